"""The flasher fixture against simulated ESP32 boards: the real esptool, in worker processes, over ptys.

Every test opens the board's port once, as the station's console does, and
lends it to the flasher; a board whose port was closed would have been reset,
so ``boot_count == 1`` at the end proves that detect, flash and boot happened
without a reset.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import attrs
import pytest
import trio

from fixtures.flasher import (
    BootloaderNotResponding,
    EspFlasher,
    FlashImagesRefused,
    FlashLinkLost,
    FlashPortLost,
    FlashResetUnsupported,
    FlashVerifyFailed,
    FlashWorkerFailed,
    FlashWorkers,
)
from fixtures.images import ImageSet, load_image_set
from fixtures.serial_link import PortLost, SerialLink, open_serial_link
from fixtures.sim.esp32_board import BoardFaults, DownloadMode, open_esp32_farm
from fixtures.sim.device import VirtualDevice
from phases.esp32 import BootFailed, read_boot_banner
from sequencer.config import FlashConfig

ROOT = Path(__file__).resolve().parent.parent
BUILD = ROOT / "products" / "data" / "esp32_sensor" / "build"
IMAGES = load_image_set(BUILD / "flasher_args.json")


@asynccontextmanager
async def board(
    faults: BoardFaults | None = None, *, pace_baud: bool = False, seed: int = 3
) -> AsyncIterator[tuple[VirtualDevice, SerialLink]]:
    async with open_esp32_farm(1, seed=seed, boards={0: faults} if faults else None, pace_baud=pace_baud) as (dev,):
        async with open_serial_link(dev.path) as link:
            yield dev, link


@asynccontextmanager
async def flasher_for(config: FlashConfig | None = None, workers: FlashWorkers | None = None) -> AsyncIterator[EspFlasher]:
    flasher = EspFlasher(config, workers=workers)
    try:
        yield flasher
    finally:
        await flasher.aclose()


def flash_workers(parent: int | None = None) -> list[int]:
    """Live flash worker processes started by this test process (or by ``parent``, a fork server)."""
    me = str(os.getpid() if parent is None else parent)
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if stat.rsplit(")", 1)[1].split()[1] == me and b"fixtures.flash_worker" in cmdline:
            if stat.rsplit(")", 1)[1].split()[0] != "Z":
                found.append(int(pid))
    return found


async def test_detect_reads_model_revision_and_efuse_mac_and_leaves_the_board_in_download_mode() -> None:
    async with board() as (dev, link), flasher_for() as flasher:
        chip = await flasher.detect(link)
        assert chip.chip == "ESP32" and chip.key == "esp32"
        assert chip.model == "ESP32-D0WD-V3" and chip.revision == "v3.0"
        assert chip.mac == dev.profile.mac  # the eFuse MAC is the unit's
        assert chip.flash_size == "4MB" and chip.crystal_mhz == 40
        assert flasher.chip == chip
        assert isinstance(dev.personality, DownloadMode) and dev.boot_count == 1


async def test_flash_writes_verifies_and_boots_the_test_firmware_without_a_reset() -> None:
    progress = []
    async with board() as (dev, link), flasher_for() as flasher:
        report = await flasher.flash(link, IMAGES, progress=progress.append)
        assert isinstance(dev.personality, DownloadMode)  # judged by the caller before it starts
        assert await flasher.start_app(link) == "run-user-code"
        banner = await read_boot_banner(link, 5)
        assert banner == {"model": "esp32-sensor", "fw": "1.4.2", "hw": dev.profile.hardware_rev}
        assert dev.boot_count == 1 and dev.board.boots == ["app"]
        for image in IMAGES.images:
            assert dev.board.chip.flash.read(image.offset, image.size) == image.path.read_bytes()
        # The console got its port back at 115200 and works as before.
        assert link.baudrate == 115200
        assert (await link.request("IDENT")).startswith("IDENT model=esp32-sensor")
    assert report.chip.mac == dev.profile.mac and report.baud == 921600
    assert [i.name for i in report.images] == ["bootloader.bin", "partition-table.bin", "esp32-sensor-testfw.bin"]
    assert report.bytes == IMAGES.total_bytes and report.throughput > 0
    assert [i.sha256 for i in report.images] == [i.sha256 for i in IMAGES.images]
    # Compressed: the app is code-like, so fewer bytes crossed the wire than it has.
    assert report.images[-1].wire_bytes < report.images[-1].size
    fractions = [p.fraction for p in progress]
    assert fractions == sorted(fractions) and fractions[-1] == pytest.approx(1.0)
    assert {p.image.name for p in progress} >= {"bootloader.bin", "esp32-sensor-testfw.bin"}
    # the image (and rate, once known); the fraction is shown beside it, not repeated in it
    assert progress[-1].detail.split()[0] == "esp32-sensor-testfw.bin" and "%" not in progress[-1].detail


async def test_flash_without_a_prior_detect_and_uncompressed() -> None:
    async with board() as (dev, link), flasher_for(FlashConfig(compress=False, baud=460800)) as flasher:
        report = await flasher.flash(link, IMAGES)
        await flasher.start_app(link)
        await read_boot_banner(link, 5)
    assert report.images[-1].wire_bytes == report.images[-1].size
    assert report.baud == 460800


async def test_the_stub_loader_is_uploaded_at_the_flash_rate_and_flashes_the_images() -> None:
    # The ROM switches to 921600 first, then the stub is uploaded and answers
    # at that rate (the time saved is in docs/benchmarks.md, not asserted here).
    async with board() as (dev, link), flasher_for(FlashConfig(stub=True, boot="none")) as flasher:
        report = await flasher.flash(link, IMAGES)
        assert dev.board.chip.uart_baud == pytest.approx(921600, rel=0.01)  # the divider it could set
    assert report.baud == 921600
    for image in IMAGES.images:
        assert dev.board.chip.flash.read(image.offset, image.size) == image.path.read_bytes()


class EsptoolLines:
    """A slot logger that keeps the esptool lines the flasher passes on."""

    def __init__(self) -> None:
        self.texts: list[str] = []

    def __getattr__(self, level: str) -> object:
        return lambda event, **fields: self.texts.append(str(fields.get("text", "")))


async def test_after_a_detect_the_flash_connects_without_esptool_probing_the_chip_again() -> None:
    # detect_chip's GET_SECURITY_INFO probe costs 0.2 s on an ESP32 ROM (it
    # refuses the command and esptool drains its input); a known chip skips it.
    log = EsptoolLines()
    async with board() as (dev, link):
        flasher = EspFlasher(log=log)
        try:
            await flasher.detect(link)
            probed_by_detect = [t for t in log.texts if t.startswith("Detecting chip type")]
            log.texts.clear()
            report = await flasher.flash(link, IMAGES)
        finally:
            await flasher.aclose()
    assert probed_by_detect == ["Detecting chip type... ESP32"]
    assert not [t for t in log.texts if t.startswith("Detecting chip type")]
    assert report.chip.mac == dev.profile.mac
    for image in IMAGES.images:
        assert dev.board.chip.flash.read(image.offset, image.size) == image.path.read_bytes()


async def test_without_a_detect_the_build_names_the_chip_and_its_magic_number_confirms_it() -> None:
    log = EsptoolLines()
    assert IMAGES.chip == "esp32"
    async with board() as (dev, link):
        flasher = EspFlasher(log=log)
        try:
            report = await flasher.flash(link, IMAGES)
            first = list(log.texts)
            # A build for another chip: its magic number says otherwise, so esptool detects.
            flasher.chip = None
            log.texts.clear()
            await flasher.flash(link, attrs.evolve(IMAGES, chip="esp32s3"))
        finally:
            await flasher.aclose()
    assert report.chip.chip == "ESP32"
    assert first and not [t for t in first if t.startswith("Detecting chip type")]
    assert [t for t in log.texts if t.startswith("Detecting chip type")] == ["Detecting chip type... ESP32"]


async def test_not_in_download_mode_is_no_response_from_bootloader() -> None:
    async with board(BoardFaults(download_mode=False)) as (dev, link):
        async with flasher_for(FlashConfig(connect_attempts=1)) as flasher:
            with pytest.raises(BootloaderNotResponding) as info:
                await flasher.detect(link)
    message = str(info.value)
    assert message.startswith(f"{dev.path}: no response from bootloader: is the board in download mode?")
    assert "\n" not in message


async def test_board_that_drops_off_mid_flash_is_link_lost_and_takes_a_reflash() -> None:
    async with board(BoardFaults(disconnect_after=24 * 1024)) as (dev, link), flasher_for() as flasher:
        with pytest.raises(FlashLinkLost) as info:
            await flasher.flash(link, IMAGES)
        assert "lost the board while writing esp32-sensor-testfw.bin at 0x10000 (" in str(info.value)
        assert "% sent)" in str(info.value)
        await flasher.flash(link, IMAGES)  # the retry a product allows
        await flasher.start_app(link)
        await read_boot_banner(link, 5)
        assert dev.boot_count == 1


async def test_the_boot_log_the_worker_read_past_the_loaders_last_reply_reaches_the_console() -> None:
    # On a busy station the worker may read the reply to FLASH_END late, when
    # the boot log is already behind it: it reads both at once. What it read
    # past the reply is the console's, not lost with the worker (the boot
    # phase then waited 5 s for a READY that had come and gone).
    async with board(BoardFaults(reply_with_boot_log=True)) as (dev, link), flasher_for() as flasher:
        await flasher.flash(link, IMAGES)
        await flasher.start_app(link)
        banner = await read_boot_banner(link, 5)
        assert banner == {"model": "esp32-sensor", "fw": "1.4.2", "hw": dev.profile.hardware_rev}
        assert any(e.text.startswith("ets Jun  8 2016") for e in link.transcript)  # the ROM's first line, kept
        assert (await link.request("IDENT")).startswith("IDENT model=esp32-sensor")


async def test_a_port_unplugged_mid_flash_is_port_lost_naming_the_port_and_stays_lost() -> None:
    # Linux hangs up a ttyUSB whose adapter is pulled: reads see end of file,
    # writes and termios calls EIO. esptool's reconnect then met a bare
    # termios.error, which the worker called an internal error, and a retry
    # blamed the board: "no response from bootloader".
    log = EsptoolLines()
    async with board(BoardFaults(unplug_after=24 * 1024)) as (dev, link):
        flasher = EspFlasher(log=log)
        try:
            with pytest.raises(FlashPortLost) as info:
                await flasher.flash(link, IMAGES)
            message = str(info.value)
            assert message.startswith(f"{dev.path}: port lost while writing esp32-sensor-testfw.bin at 0x10000 (")
            # End of file or EIO, depending on which call meets the hang-up first.
            assert re.search(r"\(\d+% sent\): reading: (end of file, the device hung up|Input/output error)$", message)
            for again in (flasher.flash(link, IMAGES), flasher.detect(link), flasher.start_app(link)):
                with pytest.raises(FlashPortLost) as retried:
                    await again
                assert str(retried.value) == message
        finally:
            await flasher.aclose()
        assert not any("Traceback" in text for text in log.texts)  # not an internal error
        with pytest.raises(PortLost, match=f"^{dev.path}: "):  # the console says so too
            await link.request("IDENT")


async def test_an_internal_error_in_the_worker_keeps_its_traceback_in_the_station_log() -> None:
    class StationLog:
        def __init__(self) -> None:
            self.errors: list[dict[str, object]] = []

        def error(self, event: str, **fields: object) -> None:
            self.errors.append({"event": event, **fields})

        @property
        def station(self) -> "StationLog":  # as slot.log.station: the station log alone
            return self

        def __getattr__(self, level: str) -> object:
            return lambda event, **fields: None

    log = StationLog()
    async with board() as (dev, link):
        flasher = EspFlasher(log=log)
        try:
            with pytest.raises(FlashWorkerFailed) as info:
                await flasher._command(link, {"op": "no-such-command"}, images=())
        finally:
            await flasher.aclose()
    assert str(info.value) == f"{dev.path}: flash worker failed in step 'start': KeyError: 'no-such-command'"
    assert not info.value.retryable
    [logged] = log.errors
    assert logged["event"] == "flash worker failed" and str(logged["error"]) == str(info.value)
    assert "Traceback (most recent call last)" in str(logged["traceback"]) and "KeyError" in str(logged["traceback"])


def build_copy(tmp_path: Path, *, min_revision: int | None = None, extra: dict[str, bytes] | None = None,
               **flash_settings: str) -> ImageSet:
    """The product's build, copied, with its app needing ``min_revision`` (major * 100 + minor), other
    ``flash_settings`` in flasher_args.json, or ``extra`` files (offset -> bytes) to write."""
    build = tmp_path / "build"
    shutil.copytree(BUILD, build)
    if min_revision is not None:
        app = build / "esp32-sensor-testfw.bin"
        data = bytearray(app.read_bytes())
        struct.pack_into("<H", data, 15, min_revision)  # esp_image_header_t.min_chip_rev_full
        app.write_bytes(bytes(data[:-32]) + hashlib.sha256(data[:-32]).digest())  # the appended digest
    args = json.loads((build / "flasher_args.json").read_text())
    args["flash_settings"].update(flash_settings)
    for offset, content in (extra or {}).items():
        (build / f"extra-{offset}.bin").write_bytes(content)
        args["flash_files"][offset] = f"extra-{offset}.bin"
    (build / "flasher_args.json").write_text(json.dumps(args))
    return load_image_set(build / "flasher_args.json")


async def test_an_app_for_a_newer_chip_revision_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    # esptool only checks the revision of the image at the bootloader's
    # offset; for the app it printed a note, wrote it, and the board then
    # refused to boot it.
    images = build_copy(tmp_path, min_revision=301)
    async with board() as (dev, link), flasher_for() as flasher:
        with pytest.raises(FlashImagesRefused) as info:
            await flasher.flash(link, images)
        assert str(info.value) == (
            f"{dev.path}: refused before writing anything: 'esp32-sensor-testfw.bin' requires chip revision in "
            "range v3.1 - v3.99 (this chip is revision v3.0)"
        )
        assert not info.value.retryable
        flash = dev.board.chip.flash
        assert all(flash.is_erased(i.offset, i.size) for i in images.images)
        await flasher.flash(link, IMAGES)  # the same board takes a build it can run
        await flasher.start_app(link)
        await read_boot_banner(link, 5)


async def test_a_build_for_more_flash_than_the_chip_has_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    async with board() as (dev, link), flasher_for() as flasher:
        # esptool warns, and writes 8MB into the bootloader's header: the app then fails to start.
        with pytest.raises(FlashImagesRefused, match=r": refused before writing anything: the build is for 8MB of "
                                                     r"flash, but the chip has 4MB$"):
            await flasher.flash(link, build_copy(tmp_path / "big", flash_size="8MB"))
        # esptool checks an image's end as it comes to it: the images before it were written.
        past_the_end = build_copy(tmp_path / "end", extra={"0x3ff000": bytes(range(256)) * 32})
        with pytest.raises(FlashImagesRefused, match=r": refused before writing anything: extra-0x3ff000.bin at "
                                                     r"0x3ff000 ends at 0x401000, past the end of 4MB of flash$"):
            await flasher.flash(link, past_the_end)
        assert all(dev.board.chip.flash.is_erased(i.offset, i.size) for i in IMAGES.images)


async def test_the_recorded_bootloader_digest_is_of_the_bytes_written_beside_the_files(tmp_path: Path) -> None:
    # The build says 80 MHz; the bootloader's header says 40 MHz. esptool
    # writes the build's settings into the header and recomputes the image's
    # own SHA-256, so the flash does not hold the file.
    images = build_copy(tmp_path, flash_freq="80m")
    async with board() as (dev, link), flasher_for() as flasher:
        report = await flasher.flash(link, images)
        await flasher.start_app(link)
        await read_boot_banner(link, 5)  # the rewritten bootloader still validates
    flash = dev.board.chip.flash
    bootloader, table, app = report.images
    assert bootloader.file_sha256 == images.images[0].sha256 != bootloader.sha256
    assert bootloader.sha256 == hashlib.sha256(flash.read(0x1000, bootloader.size)).hexdigest()
    assert flash.read(0x1002, 2) != images.images[0].path.read_bytes()[2:4]  # flash mode, size/frequency
    for image in (table, app):  # not rewritten: the file's bytes
        assert image.sha256 == image.file_sha256 == hashlib.sha256(flash.read(image.offset, image.size)).hexdigest()
    assert json.loads(report.to_json())["images"][0]["file_sha256"] == bootloader.file_sha256


async def test_corrupted_write_is_a_verify_failure_naming_the_image() -> None:
    async with board(BoardFaults(weak_cell=0x12000)) as (dev, link), flasher_for() as flasher:
        with pytest.raises(FlashVerifyFailed) as info:
            await flasher.flash(link, IMAGES)
    assert str(info.value) == (
        f"{dev.path}: verify failed for esp32-sensor-testfw.bin at 0x10000: "
        "the flash does not hold what was written (MD5 mismatch)"
    )
    assert dev.board.boots == []  # never started


async def test_bad_app_image_shows_up_as_a_boot_failure(tmp_path: Path) -> None:
    build = tmp_path / "build"
    shutil.copytree(BUILD, build)
    app = build / "esp32-sensor-testfw.bin"
    data = bytearray(app.read_bytes())
    data[0x1000] ^= 0xFF  # a flipped byte in a segment: the checksum no longer matches
    app.write_bytes(bytes(data))
    images = load_image_set(build / "flasher_args.json")  # the header still looks fine
    async with board() as (dev, link), flasher_for() as flasher:
        await flasher.flash(link, images)  # esptool writes and verifies what it was given
        await flasher.start_app(link)
        with pytest.raises(BootFailed) as info:
            await read_boot_banner(link, 5)
    assert "the board cannot start the test firmware: 'E (48) esp_image: Checksum failed." in str(info.value)


async def test_stub_with_hard_reset_on_a_port_without_reset_lines_is_a_clear_error() -> None:
    config = FlashConfig(stub=True, boot="hard-reset")
    async with board() as (dev, link), flasher_for(config) as flasher:
        await flasher.flash(link, IMAGES)  # the stub writes and verifies
        assert dev.board.chip.flash.read(IMAGES.app.offset, IMAGES.app.size) == IMAGES.app.path.read_bytes()
        with pytest.raises(FlashResetUnsupported, match="the port has no RTS/DTR lines to reset the board"):
            await flasher.start_app(link)


async def test_cancelled_flash_kills_the_worker_and_gives_the_port_back_at_once() -> None:
    # Paced at 115200 baud the image set takes seconds, so the cancel lands mid-write.
    async with open_esp32_farm(1, seed=5, pace_baud=True) as (dev,):
        async with open_serial_link(dev.path) as link, flasher_for(FlashConfig(baud=115200)) as flasher:
            cancelled_at = []
            with trio.CancelScope() as scope:

                def on_progress(progress: object) -> None:
                    if progress.fraction > 0.2 and not cancelled_at:
                        cancelled_at.append(trio.current_time())
                        scope.cancel()

                await flasher.flash(link, IMAGES, progress=on_progress)
            assert scope.cancelled_caught
            assert trio.current_time() - cancelled_at[0] < 0.5
            assert flash_workers() == []
            # The port is the console's again, and the board is still in its loader.
            await link.write(b"\r\n")
            assert (await flasher.detect(link)).mac == dev.profile.mac
            assert dev.boot_count == 1
        # Nobody holds the port any more: the board saw the close, and a reopen resets it.
        async with open_serial_link(dev.path):
            with trio.fail_after(2):
                while dev.boot_count < 2:
                    await trio.sleep(0.01)


async def test_workers_forked_by_the_station_server_flash_and_die_with_a_cancel() -> None:
    async with FlashWorkers.open() as workers, open_esp32_farm(1, seed=5, pace_baud=True) as (dev,):
        server = workers._process.pid
        async with open_serial_link(dev.path) as link, flasher_for(FlashConfig(baud=115200), workers) as flasher:
            assert (await flasher.detect(link)).mac == dev.profile.mac
            [worker] = flash_workers(server)  # the slot's worker, forked by the server
            with trio.CancelScope() as scope:

                def on_progress(progress: object) -> None:
                    if progress.fraction > 0.2:
                        scope.cancel()

                await flasher.flash(link, IMAGES, progress=on_progress)
            assert scope.cancelled_caught
            assert flash_workers(server) == []  # killed mid-write; its copy of the port is closed
            assert (await flasher.detect(link)).mac == dev.profile.mac  # a new one, forked again
            assert flash_workers(server) != [worker]
    assert workers._process.returncode is not None  # the server went with the station


async def test_a_worker_request_cut_short_by_a_deadline_never_hands_its_answer_to_the_next() -> None:
    def live_children(ppid: int) -> set[int]:
        found = set()
        for entry in Path("/proc").iterdir():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            if fields[1] == str(ppid) and fields[0] != "Z":
                found.add(int(entry.name))
        return found

    async with FlashWorkers.open() as workers:
        server = workers._process.pid
        cut_short = 0
        for i in range(100):
            first = None
            with trio.move_on_after((i % 20) * 50e-6) as scope:  # lands before, during or after the fork
                first = await workers.start("/dev/x")
                await trio.lowlevel.checkpoint()
            cut_short += scope.cancelled_caught
            # The next request gets its own worker's pid, never an answer left over from the one cut short.
            second = await workers.start("/dev/x")
            alive = live_children(server)
            assert second.handle.pid in alive
            if first is not None:  # a request that had begun finished: its worker is its own, alive too
                assert first.handle.pid in alive and first.handle.pid != second.handle.pid
                await first.aclose()
            await second.aclose()
        assert cut_short > 10  # the deadlines did land around the requests


async def test_eight_slots_flash_at_once_each_on_its_own_board() -> None:
    async with open_esp32_farm(8, seed=4) as devices:

        async def one(dev: VirtualDevice) -> None:
            async with open_serial_link(dev.path) as link, flasher_for() as flasher:
                report = await flasher.flash(link, IMAGES)
                await flasher.start_app(link)
                banner = await read_boot_banner(link, 10)
                assert report.chip.mac == dev.profile.mac and banner["model"] == "esp32-sensor"

        async with trio.open_nursery() as nursery:
            for dev in devices:
                nursery.start_soon(one, dev)
        for dev in devices:
            assert dev.board.boots == ["app"] and dev.boot_count == 1
            assert dev.board.chip.flash.read(0x10000, IMAGES.app.size) == IMAGES.app.path.read_bytes()


def test_a_mac_no_unit_can_have_is_named_with_the_reason() -> None:
    from fixtures.mac_check import MacClaims, mac_problem

    assert mac_problem("24:0A:C4:1F:00:07") is None
    assert mac_problem("00:00:00:00:00:00") == "MAC 00:00:00:00:00:00 is all zeros: the eFuse MAC was never programmed"
    assert mac_problem("FF:FF:FF:FF:FF:FF") == "MAC FF:FF:FF:FF:FF:FF is all ones: not a unit's address"
    assert "is a multicast address" in mac_problem("25:0A:C4:1F:00:07")
    claims = MacClaims()
    claims.claim(0, "/dev/ttyUSB0", "24:0A:C4:1F:00:07")
    claims.claim(1, "/dev/ttyUSB1", "24:0A:C4:1F:00:08")
    assert claims.others(0, "24:0A:C4:1F:00:07") is None
    claims.claim(1, "/dev/ttyUSB1", "24:0A:C4:1F:00:07")  # the slot's next board: the claim moves with it
    assert claims.others(0, "24:0A:C4:1F:00:07") == (
        "MAC 24:0A:C4:1F:00:07 is also on slot 1 (/dev/ttyUSB1) in this round: two boards cannot share a MAC"
    )
    assert claims.others(1, "24:0A:C4:1F:00:08") is None


def test_quality_gates_refuse_big_images_and_slow_flashes() -> None:
    flasher = EspFlasher(FlashConfig(max_image_bytes={"ESP32": 40_000}, max_seconds=2))
    from fixtures.flasher import ChipInfo, FlashReport, ImageReport

    esp32 = ChipInfo("ESP32", "ESP32-D0WD-V3 (revision v3.0)", "v3.0", "24:0A:C4:00:00:01")
    assert flasher.image_gate(IMAGES, esp32) == [
        "esp32-sensor-testfw.bin is 50272 bytes, over the station limit of 40000 bytes for esp32 "
        "([flash] max_image_bytes)"
    ]
    s3 = attrs.evolve(esp32, chip="ESP32-S3")
    assert flasher.image_gate(IMAGES, s3)[0] == "the image set is built for esp32, but the board is esp32s3"
    report = FlashReport(esp32, [ImageReport(0x10000, "app.bin", 1000, "0" * 64, "0" * 64, 2.5, 900)], 0.1, 2.5, 921600)
    assert flasher.report_gate(report) == ["writing took 2.5 s, over the station limit of 2 s ([flash] max_seconds)"]
    assert flasher.report_gate(attrs.evolve(report, write_seconds=1.0)) == []


# -- what the worker reads, and what it leaves the station -------------------------------


async def test_a_connection_lent_over_rfc2217_comes_back_with_what_the_worker_did_not_read() -> None:
    from fixtures.flash_worker import Rfc2217FdPort
    from fixtures.sim.rfc2217_port import BridgeUart, listen_loopback, serve_rfc2217

    listener, url = listen_loopback()
    uart = BridgeUart(url)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve_rfc2217, listener, uart)
        async with open_serial_link(url) as link:
            await uart.write(b"SLIP\xff\xffreply|and the boot log\r\n")
            await trio.sleep(0.05)
            with link.lend() as loan:
                def borrow() -> dict[str, object]:
                    port = Rfc2217FdPort(os.dup(loan.fd), url, loan.state)
                    try:
                        port.timeout = 1
                        assert port.read(11) == b"SLIP\xff\xffreply"  # what esptool used; the rest it read too
                        port.dtr = True
                        return port.hand_back()
                    finally:
                        os.close(port.fileno())

                back = await trio.to_thread.run_sync(borrow)
                loan.returned_state, loan.leftover = back, bytes.fromhex(back["leftover"])
            await uart.write(b"\xffmore\n")
            assert await link.read_until(b"more\n", timeout=2) == b"|and the boot log\r\n\xffmore\n"
            assert uart.dtr is True
        nursery.cancel_scope.cancel()
    listener.close()


def test_a_step_of_the_flash_worker_is_named_in_words_in_its_error() -> None:
    from fixtures import flash_worker as worker_protocol
    from fixtures.flasher import _error

    def said(stage: str, kind: str = worker_protocol.PORT_LOST) -> str:
        event = {"kind": kind, "message": "reading: end of file, the device hung up", "stage": stage}
        return str(_error("/dev/ttyUSB3", event, (), FlashConfig()))

    assert said("connect") == ("/dev/ttyUSB3: port lost while connecting to the loader: reading: end of file, "
                               "the device hung up")
    assert "while reading the chip's identity:" in said("identify")
    assert "esptool failed while starting the app (the image set): " in said("boot", kind="something-else")
