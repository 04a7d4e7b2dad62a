"""The esp32-sensor product as a station runs it: detect, flash, boot, EVT on simulated ESP32 boards.

Every fault kind end to end (the operator's command, with a fault profile),
an operator abort in the middle of a flash, and the station's flash-time gate.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import trio

from fixtures.images import load_image_set
from fixtures.serial_link import open_serial_link
from fixtures.sim.esp32_board import BoardFaults, DownloadMode, open_esp32_farm
from fixtures.sim.instruments import open_simulated_instrument
from fixtures.station import STATION_FIXTURES
from fixtures.flasher import esp_flasher
from reports.storage.store import LocalStore
from sequencer.config import FlashConfig
from sequencer.engine import RunSettings, SlotControl, run_dut
from sequencer.events import EventBus, PhaseProgress
from sequencer.fixtures import SlotInfo
from sequencer.product import load_product
from sequencer.records import Outcome, RunRecord, run_to_json
from sequencer.resources import SharedResource
from sequencer.station import run_station
from tests.test_flasher import flash_workers

ROOT = Path(__file__).resolve().parent.parent
SENSOR = ROOT / "products" / "esp32_sensor.py"
IMAGES = load_image_set(ROOT / "products" / "data" / "esp32_sensor" / "build" / "flasher_args.json")


def attempts(run: RunRecord, phase: str) -> list[tuple[str, str]]:
    return [(a.outcome.value, a.reason or "") for a in run.phase(phase).attempts]


async def run_farm(
    store_path: Path, n: int, *, seed: int, batch: str, boards: dict[int, BoardFaults] | None = None,
    flash: FlashConfig | None = None, loaded: Any = None, bus: EventBus | None = None,
) -> tuple[list[RunRecord], list[Any]]:
    """Run ``loaded`` (the sensor product) as a station does on ``n`` boards, a DMM shared: records by slot, boards."""
    loaded = loaded or load_product(SENSOR, station_fixtures=STATION_FIXTURES)
    store = LocalStore.open(store_path, station=True)
    try:
        async with store.writer(), open_esp32_farm(n, seed=seed, boards=boards) as devs:
            async with open_simulated_instrument("scpi-dmm", devs, seed=seed) as dmm:
                result = await run_station(
                    loaded, [d.path for d in devs], settings=RunSettings("test", batch=batch), store=store,
                    bus=bus or EventBus(), resources={"dmm": SharedResource("dmm", 1, dmm)}, handle_signals=False,
                    fixtures={"flasher": esp_flasher(flash)},
                )
    finally:
        store.close()
    return sorted(result.runs, key=lambda r: r.slot), devs


def failed(run: RunRecord) -> dict[str, str]:
    """Phases that did not pass (and were not skipped because of another), with their reasons."""
    return {
        p.name: f"{p.outcome.value}: {p.reason}"
        for p in run.phases
        if p.outcome not in (Outcome.PASS, Outcome.SKIPPED)
    }


@pytest.mark.slow
def test_every_fault_on_a_16_slot_farm_shows_as_the_right_outcome_with_its_reason(tmp_path: Path) -> None:
    store_path = tmp_path / "store.sqlite"
    result = subprocess.run(
        [sys.executable, "-m", "sequencer.cli", "run", str(SENSOR), "--sim", "16",
         "--faults", str(ROOT / "fixtures" / "sim" / "profiles" / "every-fault.toml"),
         "--store", str(store_path), "--reports", str(tmp_path / "reports"), "--batch", "FAULTS", "--plain"],
        capture_output=True, text=True, cwd=ROOT, timeout=120, env={**os.environ, "COLUMNS": "200"},
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert "faults (" in result.stdout and "1: no_download_mode" in result.stdout
    assert "5/16 passed" in result.stdout
    assert "\x1b" not in result.stdout + result.stderr  # slot 12's serial never reached the terminal
    store = LocalStore.open(store_path)
    runs = {r.slot: r for r in store.find_runs(batch="FAULTS")}
    store.close()
    assert sorted(runs) == list(range(16))

    # Healthy boards: flashed, booted, identified by ROM and firmware alike.
    for slot in (0, 15):
        run = runs[slot]
        assert run.outcome is Outcome.PASS and not run.marginal, failed(run)
        assert run.dut["chip"] == "ESP32-D0WD-V3" and run.dut["chip_revision"] == "v3.0"
        assert run.serial and run.dut["firmware"] == "1.4.2"
        flash = {m.name: m.value for m in run.phase("flash").measurements}
        assert flash["flash_verdict"] == "pass" and flash["flash_bytes"] == IMAGES.total_bytes
        assert flash["app_sha256"] == IMAGES.app.sha256 and flash["flash_throughput"] > 0
        assert run.phase("flash").attachments[0].name == "flash.json"

    no_sync = runs[1]
    assert no_sync.outcome is Outcome.ERROR
    assert "no response from bootloader: is the board in download mode?" in no_sync.phase("detect").reason
    assert no_sync.phase("flash").outcome is Outcome.SKIPPED

    dropped = runs[2]
    assert dropped.outcome is Outcome.PASS, failed(dropped)
    (first, first_reason), (second, _) = attempts(dropped, "flash")
    assert (first, second) == ("ERROR", "PASS")
    assert "lost the board while writing esp32-sensor-testfw.bin at 0x10000 (" in first_reason

    corrupted = runs[3]
    assert corrupted.outcome is Outcome.FAIL
    assert [a for a, _ in attempts(corrupted, "flash")] == ["FAIL", "FAIL"]  # the re-flash fails the same way
    assert "verify failed for esp32-sensor-testfw.bin at 0x10000" in corrupted.phase("flash").reason
    assert "(MD5 mismatch)" in corrupted.phase("flash").reason
    assert corrupted.phase("boot").outcome is Outcome.SKIPPED

    assert runs[4].outcome is Outcome.FAIL
    assert "measurement 'vdd_3v3':" in runs[4].phase("supply_rails").reason
    assert "is above 3.4" in runs[4].phase("supply_rails").reason

    assert runs[5].outcome is Outcome.PASS and runs[5].marginal

    assert runs[6].outcome is Outcome.ERROR
    assert "waiting for the boot banner to end in READY" in runs[6].phase("boot").reason

    assert runs[7].outcome is Outcome.ERROR and "line is not UTF-8" in runs[7].phase("identify").reason

    slow = runs[8]
    assert slow.outcome is Outcome.ERROR
    assert any("timed out after 1 s waiting for a response to" in reason for reason in failed(slow).values())

    slow_flash = runs[9]
    assert slow_flash.outcome is Outcome.PASS, failed(slow_flash)

    def seconds(run: RunRecord) -> float:
        return next(m.value for m in run.phase("flash").measurements if m.name == "flash_seconds")

    assert seconds(slow_flash) > max(seconds(runs[slot]) for slot in (0, 15))

    assert runs[10].outcome is Outcome.FAIL and "'psram' is not ''" in runs[10].phase("self_test").reason
    assert runs[11].outcome is Outcome.ERROR and "line longer than 1024 bytes" in runs[11].phase("identify").reason
    hostile = runs[12]
    assert hostile.outcome is Outcome.ERROR and "control character in line" in hostile.phase("identify").reason
    assert "serial" not in hostile.dut and "\x1b" not in run_to_json(hostile)

    unplugged = runs[13]
    assert attempts(unplugged, "flash") == [("ERROR", unplugged.phase("flash").reason)]  # not retried
    assert "port lost while writing esp32-sensor-testfw.bin at 0x10000 (" in unplugged.phase("flash").reason

    blank_mac = runs[14]
    assert blank_mac.outcome is Outcome.FAIL and blank_mac.phase("flash").outcome is Outcome.SKIPPED
    assert "MAC 00:00:00:00:00:00 is all zeros" in blank_mac.phase("detect").reason

    for run in runs.values():  # the console transcript teardown ran everywhere
        assert run.phase("console_transcript").outcome is Outcome.PASS


async def test_operator_abort_mid_flash_records_aborted_and_releases_the_port(store_path: Path) -> None:
    loaded = load_product(SENSOR, station_fixtures=STATION_FIXTURES)
    bus = EventBus()
    progress = bus.subscribe("test")
    control = SlotControl()
    store = LocalStore.open(store_path, station=True)
    try:
        # Paced at 115200 baud, the flash takes seconds.
        async with store.writer(), open_esp32_farm(1, seed=2, pace_baud=True) as (dev,):
            aborted_at = []

            async def abort_mid_flash() -> None:
                async for event in progress:
                    if isinstance(event, PhaseProgress) and event.phase == "flash" and event.fraction > 0.2:
                        aborted_at.append(trio.current_time())
                        control.abort()
                        return

            async with trio.open_nursery() as nursery:
                nursery.start_soon(abort_mid_flash)
                run = await run_dut(
                    loaded, SlotInfo(0, dev.path, "test"), settings=RunSettings("test", batch="ABORT"), store=store,
                    bus=bus, fixtures={"flasher": esp_flasher(FlashConfig(baud=115200))}, control=control,
                )
            assert trio.current_time() - aborted_at[0] < 2
            assert flash_workers() == []
            # The port is free again: the board saw the close and resets into its loader on the next open.
            async with open_serial_link(dev.path):
                with trio.fail_after(2):
                    while dev.boot_count < 2:
                        await trio.sleep(0.01)
                assert isinstance(dev.personality, DownloadMode)
    finally:
        store.close()
    assert run.outcome is Outcome.ABORTED
    assert run.phase("detect").outcome is Outcome.PASS
    flash = run.phase("flash")
    assert flash.outcome is Outcome.ABORTED and flash.reason == "aborted by the operator"
    assert run.phase("boot").outcome is Outcome.SKIPPED
    assert run.phase("console_transcript").outcome is Outcome.PASS
    stored = LocalStore.open(store_path)
    try:
        assert stored.find_runs(batch="ABORT")[0].phase("flash").outcome is Outcome.ABORTED
    finally:
        stored.close()


async def test_station_flash_time_gate_fails_a_slow_board_and_not_the_others(store_path: Path) -> None:
    bus = EventBus()
    events = bus.subscribe("test", buffer=100_000)
    (fast, slow), _ = await run_farm(store_path, 2, seed=9, batch="GATE", boards={1: BoardFaults(block_delay_s=0.02)},
                                flash=FlashConfig(max_seconds=0.6), bus=bus)
    assert fast.outcome is Outcome.PASS, failed(fast)
    assert slow.outcome is Outcome.FAIL, failed(slow)
    reason = slow.phase("flash").reason
    assert reason.startswith("measurement 'flash_verdict': writing took "), reason
    assert reason.endswith("over the station limit of 0.6 s ([flash] max_seconds)")
    assert slow.phase("boot").outcome is Outcome.SKIPPED
    # Refused before starting the app, so the retry could flash it again (and was refused again).
    assert [a.outcome for a in slow.phase("flash").attempts] == [Outcome.FAIL, Outcome.FAIL]
    report = json.loads(fast.phase("flash").attachments[0].data)
    assert [i["sha256"] for i in report["images"]] == [i.sha256 for i in IMAGES.images]
    seen = []
    while True:
        try:
            event = events.receive_nowait()
        except (trio.WouldBlock, trio.EndOfChannel):
            break
        if isinstance(event, PhaseProgress) and event.phase == "flash" and event.slot == 0:
            seen.append(event)
    assert seen and seen[-1].fraction == pytest.approx(1.0) and "esp32-sensor-testfw.bin" in seen[-1].detail


async def test_a_port_unplugged_mid_flash_is_port_lost_naming_the_port_and_is_not_retried(store_path: Path) -> None:
    (unplugged, other), devs = await run_farm(store_path, 2, seed=4, batch="UNPLUG",
                                      boards={0: BoardFaults(unplug_after=24 * 1024)})
    assert other.outcome is Outcome.PASS, failed(other)
    flash = unplugged.phase("flash")
    # One attempt: a retry would only have blamed a silent board ("no response from bootloader").
    [(outcome, reason)] = attempts(unplugged, "flash")
    assert outcome == "ERROR" and flash.reason == reason
    assert reason.startswith(f"FlashPortLost: {devs[0].path}: port lost while writing esp32-sensor-testfw.bin at "
                             "0x10000 ("), reason
    # The hang-up shows as end of file or as EIO, depending on which call meets it first.
    assert re.search(r"\(\d+% sent\): reading: (end of file, the device hung up|Input/output error)$", reason), reason
    assert "not retried: a retry cannot change this" in " ".join(line.message for line in flash.logs)
    verdict = next(m for m in flash.measurements if m.name == "flash_verdict")
    assert verdict.value != "pass" and "port lost while writing" in verdict.value
    assert unplugged.phase("boot").outcome is Outcome.SKIPPED


async def test_a_reset_the_port_cannot_do_is_not_retried_and_its_record_never_says_pass(store_path: Path) -> None:
    # Written and verified with the stub, then the board cannot be started:
    # the port has no RTS line. A retry re-flashed everything to fail the
    # same way, and the record kept the judged write's flash_verdict = pass.
    [run], _ = await run_farm(store_path, 1, seed=5, batch="NORESET", flash=FlashConfig(stub=True, boot="hard-reset"))
    flash = run.phase("flash")
    assert [outcome for outcome, _ in attempts(run, "flash")] == ["ERROR"]
    assert "the port has no RTS/DTR lines to reset the board" in flash.reason
    verdict = next(m for m in flash.measurements if m.name == "flash_verdict")
    assert verdict.value.startswith("the port has no RTS/DTR lines") and verdict.outcome.value == "FAIL"


async def test_a_build_the_board_cannot_run_fails_the_flash_once_naming_both_revisions(
    store_path: Path, tmp_path: Path
) -> None:
    from fixtures.dut import test_firmware
    from phases import esp32
    from sequencer import Product
    from sequencer.product import LoadedProduct
    from tests.test_flasher import build_copy

    flash = esp32.flash_images(build_copy(tmp_path, min_revision=301), retries=2).depends_on(esp32.detect)
    product = Product("needs-v3.1", [esp32.detect, flash, esp32.boot.depends_on(flash)],
                      fixtures={"dut": test_firmware(wait_boot=False)})
    needs_v31 = LoadedProduct(product, tmp_path / "needs_v31.py")
    [run], _ = await run_farm(store_path, 1, seed=6, batch="REV", loaded=needs_v31)
    assert run.outcome is Outcome.FAIL
    assert attempts(run, "flash") == [("FAIL", run.phase("flash").reason)]  # retries=2, and not retried
    assert run.phase("flash").reason == (
        "measurement 'flash_verdict': refused before writing anything: 'esp32-sensor-testfw.bin' requires chip "
        "revision in range v3.1 - v3.99 (this chip is revision v3.0)"
    )
    assert run.phase("boot").outcome is Outcome.SKIPPED


async def test_a_mac_no_unit_can_have_or_two_boards_share_fails_them_with_the_reason(store_path: Path) -> None:
    clone = "24:0A:C4:00:00:01"
    # The clones' flash is slow, so that each is still being written when the other is detected.
    boards = {0: BoardFaults(efuse_mac="00:00:00:00:00:00"), 1: BoardFaults(efuse_mac=clone, block_delay_s=0.03),
              2: BoardFaults(efuse_mac=clone, block_delay_s=0.03)}
    (blank, first, second, healthy), devs = await run_farm(store_path, 4, seed=8, batch="MAC", boards=boards)
    assert healthy.outcome is Outcome.PASS, failed(healthy)
    assert blank.outcome is Outcome.FAIL and blank.phase("flash").outcome is Outcome.SKIPPED
    assert blank.phase("detect").reason == (
        "measurement 'mac_verdict': MAC 00:00:00:00:00:00 is all zeros: the eFuse MAC was never programmed"
    )
    # the MAC is measured, but it is not the unit's identity: every unburned board has it
    assert blank.measurement("detect", "mac").value == "00:00:00:00:00:00" and "mac" not in blank.dut
    # The clones: whichever was detected second fails at detect, the other before it is started.
    for run, other in ((first, 2), (second, 1)):
        assert run.outcome is Outcome.FAIL, failed(run)
        [reason] = failed(run).values()
        assert f"MAC {clone} is also on slot {other} ({devs[other].path}) in this round: two boards cannot share a " \
               "MAC" in reason, reason
        assert run.phase("boot").outcome is Outcome.SKIPPED
    assert sorted(next(iter(failed(r))) for r in (first, second)) == ["detect", "flash"]
    assert all(dev.board.boots == [] for dev in devs[1:3])  # neither clone was started


# -- the command line's flashing options ----------------------------------------------


def test_fault_and_detect_mistakes_are_one_line_usage_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from sequencer.cli import main

    profile = ROOT / "fixtures" / "sim" / "profiles" / "every-fault.toml"
    store = ["--store", str(tmp_path / "s.sqlite")]

    def error(argv: list[str]) -> str:
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("sequencer: error: ") and "\n" not in err
        return err

    from fixtures.sim.pty import PtyEndpoint

    with PtyEndpoint() as real_port:
        assert "--faults needs a simulated farm (--sim N)" in error(
            ["run", str(SENSOR), "--port", real_port.path, "--faults", str(profile), *store])
    assert "every-fault.toml: slots.4: the farm has slots 0..3" in error(["run", str(SENSOR), "--sim", "4", "--faults", str(profile), *store])
    board_only = tmp_path / "board.toml"
    board_only.write_text("[slots]\n0 = 'disconnect'\n")
    slow_widget = ROOT / "tests" / "products" / "slow_widget.py"
    assert "board faults need a product that flashes; 'slow-widget'" in error(
        ["run", str(slow_widget), "--sim", "1", "--faults", str(board_only), *store])
    station = tmp_path / "station.toml"
    station.write_text("[detect]\nvid = 0xFFFF\npid = 0x0001\n")
    assert "detect: no serial port matches vid=65535, pid=1" in error(["run", str(SENSOR), "--station", str(station), *store])


def test_a_board_that_failed_before_identify_and_passed_its_retest_is_one_unit(tmp_path: Path) -> None:
    """Issue 19: corrupt_write on one of 4 boards, then a clean retest: 4 units, 75 % first pass, 100 % final."""
    store_path, reports = tmp_path / "store.sqlite", tmp_path / "reports"
    profile = tmp_path / "faults.toml"
    profile.write_text('[slots]\n1 = "corrupt_write"\n')
    common = ["--store", str(store_path), "--reports", str(reports), "--batch", "B1", "--plain"]
    env = {**os.environ, "COLUMNS": "200"}
    first = subprocess.run([sys.executable, "-m", "sequencer.cli", "run", str(SENSOR), "--sim", "4",
                            "--faults", str(profile), *common], capture_output=True, text=True, cwd=ROOT,
                           timeout=120, env=env)
    assert first.returncode == 1, first.stdout + first.stderr
    # the same seed: boards 0 and 1 again, board 1 now with a flash that holds
    retest = subprocess.run([sys.executable, "-m", "sequencer.cli", "run", str(SENSOR), "--sim", "2", *common],
                            capture_output=True, text=True, cwd=ROOT, timeout=120, env=env)
    assert retest.returncode == 0, retest.stdout + retest.stderr
    store = LocalStore.open(store_path)
    runs = store.find_runs(batch="B1")
    store.close()
    failed_run = next(r for r in runs if r.outcome is Outcome.FAIL)
    assert failed_run.serial is None and failed_run.dut["mac"]  # no serial: identify never ran; detect read the MAC

    from tests.htmltree import parse

    page = parse((reports / "B1" / "index.html").read_text(encoding="utf-8"))
    kpi = {k: page.find(id=f"kpi-{k}").text for k in ("units", "fpy", "final")}
    assert kpi == {"units": "4", "fpy": "75.0 %", "final": "100.0 %"}


# -- boards that DTR/RTS reset (issue 22) -------------------------------------------------


def sequencer_run(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess[str], dict[int, RunRecord]]:
    """``sequencer run ...`` as the operator types it; its output and the batch's runs by slot."""
    store_path = tmp_path / "store.sqlite"
    result = subprocess.run(
        [sys.executable, "-m", "sequencer.cli", "run", *args, "--store", str(store_path),
         "--reports", str(tmp_path / "reports"), "--batch", "B", "--plain"],
        capture_output=True, text=True, cwd=ROOT, timeout=180, env={**os.environ, "COLUMNS": "200"},
    )
    store = LocalStore.open(store_path)
    runs = {r.slot: r for r in store.find_runs(batch="B")}
    store.close()
    return result, runs


