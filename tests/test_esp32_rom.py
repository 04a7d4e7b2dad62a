"""Sans-IO tests of the simulated ESP32: SLIP, the ROM and stub dialects,
the NOR flash model and app-image validation. No ptys, no subprocesses."""

from __future__ import annotations

import base64
import hashlib
import json
import random
import struct
import zlib
from pathlib import Path

import esptool
import pytest
from esptool.bin_image import LoadFirmwareImage
from esptool.targets.esp32 import ESP32ROM
from hypothesis import given
from hypothesis import strategies as st

from fixtures.sim.esp32_rom import (
    OHAI,
    BaudRateChange,
    Command,
    Esp32ChipState,
    Esp32Efuses,
    Esp32Rom,
    ExitDownloadMode,
    RamCodeStarted,
    RomError,
    SlipDecoder,
    StubStarted,
    StubStatus,
    SYNC_PAYLOAD,
    mac_crc8,
    slip_encode,
)
from fixtures.sim.esp_image import (
    AppDescription,
    InvalidImage,
    build_app_image,
    validate_image,
    xor_checksum,
)
from fixtures.sim.spi_flash import SECTOR_SIZE, WINBOND_W25Q32, JedecId, SpiNorFlash

# -- helpers -------------------------------------------------------------------


def command(op: int, data: bytes = b"", checksum: int = 0) -> bytes:
    """A request exactly as esptool's ESPLoader.command() frames it."""
    return slip_encode(struct.pack("<BBHI", 0, op, len(data), checksum) + data)


def words(*values: int) -> bytes:
    return struct.pack(f"<{len(values)}I", *values)


def data_block(payload: bytes, seq: int) -> tuple[bytes, int]:
    return struct.pack("<IIII", len(payload), seq, 0, 0) + payload, xor_checksum(payload)


def frames(rom: Esp32Rom, data: bytes) -> list[bytes]:
    """Feed bytes, return the decoded reply frames."""
    decoder = SlipDecoder()
    return [f for chunk in rom.receive(data) for f in decoder.feed(chunk)]


def parse(frame: bytes) -> tuple[int, int, int, bytes]:
    direction, op, size, value = struct.unpack_from("<BBHI", frame)
    assert direction == 1 and size == len(frame) - 8
    return op, value, size, frame[8:]


def rom_status(frame: bytes) -> bytes:
    """The ROM's 4 status bytes (status, error, 0, 0)."""
    op, value, size, data = parse(frame)
    return data[-4:]


def stub_status(frame: bytes) -> int:
    return struct.unpack(">H", parse(frame)[3][-2:])[0]


def synced_rom(chip: Esp32ChipState | None = None) -> Esp32Rom:
    rom = Esp32Rom(chip or Esp32ChipState.create(seed=3))
    assert len(frames(rom, command(Command.SYNC, SYNC_PAYLOAD))) == 8
    return rom


def read_reg(rom: Esp32Rom, address: int) -> int:
    [reply] = frames(rom, command(Command.READ_REG, struct.pack("<I", address)))
    return parse(reply)[1]


def start_stub(rom: Esp32Rom) -> None:
    """Upload the flasher stub shipped with esptool as run_stub() does (one
    MEM_DATA block per segment rather than esptool's 6 KB blocks)."""
    description = json.loads(
        (Path(esptool.__file__).parent / "targets/stub_flasher/2/esp32.json").read_text()
    )
    for field, start in (("text", "text_start"), ("data", "data_start")):
        blob = base64.b64decode(description[field])
        begin = words(len(blob), 1, len(blob), description[start])
        replies = frames(rom, command(Command.MEM_BEGIN, begin))
        assert rom_status(replies[0]) == bytes(4)
        block, checksum = data_block(blob, 0)
        assert rom_status(frames(rom, command(Command.MEM_DATA, block, checksum))[0]) == bytes(4)
    replies = frames(rom, command(Command.MEM_END, struct.pack("<II", 0, description["entry"])))
    assert rom_status(replies[0]) == bytes(4)
    assert replies[1] == OHAI
    assert rom.next_event() == StubStarted(description["entry"])
    assert rom.dialect == "stub"


# -- SLIP ----------------------------------------------------------------------

# Bytes biased towards the ones SLIP has to escape.
payloads = st.lists(
    st.lists(
        st.one_of(st.sampled_from([0xC0, 0xDB, 0xDC, 0xDD]), st.integers(0, 255)),
        min_size=1,
        max_size=64,
    ).map(bytes),
    max_size=8,
)


