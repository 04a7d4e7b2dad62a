"""The product the portal benchmark's station runs: ten phases of 1.5 s, so the line board has steps to show."""

import trio

from sequencer import Product, phase


def _step(i: int):  # type: ignore[no-untyped-def]
    @phase(name=f"p{i:02d}")
    async def step(ctx, slot):  # type: ignore[no-untyped-def]
        if i == 0:
            ctx.identify(serial=f"BENCH{slot.index:03d}-{ctx.record.run_id[:6]}")
        await trio.sleep(1.5)

    return step


_phases = [_step(0)]
for _i in range(1, 10):
    _phases.append(_step(_i).depends_on(_phases[-1]))

product = Product("portal-bench", _phases, version="1")
