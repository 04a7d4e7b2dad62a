"""Scan to start: badges, work orders, slot codes, START and labels, from a keyboard wedge or a serial scanner."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import trio
import trio.testing

from fixtures.presence import open_presence
from fixtures.scanner import read_scanner
from fixtures.sim.farm import open_farm
from fixtures.sim.pty import PtyEndpoint
from fixtures.sim.scanner import SimulatedScanner
from reports.storage.store import LocalStore
from sequencer.config import ConfigError, StationConfig, load_station_config
from sequencer.continuous import run_continuous
from sequencer.control import WHO_IS_TESTING, StationControl
from sequencer.engine import RunSettings
from sequencer.events import EventBus, RunFinished, RunStarted, ScanRefused, SlotWaiting
from sequencer.keyboard import _Keys, answer_from_lines
from sequencer.operator import OperatorDesk, Question
from sequencer.product import LoadedProduct
from sequencer.records import Disposition, Outcome
from sequencer.scans import ScanConfig, ScanRules
from tests.store_support import finished_runs
from tests.test_continuous import board_product

ROOT = Path(__file__).resolve().parent.parent
SERIAL = r"SN\d{9}"


def control_for(config: ScanConfig = ScanConfig(), *, slots: int = 0, desk: OperatorDesk | None = None,
                bus: EventBus | None = None) -> tuple[StationControl, list[tuple[int, str]]]:
    stopped: list[tuple[int, str]] = []
    control = StationControl(ScanRules.of(config, SERIAL, "p"), config, RunSettings("st", batch="B0"), desk=desk,
                             bus=bus)
    if slots:
        control.attach(slots, lambda slot, by: bool(stopped.append((slot, by))) or True)
    return control, stopped


def test_what_a_scan_is_by_the_default_rules_and_by_the_station_files() -> None:
    rules = ScanRules.of(ScanConfig(), SERIAL, "p")
    assert [rules.classify(t) for t in ("OP:aoife", "wo:B2026-47", "SLOT:3", "start", "SN696100024", "yes")] == [
        ("badge", "aoife"), ("work_order", "B2026-47"), ("slot", "3"), ("start", ""), ("label", "SN696100024"),
        None]
    assert rules.classify("SN6961") is None  # not the product's serial: not a label
    assert rules.classify("STARTED") is None  # START is a code, not a prefix
    # A station's own badges (a number after a letter) and a label pattern for a product that names none.
    config = ScanConfig.from_table(badge=r"re:B(?P<value>\d{6})", serial=r"re:[A-Z]{3}-\d{4}")
    rules = ScanRules.of(config, None, "p")
    assert rules.classify("B004711") == ("badge", "004711")
    assert rules.classify("ABC-1234") == ("label", "ABC-1234")
    assert rules.classify("OP:aoife") is None


def test_the_scan_table_is_checked_key_by_key(tmp_path: Path) -> None:
    def load(table: str) -> StationConfig:
        path = tmp_path / "st.toml"
        path.write_text(f'sim = 2\ncontinuous = true\n[scan]\n{table}\n')
        return load_station_config(path)

    assert load('start = "scan"\nlabel = true\nbadge = "EMP-"').scan.rules["badge"] == "EMP-"
    with pytest.raises(ConfigError, match=r"st.toml: scan: unknown key 'labels'"):
        load("labels = true")
    with pytest.raises(ConfigError, match=r"st.toml: scan: start must be one of board, scan, got 'button'"):
        load('start = "button"')
    with pytest.raises(ConfigError, match=r"st.toml: scan: badge: '\(' is not a regular expression"):
        load('badge = "re:("')
    with pytest.raises(ConfigError, match=r"scan.label must be true or false"):
        load('label = "yes"')
    with pytest.raises(ConfigError, match=r"scan: start = \"scan\" is for continuous stations"):
        StationConfig(sim=2, scan=ScanConfig(start="scan")).check()


async def test_badges_and_work_orders_stamp_the_runs_that_start_after_them() -> None:
    bus = EventBus()
    events = bus.subscribe("test")
    control, _ = control_for(slots=2, bus=bus)
    assert control.take("OP:aoife", "keyboard")
    assert control.take("WO:W-17", "scanner /dev/ttyACM0")
    settings = await control.ready(0)  # the station starts on boards: nothing to wait for
    assert (settings.operator, settings.batch) == ("aoife", "W-17")
    assert [(s.kind, s.value, s.source) for s in settings.scans] == [
        ("badge", "aoife", "keyboard"), ("work_order", "W-17", "scanner /dev/ttyACM0")]
    # A work order that would name a folder elsewhere, and a name nobody has, change nothing.
    assert not control.take("WO:../x", "keyboard")
    assert not control.take("OP:", "keyboard")
    assert control.settings.batch == "W-17" and control.settings.operator == "aoife"
    refused = [e for e in _drain(events) if isinstance(e, ScanRefused)]
    assert [r.text for r in refused] == ["../x", ""] and "no / or" in refused[0].reason
    assert control.said.startswith("not taken: the badge scan carries no name")


async def test_a_station_that_starts_on_scans_waits_for_start_and_its_label() -> None:
    control, _ = control_for(ScanConfig(start="scan", label=True), slots=3)
    started: dict[int, RunSettings] = {}

    async def slot(index: int) -> None:
        started[index] = await control.ready(index)

    async with trio.open_nursery() as nursery:
        for i in range(3):
            nursery.start_soon(slot, i)
            await trio.testing.wait_all_tasks_blocked()
        assert control.needs(0) == "scan its label, then start it"
        # A label alone goes to the slot that has waited longest for one, and is its start.
        assert control.take("SN000000001", "scanner")
        await trio.testing.wait_all_tasks_blocked()
        assert list(started) == [0] and started[0].scans[-2].value == "SN000000001"
        # The same serial is never in two slots.
        assert control.take("SLOT:2", "scanner")
        assert not control.take("SN000000001", "scanner")
        assert control.said == "not taken: SN000000001 is the unit under test in slot 0"
        assert control.take("SN000000002", "scanner")
        await trio.testing.wait_all_tasks_blocked()
        assert sorted(started) == [0, 2]
        assert [(s.kind, s.value) for s in started[2].scans] == [("label", "SN000000002"), ("slot", "2")]
        # START starts the slot still waiting once its label is there.
        assert control.take("START", "keyboard")
        await trio.testing.wait_all_tasks_blocked()
        assert 1 not in started and control.needs(1) == "scan its label"
        assert control.take("SN000000003", "keyboard")
        await trio.testing.wait_all_tasks_blocked()
    assert [(s.kind, s.value) for s in started[1].scans] == [("label", "SN000000003"), ("start", "")]
    # Every slot is testing: no label and no start can be taken for any of them.
    assert not control.take("SN000000004", "keyboard")
    assert not control.take("START", "keyboard")
    assert not control.take("SLOT:7", "keyboard") and "not a slot of this station (0 to 2)" in control.said


async def test_a_scan_answers_the_open_question_unless_the_question_cannot_take_it() -> None:
    desk = OperatorDesk()
    control, _ = control_for(ScanConfig(label=True), slots=1, desk=desk)
    answers: list[str] = []

    async def ask(q: Question) -> None:
        answers.append(await desk.ask(q))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(control.ready, 0)
        nursery.start_soon(ask, Question(3, "/dev/x", "", "scan the enclosure's label", pattern=SERIAL))
        await trio.testing.wait_all_tasks_blocked()
        assert control.take("SN000000009", "scanner")  # the phase asked for it: its answer
        await trio.testing.wait_all_tasks_blocked()
        assert answers == ["SN000000009"] and control.needs(0) == "scan its label"
        nursery.start_soon(ask, Question(3, "/dev/x", "", "is the LED green?", ("yes", "no")))
        await trio.testing.wait_all_tasks_blocked()
        assert control.take("SN000000010", "scanner")  # not an answer to yes/no: the waiting slot's label
        await trio.testing.wait_all_tasks_blocked()
        assert control.slot_state(0) == "running" and desk.current is not None
        assert not control.take("maybe", "keyboard")  # refused as an answer, with the desk's hint
        assert control.take("y", "keyboard")
        await trio.testing.wait_all_tasks_blocked()
        assert answers[-1] == "yes"
        assert not control.take("hello", "keyboard")  # no question open, and not a scan
        assert control.said.startswith("not taken: no question is open, and 'hello' is not a scan")


async def test_a_badge_answers_who_is_testing() -> None:
    desk = OperatorDesk()
    control, _ = control_for(desk=desk)
    async with trio.open_nursery() as nursery:
        got: list[str] = []
        nursery.start_soon(lambda: _ask_into(desk, WHO_IS_TESTING, got))
        await trio.testing.wait_all_tasks_blocked()
        assert control.take("OP:Aoife Byrne", "scanner")
    assert got == ["Aoife Byrne"] and control.settings.operator == "Aoife Byrne"


async def _ask_into(desk: OperatorDesk, q: Question, got: list[str]) -> None:
    got.append(await desk.ask(q))


async def test_a_keyboard_wedge_types_scans_with_no_question_open_and_lines_may_come_ahead() -> None:
    desk = OperatorDesk()
    control, _ = control_for(desk=desk)
    keys = _Keys(desk, lambda line: control.take(line, "keyboard"))
    for char in "OP:ciara\r":  # nothing is asked: the scanner's keys still reach the station
        keys.press(char)
    assert control.settings.operator == "ciara" and desk.draft == ""
    read, write = os.pipe()
    os.write(write, b"WO:W-9\nno\n")  # a scan is taken at once; the answer waits for its question
    os.close(write)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lambda: answer_from_lines(desk, read, submit=lambda line: control.take_line(line, "stdin")))
        await trio.testing.wait_all_tasks_blocked()
        assert control.settings.batch == "W-9"
        assert await desk.ask(Question(0, "/dev/x", "", "is the buzzer on?", ("yes", "no"))) == "no"
    os.close(read)


async def test_a_serial_scanner_on_a_pty_reads_codes_however_they_end_and_outlives_an_unplug() -> None:
    taken: list[tuple[str, str]] = []
    scanner = SimulatedScanner()
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(read_scanner, scanner.path, 9600, lambda code, source: taken.append((code, source)))
            await scanner.scan("OP:aoife")
            await scanner._pty.write(b"WO:W-1\r\nSN000000001\n" + b"x" * 600 + b"\rSLOT:2\r")
            with trio.fail_after(10):
                while len(taken) < 4:
                    await trio.sleep(0.01)
            assert taken == [(c, f"scanner {scanner.path}") for c in ("OP:aoife", "WO:W-1", "SN000000001", "SLOT:2")]
            scanner._pty.unplug()  # the scanner's USB pulled: the station goes on without it
            await trio.sleep(0.3)
            nursery.cancel_scope.cancel()
    finally:
        scanner.close()


async def test_a_slot_whose_adapter_is_always_there_starts_on_start_and_again_on_the_next(tmp_path: Path) -> None:
    """A jig that cannot sense boards: the slot waits for start, shows the verdict, and waits for the next start."""
    bus = EventBus()
    events = bus.subscribe("test", buffer=10_000)
    store = LocalStore.open(tmp_path / "s.sqlite", station=True)
    loaded = LoadedProduct(board_product(), Path("<t>"))
    control, _ = control_for(ScanConfig(start="scan"), bus=bus)
    finished: list[RunFinished] = []
    try:
        async with store.writer(), open_farm(1, seed=3) as devices:
            async with open_presence(ports=[devices[0].path], settle_s=0.0, udev=False, poll_s=0.02) as boards:

                async def operator() -> None:
                    async for event in events:
                        if isinstance(event, SlotWaiting):
                            assert not finished  # started again, it does not wait: the start is there
                            control.take("OP:aoife", "scanner")
                            control.take("START", "scanner")
                        elif isinstance(event, RunFinished):
                            finished.append(event)
                            if len(finished) == 2:
                                os.kill(os.getpid(), signal.SIGINT)
                            else:
                                await trio.sleep(0.5)  # the verdict stays: no new run without a start
                                assert sum(isinstance(e, RunStarted) for e in _drain(events)) == 0
                                control.take("OP:ciara", "scanner")  # the next shift's operator
                                assert control.start(None, "panel")

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(operator)
                    with trio.fail_after(60):
                        result = await run_continuous(loaded, boards, settings=RunSettings("st", batch="B"),
                                                      store=store, bus=bus, control=control)
                    nursery.cancel_scope.cancel()
    finally:
        store.close()
    assert result.aborted
    reader = LocalStore.open(tmp_path / "s.sqlite")
    try:
        runs = sorted(reader.find_runs(), key=lambda r: r.started_at)
    finally:
        reader.close()
    assert [r.outcome for r in runs[:2]] == [Outcome.PASS, Outcome.PASS]
    assert runs[0].operator == "aoife" and [(s.kind, s.source) for s in runs[0].scans] == [
        ("badge", "scanner"), ("start", "scanner")]
    assert runs[1].operator == "ciara" and runs[1].scans[-1].source == "panel"  # started again with no new board
    assert runs[0].serial == runs[1].serial


async def test_a_label_that_is_not_the_boards_sends_it_to_rework(tmp_path: Path) -> None:
    bus = EventBus()
    events = bus.subscribe("test", buffer=10_000)
    store = LocalStore.open(tmp_path / "s.sqlite", station=True)
    loaded = LoadedProduct(board_product(), Path("<t>"))
    control, _ = control_for(ScanConfig(label=True), bus=bus)
    try:
        async with store.writer(), open_farm(1, seed=3) as devices:
            async with open_presence(ports=[devices[0].path], settle_s=0.0, udev=False, poll_s=0.02) as boards:

                async def operator() -> None:
                    async for event in events:
                        if isinstance(event, SlotWaiting):
                            assert control.take("SN999999999", "scanner")  # another unit's label
                        elif isinstance(event, RunFinished):
                            os.kill(os.getpid(), signal.SIGINT)

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(operator)
                    with trio.fail_after(60):
                        await run_continuous(loaded, boards, settings=RunSettings("st"), store=store, bus=bus,
                                             control=control)
                    nursery.cancel_scope.cancel()
    finally:
        store.close()
    reader = LocalStore.open(tmp_path / "s.sqlite")
    try:
        (run,) = reader.find_runs()
    finally:
        reader.close()
    assert run.outcome is Outcome.FAIL and run.disposition is Disposition.REWORK
    assert run.serial == devices[0].profile.serial  # what the board says it is, recorded
    assert "label scanned for slot 0 says SN999999999" in run.instruction and "relabelled" in run.instruction
    assert [(s.kind, s.value) for s in run.scans] == [("label", "SN999999999")]


async def test_the_operator_stops_one_slot_and_the_others_go_on(tmp_path: Path) -> None:
    bus = EventBus()
    events = bus.subscribe("test", buffer=10_000)
    store = LocalStore.open(tmp_path / "s.sqlite", station=True)
    loaded = LoadedProduct(board_product(slow_slot=0, slow_s=30.0), Path("<t>"))
    control, _ = control_for(bus=bus)
    ended: dict[int, list[Outcome | None]] = {0: [], 1: []}
    try:
        async with store.writer(), open_farm(2, seed=4) as devices:
            async with open_presence(ports=[d.path for d in devices], settle_s=0.0, udev=False,
                                     poll_s=0.02) as boards:

                async def operator() -> None:
                    async for event in events:
                        if isinstance(event, RunStarted) and event.run.slot == 0:
                            await trio.sleep(0.5)
                            assert control.stop(0, "the panel")
                        elif isinstance(event, RunFinished):
                            ended[event.run.slot].append(event.run.outcome)
                            if event.run.slot == 0:
                                assert not control.stop(0, "the panel")  # nothing to stop now
                                os.kill(os.getpid(), signal.SIGINT)

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(operator)
                    with trio.fail_after(60):
                        await run_continuous(loaded, boards, settings=RunSettings("st"), store=store, bus=bus,
                                             control=control)
                    nursery.cancel_scope.cancel()
    finally:
        store.close()
    assert ended[0] == [Outcome.ABORTED]
    reader = LocalStore.open(tmp_path / "s.sqlite")
    try:
        slot0 = [r for r in reader.find_runs() if r.slot == 0][0]
    finally:
        reader.close()
    assert any("aborted at the panel" in (p.reason or "") for p in slot0.phases)
    assert ended[1] and ended[1][0] is Outcome.PASS  # slot 1 tested its board meanwhile


def test_labels_need_a_pattern_and_a_scanner_needs_its_port(tmp_path: Path) -> None:
    (tmp_path / "st.toml").write_text('station = "s"\nstore = "s.sqlite"\ncontinuous = true\nsim = 1\n'
                                      '[scan]\nlabel = true\n')
    widget = ROOT / "tests" / "products" / "counting_widget.py"
    run = subprocess.run([sys.executable, "-m", "sequencer.cli", "run", str(widget), "--station",
                          str(tmp_path / "st.toml")], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert run.returncode == 2
    assert run.stderr.strip().endswith("scan: label = true, and 'counting-widget' has no serial_pattern: give the labels' "
                                       'pattern as [scan] serial = "re:..." (or Product(serial_pattern=...))')
    (tmp_path / "st.toml").write_text('station = "s"\nstore = "s.sqlite"\nports = ["/dev/serial/by-path/x"]\n'
                                      'continuous = true\n[scan]\nport = "/dev/serial/by-id/no-scanner"\n')
    run = subprocess.run([sys.executable, "-m", "sequencer.cli", "run", str(widget), "--station",
                          str(tmp_path / "st.toml")], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert run.returncode == 2
    assert "scan: the scanner's port /dev/serial/by-id/no-scanner: does not exist" in run.stderr
    assert len(run.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_a_simulated_shift_scans_each_slot_and_label_before_it_starts(tmp_path: Path) -> None:
    store = tmp_path / "s.sqlite"
    (tmp_path / "st.toml").write_text(f'station = "scan-st"\nstore = "{store}"\ncontinuous = true\n'
                                      '[scan]\nstart = "scan"\nlabel = true\n')
    proc = subprocess.Popen(
        [sys.executable, "-m", "sequencer.cli", "run", "products/esp32_sensor.py", "--sim", "2", "--plain",
         "--station", str(tmp_path / "st.toml"), "--batch", "SCANS", "--seed", "5"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and finished_runs(store) < 4:
            time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert "continuous: put a board in, scan its label, then start it" in out
    reader = LocalStore.open(store)
    try:
        runs = reader.find_runs(batch="SCANS")
    finally:
        reader.close()
    assert len(runs) >= 4
    for run in runs:
        kinds = {s.kind: s for s in run.scans}
        assert set(kinds) == {"label", "slot"} and kinds["slot"].value == str(run.slot)
        assert kinds["label"].source.startswith("scanner /dev/pts/")  # read from the simulated serial scanner
        assert run.serial == kinds["label"].value  # the label was the board's own
    assert f"slot 0: label {runs[0].serial}" in out or "scan: slot" in out


def _drain(channel: trio.MemoryReceiveChannel) -> list[object]:  # type: ignore[type-arg]
    got = []
    while True:
        try:
            got.append(channel.receive_nowait())
        except trio.WouldBlock:
            return got


async def test_a_work_order_scanned_mid_shift_gets_its_own_report_folder(tmp_path: Path) -> None:
    import attrs

    from sequencer.cli import _RoundReports
    from sequencer.station import StationResult
    from tests.records_factory import sensor_run

    reports = _RoundReports(StationConfig(store=tmp_path / "s.sqlite", batch="B0"))
    first, second = attrs.evolve(sensor_run("SN1"), batch="B0"), attrs.evolve(sensor_run("SN2"), batch="W-17")
    await reports.write(StationResult((first,)))
    await reports.write(StationResult((second,)))
    assert reports.error is None and list(reports.batches) == ["B0", "W-17"]
    assert (tmp_path / "reports" / "B0" / f"{first.run_id}.html").is_file()
    assert (tmp_path / "reports" / "W-17" / f"{second.run_id}.html").is_file()