@given(payloads=payloads, cuts=st.lists(st.integers(min_value=0, max_value=2000), max_size=20))
def test_slip_frames_survive_any_chunking(payloads: list[bytes], cuts: list[int]) -> None:
    stream = b"".join(slip_encode(p) for p in payloads)
    bounds = sorted({0, len(stream), *(c % (len(stream) + 1) for c in cuts)})
    decoder = SlipDecoder()
    decoded = []
    for start, end in zip(bounds, bounds[1:]):
        decoded += decoder.feed(stream[start:end])
    assert decoded == payloads


def test_slip_skips_noise_before_first_frame_and_drops_bad_escapes() -> None:
    decoder = SlipDecoder()
    assert decoder.feed(b"\x00\x00garbage" + slip_encode(b"ok")) == [b"ok"]
    assert decoder.feed(b"\xc0ab\xdb\x01cd\xc0" + slip_encode(b"next")) == [b"next"]
    assert slip_encode(b"\xc0\xdb") == b"\xc0\xdb\xdc\xdb\xdd\xc0"


@given(cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=12))
def test_rom_answers_the_same_however_the_bytes_are_split(cuts: list[int]) -> None:
    stream = (
        command(Command.SYNC, SYNC_PAYLOAD)
        + command(Command.READ_REG, struct.pack("<I", 0x40001000))
        + command(Command.READ_REG, struct.pack("<I", 0x3FF5A008))  # escapes nothing; 0xC0 below
        + command(Command.READ_REG, struct.pack("<I", 0x3FF440C0))
    )
    chip = Esp32ChipState.create(seed=9)
    whole = Esp32Rom(chip).receive(stream)
    rom = Esp32Rom(chip)
    bounds = sorted({0, len(stream), *(c % (len(stream) + 1) for c in cuts)})
    pieces = [out for a, b in zip(bounds, bounds[1:]) for out in rom.receive(stream[a:b])]
    assert pieces == whole
    assert len(whole) == 8 + 3


# -- identity: registers as esptool decodes them ------------------------------


def test_efuses_reproduce_a_real_esp32_d0wd_v3() -> None:
    # ``espefuse dump`` of a real ESP32-D0WD-V3, from esptool's documentation.
    efuses = Esp32Efuses(mac=bytes.fromhex("94b97e5a6e58"))
    assert [f"{w:08x}" for w in efuses.block0()] == (
        "00000000 7e5a6e58 00e294b9 0000a200 00000333 00100000 00000004".split()
    )
    # And the MAC CRC of another real chip (esptool issue #570 trace).
    assert mac_crc8(bytes.fromhex("246f287ad884")) == 0x3E


def test_create_gives_distinct_deterministic_espressif_macs() -> None:
    a, b = Esp32ChipState.create(seed=1), Esp32ChipState.create(seed=2)
    assert a.mac[:3] == b.mac[:3] == bytes.fromhex("246f28")
    assert a.mac != b.mac
    assert Esp32ChipState.create(seed=1).mac == a.mac
    assert Esp32ChipState.create(mac=bytes.fromhex("aabbccddeeff")).mac.hex() == "aabbccddeeff"


def esptool_view(rom: Esp32Rom, baud: int = 115200) -> ESP32ROM:
    """esptool's own ESP32 decoding logic, reading registers through the ROM."""
    esp = ESP32ROM.__new__(ESP32ROM)
    esp.read_reg = lambda address, timeout=None: read_reg(rom, address)

    class Port:
        baudrate = baud

    esp._port = Port()
    esp.cache = {"flash_id": None}
    return esp


def test_esptool_identifies_the_chip_from_the_registers() -> None:
    chip = Esp32ChipState.create(seed=5)
    rom = synced_rom(chip)
    esp = esptool_view(rom)
    assert read_reg(rom, ESP32ROM.CHIP_DETECT_MAGIC_REG_ADDR) == ESP32ROM.MAGIC_VALUE
    assert esp.get_chip_description() == "ESP32-D0WD-V3 (revision v3.0)"
    assert esp.get_chip_revision() == 300
    assert bytes(esp.read_mac()) == chip.mac
    assert esp.get_crystal_freq() == 40
    assert esp.get_rom_cal_crystal_freq() == pytest.approx(chip.rom_xtal_estimate_hz)
    assert not esp.get_secure_boot_enabled() and not esp.get_flash_encryption_enabled()


