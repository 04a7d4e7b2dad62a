"""The operator's view: slot lines follow events; plain mode prints failures and outcomes."""

from __future__ import annotations

import io
import math
import re
from typing import Any

import attrs
import pytest
import trio
from rich.console import Console

from sequencer.display import REDRAW_S, TYPING_REDRAW_S, StationDisplay, _draw_live, station_summary
from sequencer.events import DutIdentified, PhaseFinished, PhaseProgress, PhaseStarted, RunFinished, RunStarted
from sequencer.operator import OperatorDesk, Question
from sequencer.records import Outcome
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


def test_station_summary_names_the_first_failure() -> None:
    runs = [sensor_run(slot=0), sensor_run(slot=1, fail_rf=True)]
    console = Console(width=200, record=True)
    console.print(station_summary(runs))
    text = console.export_text()
    failed = next(p for p in runs[1].phases if p.outcome.is_failure)
    assert failed.name in text and "PASS" in text and runs[1].outcome.value in text
    assert f"{failed.name}: {failed.reason}" in text  # the reason in full, under the table


def test_station_summary_keeps_one_line_per_slot_at_80_columns() -> None:
    import attrs

    long_reason = "ProtocolError: /dev/ttyUSB1: line longer than 1024 bytes: b'dump 0123456789abcdef' (4095 bytes)"
    failing = sensor_run(slot=1, fail_rf=True)
    phases = tuple(attrs.evolve(p, reason=long_reason) if p.outcome.is_failure else p for p in failing.phases)
    runs = [sensor_run(slot=0), attrs.evolve(failing, phases=phases), sensor_run(slot=2)]
    console = Console(width=80, record=True)
    console.print(station_summary(runs))
    lines = console.export_text().splitlines()
    rows = [ln for ln in lines if ln.startswith("│")]
    assert len(rows) == len(runs)  # one row per slot: nothing wrapped
    assert all(len(ln) <= 80 for ln in lines)
    below = " ".join(ln.strip() for ln in lines[lines.index(next(ln for ln in lines if ln.startswith("└"))) + 1:])
    assert long_reason in below  # wrapped at the full width, every word kept


def test_what_a_dut_sends_is_shown_as_sent_never_read_as_markup() -> None:
    # A serial is whatever the DUT answered; "[/x]" read as rich markup
    # raised MarkupError and took the display, and the station, down.
    serial, port = "[/x][bold]SN1", "/dev/[red]tty"
    run = attrs.evolve(sensor_run(serial, slot=0), port=port)
    display = StationDisplay([port], phases_per_run=len(run.phases))
    display.apply(RunStarted(run))
    display.apply(DutIdentified(run.run_id, 0, {"serial": serial}))
    display.apply(PhaseStarted(run.run_id, 0, "[/phase]", 1))
    console = Console(width=200, record=True, color_system=None)
    console.print(display.table())
    console.print(station_summary([run]))
    text = console.export_text()
    assert text.count(serial) == 2 and text.count(port) == 2 and "[/phase]" in text


def test_control_characters_from_a_record_are_shown_escaped_never_sent() -> None:
    # The serial link refuses such lines, but the display must not rely on
    # every path to it doing so: an escape sequence printed raw clears the
    # operator's screen or retitles the window.
    serial = "SN\x1b[2J\x1b]0;owned\x07"
    run = sensor_run(serial, slot=0, fail_rf=True)
    failing = next(p for p in run.phases if p.outcome.is_failure)
    run = attrs.evolve(run, phases=tuple(
        attrs.evolve(p, reason="bad\r\nline \x1b[31mred") if p is failing else p for p in run.phases))
    display = StationDisplay([run.port], phases_per_run=len(run.phases))
    display.apply(RunStarted(run))
    display.apply(DutIdentified(run.run_id, 0, {"serial": serial}))
    printed = [line for p in run.phases if (line := display.apply(PhaseFinished(run.run_id, 0, p)))]
    printed.append(display.apply(RunFinished(run)))
    console = Console(width=200, record=True, color_system=None)
    console.print(display.table())
    console.print(station_summary([run]))
    shown = console.export_text() + "\n".join(printed)
    assert "\x1b" not in shown and "\x07" not in shown and "\r" not in shown
    assert shown.count("SN\\x1b[2J\\x1b]0;owned\\x07") == 4  # table, summary, failure line, final line
    assert "bad\\r\\nline \\x1b[31mred" in shown


