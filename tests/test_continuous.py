"""Continuous stations: every slot on its own cycle as boards come and go; Ctrl-C and the store as in rounds."""

from __future__ import annotations

import contextlib
import gc
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import trio
from serial.tools.list_ports_linux import SysFS

from fixtures.presence import open_presence, ports_at_locations
from fixtures.sim.changing_farm import FarmTiming, open_changing_farm
from reports.storage.store import LocalStore
from sequencer import Measurement, Product, phase
from sequencer.config import ConfigError, DetectConfig, SerialLines, StationConfig
from sequencer.continuous import run_continuous
from sequencer.engine import RunSettings
from sequencer.events import BoardArrived, BoardRemoved, EventBus, RunFinished
from sequencer.product import LoadedProduct
from sequencer.records import Outcome
from tests.store_support import finished_runs

ROOT = Path(__file__).resolve().parent.parent
QUICK = FarmTiming(insert_s=(0.01, 0.05), remove_s=(0.01, 0.05), retest=0.0, pull=0.0)


def board_product(slow_slot: int | None = None, slow_s: float = 0.0) -> Product:
    """identify (the board's own serial) -> check; on ``slow_slot``, the first board's check takes ``slow_s``."""
    slow_done: list[bool] = []

    @phase(measurements=[Measurement("serial").matches(r"SN\d+")], timeout=10)
    async def identify(ctx, dut) -> None:
        ident = await dut.identify()
        ctx.identify(serial=ident.serial, mac=ident.mac)
        ctx.measurements.serial = ident.serial

    @phase(after=[identify], timeout=60)
    async def check(slot, dut) -> None:
        if slot.index == slow_slot and not slow_done:
            slow_done.append(True)
            with trio.move_on_after(slow_s):
                while True:  # talking to the board all along: one pulled out is noticed
                    await dut.identify()
                    await trio.sleep(0.1)

    from fixtures.dut import test_firmware

    return Product("board", [identify, check], fixtures={"dut": test_firmware(baudrate=115200)})


async def _stop_after(condition: trio.Event) -> None:
    await condition.wait()
    os.kill(os.getpid(), signal.SIGINT)  # the operator's Ctrl-C, through the station's own handling


async def test_every_slot_runs_its_own_cycle_and_none_waits_for_another(tmp_path: Path) -> None:
    bus = EventBus()
    events = bus.subscribe("test", buffer=100_000)
    finished: list[tuple[int, float, str]] = []
    enough = trio.Event()
    store = LocalStore.open(tmp_path / "s.sqlite", station=True)
    loaded = LoadedProduct(board_product(slow_slot=0, slow_s=4.0), Path("<t>"))
    try:
        async with store.writer(), open_changing_farm(3, bus, seed=5, timing=QUICK) as farm:
            async with open_presence(ports=farm.places, settle_s=0.0, udev=False, poll_s=0.02) as boards:

                async def watch() -> None:
                    async for event in events:
                        if isinstance(event, RunFinished):
                            finished.append((event.run.slot, trio.current_time(), event.run.run_id))
                            if sum(1 for s, _, _ in finished if s == 0) >= 2:
                                enough.set()

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(watch)
                    nursery.start_soon(_stop_after, enough)
                    result = await run_continuous(loaded, boards, settings=RunSettings("st", batch="C"), store=store,
                                                  bus=bus)
                    bus.close()
    finally:
        store.close()
    assert result.aborted
    slot0_first = min(t for s, t, _ in finished if s == 0)
    # While slot 0's first board took 4 s, the other slots tested board after board.
    for other in (1, 2):
        assert sum(1 for s, t, _ in finished if s == other and t < slot0_first) >= 3
    reader = LocalStore.open(tmp_path / "s.sqlite")
    try:
        runs = reader.find_runs(batch="C")
    finally:
        reader.close()
    # Every run recorded and closed; the ones the operator's Ctrl-C cut short are ABORTED.
    assert {r.run_id for r in runs} == {run_id for _, _, run_id in finished}
    assert all(r.outcome is not None for r in runs)
    assert sum(result.outcomes.values()) == len(runs)
    assert len({r.serial for r in runs if r.outcome is Outcome.PASS}) == result.outcomes.get(Outcome.PASS, 0)
    assert len(result.runs) == 3  # each slot's last run: nothing more is kept