def test_spi_user_commands_reach_the_flash_like_run_spiflash_command() -> None:
    chip = Esp32ChipState.create(seed=5, flash=SpiNorFlash(WINBOND_W25Q32))
    rom = synced_rom(chip)
    esp = esptool_view(rom)
    esp.write_reg = lambda address, value, mask=0xFFFFFFFF, delay_us=0, delay_after_us=0: frames(
        rom, command(Command.WRITE_REG, struct.pack("<IIII", address, value, mask, delay_us))
    )
    assert esp.flash_id() == 0x1640EF  # esptool reads "Manufacturer: ef, Device: 4016"
    assert esp.read_spiflash_sfdp(0, 32) == 0x50444653  # "SFDP"
    esp.write_status(0x0200, num_bytes=2)  # QE bit, via WEVSR + WRSR
    assert esp.read_status(2) == 0x0200


# -- ROM dialect ---------------------------------------------------------------


def test_sync_gets_eight_rom_replies_with_a_nonzero_value() -> None:
    rom = Esp32Rom(Esp32ChipState.create())
    replies = frames(rom, command(Command.SYNC, SYNC_PAYLOAD))
    assert len(replies) == 8 and len(set(replies)) == 1
    op, value, size, data = parse(replies[0])
    assert (op, size, data) == (Command.SYNC, 4, bytes(4))
    assert value != 0  # esptool's sign of the ROM rather than the stub


def test_reply_value_carries_the_last_register_read() -> None:
    rom = synced_rom()
    magic = read_reg(rom, 0x40001000)
    [reply] = frames(rom, command(Command.SPI_ATTACH, bytes(8)))
    assert parse(reply)[1] == magic == 0x00F01D83


def test_security_info_is_refused_as_the_esp32_rom_does() -> None:
    rom = synced_rom()
    wire = rom.receive(command(Command.GET_SECURITY_INFO))
    # esptool's "unsupported command" path: ROM_INVALID_RECV_MSG in a reply
    # that does not echo the command, 8 copies of 14 bytes on the wire.
    assert [len(out) for out in wire] == [14] * 8
    for out in wire:
        [reply] = SlipDecoder().feed(out)
        op, _value, _size, data = parse(reply)
        assert op != Command.GET_SECURITY_INFO
        assert data == bytes((1, RomError.INVALID_MESSAGE, 0, 0))
    # The loader carries on normally afterwards.
    assert read_reg(rom, 0x40001000) == 0x00F01D83


def test_rom_flash_write_checks_checksum_and_sequence() -> None:
    chip = Esp32ChipState.create()
    rom = synced_rom(chip)
    blocks = [bytes([i]) * 0x400 for i in (0x11, 0x22)]
    [begin] = frames(rom, command(Command.FLASH_BEGIN, words(0x800, 2, 0x400, 0x8000)))
    assert rom_status(begin) == bytes(4)

    block, checksum = data_block(blocks[0], 0)
    [bad] = frames(rom, command(Command.FLASH_DATA, block, checksum ^ 0x55))
    assert rom_status(bad) == bytes((1, RomError.BAD_CHECKSUM, 0, 0))
    block1, checksum1 = data_block(blocks[1], 1)
    [skipped] = frames(rom, command(Command.FLASH_DATA, block1, checksum1))
    assert rom_status(skipped) == bytes((1, RomError.FAILED, 0, 0))

    # esptool retries the same block; the sequence continues from there.
    assert rom_status(frames(rom, command(Command.FLASH_DATA, block, checksum))[0]) == bytes(4)
    assert rom_status(frames(rom, command(Command.FLASH_DATA, block1, checksum1))[0]) == bytes(4)
    assert chip.flash.read(0x8000, 0x800) == b"".join(blocks)

    [md5] = frames(rom, command(Command.SPI_FLASH_MD5, struct.pack("<IIII", 0x8000, 0x800, 0, 0)))
    assert parse(md5)[3] == hashlib.md5(b"".join(blocks)).hexdigest().encode() + bytes(4)


