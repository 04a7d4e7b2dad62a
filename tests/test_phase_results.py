"""What each PhaseResult does to its phase and to the run's verdict, everywhere the verdict is read.

OpenHTF's semantics are the reference (``openhtf/core/phase_executor.py`` and
``test_state.py``): SKIP and REPEAT leave a phase's measurements unjudged,
STOP ends the test FAIL, and a phase asking to repeat past its limit stops
the test.
"""

from __future__ import annotations

from pathlib import Path

import trio

from reports.render.export import export_tables, plain
from reports.render.html import render_batch, render_run
from reports.storage.mongo import MongoSettings
from reports.quality.yields import measurement_failures, phase_failures
from sequencer import Measurement, PhaseResult, Product, phase
from sequencer.records import MeasurementOutcome, Outcome
from tests.conftest import outcomes, run_product
from tests.mongo_support import database


def _skipping_product() -> Product:
    @phase(measurements=[Measurement("v", units="V").in_range(0, 10)])
    async def measures_then_skips(ctx) -> PhaseResult:
        ctx.measurements.v = 99
        return PhaseResult.SKIP

    @phase(measurements=[Measurement("w").in_range(0, 10)])
    async def fine(ctx) -> None:
        ctx.measurements.w = 5

    return Product("skipping", [measures_then_skips, fine])


async def test_skip_leaves_the_measurements_unjudged_in_the_record(store_path: Path) -> None:
    [run] = await run_product(_skipping_product(), store_path)
    assert run.outcome is Outcome.PASS
    skipped = run.phase("measures_then_skips")
    assert (skipped.outcome, skipped.reason) == (Outcome.SKIPPED, "skipped by the phase")
    [v] = skipped.measurements
    assert v.outcome is MeasurementOutcome.SKIPPED and v.value == 99  # kept, as measured
    assert v.reason == "not judged: the phase returned SKIP"
    assert skipped.attempts[-1].outcome is Outcome.SKIPPED


async def test_a_skipped_measurement_is_no_failure_in_paretos_or_exports(store_path: Path) -> None:
    runs = await run_product(_skipping_product(), store_path, slots=2)
    assert not measurement_failures(runs) and not phase_failures(runs)
    tables = export_tables(runs)
    assert tables["runs"].column("measures_then_skips.v [V]") == [99, 99]
    cell = tables["runs"].rows[0][tables["runs"].columns.index("measures_then_skips.v [V]")]
    assert getattr(cell, "mark", None) != "fail"
    measured = tables["measurements"]
    rows = [dict(zip(measured.columns, map(plain, row))) for row in measured.rows]
    assert {r["outcome"] for r in rows if r["measurement"] == "v"} == {"SKIPPED"}
    page = render_run(runs[0])
    assert '<tr class="m-skipped">' in page and "not judged: the phase returned SKIP" in page
    assert "measures_then_skips / v" not in render_batch(runs, title="B1")  # no bar in "failures by measurement"


async def test_a_skipped_measurement_is_no_failure_in_mongodb(tmp_path: Path, mongo: MongoSettings) -> None:
    from reports.storage.shipper import Shipper

    path = tmp_path / "store.sqlite"
    [run] = await run_product(_skipping_product(), path)
    shipper = await Shipper.open(path, mongo)
    try:
        await shipper.drain()
    finally:
        await shipper.aclose()
    db = database(mongo)
    try:
        assert db.runs.count_documents({"measurements": {"$elemMatch": {"outcome": "FAIL"}}}) == 0
        flat = db.runs.find_one({"_id": run.run_id})["measurements"]
        assert [(m["name"], m["outcome"]) for m in flat] == [("v", "SKIPPED"), ("w", "PASS")]
    finally:
        db.client.close()


