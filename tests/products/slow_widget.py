"""A product for end-to-end tests of the station itself: slow phases, no hardware."""

import trio

from sequencer import Measurement, Product, phase


@phase(measurements=[Measurement("slot_index")])
async def identify(ctx, slot):
    ctx.identify(serial=f"SLOW{slot.index:04d}")
    ctx.measurements.slot_index = slot.index


@phase(after=[identify], timeout=60)
async def soak(ctx):
    ctx.log.info("soaking")
    await trio.sleep(30)


@phase(after=[soak])
async def final_check(ctx):
    pass


@phase(teardown=True, timeout=5)
async def power_off(ctx):
    await trio.sleep(0.2)  # teardowns must be allowed to await after an abort
    ctx.log.info("powered off")


product = Product("slow-widget", [identify, soak, final_check, power_off], version="0.1")