def test_rom_reports_a_write_to_unerased_flash_as_far_as_its_checksum_sees() -> None:
    chip = Esp32ChipState.create()
    chip.flash.program(0x9000, bytes(0x800))  # stale zeros
    rom = synced_rom(chip)
    # Erase size 0: the ROM erases nothing, and programming cannot set bits.
    frames(rom, command(Command.FLASH_BEGIN, struct.pack("<IIII", 0, 2, 0x400, 0x9000)))
    odd = b"\xa5" * 0x3FF + b"\x5a"
    block, checksum = data_block(odd, 0)
    [reply] = frames(rom, command(Command.FLASH_DATA, block, checksum))
    assert rom_status(reply) == bytes((1, RomError.FLASH_WRITE, 0, 0))
    # The read-back check is the 8-bit XOR, so some corruption slips past it:
    # 1024 x 0xA5 XORs to the same value as 1024 zeros. Only the MD5 tells.
    even = b"\xa5" * 0x400
    block, checksum = data_block(even, 0)
    [reply] = frames(rom, command(Command.FLASH_DATA, block, checksum))
    assert rom_status(reply) == bytes(4)
    [md5] = frames(rom, command(Command.SPI_FLASH_MD5, struct.pack("<IIII", 0x9000, 0x400, 0, 0)))
    assert parse(md5)[3][:32] != hashlib.md5(even).hexdigest().encode()


def test_rom_deflate_download_inflates_across_blocks() -> None:
    chip = Esp32ChipState.create()
    rom = synced_rom(chip)
    image = bytes(random.Random(1).choice(b"ESP32\x00") for _ in range(6000))
    packed = zlib.compress(image, 9)
    blocks = [packed[i : i + 0x400] for i in range(0, len(packed), 0x400)]
    frames(rom, command(Command.FLASH_DEFL_BEGIN, words(0x1800, len(blocks), 0x400, 0x10000)))
    for seq, payload in enumerate(blocks):
        block, checksum = data_block(payload, seq)
        [reply] = frames(rom, command(Command.FLASH_DEFL_DATA, block, checksum))
        assert rom_status(reply) == bytes(4)
    assert chip.flash.read(0x10000, len(image)) == image

    broken = bytearray(zlib.compress(image))
    broken[-1] ^= 0xFF  # corrupt the Adler-32 trailer
    frames(rom, command(Command.FLASH_DEFL_BEGIN, words(0x1800, 1, len(broken), 0x20000)))
    block, checksum = data_block(bytes(broken), 0)
    [reply] = frames(rom, command(Command.FLASH_DEFL_DATA, block, checksum))
    assert rom_status(reply) == bytes((1, RomError.DEFLATE_ADLER32, 0, 0))


