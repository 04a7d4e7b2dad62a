"""OpenHTF's examples/phase_groups.py and checkpoints.py as one sequencer product.

``sequencer run phase_groups.py --bench 1``: every phase in list order
(``sequential=True``, OpenHTF's flow); the rail out of range FAILs its phase
and the run goes on; the inner group's teardown runs before the outer
group's, and both before what comes after the group; the checkpoint then
stops the run, so the long burn-in never starts on a failed unit.
"""

from sequencer import Measurement, PhaseGroup, Product, checkpoint, phase


@phase
async def setup_phase(ctx):
    ctx.log.info("Setup in a group.")


@phase
async def main_phase(ctx):
    ctx.log.info("This is a main phase.")


@phase(measurements=[Measurement("rail", units="V").in_range(3.2, 3.4)])
async def failing_phase(ctx):
    ctx.measurements.rail = 3.6  # out of range: this phase FAILs, the run goes on


@phase
async def inner_main_phase(ctx):
    ctx.log.info("Inner main phase.")


@phase
async def inner_teardown_phase(ctx):
    ctx.log.info("Inner teardown phase.")


@phase
async def teardown_phase(ctx):
    ctx.log.info("Teardown phase.")


@phase
async def long_running_phase(ctx):
    ctx.log.info("A burn-in that a failed unit does not need.")


inner = PhaseGroup("inner", main=[inner_main_phase], teardown=[inner_teardown_phase])
outer = PhaseGroup("outer", setup=[setup_phase], main=[main_phase, failing_phase, inner], teardown=[teardown_phase])

product = Product("phase-groups", [outer, checkpoint(), long_running_phase], sequential=True)
