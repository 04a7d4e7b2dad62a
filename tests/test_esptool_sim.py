"""The real, unmodified esptool against the simulated ESP32 on a pseudo-terminal.

The CLI runs as a subprocess (``python -m esptool``); the Python API runs in a
worker thread while the simulator runs in trio. Images are small so the file
stays quick; ``--before/--after`` are left at their defaults on purpose, so
esptool's reset attempts (which a pty ignores) are part of what is tested.
"""

from __future__ import annotations

import random
import re
import struct
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import attrs
import pytest
import serial
import trio
from esptool.cmds import attach_flash, detect_chip, read_mac, reset_chip, run_stub, write_flash
from esptool.util import FatalError

from fixtures.sim.esp32_device import bauds_compatible, host_baud, serve_esp32_rom
from fixtures.sim.esp32_rom import Esp32ChipState
from fixtures.sim.esp_image import AppDescription, build_app_image, validate_image
from fixtures.sim.pty import PtyEndpoint

pytestmark = pytest.mark.slow


@attrs.frozen
class Sim:
    port: str
    chip: Esp32ChipState


@asynccontextmanager
async def running(chip: Esp32ChipState, *, pace_baud: bool = False) -> AsyncIterator[Sim]:
    with PtyEndpoint() as endpoint:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lambda: serve_esp32_rom(endpoint, chip, pace_baud=pace_baud))
            yield Sim(endpoint.path, chip)
            nursery.cancel_scope.cancel()


@pytest.fixture
async def esp32() -> AsyncIterator[Sim]:
    async with running(Esp32ChipState.create(seed=42)) as sim:
        yield sim