async def test_a_board_pulled_mid_test_ends_its_run_recorded_and_the_slot_goes_on(tmp_path: Path) -> None:
    bus = EventBus()
    events = bus.subscribe("test", buffer=100_000)
    seen: list[object] = []
    store = LocalStore.open(tmp_path / "s.sqlite", station=True)
    loaded = LoadedProduct(board_product(slow_slot=0, slow_s=30.0), Path("<t>"))
    pulled_and_next = trio.Event()
    timing = FarmTiming(insert_s=(0.01, 0.05), remove_s=(0.01, 0.05), retest=0.0, pull=1.0, pull_after_s=(0.5, 0.5))
    try:
        async with store.writer(), open_changing_farm(1, bus, seed=1, timing=timing) as farm:
            async with open_presence(ports=farm.places, settle_s=0.0, udev=False, poll_s=0.02) as boards:

                async def watch() -> None:
                    async for event in events:
                        seen.append(event)
                        if sum(isinstance(e, RunFinished) for e in seen) >= 2:
                            pulled_and_next.set()

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(watch)
                    nursery.start_soon(_stop_after, pulled_and_next)
                    await run_continuous(loaded, boards, settings=RunSettings("st", batch="P"), store=store, bus=bus)
                    bus.close()
    finally:
        store.close()
    first = next(e for e in seen if isinstance(e, RunFinished))
    assert first.run.outcome is Outcome.ABORTED or first.run.outcome is Outcome.ERROR
    assert [type(e).__name__ for e in seen if isinstance(e, (BoardArrived, BoardRemoved))][:3] == \
        ["BoardArrived", "BoardRemoved", "BoardArrived"]


async def test_a_store_that_refuses_stops_every_slot(tmp_path: Path) -> None:
    class Refusing:
        """A store whose disk is full after a few records."""

        def __init__(self) -> None:
            self.left = 6

        async def begin_run(self, run: object) -> None:
            self._take()

        async def commit_phase(self, *args: object) -> None:
            self._take()

        async def finish_run(self, run: object) -> None:
            self._take()

        def _take(self) -> None:
            self.left -= 1
            if self.left < 0:
                raise OSError(28, "No space left on device")

    bus = EventBus()
    loaded = LoadedProduct(board_product(), Path("<t>"))
    with trio.fail_after(60):
        async with open_changing_farm(3, bus, seed=2, timing=QUICK) as farm:
            async with open_presence(ports=farm.places, settle_s=0.0, udev=False, poll_s=0.02) as boards:
                result = await run_continuous(loaded, boards, settings=RunSettings("st"), store=Refusing(), bus=bus,
                                              handle_signals=False)
    assert result.write_error is not None and "No space left" in result.write_error


async def test_a_slot_has_a_board_while_its_place_exists(tmp_path: Path) -> None:
    places = [str(tmp_path / "slot-0"), str(tmp_path / "slot-1")]
    target = tmp_path / "ttyUSB7"
    target.write_text("")
    async with open_presence(ports=places, settle_s=0.3, udev=False, poll_s=0.02) as boards:
        await trio.sleep(0.1)
        assert boards.ports == (None, None)
        os.symlink(target, places[1])
        plugged = trio.current_time()
        with trio.fail_after(10):
            assert await boards.arrived(1) == places[1]
        assert trio.current_time() - plugged >= 0.3  # an adapter that just enumerated settles first
        assert boards.ports == (None, places[1])
        os.unlink(places[1])
        with trio.fail_after(10):
            await boards.removed(1)
        assert boards.ports == (None, None)


def test_usb_locations_are_slots_whatever_the_ports_are_called(tmp_path: Path) -> None:
    def port(device: str, location: str | None, vid: int = 0x10C4) -> SysFS:
        info = SysFS(device)
        info.location, info.vid, info.pid = location, vid, 0xEA60
        return info

    detect = DetectConfig(vid=0x10C4, locations=("1-1.1", "1-1.2", "1-1.3"))
    by_path = tmp_path / "by-path"
    by_path.mkdir()
    found = ports_at_locations(detect, [port("/dev/ttyUSB3", "1-1.2:1.0"), port("/dev/ttyUSB0", "1-1.1:1.0"),
                                        port("/dev/ttyUSB9", "1-1.3:1.0", vid=0x0403)], by_path=by_path)
    assert found == ["/dev/ttyUSB0", "/dev/ttyUSB3", None]  # the FTDI adapter on 1-1.3 is not a DUT
    # Two boards at one location (a hub in the jig): none, rather than a guess.
    assert ports_at_locations(detect, [port("/dev/ttyUSB1", "1-1.1:1.0"), port("/dev/ttyUSB2", "1-1.1:1.1")],
                              by_path=by_path)[0] is None


