"""A product for the MongoDB tests: identity with MAC and IMEI, measurements, tunable pace.

``MONGO_WIDGET_PHASE_S`` (seconds, default 0) is how long each of the six
``step`` phases takes, so a test can keep runs open long enough to kill the
station in the middle of a batch. ``MONGO_WIDGET_QUICK_SLOTS`` (slot numbers,
comma-separated) take no time at all: their runs end while the others are open.
"""

import os

import trio

from sequencer import Measurement, Product, phase

PHASE_S = float(os.environ.get("MONGO_WIDGET_PHASE_S", "0"))
QUICK_SLOTS = {int(n) for n in os.environ.get("MONGO_WIDGET_QUICK_SLOTS", "").split(",") if n.strip()}


@phase(measurements=[Measurement("slot_index")])
async def identify(ctx, slot):
    n = slot.index
    ctx.identify(serial=f"MW{n:05d}", mac=f"02:00:00:00:{n // 256:02x}:{n % 256:02x}", imei=f"35000000000{n:04d}")
    ctx.measurements.slot_index = n


def _step(i):
    @phase(name=f"step{i}", measurements=[Measurement("vdd", units="V").in_range(3.0, 3.6)])
    async def step(ctx, slot):
        await trio.sleep(0 if slot.index in QUICK_SLOTS else PHASE_S)
        ctx.measurements.vdd = 3.3 + slot.index * 1e-4 + i * 1e-3

    return step


steps = []
for _i in range(6):
    steps.append(_step(_i).depends_on(steps[-1] if steps else identify))

product = Product("mongo-widget", [identify, *steps], version="1.0")