def measured(run: RunRecord, phase: str) -> dict[str, object]:
    return {m.name: m.value for m in run.phase(phase).measurements}


@pytest.mark.slow
@pytest.mark.parametrize(
    "product, board, chip, entry, bootloader",
    [
        ("esp32_sensor.py", "devkitc", "ESP32-D0WD-V3", "ClassicReset (default-reset)", 0x1000),
        ("esp32s3_sensor.py", "esp32s3-usb", "ESP32-S3 (QFN56)", "USBJTAGSerialReset (usb-reset)", 0x0),
    ],
)
def test_auto_reset_farms_pass_end_to_end_and_say_how_each_board_was_reset(
        tmp_path: Path, product: str, board: str, chip: str, entry: str, bootloader: int) -> None:
    result, runs = sequencer_run(tmp_path, str(ROOT / "products" / product), "--sim", "8", "--sim-board", board)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "8/8 passed" in result.stdout and "rfc2217://127.0.0.1:" in result.stdout
    assert len(runs) == 8
    for run in runs.values():
        assert run.outcome is Outcome.PASS, failed(run)
        assert run.dut["chip"] == chip and run.serial
        assert measured(run, "detect")["loader_entry"] == entry
        report = json.loads(run.phase("flash").attachments[0].data)
        assert report["reset"]["before"] == entry.split("(")[1].rstrip(")")
        assert report["images"][0]["offset"] == bootloader
        assert any("how='hard-reset (HardReset)'" in line.message for line in run.phase("flash").logs)


