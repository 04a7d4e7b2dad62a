"""Boards that DTR and RTS reset: the circuits against esptool's own sequences, and the boards on RFC 2217.

The sequences are esp-pylib's (what esptool's ``ClassicReset``,
``UnixTightReset``, ``USBJTAGSerialReset`` and ``HardReset`` run), driven
from a thread with their real sleeps, as esptool drives them.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import trio
from esp_pylib import serial_reset

from fixtures.dut import test_firmware
from fixtures.flasher import BootloaderNotResponding, DownloadModeNotEntered, EspFlasher
from fixtures.serial_link import DeviceTimeout, ProtocolError, open_serial_link
from fixtures.sim.auto_reset import (
    EN_RISE_S,
    AutoResetDevice,
    DevKitCAutoReset,
    UsbSerialJtagReset,
    running_auto_reset_board,
)
from fixtures.sim.device import DeviceProfile, ResetBoot
from fixtures.sim.esp32_board import BoardFaults, DownloadMode, Esp32Board, open_esp32_farm
from fixtures.sim.esp_chips import ESP32S3, Esp32ChipState
from fixtures.sim.farm import open_farm
from sequencer.config import RELEASED, FlashConfig, SerialLines
from sequencer.fixtures import SlotInfo

pytestmark = pytest.mark.slow


class _Lines:
    """A pyserial-like port whose DTR/RTS drive a simulated circuit (esptool's sequences run in a thread)."""

    def __init__(self, circuit: object, dtr: bool = False, rts: bool = False) -> None:
        self._circuit = circuit
        self.dtr, self.rts = dtr, rts

    def setDTR(self, on: bool) -> None:  # noqa: N802 - pyserial's name
        self.dtr = on
        trio.from_thread.run_sync(self._circuit.lines, self.dtr, self.rts)  # type: ignore[attr-defined]

    def setRTS(self, on: bool) -> None:  # noqa: N802
        self.rts = on
        trio.from_thread.run_sync(self._circuit.lines, self.dtr, self.rts)  # type: ignore[attr-defined]


async def reset_with(circuit: object, sequence: Callable[[_Lines], None]) -> ResetBoot:
    """Run ``sequence`` on the circuit, as esptool would; how the chip comes out of the reset."""
    circuit.power_on()  # type: ignore[attr-defined]
    await circuit.wait_released()  # type: ignore[attr-defined]
    port = _Lines(circuit)
    await trio.to_thread.run_sync(sequence, port)
    with trio.fail_after(2):
        return await circuit.wait_released()  # type: ignore[attr-defined]


# -- the circuits ---------------------------------------------------------------------


async def test_esptools_classic_reset_brings_a_devkitc_up_in_its_loader_and_hard_reset_in_its_app() -> None:
    assert await reset_with(DevKitCAutoReset(), serial_reset.classic_bootloader_reset) == ResetBoot(True, "en")
    assert await reset_with(DevKitCAutoReset(), serial_reset.hard_reset) == ResetBoot(False, "en")


async def test_unix_tight_reset_sets_both_lines_at_once_and_works_too() -> None:
    def unix_tight(port: _Lines) -> None:  # the pairs TIOCMSET writes, each in one go
        for dtr, rts, pause in [(False, False, 0), (True, True, 0), (False, True, 0.1), (True, False, 0.05),
                                (False, False, 0)]:
            port.dtr, port.rts = dtr, rts
            trio.from_thread.run_sync(port._circuit.lines, dtr, rts)  # type: ignore[attr-defined]
            if pause:
                trio.from_thread.run_sync(lambda: None)
                import time

                time.sleep(pause)

    assert await reset_with(DevKitCAutoReset(), unix_tight) == ResetBoot(True, "en")


async def test_the_en_delay_is_what_makes_the_classic_sequence_work() -> None:
    # pyserial's own RFC 2217 client waits about 50 ms for the server to answer each
    # line change: "both asserted" (EN already released) then lasts longer than EN
    # takes to rise, and the chip samples GPIO0 still high. This is why esptool's
    # esp_rfc2217_server runs the sequences itself, and why the station's own
    # client sends line changes back to back.
    import time

    def slow_classic(port: _Lines) -> None:
        port.setDTR(False)
        port.setRTS(True)
        time.sleep(0.1)
        port.setDTR(True)
        time.sleep(EN_RISE_S * 3)  # a round trip for the answer
        port.setRTS(False)
        time.sleep(0.05)
        port.setDTR(False)

    assert await reset_with(DevKitCAutoReset(), slow_classic) == ResetBoot(False, "en")
    # A board with no capacitor on EN does the same even with esptool's timing.
    assert await reset_with(DevKitCAutoReset(rise_s=0.0), serial_reset.classic_bootloader_reset) == ResetBoot(
        False, "en")


async def test_the_usb_serial_jtag_follows_the_s3_trm_table() -> None:
    def chip() -> Esp32ChipState:
        return Esp32ChipState.create(model=ESP32S3, usb_serial_jtag=True)

    assert await reset_with(UsbSerialJtagReset(chip()), serial_reset.usb_jtag_bootloader_reset) == ResetBoot(
        True, "usb")
    assert await reset_with(UsbSerialJtagReset(chip()), serial_reset.hard_reset) == ResetBoot(False, "usb")
    # The DevKitC's sequence passes through (RTS, DTR) = (1, 0) with the flag clear: a reset into the app.
    assert await reset_with(UsbSerialJtagReset(chip()), serial_reset.classic_bootloader_reset) == ResetBoot(
        False, "usb")

    # The download flag is RTC_CNTL_OPTION1 bit 0: it outlives the reset, so a software
    # restart goes back into the loader until it is cleared (esptool clears it before
    # a hard reset; (RTS, DTR) = (0, 0) clears it too).
    s3 = chip()
    circuit = UsbSerialJtagReset(s3)
    circuit.power_on()
    circuit.lines(dtr=True, rts=False)
    circuit.lines(dtr=True, rts=True)  # "no action": the flag stays
    assert s3.force_download and circuit.download_now()
    circuit.lines(dtr=False, rts=False)
    assert not s3.force_download


# -- the console on a running board (issue 22, item 2) -----------------------------------


@pytest.mark.parametrize("kind", ["devkitc", "esp32s3-usb"])
async def test_the_app_keeps_running_across_the_consoles_open_and_close(kind: str) -> None:
    async with open_farm(1, make=running_auto_reset_board(kind)) as (device,):
        await device.app_ready.wait()  # powered on before the console opens
        slot = SlotInfo(0, device.path, "bench", lines=RELEASED)
        factory = test_firmware(wait_boot=True)
        async with factory(slot) as firmware:  # waits for the app to answer, not for a banner
            await firmware.set_led("GREEN")
            first = await firmware.identify()
        boots = device.boot_count
        for _ in range(3):
            async with factory(slot) as firmware:
                assert await firmware.identify() == first
        assert device.boot_count == boots == 1  # never reset: no boot since power-on
        assert device.led == "GREEN"  # what the app was told before is still so
        # A console that asserted RTS alone (pyserial asserts both on open; a bridge
        # that sets them one by one passes through this) holds the chip in reset.
        async with open_serial_link(device.path, lines=SerialLines(dtr=False, rts=True)):
            await trio.sleep(0.1)
            assert device.personality is None
        await trio.sleep(0.1)
        assert device.boot_count == 2 and device.led == "OFF"  # it booted afresh when let go


class _Log:
    def __init__(self) -> None:
        self.warnings: list[tuple[str, dict[str, object]]] = []

    def info(self, event: str, **fields: object) -> None:
        pass

    def warning(self, event: str, **fields: object) -> None:
        self.warnings.append((event, fields))


@pytest.mark.parametrize("resets_on_open", [False, True])
async def test_a_board_that_resets_when_its_console_opens_is_logged_with_the_reset(resets_on_open: bool) -> None:
    faults = {0: BoardFaults(resets_on_open=resets_on_open)}
    async with open_farm(1, make=running_auto_reset_board("devkitc", faults)) as (device,):
        await device.app_ready.wait()
        log = _Log()
        async with test_firmware(wait_boot=True)(SlotInfo(0, device.path, "bench", log=log, lines=RELEASED)) as fw:
            assert (await fw.identify()).serial == device.profile.serial  # it answers all the same
        if resets_on_open:
            assert device.boot_count == 2
            [(event, fields)] = log.warnings
            assert event.startswith("the board restarted when its console opened")
            assert fields["reset"] == "rst:0x1 (POWERON_RESET),boot:0x13 (SPI_FAST_FLASH_BOOT)"
        else:
            assert device.boot_count == 1 and log.warnings == []


# -- flashing auto-reset boards ---------------------------------------------------------


async def test_detect_resets_a_devkitc_into_its_loader_with_esptools_classic_sequence() -> None:
    async with open_esp32_farm(1, kind="devkitc") as (device,):
        flasher = EspFlasher(FlashConfig(before="default-reset", boot="hard-reset"))
        try:
            async with open_serial_link(device.path, lines=RELEASED) as link:
                chip = await flasher.detect(link)
        finally:
            await flasher.aclose()
        assert chip.mac == device.profile.mac and chip.console == "UART"
        assert flasher.reset.how == "ClassicReset (default-reset)" and flasher.reset.attempts >= 1
        # The lines as esptool set them over RFC 2217: EN low, both, GPIO0 low, released. (Preempted
        # between two of them for longer than EN takes to rise, esptool tries the sequence again.)
        assert [(dtr, rts) for dtr, rts, _ in device.circuit.history][-4:] == [
            (False, True), (True, True), (True, False), (False, False)]
        assert isinstance(device.personality, DownloadMode)


async def test_an_s3_on_its_usb_serial_jtag_says_so_and_takes_esptools_usb_sequence() -> None:
    async with open_esp32_farm(1, kind="esp32s3-usb") as (device,):
        flasher = EspFlasher(FlashConfig(before="usb-reset", boot="hard-reset"))
        try:
            async with open_serial_link(device.path, lines=RELEASED) as link:
                chip = await flasher.detect(link)
        finally:
            await flasher.aclose()
        assert (chip.chip, chip.model, chip.revision) == ("ESP32-S3", "ESP32-S3 (QFN56)", "v0.2")
        assert chip.mac == device.profile.mac
        assert chip.console == "USB-Serial/JTAG"  # the ROM's own word (its UARTDEV_BUF_NO)
        assert flasher.reset.how == "USBJTAGSerialReset (usb-reset)"


@pytest.mark.parametrize(
    "kind, before, circuit, error, message",
    [
        # A DevKitC left alone boots its empty flash; a jig's setting resets nothing.
        ("devkitc", "no-reset", None, BootloaderNotResponding, "The jig must hold GPIO0 low"),
        # DTR/RTS reach nothing: the operator is told what to do by hand. (esptool may
        # see the board's own boot log and take it for a reset into the app.)
        ("devkitc", "default-reset", "unwired", BootloaderNotResponding, "auto-reset circuit is missing"),
        # EN rises at once (no capacitor): the chip comes up in its app.
        ("devkitc", "default-reset", "no-capacitor", DownloadModeNotEntered, "GPIO0 was not low as EN rose"),
        # The DevKitC's sequence on a USB-Serial/JTAG: a reset into the app.
        ("esp32s3-usb", "default-reset", None, DownloadModeNotEntered, "running from its flash, not its loader"),
    ],
)
async def test_a_reset_that_does_not_reach_the_loader_says_what_to_do(
        kind: str, before: str, circuit: str | None, error: type, message: str) -> None:
    boards = {0: BoardFaults(auto_reset=False)} if circuit == "unwired" else {}
    async with open_esp32_farm(1, kind=kind, boards=boards) as (device,):
        if circuit == "no-capacitor":
            device.circuit.rise_s = 0.0
        flasher = EspFlasher(FlashConfig(before=before, boot="hard-reset", connect_attempts=2))
        try:
            async with open_serial_link(device.path, lines=RELEASED) as link:
                with pytest.raises(error) as info:
                    await flasher.detect(link)
        finally:
            await flasher.aclose()
        assert message in str(info.value) and str(info.value).startswith(device.path)
        if error is not BootloaderNotResponding or before != "no-reset":
            assert "hold BOOT, press and release EN" in str(info.value)


async def test_the_real_esptool_over_pyserials_rfc2217_client() -> None:
    # The simulated boards are ordinary RFC 2217 servers: esptool's own command line,
    # through pyserial's client, talks to them like to a remote port.
    async def esptool(url: str, *args: str) -> tuple[int, str]:
        with trio.fail_after(60):
            done = await trio.run_process([sys.executable, "-m", "esptool", "--port", url, *args],
                                          capture_stdout=True, capture_stderr=True, check=False)
        return done.returncode, done.stdout.decode() + done.stderr.decode()

    async with open_esp32_farm(1, kind="esp32s3-usb") as (s3,):
        code, out = await esptool(s3.path, "--before", "usb-reset", "--no-stub", "read-mac")
        assert code == 0, out
        assert "Detecting chip type... ESP32-S3" in out and s3.profile.mac.lower() in out
    async with open_esp32_farm(1, kind="devkitc") as (devkitc,):
        # pyserial's client waits for an answer to every line change, too long for the
        # DevKitC's EN delay: the chip comes up in its app (see the EN delay test above).
        code, out = await esptool(devkitc.path, "--no-stub", "--connect-attempts", "1", "read-mac")
        assert code == 2 and "Wrong boot mode detected (0x13)" in out, out
        # The station's client puts it in its loader; after that esptool needs no reset.
        flasher = EspFlasher(FlashConfig(before="default-reset", boot="hard-reset"))
        try:
            async with open_serial_link(devkitc.path, lines=RELEASED) as link:
                await flasher.detect(link)
        finally:
            await flasher.aclose()
        code, out = await esptool(devkitc.path, "--before", "no-reset", "--no-stub", "read-mac")
        assert code == 0 and devkitc.profile.mac.lower() in out, out