def test_a_continuous_station_is_bound_to_places_not_to_renumbered_ports() -> None:
    with pytest.raises(ConfigError, match=r"port /dev/ttyUSB0 is named in the order boards are plugged in"):
        StationConfig(ports=("/dev/ttyUSB0",), continuous=True).check()
    with pytest.raises(ConfigError, match=r"continuous stations have no rounds"):
        StationConfig(sim=2, continuous=True, rounds=3).check()
    StationConfig(ports=("/dev/serial/by-path/pci-0000:00:14.0-usb-0:1.2:1.0-port0",), continuous=True).check()
    StationConfig(detect=DetectConfig(locations=("1-1.2",)), continuous=True).check()


@pytest.mark.slow
def test_the_simulated_station_runs_until_ctrl_c_with_boards_coming_and_going(tmp_path: Path) -> None:
    store = tmp_path / "s.sqlite"
    proc = subprocess.Popen(
        [sys.executable, "-m", "sequencer.cli", "run", "products/esp32_sensor.py", "--sim", "4", "--continuous",
         "--plain", "--store", str(store), "--batch", "SHIFT", "--seed", "3"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            time.sleep(1)
            if finished_runs(store) >= 10:
                break
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    reader = LocalStore.open(store)
    try:
        runs = reader.find_runs(batch="SHIFT")
    finally:
        reader.close()
    assert len(runs) >= 10 and all(r.outcome is not None for r in runs)  # every run closed, none left RUNNING
    assert len({r.serial for r in runs if r.serial}) > 4  # more boards than slots: they came and went
    # The line a log reader (tools/bench/soak.py) counts runs by: a unit before its serial is "mac=...".
    printed = [line for line in out.splitlines()
               if re.fullmatch(r"slot \d+ \S+ \S+: (PASS|FAIL|ERROR|TIMEOUT|ABORTED)( \(marginal\))?", line)]
    assert len(printed) == len(runs)  # each run's verdict was shown as it ended
    assert "continuous: put a board in any slot; Ctrl-C ends the shift" in out
    assert f"{sum(r.outcome is Outcome.PASS for r in runs)}/{len(runs)} passed." in out


@pytest.mark.slow
def test_stop_signals_over_and_over_end_a_shift_with_its_summary_and_every_run_closed(tmp_path: Path) -> None:
    # As in rounds: however many stop signals, wherever they land, only the
    # shift stops; the records, the summary and exit status 130 follow.
    store = tmp_path / "s.sqlite"
    proc = subprocess.Popen(
        [sys.executable, "-m", "sequencer.cli", "run", "products/esp32_sensor.py", "--sim", "4", "--continuous",
         "--plain", "--store", str(store), "--batch", "HAMMER", "--seed", "5"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    sent = 0
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and finished_runs(store) < 3:
            time.sleep(0.5)
        while proc.poll() is None and sent < 3000:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, (signal.SIGINT, signal.SIGINT, signal.SIGTERM, signal.SIGHUP)[sent % 4])
            sent += 1
            time.sleep(0.005)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, out[-2000:] + err
    assert "Traceback" not in err
    assert "passed." in out and "aborted by the operator" in out, out[-2000:]
    station = LocalStore.open(store, station=True)  # the next start: nothing was left open
    try:
        assert station.interrupted_on_open == 0 and len(station.find_runs(batch="HAMMER")) >= 3
    finally:
        station.close()


async def test_cycles_leave_nothing_behind(tmp_path: Path) -> None:
    """Memory, open files and tasks after many boards are what they were after a few."""
    bus = EventBus()
    events = bus.subscribe("test", buffer=100_000)
    samples: list[tuple[int, int, int]] = []
    done = trio.Event()
    store = LocalStore.open(tmp_path / "s.sqlite", station=True)
    loaded = LoadedProduct(board_product(), Path("<t>"))

    from fixtures.sim.device import VirtualDevice
    from sequencer.records import PhaseRecord, RunRecord

    def sample() -> tuple[int, int, int]:
        gc.collect()
        tasks = 0
        stack = [trio.lowlevel.current_root_task()]
        while stack:
            task = stack.pop()
            tasks += 1
            stack.extend(child for nursery in task.child_nurseries for child in nursery.child_tasks)
        # What a run is made of, alive: a board, its record, its phases' records (counted whatever else the
        # process holds, or has frozen out of the collector's sight: sequencer run's gc.freeze()).
        runs = sum(isinstance(o, (RunRecord, PhaseRecord, VirtualDevice)) for o in gc.get_objects())
        return len(os.listdir("/proc/self/fd")), tasks, runs

    try:
        async with store.writer(), open_changing_farm(2, bus, seed=4, timing=QUICK) as farm:
            async with open_presence(ports=farm.places, settle_s=0.0, udev=False, poll_s=0.02) as boards:

                async def watch() -> None:
                    n = 0
                    async for event in events:
                        if isinstance(event, RunFinished):
                            n += 1
                            if 10 <= n < 16 or 55 <= n <= 60:
                                await trio.sleep(0.05)  # both slots between boards, more or less
                                samples.append(sample())
                            if n == 60:
                                done.set()

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(watch)
                    nursery.start_soon(_stop_after, done)
                    await run_continuous(loaded, boards, settings=RunSettings("st"), store=store, bus=bus)
                    bus.close()
    finally:
        store.close()
    # The fewest of several moments around the 10th run and around the 60th: at any one moment a board may
    # be going in (its pty) and a slot opening its port, a few descriptors that come and go, where what a
    # run leaked would be there at every moment, 45 runs' worth.
    early, late = samples[:6], samples[6:]
    fds_10, tasks_10, objects_10 = (min(s[i] for s in early) for i in range(3))
    fds_60, tasks_60, objects_60 = (min(s[i] for s in late) for i in range(3))
    assert fds_60 <= fds_10 + 4
    assert tasks_60 <= tasks_10 + 10
    # 50 more boards (each a board, a run and its phases' records), and at most the runs in flight more.
    assert objects_60 <= objects_10 + 20, (objects_10, objects_60)


def test_a_long_shift_of_faults_is_counted_not_listed_and_an_empty_slot_asks_for_a_board() -> None:
    from fixtures.sim.faults import load_fault_profile
    from sequencer.display import StationDisplay

    plan = load_fault_profile(ROOT / "fixtures" / "sim" / "profiles" / "flaky-line.toml", 1600)
    counts = plan.counts()
    assert counts.startswith("183 rail_marginal, 176 disconnect") and len(counts) < 100
    display = StationDisplay(["/dev/serial/by-path/a"], phases_per_run=3, continuous=True)
    assert display.slots[0].result().plain == "put a board in"
    display.apply(BoardArrived(0, "/dev/serial/by-path/a"))
    assert display.slots[0].result().plain == "running"


def test_a_run_line_names_a_unit_without_its_serial_in_one_word() -> None:
    # Log readers (tools/bench/soak.py) split a run's line on spaces: "mac 24:..." would be two words.
    from sequencer.display import StationDisplay
    from sequencer.events import DutIdentified
    from tests.records_factory import sensor_run

    import attrs

    run = attrs.evolve(sensor_run(slot=0), dut={"mac": "24:0A:C4:00:00:01"}, outcome=Outcome.ERROR)
    display = StationDisplay(["/dev/a"], phases_per_run=3)
    display.apply(DutIdentified(run.run_id, 0, dict(run.dut)))
    line = display.apply(RunFinished(run))
    assert line.splitlines()[0] == "slot 0 /dev/a mac=24:0A:C4:00:00:01: ERROR"


async def test_each_board_that_arrives_is_given_its_ports_serial_lines(tmp_path: Path) -> None:
    """The station says how the links to a port hold DTR/RTS as each board arrives (an auto-reset board's stay
    released), as a station in rounds does for its listed ports."""
    seen: list[tuple[str, SerialLines | None]] = []
    done = trio.Event()

    @phase(timeout=10)
    async def note(slot) -> None:
        seen.append((slot.port, slot.lines))
        if len({port for port, _ in seen}) == 2:
            done.set()

    bus = EventBus()
    store = LocalStore.open(tmp_path / "s.sqlite", station=True)
    loaded = LoadedProduct(Product("lines", [note]), Path("<t>"))
    released = SerialLines(dtr=False, rts=False)
    try:
        async with store.writer(), open_changing_farm(2, bus, seed=2, timing=QUICK) as farm:
            async with open_presence(ports=farm.places, settle_s=0.0, udev=False, poll_s=0.02) as boards:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(_stop_after, done)
                    await run_continuous(loaded, boards, settings=RunSettings("st"), store=store, bus=bus,
                                         lines=lambda port: released if port == farm.places[1] else None)
                    bus.close()
    finally:
        store.close()
    assert seen and all(lines == (released if port == farm.places[1] else None) for port, lines in seen)
    assert {port for port, _ in seen} == set(farm.places)