@pytest.mark.slow
def test_auto_reset_faults_show_as_the_right_outcome_with_their_reasons(tmp_path: Path) -> None:
    result, runs = sequencer_run(tmp_path, str(SENSOR), "--sim", "8", "--sim-board", "devkitc", "--faults",
                                 str(ROOT / "fixtures" / "sim" / "profiles" / "auto-reset.toml"))
    assert result.returncode == 1, result.stdout + result.stderr
    assert "6/8 passed" in result.stdout
    for slot in (0, 2, 3, 5, 6, 7):
        assert runs[slot].outcome is Outcome.PASS, failed(runs[slot])
    unwired = runs[1].phase("detect")
    assert unwired.outcome is Outcome.ERROR
    assert "auto-reset circuit is missing" in unwired.reason and "hold BOOT, press and release EN" in unwired.reason
    # Reset when its console opened: harmless to a flashing station, which resets it anyway;
    # the console transcript shows the boot it did on its own.
    def boots(run: RunRecord) -> int:
        return run.phase("console_transcript").attachments[0].data.decode().count("rst:0x1 (POWERON_RESET)")

    assert boots(runs[2]) == boots(runs[0]) + 1
    (first, first_reason), (second, _) = attempts(runs[3], "flash")
    assert (first, second) == ("ERROR", "PASS") and "lost the board while writing" in first_reason
    assert runs[4].outcome is Outcome.FAIL and "(MD5 mismatch)" in runs[4].phase("flash").reason


