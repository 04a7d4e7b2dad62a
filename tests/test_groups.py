"""Ordering and groups: ``follows``, ``sequential``, ``PhaseGroup``, ``FAIL_GROUP`` and checkpoints.

The group tests port OpenHTF's ``examples/phase_groups.py`` (each ``run_*``
there is a test here) and its subtests (``FAIL_SUBTEST``); the checkpoint
test ports ``examples/checkpoints.py``. OpenHTF runs every phase in order, so
the ports are sequential products; OpenHTF's terminal ERROR is ``STOP`` here.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from reports.storage.store import LocalStore
from sequencer import Measurement, PhaseGroup, PhaseResult, Product, checkpoint, phase
from sequencer.engine import RunSettings, SlotControl, run_dut
from sequencer.events import EventBus
from sequencer.fixtures import SlotInfo
from sequencer.product import LoadedProduct, ProductError, layers, validate_product
from sequencer.records import Outcome, RunRecord
from tests.conftest import outcomes, run_product


def ran(run: RunRecord) -> list[tuple[str, str]]:
    """The phases in the order they were recorded, with their outcomes."""
    return [(p.name, p.outcome.value) for p in run.phases]


def logged(name: str) -> object:
    async def log(ctx) -> None:
        ctx.log.info(name)

    return phase(log, name=name)


def stops(name: str) -> object:
    async def stop() -> PhaseResult:
        return PhaseResult.STOP

    return phase(stop, name=name)


# -- OpenHTF's examples/phase_groups.py -------------------------------------------------------


async def test_a_basic_group_runs_setup_main_teardown(store_path: Path) -> None:
    group = PhaseGroup("g", setup=[logged("setup_phase")], main=[logged("main_phase")],
                       teardown=[logged("teardown_phase")])
    [run] = await run_product(Product("basic", [group], sequential=True), store_path)
    assert ran(run) == [("setup_phase", "PASS"), ("main_phase", "PASS"), ("teardown_phase", "PASS")]
    assert run.outcome is Outcome.PASS
    assert run.phase("teardown_phase").teardown  # a group's teardown phases are teardowns


async def test_a_setup_that_stops_leaves_the_group_unentered(store_path: Path) -> None:
    group = PhaseGroup("g", setup=[stops("error_setup_phase")], main=[logged("main_phase")],
                       teardown=[logged("teardown_phase")])
    [run] = await run_product(Product("setup-error", [group], sequential=True), store_path)
    assert ran(run) == [("error_setup_phase", "FAIL"), ("main_phase", "SKIPPED"), ("teardown_phase", "SKIPPED")]
    assert run.phase("teardown_phase").reason == "group 'g' not entered: setup phase 'error_setup_phase' ended FAIL"
    assert run.outcome is Outcome.FAIL


async def test_a_main_phase_that_stops_skips_the_rest_and_the_teardown_runs(store_path: Path) -> None:
    group = PhaseGroup("g", setup=[logged("setup_phase")], main=[stops("error_main_phase"), logged("main_phase")],
                       teardown=[logged("teardown_phase")])
    [run] = await run_product(Product("main-error", [group], sequential=True), store_path)
    assert ran(run) == [("setup_phase", "PASS"), ("error_main_phase", "FAIL"), ("main_phase", "SKIPPED"),
                        ("teardown_phase", "PASS")]
    assert run.phase("main_phase").reason == "run stopped by phase 'error_main_phase'"


async def test_nested_groups_run_inner_teardown_before_outer(store_path: Path) -> None:
    inner = PhaseGroup("inner", main=[logged("inner_main_phase")], teardown=[logged("inner_teardown_phase")])
    outer = PhaseGroup("outer", main=[logged("main_phase"), inner], teardown=[logged("teardown_phase")])
    [run] = await run_product(Product("nested", [outer], sequential=True), store_path)
    assert [name for name, _ in ran(run)] == ["main_phase", "inner_main_phase", "inner_teardown_phase",
                                              "teardown_phase"]


async def test_an_error_in_a_nested_group_runs_both_teardowns(store_path: Path) -> None:
    inner = PhaseGroup("inner", main=[stops("error_main_phase"), logged("main_phase")],
                       teardown=[logged("inner_teardown_phase")])
    outer = PhaseGroup("outer", main=[inner, logged("main_phase_2")], teardown=[logged("teardown_phase")])
    [run] = await run_product(Product("nested-error", [outer], sequential=True), store_path)
    assert ran(run) == [("error_main_phase", "FAIL"), ("main_phase", "SKIPPED"), ("inner_teardown_phase", "PASS"),
                        ("main_phase_2", "SKIPPED"), ("teardown_phase", "PASS")]


async def test_a_group_never_reached_is_skipped_teardown_and_all(store_path: Path) -> None:
    inner = PhaseGroup("inner", main=[logged("main_phase")], teardown=[logged("inner_teardown_phase")])
    outer = PhaseGroup("outer", main=[stops("error_main_phase"), inner, logged("main_phase_2")],
                       teardown=[logged("teardown_phase")])
    [run] = await run_product(Product("unentered", [outer], sequential=True), store_path)
    assert ran(run) == [("error_main_phase", "FAIL"), ("main_phase", "SKIPPED"), ("inner_teardown_phase", "SKIPPED"),
                        ("main_phase_2", "SKIPPED"), ("teardown_phase", "PASS")]
    assert run.phase("inner_teardown_phase").reason == "group 'inner' was not entered"


# -- what OpenHTF users expect of subtests, and more ---------------------------------------------


async def test_fail_group_is_a_failed_subtest_the_run_goes_on(store_path: Path) -> None:
    # OpenHTF: Subtest('radio', fails_subtest, never_runs); FAIL_SUBTEST skips the rest of the subtest.
    @phase
    async def fails_subtest() -> PhaseResult:
        return PhaseResult.FAIL_GROUP

    subtest = PhaseGroup("radio", main=[fails_subtest, logged("never_runs")], teardown=[logged("radio_off")])
    [run] = await run_product(Product("subtests", [subtest, logged("after_subtest")], sequential=True), store_path)
    assert ran(run) == [("fails_subtest", "FAIL"), ("never_runs", "SKIPPED"), ("radio_off", "PASS"),
                        ("after_subtest", "PASS")]
    assert run.phase("fails_subtest").reason == "failed by the phase: group 'radio' stops"
    assert run.phase("never_runs").reason == "group 'radio' stopped by phase 'fails_subtest'"
    assert run.outcome is Outcome.FAIL


async def test_fail_group_outside_any_group_stops_the_run(store_path: Path) -> None:
    @phase
    async def fails_subtest() -> PhaseResult:
        return PhaseResult.FAIL_GROUP

    [run] = await run_product(Product("p", [fails_subtest, logged("later")], sequential=True), store_path)
    assert ran(run) == [("fails_subtest", "FAIL"), ("later", "SKIPPED")]
    assert run.phase("later").reason == "run stopped by phase 'fails_subtest'"


async def test_a_group_stops_on_its_first_failure_and_the_run_goes_on(store_path: Path) -> None:
    @phase(measurements=[Measurement("v").in_range(0, 1)])
    async def out_of_range(ctx) -> None:
        await trio.sleep(0.05)  # slow_sibling is under way by then
        ctx.measurements.v = 2

    @phase(timeout=5)
    async def slow_sibling() -> None:
        await trio.sleep(30)

    # Not sequential: out_of_range and slow_sibling run at once; the failure cuts the sibling short.
    group = PhaseGroup("rails", setup=[logged("power_on")], main=[out_of_range, slow_sibling],
                       teardown=[logged("power_off")], stop_on_failure=True)
    after_group = logged("after_group").configured(follows=["rails"])  # the group: its teardown included
    start = trio.current_time()
    [run] = await run_product(Product("p", [group, after_group]), store_path)
    assert trio.current_time() - start < 5
    assert outcomes(run) == {"power_on": "PASS", "out_of_range": "FAIL", "slow_sibling": "ABORTED",
                             "power_off": "PASS", "after_group": "PASS"}
    assert run.phase("slow_sibling").reason == "group 'rails' stopped: phase 'out_of_range' ended FAIL"
    assert run.outcome is Outcome.FAIL  # the phase's failure, not ABORTED: nobody aborted the run


async def test_a_groups_teardown_runs_before_what_comes_after_the_group(store_path: Path) -> None:
    group = PhaseGroup("g", main=[logged("a"), logged("b")], teardown=[logged("td1"), logged("td2")])
    [run] = await run_product(Product("p", [logged("first"), group, logged("last")], sequential=True), store_path)
    assert [name for name, _ in ran(run)] == ["first", "a", "b", "td1", "td2", "last"]


async def test_a_setup_that_skips_itself_still_enters_the_group(store_path: Path) -> None:
    @phase(run_if=lambda record: False)
    async def optional_setup() -> None:
        pass

    group = PhaseGroup("g", setup=[optional_setup], main=[logged("main_phase")], teardown=[logged("td")])
    [run] = await run_product(Product("p", [group], sequential=True), store_path)
    assert ran(run) == [("optional_setup", "SKIPPED"), ("main_phase", "PASS"), ("td", "PASS")]


async def test_an_abort_runs_the_teardowns_of_entered_groups_innermost_first(store_path: Path) -> None:
    @phase
    async def long_one() -> None:
        await trio.sleep(30)

    @phase(teardown=True)
    async def product_teardown() -> None:
        pass

    inner = PhaseGroup("inner", main=[long_one], teardown=[logged("inner_td")])
    outer = PhaseGroup("outer", main=[logged("first"), inner, logged("never")], teardown=[logged("outer_td")])
    unentered = PhaseGroup("later", main=[logged("later_main")], teardown=[logged("later_td")])
    product = Product("p", [outer, unentered, product_teardown], sequential=True)
    run = await _aborted_after(product, store_path, 0.2)
    assert run.outcome is Outcome.ABORTED
    assert ran(run) == [("first", "PASS"), ("long_one", "ABORTED"), ("never", "SKIPPED"), ("later_main", "SKIPPED"),
                        ("inner_td", "PASS"), ("outer_td", "PASS"), ("later_td", "SKIPPED"),
                        ("product_teardown", "PASS")]


async def test_a_groups_teardown_in_progress_finishes_through_an_abort(store_path: Path) -> None:
    @phase
    async def slow_teardown() -> None:
        await trio.sleep(0.3)

    group = PhaseGroup("g", main=[logged("work")], teardown=[slow_teardown])
    product = Product("p", [group, logged("after")], sequential=True)
    run = await _aborted_after(product, store_path, 0.1)
    assert ran(run) == [("work", "PASS"), ("slow_teardown", "PASS"), ("after", "SKIPPED")]


async def _aborted_after(product: Product, store_path: Path, seconds: float) -> RunRecord:
    validate_product(product)
    store = LocalStore.open(store_path, station=True)
    control = SlotControl()
    result: list[RunRecord] = []
    try:
        async with store.writer():
            async with trio.open_nursery() as nursery:
                async def go() -> None:
                    result.append(await run_dut(LoadedProduct(product, Path("x")), SlotInfo(0, "/dev/x", "st"),
                                                settings=RunSettings("st"), store=store, bus=EventBus(),
                                                control=control))

                nursery.start_soon(go)
                await trio.sleep(seconds)
                control.abort()
    finally:
        store.close()
    return result[0]


# -- follows and sequential ------------------------------------------------------------------


async def test_follows_runs_after_whatever_the_outcome_and_after_still_needs_a_pass(store_path: Path) -> None:
    @phase
    async def fails() -> PhaseResult:
        await trio.sleep(0.02)
        return PhaseResult.FAIL

    @phase(follows=[fails])
    async def cleanup(ctx) -> None:
        ctx.log.info("saw", outcome=ctx.record.phase("fails").outcome.value)

    @phase(after=[fails])
    async def needs_a_pass() -> None:
        pass

    [run] = await run_product(Product("p", [fails, cleanup, needs_a_pass]), store_path)
    assert outcomes(run) == {"fails": "FAIL", "cleanup": "PASS", "needs_a_pass": "SKIPPED"}
    assert run.phase("cleanup").logs[0].message == "saw outcome='FAIL'"


async def test_a_sequential_product_runs_in_list_order_and_keeps_going_after_a_failure(store_path: Path) -> None:
    order: list[str] = []

    def step(name: str, sleep: float, fail: bool = False) -> object:
        async def run_step() -> PhaseResult | None:
            await trio.sleep(sleep)  # later phases are quicker: only the order makes them wait
            order.append(name)
            return PhaseResult.FAIL if fail else None

        return phase(run_step, name=name)

    product = Product("p", [step("a", 0.03), step("b", 0.02, fail=True), step("c", 0.01)], sequential=True)
    [run] = await run_product(product, store_path)
    assert order == ["a", "b", "c"]
    assert ran(run) == [("a", "PASS"), ("b", "FAIL"), ("c", "PASS")]
    assert layers(product) == [["a"], ["b"], ["c"]]


async def test_after_in_a_sequential_product_adds_a_must_pass(store_path: Path) -> None:
    @phase
    async def fails() -> PhaseResult:
        return PhaseResult.FAIL

    @phase(after=[fails])
    async def needs_it() -> None:
        pass

    [run] = await run_product(Product("p", [fails, logged("middle"), needs_it], sequential=True), store_path)
    assert ran(run) == [("fails", "FAIL"), ("middle", "PASS"), ("needs_it", "SKIPPED")]


async def test_a_checkpoint_stops_the_run_after_a_failure(store_path: Path) -> None:
    # OpenHTF's examples/checkpoints.py.
    @phase(measurements=[Measurement("fixed_time", units="s").in_range(0, 10)])
    async def failing_phase(ctx) -> None:
        ctx.measurements.fixed_time = 20

    @phase
    async def long_running_phase() -> None:
        raise AssertionError("a checkpoint stands before it")

    product = Product("checkpoints", [logged("hello_phase"), failing_phase, logged("lots_of_measurements"),
                                      checkpoint(), long_running_phase], sequential=True)
    [run] = await run_product(product, store_path)
    assert ran(run) == [("hello_phase", "PASS"), ("failing_phase", "FAIL"), ("lots_of_measurements", "PASS"),
                        ("checkpoint", "FAIL"), ("long_running_phase", "SKIPPED")]
    assert run.phase("long_running_phase").reason == "run stopped by phase 'checkpoint'"
    assert run.phase("checkpoint").logs[0].message == "checkpoint: earlier phases failed phases='failing_phase'"


async def test_a_checkpoint_passes_when_nothing_failed(store_path: Path) -> None:
    product = Product("p", [logged("a"), checkpoint("gate"), logged("b")], sequential=True)
    [run] = await run_product(product, store_path)
    assert ran(run) == [("a", "PASS"), ("gate", "PASS"), ("b", "PASS")]


# -- mistakes -----------------------------------------------------------------------------------


def test_graph_mistakes_with_groups_are_one_line_naming_the_place() -> None:
    a, b = logged("a"), logged("b")
    cases = [
        (Product("p", [a, PhaseGroup("g", main=[a])]), "phase 'a': the name is used twice"),
        (Product("p", [PhaseGroup("g", main=[a]), PhaseGroup("g", main=[b])]), "group 'g': the name is used twice"),
        (Product("p", [PhaseGroup("a", main=[a])]), "group 'a': a phase has the same name"),
        (Product("p", [logged("x").configured(follows=["nope"])]), "phase 'x': depends on unknown phase 'nope'"),
        (Product("p", [PhaseGroup("g", main=[a], teardown=[b]), logged("x").configured(after=["b"])]),
         "phase 'x': a main phase cannot depend on 'b'; teardowns run after every main phase"),
        (Product("p", [a, b.configured(after=["c"]), logged("c")], sequential=True),
         "phase 'b': dependency cycle b -> c -> b ('c' comes after 'b' by the order of a sequential list or of its "
         "group)"),
    ]
    for product, message in cases:
        with pytest.raises(ProductError) as info:
            validate_product(product, source="p.py")
        assert str(info.value) == f"p.py: {message}"


def test_a_group_refuses_what_it_cannot_hold() -> None:
    @phase(teardown=True)
    async def td() -> None:
        pass

    with pytest.raises(ValueError, match="group 'g': phase 'td' is a teardown: give it in teardown=\\[...\\]"):
        PhaseGroup("g", main=[td])
    with pytest.raises(TypeError, match="group 'g': setup takes phases"):
        PhaseGroup("g", setup=[PhaseGroup("h", main=[logged("a")])])
    with pytest.raises(ValueError, match="group 'g': has no phases"):
        PhaseGroup("g")
    with pytest.raises(ValueError, match="group 'a b': name must"):
        PhaseGroup("a b", main=[logged("a")])


def test_check_shows_the_order_and_the_groups(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from sequencer.cli import main

    product = tmp_path / "jig.py"
    product.write_text(
        "from sequencer import PhaseGroup, Product, checkpoint, phase\n"
        "@phase\nasync def supply_on(): pass\n"
        "@phase\nasync def rails(): pass\n"
        "@phase\nasync def supply_off(): pass\n"
        "@phase(follows=['psu'])\nasync def report(): pass\n"
        "psu = PhaseGroup('psu', setup=[supply_on], main=[rails], teardown=[supply_off], stop_on_failure=True)\n"
        "product = Product('jig', [psu, checkpoint(), report], sequential=True)\n"
    )
    assert main(["check", str(product)]) == 0
    out = capsys.readouterr().out
    assert "sequential: each phase follows the one before, whatever its outcome" in out
    assert "group psu: setup supply_on; teardown supply_off; stops on its first failure" in out
    assert "    supply_off  (teardown of group psu; timeout 30 s)" in out
    assert "    report  (follows psu)" in out
    layered = out[out.index("layer 0"):]
    assert layered.index("supply_on") < layered.index("rails") < layered.index("supply_off") \
        < layered.index("checkpoint") < layered.index("report")