async def esptool(sim: Sim, *args: str, expect_rc: int = 0) -> str:
    with trio.fail_after(30):
        result = await trio.run_process(
            [sys.executable, "-m", "esptool", "--port", sim.port, *args],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    output = result.stdout.decode() + result.stderr.decode()
    assert result.returncode == expect_rc, output
    return output


def compressible(size: int, seed: int) -> bytes:
    """Random, but from a small alphabet, so deflate has work to do."""
    rng = random.Random(seed)
    return bytes(rng.choice(b"\x00\x01ESP\xff") for _ in range(size))


# -- CLI -------------------------------------------------------------------------


async def test_read_mac_rom_mode(esp32: Sim) -> None:
    out = await esptool(esp32, "--no-stub", "read-mac")
    assert f"MAC:                {esp32.chip.mac.hex(':')}" in out
    assert "Chip type:          ESP32-D0WD-V3 (revision v3.0)" in out
    assert "Crystal frequency:  40MHz" in out
    assert "Stub" not in out


async def test_read_mac_chip_auto_stub_mode(esp32: Sim) -> None:
    out = await esptool(esp32, "--chip", "auto", "read-mac")
    assert "Detecting chip type... ESP32" in out
    assert "Stub flasher running." in out
    assert esp32.chip.mac.hex(":") in out


@pytest.mark.parametrize(
    "options, compressed",
    [
        pytest.param([], True, id="stub-compressed"),
        pytest.param(["--no-compress"], False, id="stub-uncompressed"),
        pytest.param(["--no-stub"], False, id="rom-uncompressed"),
        pytest.param(["--no-stub", "--compress"], True, id="rom-compressed"),
    ],
)
async def test_write_flash_verifies(
    esp32: Sim, tmp_path: Path, options: list[str], compressed: bool
) -> None:
    data = compressible(24 * 1024 + 100, seed=len(options))
    path = tmp_path / "blob.bin"
    path.write_bytes(data)
    global_options = [o for o in options if o == "--no-stub"]
    write_options = [o for o in options if o != "--no-stub"]
    out = await esptool(esp32, *global_options, "write-flash", *write_options, "0x20000", str(path))
    assert "Hash of data verified." in out
    assert ("compressed)" in out) == compressed
    assert esp32.chip.flash.read(0x20000, len(data)) == data
    # The write erased whole sectors: the rest of the last one is blank.
    end = 0x20000 + len(data)
    assert esp32.chip.flash.is_erased(end, -end % 0x1000)


async def test_write_random_file_at_921600_then_verify_in_a_new_session(
    esp32: Sim, tmp_path: Path
) -> None:
    data = random.Random(1).randbytes(8 * 1024)
    path = tmp_path / "random.bin"
    path.write_bytes(data)
    out = await esptool(
        esp32, "--chip", "auto", "--baud", "921600", "write-flash", "0x9000", str(path)
    )
    assert "Changing baud rate to 921600" in out
    assert "Hash of data verified." in out
    assert esp32.chip.flash.read(0x9000, len(data)) == data
    assert bauds_compatible(esp32.chip.uart_baud, 921600)

    # Closing the port reset the chip: back in the ROM, at 115200, flash kept.
    out = await esptool(esp32, "--no-stub", "--baud", "921600", "verify-flash", "0x9000", str(path))
    assert "Verification successful (digest matched)." in out


async def test_write_app_image_boots(esp32: Sim, tmp_path: Path) -> None:
    description = AppDescription(
        version="2.0.1",
        project_name="sensor-node",
        compile_time="10:00:00",
        compile_date="Mar  3 2025",
        idf_version="v5.3.1",
        secure_version=0,
        elf_sha256=bytes(range(32)),
    )
    rng = random.Random(7)
    image = build_app_image(
        [
            (0x3F400020, description.to_bytes() + rng.randbytes(4000)),
            (0x3FFB0000, rng.randbytes(1024)),
            (0x40080000, rng.randbytes(8000)),
        ],
        entry_point=0x40080400,
    )
    path = tmp_path / "app.bin"
    path.write_bytes(image)
    out = await esptool(esp32, "--no-stub", "write-flash", "--compress", "0x10000", str(path))
    assert "Hash of data verified." in out
    info = validate_image(esp32.chip.flash, 0x10000, chip_revision=esp32.chip.chip_revision)
    assert info.app_description == description
    assert info.length == len(image)

    # One flipped bit in flash and the bootloader would refuse it.
    esp32.chip.flash.program(0x10000 + 0x200, b"\xfe")
    with pytest.raises(Exception, match="Checksum failed"):
        validate_image(esp32.chip.flash, 0x10000)


async def test_espefuse_finds_the_mac_crc_valid(esp32: Sim) -> None:
    with trio.fail_after(30):
        result = await trio.run_process(
            [sys.executable, "-m", "espefuse", "--port", esp32.port, "--chip", "esp32", "summary"],
            capture_stdout=True,
            capture_stderr=True,
        )
    out = result.stdout.decode()
    match = re.search(r"= (\S+) \(CRC (0x[0-9a-f]+) OK\)", out)
    assert match, out
    assert match.group(1) == esp32.chip.mac.hex(":")


async def test_paced_line_takes_the_time_of_the_wire(tmp_path: Path) -> None:
    data = random.Random(3).randbytes(6 * 1024)
    path = tmp_path / "paced.bin"
    path.write_bytes(data)
    async with running(Esp32ChipState.create(seed=8), pace_baud=True) as sim:
        out = await esptool(sim, "--no-stub", "write-flash", "0x40000", str(path))
    seconds = float(re.search(r"Wrote \d+ bytes at 0x00040000 in ([\d.]+) seconds", out).group(1))
    # 6 KB in 1 KB blocks, each with 16+8 bytes of header plus SLIP, at
    # 10 bits per byte and 115200 baud: about 0.55 s on the wire.
    assert seconds >= 6 * 1024 * 10 / 115200


# -- Python API, from a worker thread --------------------------------------------


def _api_flash(port: str, data: bytes, *, stub: bool) -> tuple[bytes, str, bytes]:
    esp = detect_chip(port)
    try:
        mac = bytes(esp.read_mac())
        read_mac(esp)  # the command-level helper prints it
        if stub:
            esp = run_stub(esp)
            esp.change_baud(460800)
        attach_flash(esp)
        write_flash(esp, [(0x30000, data)], compress=True)
        readback = esp.read_flash(0x30000, 256 if not stub else len(data))
        reset_chip(esp, "no-reset")
        return mac, esp.CHIP_NAME, readback
    finally:
        esp._port.close()


@pytest.mark.parametrize("stub", [True, False], ids=["stub", "rom"])
async def test_python_api_in_a_worker_thread(esp32: Sim, stub: bool) -> None:
    data = compressible(16 * 1024, seed=11)
    mac, chip_name, readback = await trio.to_thread.run_sync(
        lambda: _api_flash(esp32.port, data, stub=stub)
    )
    assert mac == esp32.chip.mac
    assert chip_name == "ESP32"
    assert readback == data[: len(readback)]
    assert esp32.chip.flash.read(0x30000, len(data)) == data


def _uncorrected_baud_change(port: str) -> str:
    """Ask the ROM for 921600 without esptool's crystal correction."""
    esp = detect_chip(port)
    try:
        esp.command(esp.ESP_CMDS["CHANGE_BAUDRATE"], struct.pack("<II", 921600, 0))
        esp._set_port_baudrate(921600)
        esp.flush_input()
        try:
            esp.read_reg(esp.CHIP_DETECT_MAGIC_REG_ADDR, timeout=0.5)
        except FatalError as exc:
            return f"failed: {exc}"
        return "ok"
    finally:
        esp._port.close()


async def test_drifted_rom_clock_needs_esptools_correction() -> None:
    chip = Esp32ChipState.create(seed=12)
    chip.rtc_cali = 2110  # the ROM overestimates its crystal by ~5%
    async with running(chip) as sim:
        # esptool pre-distorts the rate it asks for, and gets a working link.
        out = await esptool(sim, "--no-stub", "--baud", "921600", "flash-id")
        assert "Detected flash size: 4MB" in out
        # Asking for the nominal rate leaves the chip ~5% slow: no link.
        verdict = await trio.to_thread.run_sync(lambda: _uncorrected_baud_change(sim.port))
    assert verdict.startswith("failed")


# -- the pty line ----------------------------------------------------------------


def test_host_baud_is_read_from_the_pty() -> None:
    with PtyEndpoint() as endpoint:
        with serial.Serial(endpoint.path, 115200) as port:
            assert host_baud(endpoint.fileno) == 115200
            port.baudrate = 921600
            assert host_baud(endpoint.fileno) == 921600
            port.baudrate = 250000  # non-standard rates too (BOTHER)
            assert host_baud(endpoint.fileno) == 250000
    assert bauds_compatible(115200, 116000)
    assert not bauds_compatible(921600, 880000)