@pytest.mark.slow
def test_boards_already_running_keep_running_when_the_station_opens_their_consoles(tmp_path: Path) -> None:
    widget = ROOT / "tests" / "products" / "asking_widget.py"
    result, runs = sequencer_run(tmp_path, str(widget), "--sim", "3", "--sim-board", "devkitc")
    assert result.returncode == 0, result.stdout + result.stderr
    assert all(run.outcome is Outcome.PASS for run in runs.values())


@pytest.mark.slow
async def test_a_station_names_a_remote_rfc2217_port_and_its_wiring_in_its_station_file(tmp_path: Path) -> None:
    # A DevKitC on a hub served over RFC 2217 (here a simulated one, in this process), named as a real
    # station names it: a port URL and how the board on it is wired.
    product = tmp_path / "flash_only.py"
    product.write_text(
        "from pathlib import Path\nfrom fixtures.dut import test_firmware\nfrom phases import esp32, evt\n"
        "from sequencer import Product\n"
        f"IMAGES = Path({str(ROOT / 'products' / 'data' / 'esp32_sensor' / 'build' / 'flasher_args.json')!r})\n"
        "flash = esp32.flash_images(IMAGES).depends_on(esp32.detect)\nboot = esp32.boot.depends_on(flash)\n"
        "product = Product('flash-only', [esp32.detect, flash, boot, evt.identify.depends_on(boot)],\n"
        "                  fixtures={'dut': test_firmware(wait_boot=False)})\n"
    )
    async with open_esp32_farm(1, kind="devkitc") as (board,):
        station = tmp_path / "station.toml"
        station.write_text(f'ports = ["{board.path}"]\nstore = "store.sqlite"\n'
                           f'[flash.port."{board.path}"]\nbefore = "default-reset"\nboot = "hard-reset"\n')
        with trio.fail_after(120):
            done = await trio.run_process(
                [sys.executable, "-m", "sequencer.cli", "run", str(product), "--station", str(station), "--plain",
                 "--batch", "REMOTE"], capture_stdout=True, capture_stderr=True, check=False, cwd=ROOT)
        assert done.returncode == 0, done.stdout.decode() + done.stderr.decode()
        # Powered on with empty flash; flashed; started. (A busy machine can preempt esptool between the
        # two line changes of a ClassicReset for longer than EN takes to rise: esptool then tries again.)
        assert board.board.boots[0] == "invalid header: 0xffffffff" and board.board.boots[-1] == "app"
    store = LocalStore.open(tmp_path / "store.sqlite")
    [run] = store.find_runs(batch="REMOTE")
    store.close()
    assert run.port == board.path and run.outcome is Outcome.PASS
    assert measured(run, "detect")["loader_entry"] == "ClassicReset (default-reset)"
