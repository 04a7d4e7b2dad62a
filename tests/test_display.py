"""The operator's view: slot lines follow events; plain mode prints failures and outcomes."""

from __future__ import annotations

from rich.console import Console

from sequencer.display import StationDisplay, summary_table
from sequencer.events import DutIdentified, PhaseFinished, PhaseProgress, PhaseStarted, RunFinished, RunStarted
from tests.records_factory import sensor_run


def test_slot_view_follows_events() -> None:
    run = sensor_run(slot=1)
    display = StationDisplay(["/dev/ttyUSB0", "/dev/ttyUSB1"], phases_per_run=len(run.phases))
    assert display.apply(RunStarted(run)) is None
    display.apply(DutIdentified(run.run_id, 1, {"serial": "SN000000042"}))
    display.apply(PhaseStarted(run.run_id, 1, "flash", 2))
    display.apply(PhaseProgress(run.run_id, 1, "flash", 0.5, "app"))
    view = display.slots[1]
    assert (view.serial, view.phase, view.detail) == ("SN000000042", "flash (attempt 2)", " 50% app")
    for p in run.phases:
        display.apply(PhaseFinished(run.run_id, 1, p))
    line = display.apply(RunFinished(run))
    assert view.done == len(run.phases) and view.outcome is run.outcome
    assert line == f"slot 1 /dev/ttyUSB1 SN000000042: {run.outcome.value}" + (" (marginal)" if run.marginal else "")
    assert display.slots[0].phase == "waiting"


def test_failed_phase_is_printed_once_with_its_reason() -> None:
    run = sensor_run(slot=0, fail_rf=True)
    display = StationDisplay(["/dev/ttyUSB0"], phases_per_run=len(run.phases))
    lines = [display.apply(PhaseFinished(run.run_id, 0, p)) for p in run.phases]
    printed = [line for line in lines if line]
    failed = [p for p in run.phases if p.outcome.is_failure]
    assert failed and len(printed) == 1
    assert f"{failed[0].name} {failed[0].outcome.value}: {failed[0].reason}" in printed[0]


def test_summary_table_names_the_first_failure() -> None:
    runs = [sensor_run(slot=0), sensor_run(slot=1, fail_rf=True)]
    console = Console(width=200, record=True)
    console.print(summary_table(runs))
    text = console.export_text()
    failed = next(p for p in runs[1].phases if p.outcome.is_failure)
    assert failed.name in text and "PASS" in text and runs[1].outcome.value in text
