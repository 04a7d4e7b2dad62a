"""OpenHTF's examples/phase_branches.py as a sequencer product: the operator picks the branch.

OpenHTF's diagnoses and BranchSequences become ``run_if`` on the record so
far. ``sequencer run phase_branches.py --sim 1``: the simulated operator
picks the first branch and types the observation the phase declares.
"""

from sequencer import Measurement, Product, phase


@phase(measurements=[Measurement("test_branch").one_of(["prototype", "evt", "dvt"])], timeout=120)
async def select_testing_branch(ctx, operator):
    ctx.measurements.test_branch = await operator.choose("Which branch of testing?", ["prototype", "evt", "dvt"])


def branch(name):
    return lambda record: record.value("select_testing_branch", "test_branch") == name


@phase(measurements=[Measurement("observation").matches(r"[A-Za-z ]{3,40}")], timeout=120,
       run_if=branch("prototype"), sim_answer="all lights green")
async def prototype_observation(ctx, operator):
    ctx.measurements.observation = await operator.ask("Your observations?", matches=r"[A-Za-z ]{3,40}")


@phase(measurements=[Measurement("serial_on_label").matches(r"EVT-\d{4}")], timeout=120, run_if=branch("evt"))
async def evt_observation(ctx, operator):
    ctx.measurements.serial_on_label = await operator.ask("Scan the EVT label", matches=r"EVT-\d{4}")


@phase(run_if=branch("dvt"))
async def dvt_validation(ctx):
    ctx.log.info("DVT validation complete.")


product = Product("phase-branches", [select_testing_branch, prototype_observation, evt_observation, dvt_validation],
                  sequential=True)