def _rendered(display: StationDisplay, width: int, height: int) -> list[str]:
    console = Console(width=width, height=height, record=True, color_system=None)
    console.print(display.render(width, height))
    return console.export_text().rstrip("\n").splitlines()


def _finish(display: StationDisplay, slot: int, outcome: Outcome) -> None:
    run = attrs.evolve(sensor_run(f"SN{slot:09d}", slot=slot), outcome=outcome)
    display.apply(DutIdentified(run.run_id, slot, {"serial": f"SN{slot:09d}"}))
    display.apply(RunFinished(run))


def test_a_few_slots_get_a_row_each_under_the_counts() -> None:
    display = StationDisplay([f"/dev/ttyUSB{i}" for i in range(8)], phases_per_run=10)
    _finish(display, 2, Outcome.FAIL)
    _finish(display, 3, Outcome.PASS)
    lines = _rendered(display, 100, 30)
    assert lines[0] == "8 slot(s): 6 running · 1 passed · 1 failed · 0 error, timeout or aborted"
    assert sum("/dev/ttyUSB" in line for line in lines) == 8


def test_more_slots_than_rows_go_side_by_side_and_none_is_cut_off() -> None:
    # 40 slots in a 30-line terminal: a row each would hide slots 26..39 for the whole run
    display = StationDisplay([f"/dev/pts/{i}" for i in range(40)], phases_per_run=10)
    _finish(display, 39, Outcome.FAIL)
    lines = _rendered(display, 100, 30)
    assert len(lines) <= 29
    text = "\n".join(lines)
    for i in range(39):
        assert f"/dev/pts/{i} " in text
    assert re.search(r"\b39 SN000000039 +FAIL", text)


def test_slots_that_do_not_fit_at_all_show_failures_first_and_count_the_rest() -> None:
    display = StationDisplay([f"/dev/pts/{i}" for i in range(256)], phases_per_run=10)
    for i in range(200):
        _finish(display, i, Outcome.PASS)
    for i in (7, 250):
        _finish(display, i, Outcome.FAIL)
    lines = _rendered(display, 80, 24)
    assert len(lines) <= 23
    assert lines[0] == "256 slot(s): 55 running · 199 passed · 2 failed · 0 error, timeout or aborted"
    cells = re.findall(r"\b(\d+) (?:SN\d+|/dev/pts/\d+) +(FAIL|PASS|waiting \d+/\d+)", "\n".join(lines[1:-1]))
    # two columns of 20: the failures, then running slots; no passed slot while a running one is hidden
    assert len(cells) == 40
    assert {int(i) for i, state in cells if state == "FAIL"} == {7, 250}
    assert all(state.startswith("waiting") for _, state in cells if state != "FAIL")
    assert lines[-1] == "… 216 more slot(s) not shown: 199 passed, 17 running, 0 other"


def test_a_long_progress_detail_never_takes_a_slot_a_second_line() -> None:
    # A wrapped cell made the table taller than render() had room for.
    display = StationDisplay([f"/dev/ttyUSB{i}" for i in range(8)], phases_per_run=10)
    for i in range(8):
        display.apply(PhaseStarted(f"run{i}", i, "flash", 1))
        display.apply(PhaseProgress(f"run{i}", i, "flash", 0.42, "esp32-sensor-testfw.bin 58 KiB/s " * 3))
    lines = _rendered(display, 80, 30)
    assert len(lines) == 1 + 4 + 8  # the counts, the table's rules and heading, a line per slot
    assert sum("/dev/ttyUSB" in line for line in lines) == 8


BY_ID = "/dev/serial/by-id/usb-Silicon_Labs_CP2102N_USB_to_UART_Bridge_Controller_7c1a2f{:02d}-if00-port0"