async def test_stop_ends_the_run_fail_skips_the_rest_and_runs_teardowns(store_path: Path) -> None:
    @phase(measurements=[Measurement("x").in_range(0, 1)])
    async def halts(ctx) -> PhaseResult:
        ctx.measurements.x = 1
        return PhaseResult.STOP

    @phase(after=[halts])
    async def later() -> None:
        raise AssertionError("must not run after STOP")

    @phase(teardown=True)
    async def power_off() -> None:
        pass

    [run] = await run_product(Product("p", [halts, later, power_off]), store_path)
    assert run.outcome is Outcome.FAIL
    assert outcomes(run) == {"halts": "FAIL", "later": "SKIPPED", "power_off": "PASS"}
    assert run.phase("halts").reason == "run stopped by phase 'halts'"
    assert run.phase("later").reason == "run stopped by phase 'halts'"
    assert run.phase("halts").measurements[0].outcome is MeasurementOutcome.PASS  # judged, and fine


async def test_stop_keeps_the_phases_own_failure_as_its_reason(store_path: Path) -> None:
    @phase(measurements=[Measurement("x").in_range(0, 1)])
    async def halts(ctx) -> PhaseResult:
        ctx.measurements.x = 7
        return PhaseResult.STOP

    [run] = await run_product(Product("p", [halts]), store_path)
    assert run.outcome is Outcome.FAIL
    assert run.phase("halts").reason == "measurement 'x': 7 is above 1"


async def test_repeated_attempts_are_recorded_as_repeats_with_the_reason(store_path: Path) -> None:
    count = 0

    @phase(measurements=[Measurement("reading").in_range(0, 10)], repeat_limit=5)
    async def settles(ctx) -> PhaseResult | None:
        nonlocal count
        count += 1
        ctx.measurements.reading = 50 if count < 3 else 5
        return PhaseResult.REPEAT if count < 3 else None

    [run] = await run_product(Product("p", [settles]), store_path)
    rec = run.phase("settles")
    assert run.outcome is Outcome.PASS and rec.outcome is Outcome.PASS
    assert [a.outcome for a in rec.attempts] == [Outcome.SKIPPED, Outcome.SKIPPED, Outcome.PASS]
    assert [a.reason for a in rec.attempts] == ["repeated: the phase returned REPEAT"] * 2 + [None]
    # What a repeated attempt measured is kept, not judged (50 is out of range, yet no failure).
    assert [a.measurements[0].outcome for a in rec.attempts] == [MeasurementOutcome.SKIPPED] * 2 + [
        MeasurementOutcome.PASS]


async def test_repeating_past_the_limit_fails_the_phase_and_stops_the_run(store_path: Path) -> None:
    @phase(repeat_limit=3)
    async def forever() -> PhaseResult:
        await trio.sleep(0.01)  # slow_independent is under way by now
        return PhaseResult.REPEAT

    @phase(after=[forever])
    async def never() -> None:
        raise AssertionError("the run stopped")

    @phase
    async def slow_independent() -> None:
        await trio.sleep(5)

    @phase(teardown=True)
    async def power_off() -> None:
        pass

    [run] = await run_product(Product("p", [forever, never, slow_independent, power_off]), store_path)
    rec = run.phase("forever")
    assert rec.outcome is Outcome.FAIL and len(rec.attempts) == 3
    assert rec.reason == "repeat limit 3 reached: the phase asked to repeat on its last allowed run"
    assert outcomes(run) == {"forever": "FAIL", "slow_independent": "ABORTED", "never": "SKIPPED",
                             "power_off": "PASS"}
    assert run.phase("never").reason == "run stopped: phase 'forever' reached its repeat limit"
    assert run.outcome is Outcome.FAIL


def test_depends_on_adds_to_the_phases_own_after() -> None:
    @phase
    async def a() -> None:
        pass

    @phase
    async def b() -> None:
        pass

    @phase(after=[a])
    async def c() -> None:
        pass

    assert c.depends_on(b).after == ("a", "b")
    assert c.depends_on(a, "b").after == ("a", "b")  # once each