def test_rom_change_baudrate_uses_its_own_crystal_estimate() -> None:
    chip = Esp32ChipState.create()
    chip.rtc_cali = 2100  # an 8 MHz clock that drifted: estimate ~4.6% high
    rom = synced_rom(chip)
    estimate = esptool_view(rom).get_rom_cal_crystal_freq()
    # What esptool's ESP32ROM.change_baud() sends to get 921600 for real:
    corrected = int(921600 * estimate // 40_000_000)
    stream = command(Command.CHANGE_BAUDRATE, struct.pack("<II", corrected, 0)) + command(
        Command.READ_REG, struct.pack("<I", 0x40001000)
    )
    [reply] = frames(rom, stream)  # processing stops at the event...
    assert parse(reply)[0] == Command.CHANGE_BAUDRATE
    event = rom.next_event()
    assert isinstance(event, BaudRateChange)
    assert event.baud == pytest.approx(921600, rel=0.002)
    assert len(frames(rom, b"")) == 1  # ...and resumes with the buffered READ_REG

    frames(rom, command(Command.CHANGE_BAUDRATE, struct.pack("<II", 921600, 0)))
    uncorrected = rom.next_event()
    assert uncorrected.baud == pytest.approx(921600 * 40_000_000 / estimate, rel=0.002)


def test_flash_end_leaves_the_loader() -> None:
    rom = synced_rom()
    frames(rom, command(Command.FLASH_BEGIN, struct.pack("<IIII", 0, 0, 0x400, 0)))
    [reply] = frames(rom, command(Command.FLASH_END, struct.pack("<I", 1)))
    assert rom_status(reply) == bytes(4)
    assert rom.next_event() == ExitDownloadMode(reboot=False)
    assert rom.finished
    assert rom.receive(command(Command.SYNC, SYNC_PAYLOAD)) == []


def test_code_that_is_not_the_stub_starts_and_goes_quiet() -> None:
    rom = synced_rom()
    frames(rom, command(Command.MEM_BEGIN, struct.pack("<IIII", 4, 1, 4, 0x40080000)))
    block, checksum = data_block(b"\x06\x00\x00\x00", 0)
    frames(rom, command(Command.MEM_DATA, block, checksum))
    [reply] = frames(rom, command(Command.MEM_END, struct.pack("<II", 0, 0x40080000)))
    assert rom_status(reply) == bytes(4)
    assert rom.next_event() == RamCodeStarted(0x40080000)
    assert rom.receive(command(Command.SYNC, SYNC_PAYLOAD)) == []


def test_mem_begin_outside_ram_is_refused() -> None:
    rom = synced_rom()
    [reply] = frames(rom, command(Command.MEM_BEGIN, struct.pack("<IIII", 16, 1, 16, 0x3F400000)))
    assert rom_status(reply) == bytes((1, RomError.RAM_ADDRESS, 0, 0))


# -- stub dialect ----------------------------------------------------------------


def test_stub_upload_switches_dialect() -> None:
    chip = Esp32ChipState.create()
    rom = synced_rom(chip)
    start_stub(rom)
    replies = frames(rom, command(Command.SYNC, SYNC_PAYLOAD))
    assert len(replies) == 8
    assert {parse(r)[1] for r in replies} == {0}  # value 0: "stub already running"
    [reply] = frames(rom, command(Command.READ_REG, struct.pack("<I", 0x40001000)))
    op, value, size, data = parse(reply)
    assert (value, data) == (0x00F01D83, b"\x00\x00")  # 2-byte status
    [reply] = frames(rom, command(Command.GET_SECURITY_INFO))
    assert stub_status(reply) == StubStatus.CMD_NOT_IMPLEMENTED


def test_stub_flash_write_erases_just_in_time_and_defers_errors() -> None:
    chip = Esp32ChipState.create()
    chip.flash.program(0x30000, bytes(0x3000))  # dirty flash under the write
    rom = synced_rom(chip)
    start_stub(rom)
    data = bytes(range(256)) * 40  # 10 KB
    frames(rom, command(Command.FLASH_BEGIN, words(len(data), 1, 0x4000, 0x30000, 0)))
    block, checksum = data_block(data, 0)
    [bad] = frames(rom, command(Command.FLASH_DATA, block, checksum ^ 1))
    assert stub_status(bad) == StubStatus.BAD_DATA_CHECKSUM
    [good] = frames(rom, command(Command.FLASH_DATA, block, checksum))
    assert stub_status(good) == StubStatus.SUCCESS
    [end] = frames(rom, command(Command.FLASH_END, struct.pack("<I", 1)))
    assert stub_status(end) == StubStatus.SUCCESS
    assert rom.next_event() is None and not rom.finished  # the stub stays
    assert chip.flash.read(0x30000, len(data)) == data
    assert chip.flash.is_erased(0x30000 + len(data), 0x3000 - len(data))

    # A failure after the reply (here, inflating garbage) surfaces on the next command.
    frames(rom, command(Command.FLASH_DEFL_BEGIN, words(100, 1, 0x4000, 0x40000, 0)))
    block, checksum = data_block(b"not zlib at all", 0)
    [accepted] = frames(rom, command(Command.FLASH_DEFL_DATA, block, checksum))
    assert stub_status(accepted) == StubStatus.SUCCESS
    [late] = frames(rom, command(Command.READ_REG, struct.pack("<I", 0x40001000)))
    assert stub_status(late) == StubStatus.INFLATE_ERROR


def test_stub_read_flash_is_flow_controlled() -> None:
    chip = Esp32ChipState.create()
    content = random.Random(2).randbytes(0x2800)
    chip.flash.program(0x50000, content)
    rom = synced_rom(chip)
    start_stub(rom)
    replies = frames(rom, command(Command.READ_FLASH, words(0x50000, len(content), 0x1000, 64)))
    assert stub_status(replies[0]) == StubStatus.SUCCESS
    received = replies[1]
    assert len(replies) == 2  # one packet, then it waits for the ACK
    while True:
        replies = frames(rom, slip_encode(struct.pack("<I", len(received))))
        if len(received) == len(content):
            break
        assert len(replies) == 1
        received += replies[0]
    assert received == content
    assert replies == [hashlib.md5(content).digest()]


def test_stub_erase_region_wants_sector_alignment() -> None:
    chip = Esp32ChipState.create()
    chip.flash.program(0x60000, bytes(0x2000))
    rom = synced_rom(chip)
    start_stub(rom)
    [bad] = frames(rom, command(Command.ERASE_REGION, struct.pack("<II", 0x60010, 0x1000)))
    assert stub_status(bad) == StubStatus.BAD_DATA_LEN
    [ok] = frames(rom, command(Command.ERASE_REGION, struct.pack("<II", 0x60000, 0x1000)))
    assert stub_status(ok) == StubStatus.SUCCESS
    assert chip.flash.is_erased(0x60000, 0x1000) and chip.flash.read(0x61000, 1) == b"\x00"


# -- NOR flash -------------------------------------------------------------------


def test_programming_ands_bits_and_only_erase_sets_them() -> None:
    flash = SpiNorFlash()
    flash.program(0x1234, b"\xf0\x3c")
    flash.program(0x1234, b"\x0f\xff")
    assert flash.read(0x1234, 2) == b"\x00\x3c"
    flash.program(0x1234, b"\xff\xff")  # cannot set bits back
    assert flash.read(0x1234, 2) == b"\x00\x3c"
    flash.erase_sector(0x1FFF)  # erases 0x1000-0x1FFF: the sector holding it
    assert flash.read(0x1234, 2) == b"\xff\xff"
    assert flash.erase_counts == {1: 1}


def test_erase_is_sector_granular() -> None:
    flash = SpiNorFlash()
    flash.program(0, bytes(3 * SECTOR_SIZE))
    flash.erase_range(SECTOR_SIZE + 10, 1)
    assert flash.read(0, SECTOR_SIZE) == bytes(SECTOR_SIZE)
    assert flash.is_erased(SECTOR_SIZE, SECTOR_SIZE)
    assert flash.read(2 * SECTOR_SIZE, SECTOR_SIZE) == bytes(SECTOR_SIZE)


def test_addresses_wrap_at_the_chip_size_and_md5_covers_regions() -> None:
    flash = SpiNorFlash()
    flash.program(flash.size - 2, b"\x01\x02\x03\x04")
    assert flash.read(0, 2) == b"\x03\x04"
    assert flash.md5(flash.size - 2, 4) == hashlib.md5(b"\x01\x02\x03\x04").digest()


#: A 64 KB chip (16 sectors): the model below is a plain array of it, and wrapping is reached often.
_SMALL_CHIP = JedecId(0xC8, 0x40, 0x10)
_FLASH_OPS = st.lists(st.one_of(
    st.tuples(st.just("program"), st.integers(0, 2 * _SMALL_CHIP.size),
              st.binary(min_size=1, max_size=3 * SECTOR_SIZE)),
    st.tuples(st.just("erase"), st.integers(0, 2 * _SMALL_CHIP.size), st.just(b"")),
), max_size=12)


@given(ops=_FLASH_OPS, start=st.integers(0, 2 * _SMALL_CHIP.size), length=st.integers(0, 3 * SECTOR_SIZE))
def test_flash_reads_as_a_whole_chip_of_nor_cells_would(ops: list[tuple[str, int, bytes]], start: int,
                                                         length: int) -> None:
    # The chip keeps only the sectors written since their erase; every read
    # must still be what an array of NOR cells (0xFF, ANDed, wrapping) holds.
    flash = SpiNorFlash(_SMALL_CHIP)
    size = flash.size
    cells = bytearray(b"\xff") * size
    for op, address, data in ops:
        if op == "program":
            flash.program(address, data)
            at = address % size
            for piece in (data[: size - at], data[size - at :]):  # at most one wrap: data is shorter than the chip
                old = int.from_bytes(cells[at : at + len(piece)], "little")
                cells[at : at + len(piece)] = (old & int.from_bytes(piece, "little")).to_bytes(len(piece), "little")
                at = 0
        else:
            flash.erase_sector(address)
            first = (address % size) & ~(SECTOR_SIZE - 1)
            cells[first:first + SECTOR_SIZE] = b"\xff" * SECTOR_SIZE
    at = start % size
    expected = bytes((cells[at:] + cells[:at])[:length]) if length <= size else None
    assert expected is not None
    assert flash.read(start, length) == expected
    assert flash.md5(start, length) == hashlib.md5(expected).digest()
    assert flash.is_erased(start, length) == (expected.count(0xFF) == length)


def test_a_blank_chip_costs_no_memory_and_an_erase_gives_it_back() -> None:
    # A station under --sim makes a 4 MB chip per slot every round: as a
    # whole-chip array each round's boards took 128 MB at 32 slots.
    import tracemalloc

    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        chips = [SpiNorFlash() for _ in range(32)]
        assert tracemalloc.get_traced_memory()[0] - before < 1 << 20
        chips[0].program(0x10000, bytes(0x10000))
        assert 0x10000 <= tracemalloc.get_traced_memory()[0] - before < 0x10000 + (1 << 20)
        chips[0].erase_chip()
        assert tracemalloc.get_traced_memory()[0] - before < 1 << 20
        assert chips[0].read(0x10000, 4) == b"\xff" * 4
    finally:
        tracemalloc.stop()


def test_spi_program_and_erase_need_write_enable() -> None:
    flash = SpiNorFlash()
    flash.transaction(0x02, address=0x100, mosi=b"\x00\x00")
    assert flash.read(0x100, 2) == b"\xff\xff"  # ignored: WEL was clear
    flash.transaction(0x06)
    assert flash.transaction(0x05, miso_length=1) == b"\x02"  # WEL set
    flash.transaction(0x02, address=0x1FE, mosi=b"\x11\x22\x33")  # wraps in its page
    assert flash.read(0x1FE, 2) + flash.read(0x100, 1) == b"\x11\x22\x33"
    assert flash.transaction(0x05, miso_length=1) == b"\x00"  # WEL cleared
    assert flash.transaction(0x9F, miso_length=3) == bytes.fromhex("c84016")


# -- app images ------------------------------------------------------------------


def sample_image() -> bytes:
    description = AppDescription(
        version="1.2.3",
        project_name="widget",
        compile_time="12:00:00",
        compile_date="Jan  1 2025",
        idf_version="v5.3",
        secure_version=0,
        elf_sha256=bytes(32),
    )
    rng = random.Random(4)
    return build_app_image(
        [
            (0x3F400020, description.to_bytes() + rng.randbytes(200)),  # DROM
            (0x3FFB0000, rng.randbytes(64)),  # DRAM
            (0x40080000, rng.randbytes(300)),  # IRAM
        ],
        entry_point=0x40080004,
    )


def test_valid_image_is_accepted_here_and_by_esptool() -> None:
    image = sample_image()
    LoadFirmwareImage("esp32", image).verify()  # esptool's independent parser
    flash = SpiNorFlash()
    flash.erase_range(0x10000, len(image))
    flash.program(0x10000, image)
    info = validate_image(flash, 0x10000, chip_revision=300)
    assert info.entry_point == 0x40080004
    assert [s.load_address for s in info.segments] == [0x3F400020, 0x3FFB0000, 0x40080000]
    assert info.length == len(image)
    assert info.sha256 == image[-32:]
    assert info.app_description is not None
    assert (info.app_description.project_name, info.app_description.version) == ("widget", "1.2.3")


def test_corrupted_checksum_is_rejected() -> None:
    image = bytearray(sample_image())
    checksum_at = len(image) - 32 - 1
    image[checksum_at] ^= 0x01
    with pytest.raises(InvalidImage, match="Checksum failed"):
        validate_image(bytes(image), 0)


def test_corrupted_digest_and_blank_flash_are_rejected() -> None:
    image = bytearray(sample_image())
    image[-1] ^= 0x80
    with pytest.raises(InvalidImage, match="hash failed"):
        validate_image(bytes(image), 0)
    with pytest.raises(InvalidImage, match="invalid magic byte 0xff"):
        validate_image(SpiNorFlash(), 0x10000)


def test_image_rules_of_the_bootloader() -> None:
    image = sample_image()
    with pytest.raises(InvalidImage, match="chip rev >= v3.1"):
        newer = build_app_image([(0x40080000, b"1234")], entry_point=0, min_rev_full=301)
        validate_image(newer, 0, chip_revision=300)
    with pytest.raises(InvalidImage, match="mismatch chip ID"):
        validate_image(build_app_image([(0x40080000, b"1234")], entry_point=0, chip_id=5), 0)
    with pytest.raises(InvalidImage, match="doesn't match data"):
        validate_image(b"\xff" * 0x100 + image, 0x100)  # mapped segment moved off its MMU page
    with pytest.raises(InvalidImage, match="bad load address"):
        validate_image(build_app_image([(0x20000000, b"1234")], entry_point=0), 0)
