"""OpenHTF's examples/repeat.py and stop_on_first_failure.py as a sequencer product.

``sequencer run repeat.py --bench 1``: ``phase_repeat`` repeats until its
reading settles; ``phase_repeat_with_limit`` asks to repeat on its fifth and
last allowed run, which FAILs it and stops the run, as in OpenHTF.
"""

from sequencer import Measurement, PhaseResult, Product, phase


@phase(measurements=[Measurement("reading").in_range(0, 10)])
async def phase_repeat(ctx):
    ctx.measurements.reading = 20 if ctx.attempt < 3 else 5
    if ctx.attempt < 3:
        return PhaseResult.REPEAT  # recorded SKIPPED, "repeated"; its 20 is kept, not judged


@phase(repeat_limit=5)
async def phase_repeat_with_limit(ctx):
    return PhaseResult.REPEAT  # never settles


@phase
async def never_reached(ctx):
    ctx.log.info("The run stopped before this phase.")


product = Product("repeat", [phase_repeat, phase_repeat_with_limit, never_reached], sequential=True)