def test_long_port_paths_give_way_to_the_slot_serial_and_outcome() -> None:
    ports = [BY_ID.format(i) for i in range(3)]
    display = StationDisplay(ports, phases_per_run=10)
    for i in range(3):
        _finish(display, i, Outcome.PASS if i != 1 else Outcome.FAIL)
    lines = _rendered(display, 100, 30)
    for i in range(3):
        row = next(line for line in lines if f"SN{i:09d}" in line)
        assert ("PASS" if i != 1 else "FAIL") in row and f"7c1a2f{i:02d}-if00-port0" in row  # the end that differs
    assert all(len(line) <= 100 for line in lines)
    runs = [attrs.evolve(sensor_run(f"SN{i:09d}", slot=i), port=ports[i]) for i in range(3)]
    console = Console(width=80, record=True, color_system=None)
    console.print(station_summary(runs))
    summary = console.export_text().splitlines()
    for r in runs:
        row = next(line for line in summary if r.serial in line and line.startswith("│"))
        assert r.outcome.value in row and row.split("│")[1].strip() == str(r.slot)


# -- the live view's redraws -----------------------------------------------------


class _Drawn:
    """A view for ``_draw_live`` that notes when it was drawn and what slot 0 showed."""

    def __init__(self, display: StationDisplay) -> None:
        self.display = display
        self.at: list[float] = []
        self.details: list[str] = []

    def __call__(self) -> Any:
        self.at.append(trio.current_time())
        self.details.append(self.display.slots[0].detail)
        return self.display.render(120, 40)


async def _live(display: StationDisplay, send: Any, receive: Any, desk: OperatorDesk | None = None) -> _Drawn:
    drawn = _Drawn(display)
    console = Console(file=io.StringIO(), force_terminal=True, width=120, height=40)
    await _draw_live(display, receive, console, drawn, desk)
    return drawn


async def test_a_stream_of_events_is_drawn_a_few_times_a_second_and_its_end_is_drawn(autojump_clock: Any) -> None:
    display = StationDisplay([f"/dev/ttyUSB{i}" for i in range(64)], phases_per_run=10)
    send, receive = trio.open_memory_channel[Any](math.inf)
    result: list[_Drawn] = []

    async def feed() -> None:
        async with send:
            for i in range(1000):  # a second of progress events, one a millisecond
                await send.send(PhaseProgress("r0", 0, "flash", i / 1000, f"step {i}"))
                await trio.sleep(0.001)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(feed)
        result.append(await _live(display, send, receive))
    drawn = result[0]
    gaps = [b - a for a, b in zip(drawn.at[1:-1], drawn.at[2:-1])]
    # One draw on start, about five a second while events flow, one at the end.
    assert 1 / REDRAW_S <= len(drawn.at) <= 1 / REDRAW_S + 3, drawn.at
    assert all(gap >= REDRAW_S - 1e-9 for gap in gaps), gaps
    assert drawn.details[-1].endswith("step 999")  # nothing applied is left undrawn


async def test_an_event_after_a_quiet_spell_is_drawn_at_once(autojump_clock: Any) -> None:
    display = StationDisplay(["/dev/ttyUSB0"], phases_per_run=3)
    send, receive = trio.open_memory_channel[Any](math.inf)
    result: list[_Drawn] = []

    async def feed() -> None:
        async with send:
            await trio.sleep(5)
            await send.send(PhaseStarted("r0", 0, "boot", 1))
            await trio.sleep(5)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(feed)
        result.append(await _live(display, send, receive))
    drawn = result[0]
    # Drawn on start, the moment the event came (not up to a redraw interval later), and at the end.
    assert drawn.at[1] - drawn.at[0] == pytest.approx(5)
    assert len(drawn.at) == 3


async def test_what_the_operator_types_is_redrawn_within_a_few_hundredths(autojump_clock: Any) -> None:
    display = StationDisplay(["/dev/ttyUSB0"], phases_per_run=3)
    send, receive = trio.open_memory_channel[Any](math.inf)
    desk = OperatorDesk()
    question = Question(slot=0, port="/dev/ttyUSB0", serial="SN1", text="LED green?", choices=("yes", "no"))
    typed_at: list[float] = []
    result: list[_Drawn] = []

    async def operator() -> None:
        async with send:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(desk.ask, question)
                await trio.sleep(1)
                for draft in ("y", "ye", "yes"):
                    desk.type(draft)
                    typed_at.append(trio.current_time())
                    await trio.sleep(0.1)
                desk.answer("yes")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(operator)
        result.append(await _live(display, send, receive, desk))
    drawn = result[0]
    for t in typed_at:
        assert any(t <= at <= t + TYPING_REDRAW_S + 1e-9 for at in drawn.at), (t, drawn.at)
