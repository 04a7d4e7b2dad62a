"""Everything about flashing that is checked before a board is touched: image sets, partition
tables, the station's [flash] and [detect] tables, port discovery, fault profiles."""

from __future__ import annotations

import json
import shutil
import textwrap
from pathlib import Path

import attrs
import pytest
from serial.tools.list_ports_common import ListPortInfo

from fixtures.flasher import find_dut_ports
from fixtures.images import ImageSetError, load_image_set
from fixtures.partition_table import APP, DATA, FACTORY, Partition, PartitionTable, PartitionTableError, single_app_table
from fixtures.sim.device import Faults
from fixtures.sim.esp32_board import BoardFaults
from fixtures.sim.faults import FaultProfileError, load_fault_profile, parse_fault_profile
from fixtures.station import detected_ports
from sequencer.config import ConfigError, DetectConfig, FlashConfig, SerialLines, load_station_config

ROOT = Path(__file__).resolve().parent.parent
BUILD = ROOT / "products" / "data" / "esp32_sensor" / "build"
S3_BUILD = ROOT / "products" / "data" / "esp32s3_sensor" / "build"
PROFILES = ROOT / "fixtures" / "sim" / "profiles"


@pytest.fixture
def build(tmp_path: Path) -> Path:
    target = tmp_path / "build"
    shutil.copytree(BUILD, target)
    return target


# -- image sets ---------------------------------------------------------------------


def test_the_shipped_build_is_read_like_idf_py_flash_reads_it() -> None:
    images = load_image_set(BUILD / "flasher_args.json")
    assert [(i.offset, i.role, i.name) for i in images.images] == [
        (0x1000, "bootloader", "bootloader.bin"),
        (0x8000, "partition-table", "partition-table.bin"),
        (0x10000, "app", "esp32-sensor-testfw.bin"),
    ]
    assert images.chip == "esp32"
    assert (images.flash_mode, images.flash_size, images.flash_freq) == ("dio", "4MB", "40m")
    assert images.app.size == (BUILD / "esp32-sensor-testfw.bin").stat().st_size
    assert len(images.app.sha256) == 64


@pytest.mark.parametrize("chip", ["esp32", "esp32s3"])
def test_the_shipped_build_is_what_the_generator_writes(tmp_path: Path, chip: str) -> None:
    import tools.make_esp32_images as generator

    target = generator.TARGETS[chip]
    written = generator.write(tmp_path, target)
    assert written
    for path in written:
        assert path.read_bytes() == (target.out / path.relative_to(tmp_path)).read_bytes(), path


def test_the_esp32s3_build_is_an_s3_build() -> None:
    images = load_image_set(S3_BUILD / "flasher_args.json")
    assert [(i.offset, i.role, i.name) for i in images.images] == [
        (0x0, "bootloader", "bootloader.bin"),  # the S3's 2nd-stage bootloader lives at 0x0
        (0x8000, "partition-table", "partition-table.bin"),
        (0x10000, "app", "esp32s3-sensor-testfw.bin"),
    ]
    assert images.chip == "esp32s3"
    # Its images are the S3's (chip id 9): an ESP32 image set is refused as the wrong chip.
    from esptool.bin_image import LoadFirmwareImage

    for image in (images.role("bootloader"), images.app):
        assert LoadFirmwareImage("esp32s3", str(image.path)).chip_id == 9
    with pytest.raises(ImageSetError, match="the build is for esp32s3, not esp32"):
        load_image_set(S3_BUILD / "flasher_args.json", chip="esp32")


def test_an_explicit_offset_map(build: Path) -> None:
    images = load_image_set({"0x10000": build / "esp32-sensor-testfw.bin", 0x1000: build / "bootloader" / "bootloader.bin"})
    assert [i.offset for i in images.images] == [0x1000, 0x10000]
    assert images.chip is None and images.source is None


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda b: (b / "esp32-sensor-testfw.bin").unlink(), "esp32-sensor-testfw.bin does not exist"),
        (lambda b: (b / "esp32-sensor-testfw.bin").write_bytes(b"\0" * 64),
         "app esp32-sensor-testfw.bin is not an ESP image (first byte 0x00, expected 0xe9)"),
        (lambda b: (b / "partition_table" / "partition-table.bin").write_bytes(b"\xff" * 3072),
         "partition-table.bin: partition 0 invalid magic number 0xffff"),
        (lambda b: (b / "flasher_args.json").write_text("{nope"), "flasher_args.json:1: not JSON"),
        (lambda b: (b / "flasher_args.json").write_text("{}"), 'no "flash_files"'),
        (lambda b: (b / "partition_table" / "partition-table.bin").write_bytes(
            PartitionTable([Partition("factory", APP, FACTORY, 0x10000, 0x8000)]).to_bytes()),
         "esp32-sensor-testfw.bin is 50272 bytes, larger than its partition 'factory' (32768 bytes)"),
    ],
)
def test_a_broken_build_fails_at_load_naming_the_file(build: Path, change, message: str) -> None:
    change(build)
    with pytest.raises(ImageSetError) as info:
        load_image_set(build / "flasher_args.json")
    assert message in str(info.value) and "\n" not in str(info.value)


def test_overlapping_images_and_a_build_for_another_chip_are_refused(build: Path) -> None:
    with pytest.raises(ImageSetError, match=r"bootloader.bin \(0x1000\.\.0x.*\) overlaps esp32-sensor-testfw.bin at 0x2000"):
        load_image_set({0x1000: build / "bootloader" / "bootloader.bin", 0x2000: build / "esp32-sensor-testfw.bin"})
    args = json.loads((build / "flasher_args.json").read_text())
    args["extra_esptool_args"]["chip"] = "esp32s3"
    (build / "flasher_args.json").write_text(json.dumps(args))
    with pytest.raises(ImageSetError, match="bootloader bootloader.bin is built for chip id 0, not esp32s3"):
        load_image_set(build / "flasher_args.json")


def test_partition_tables_round_trip_and_fail_like_the_bootloader_says() -> None:
    table = single_app_table(0x100000)
    raw = table.to_bytes()
    assert len(raw) == 0xC00 and PartitionTable.parse(raw) == table
    assert table.boot_app() == Partition("factory", APP, FACTORY, 0x10000, 0x100000)
    assert table.find("nvs").type == DATA
    corrupted = bytearray(raw)
    corrupted[40] ^= 1
    with pytest.raises(PartitionTableError, match="Partition table MD5 mismatch"):
        PartitionTable.parse(bytes(corrupted))
    with pytest.raises(PartitionTableError, match="No MD5 found"):
        PartitionTable.parse(raw[:96] + b"\xff" * (0xC00 - 96))


# -- station configuration -----------------------------------------------------------


def station(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "station.toml"
    path.write_text(textwrap.dedent(body))
    return path


def test_flash_and_detect_tables_are_read_with_their_gates(tmp_path: Path) -> None:
    config = load_station_config(station(tmp_path, """
        [flash]
        baud = 460800
        max_seconds = 30
        max_image_bytes = { ESP32 = 0x180000, esp32-s3 = 0x300000 }
        [detect]
        vid = 0x10C4
        location = "1-1.*"
    """))
    assert config.flash == FlashConfig(baud=460800, max_seconds=30, max_image_bytes={"esp32": 0x180000,
                                                                                     "esp32s3": 0x300000})
    assert config.detect == (DetectConfig(vid=0x10C4, location="1-1.*"),)
    config.check()  # [detect] is a port source of its own
    assert load_station_config(station(tmp_path, "sim = 1\n")).flash == FlashConfig()


def test_wiring_is_set_for_the_station_per_port_and_per_detect_rule(tmp_path: Path) -> None:
    config = load_station_config(station(tmp_path, """
        [flash]
        before = "default-reset"
        boot = "hard-reset"
        stub = true
        [flash.port."/dev/ttyUSB9"]
        before = "no-reset"
        boot = "none"
        [[detect]]
        vid = 0x303A
        pid = 0x1001
        before = "usb-reset"
        [[detect]]
        vid = 0x10C4
    """))
    assert (config.flash.before, config.flash.boot, config.flash.stub) == ("default-reset", "hard-reset", True)
    jig = config.flash.for_port("/dev/ttyUSB9")
    assert (jig.before, jig.boot, jig.stub, jig.port) == ("no-reset", "none", True, {})
    assert config.flash.for_port("/dev/ttyUSB0") == attrs.evolve(config.flash, port={})
    assert [rule.wiring.overrides() for rule in config.detect] == [{"before": "usb-reset"}, {}]
    # The console holds DTR/RTS released where reset lines are wired, and leaves a jig's port as pyserial opens it.
    assert config.flash.console_lines == SerialLines(dtr=False, rts=False)
    assert jig.console_lines is None


def test_detect_rules_give_the_ports_they_find_their_wiring_in_hub_order(tmp_path: Path) -> None:
    config = load_station_config(station(tmp_path, """
        [flash.port."/dev/ttyUSB1"]
        boot = "none"
        [[detect]]
        vid = 0x303A
        before = "usb-reset"
        boot = "hard-reset"
        [[detect]]
        vid = 0x10C4
        before = "default-reset"
        boot = "hard-reset"
        [[detect]]
        location = "1-1.*"
    """))
    ports = [
        usb("/dev/ttyACM0", 0x303A, 0x1001, "S3", "1-1.4"),
        usb("/dev/ttyUSB3", 0x10C4, 0xEA60, "JIG-A2", "1-1.3"),
        usb("/dev/ttyUSB1", 0x10C4, 0xEA60, "JIG-A1", "1-1.1"),
        usb("/dev/ttyUSB0", 0x1A86, 0x7523, None, "1-1.2"),
        usb("/dev/ttyS0", None, None, None, None),
    ]
    found = detected_ports(config, ports)
    assert found.ports == ("/dev/ttyUSB1", "/dev/ttyUSB0", "/dev/ttyUSB3", "/dev/ttyACM0")
    flash = found.flash
    assert (flash.for_port("/dev/ttyACM0").before, flash.for_port("/dev/ttyACM0").boot) == ("usb-reset", "hard-reset")
    assert flash.for_port("/dev/ttyUSB3").before == "default-reset"
    # A port the station file names itself keeps its own wiring; a port no rule wires keeps [flash].
    assert (flash.for_port("/dev/ttyUSB1").before, flash.for_port("/dev/ttyUSB1").boot) == ("no-reset", "none")
    assert flash.for_port("/dev/ttyUSB0") == FlashConfig()
    with pytest.raises(ConfigError, match=r"detect: no serial port matches vid=12346; vid=4292; location='1-1.\*'"):
        detected_ports(config, ports[-1:])


def test_a_rule_with_locations_gives_its_slots_in_order_and_its_wiring_also_to_a_continuous_station(
    tmp_path: Path,
) -> None:
    body = """
        [[detect]]
        vid = 0x10C4
        locations = ["1-1.3", "1-1.1"]
        before = "default-reset"
        boot = "hard-reset"
        [[detect]]
        vid = 0x303A
        before = "usb-reset"
    """
    config = load_station_config(station(tmp_path, body))
    assert config.located == config.detect[0] and config.detect[0].describe() == "vid=4292, locations=['1-1.3', '1-1.1']"
    ports = [
        usb("/dev/ttyACM0", 0x303A, 0x1001, "S3", "1-1.0"),
        usb("/dev/ttyUSB1", 0x10C4, 0xEA60, "JIG-A1", "1-1.1"),
        usb("/dev/ttyUSB3", 0x10C4, 0xEA60, "JIG-A2", "1-1.3"),
    ]
    found = detected_ports(config, ports)
    assert found.ports == ("/dev/ttyUSB3", "/dev/ttyUSB1", "/dev/ttyACM0")  # the located slots first, in their order
    assert [found.flash.for_port(p).before for p in found.ports] == ["default-reset", "default-reset", "usb-reset"]
    # A continuous station finds its ports as boards arrive: its slots take the located rule's wiring.
    continuous = detected_ports(attrs.evolve(config, continuous=True), ports)
    assert continuous.ports == () and (continuous.flash.before, continuous.flash.boot) == ("default-reset", "hard-reset")
    assert continuous.flash.for_port("/dev/serial/by-path/x").console_lines == SerialLines(dtr=False, rts=False)


@pytest.mark.parametrize(
    "body, message",
    [
        ("[[detect]]\nlocations = ['1-1.1']\n[[detect]]\nlocations = ['1-1.2']\n",
         "detect: locations belong to one rule"),
        ("continuous = true\nsim_board = 'devkitc'\n", "continuous: the simulated operator swaps jig boards only"),
        ("[flash]\nbuad = 921600\n", "flash: unknown key 'buad'"),
        ("[flash]\nbaud = '921600'\n", "flash.baud must be a whole number, got '921600'"),
        ("[flash]\nmax_seconds = -1\n", "flash: max_seconds must be a positive number"),
        ("[flash]\nboot = 'reboot'\n", "flash: boot must be one of run-user-code, hard-reset, none, got 'reboot'"),
        ("[flash]\nstub = true\n", 'flash: stub = true needs boot = "hard-reset"'),
        ("[flash]\nmax_image_bytes = { esp32 = 'big' }\n", "max_image_bytes.esp32 must be a positive whole number"),
        ("[detect]\n", "detect: detect needs at least one of"),
        ("[detect]\nvid = '10c4'\n", "detect.vid must be a whole number"),
        ("[detect]\nhub = 3\n", "detect: unknown key 'hub'"),
        ("[flash]\nbefore = 'hard-reset'\n", "flash: before must be one of default-reset, usb-reset, no-reset"),
        ("[flash.port.'/dev/x']\nbefore = 'usb_reset'\n", "flash.port.'/dev/x': before must be one of"),
        ("[flash.port.'/dev/x']\nmax_seconds = 3\n", "flash.port.'/dev/x': unknown key 'max_seconds' (known: baud,"),
        ("[flash]\nport = 3\n", 'flash.port must hold one table per port, as [flash.port."/dev/ttyUSB0"]'),
        ("[flash]\nstub = true\nboot = 'hard-reset'\n[flash.port.'/dev/x']\nboot = 'run-user-code'\n",
         '[flash.port."/dev/x"]: stub = true needs boot = "hard-reset"'),
        ("[[detect]]\nvid = 1\n[[detect]]\nbefore = 'usb-reset'\n", "detect rule 2: detect needs at least one of"),
        ("[[detect]]\nvid = 1\nboot = 'bounce'\n", "detect rule 1: boot must be one of"),
        ("[flash]\nstub = true\nboot = 'hard-reset'\n[[detect]]\nvid = 1\nboot = 'run-user-code'\n",
         "[[detect]] rule 1: stub = true needs boot"),
        ("sim_board = 'wroom'\n", "sim_board must be one of jig, devkitc, esp32s3-usb"),
    ],
)
def test_bad_flash_and_detect_tables_are_one_line_errors(tmp_path: Path, body: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_station_config(station(tmp_path, "sim = 1\n" + body)).check()
    assert message in str(info.value) and str(tmp_path) in str(info.value)


def usb(device: str, vid: int | None, pid: int | None, serial: str | None, location: str | None) -> ListPortInfo:
    port = ListPortInfo(device, skip_link_detection=True)
    port.vid, port.pid, port.serial_number, port.location = vid, pid, serial, location
    port.description = "CP2102N USB to UART Bridge Controller" if vid == 0x10C4 else "n/a"
    return port


def test_ports_are_found_by_usb_identity_and_ordered_by_hub_position() -> None:
    ports = [
        usb("/dev/ttyUSB3", 0x10C4, 0xEA60, "JIG-A2", "1-1.3"),
        usb("/dev/ttyUSB1", 0x10C4, 0xEA60, "JIG-A1", "1-1.1"),
        usb("/dev/ttyUSB0", 0x1A86, 0x7523, None, "1-2"),
        usb("/dev/ttyS0", None, None, None, None),
    ]
    assert find_dut_ports(DetectConfig(vid=0x10C4), ports) == ["/dev/ttyUSB1", "/dev/ttyUSB3"]
    assert find_dut_ports(DetectConfig(location="1-1.*"), ports) == ["/dev/ttyUSB1", "/dev/ttyUSB3"]
    assert find_dut_ports(DetectConfig(serial="JIG-A2"), ports) == ["/dev/ttyUSB3"]
    assert find_dut_ports(DetectConfig(description="*CP2102*", pid=0xEA60), ports) == ["/dev/ttyUSB1", "/dev/ttyUSB3"]
    assert find_dut_ports(DetectConfig(serial="*"), ports) == ["/dev/ttyUSB1", "/dev/ttyUSB3"]  # no serial: no match
    assert find_dut_ports(DetectConfig(vid=0x0403), ports) == []


# -- fault profiles ------------------------------------------------------------------


def test_a_built_in_profile_is_found_by_its_name_and_a_wrong_name_lists_them(tmp_path: Path,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert load_fault_profile("flaky-line", 16) == load_fault_profile(PROFILES / "flaky-line.toml", 16)
    with pytest.raises(FaultProfileError, match=r"^flaky: no such fault profile \(a TOML file, or one of: "
                                                 r"auto-reset, every-fault, flaky-line\)$"):
        load_fault_profile("flaky", 16)
    (tmp_path / "flaky-line").write_text("", encoding="utf-8")  # a file of that name is the file, not the built-in
    assert load_fault_profile("flaky-line", 16).slots == {}


def test_the_every_fault_profile_covers_every_board_and_firmware_kind_once() -> None:
    plan = load_fault_profile(PROFILES / "every-fault.toml", 16)
    kinds = sorted(spec.kind for specs in plan.slots.values() for spec in specs)
    from fixtures.sim.faults import KINDS

    # The profile is esp32_sensor's, which asks the operator nothing: an
    # operator fault would leave its slot passing, untouched. Faults of
    # auto-reset circuits have a profile of their own (a jig has none).
    assert kinds == sorted(k for k in KINDS if k != "operator_says_no" and KINDS[k].sim_boards is None)
    assert plan.boards() == {
        1: BoardFaults(download_mode=False), 2: BoardFaults(disconnect_after=24 * 1024),
        3: BoardFaults(weak_cell=0x12000), 9: BoardFaults(block_delay_s=0.02), 13: BoardFaults(unplug_after=24 * 1024),
        14: BoardFaults(efuse_mac="00:00:00:00:00:00"),
    }
    assert plan.firmware()[6] == Faults(hang=True) and plan.firmware()[4] == Faults(rail_offsets={"3V3": 0.3})
    assert 0 not in plan.slots and 15 not in plan.slots
    with pytest.raises(FaultProfileError, match=r"slots.2: bad_mac.mac must be six hex octets like 24:0A:C4:00:00:01, "
                                                r"got '24:0A'"):
        parse_fault_profile('[slots]\n2 = { kind = "bad_mac", mac = "24:0A" }\n', 4, source="p.toml")


def test_the_auto_reset_profile_is_for_boards_with_a_reset_circuit(tmp_path: Path) -> None:
    from fixtures.station import load_faults
    from sequencer.config import StationConfig
    from sequencer.product import load_product

    plan = load_fault_profile(PROFILES / "auto-reset.toml", 8)
    assert plan.boards() == {1: BoardFaults(auto_reset=False), 2: BoardFaults(resets_on_open=True),
                             3: BoardFaults(disconnect_after=24 * 1024), 4: BoardFaults(weak_cell=0x12000)}
    assert plan.not_on("devkitc") == plan.not_on("esp32s3-usb") == []
    assert plan.not_on("jig") == ["slot 1: no_auto_reset", "slot 2: resets_on_open"]
    sensor = load_product(ROOT / "products" / "esp32_sensor.py", station_fixtures=("flasher",))
    assert load_faults(PROFILES / "auto-reset.toml", StationConfig(sim=8, sim_board="devkitc"), sensor) is not None
    with pytest.raises(ConfigError, match=r"auto-reset.toml: slot 1: no_auto_reset needs an auto-reset board "
                                          r"\(--sim-board devkitc or esp32s3-usb\); a jig has no reset circuit"):
        load_faults(PROFILES / "auto-reset.toml", StationConfig(sim=8), sensor)
    # A board that resets on open is a fault of running boards too; a flash fault is not.
    widget = load_product(ROOT / "tests" / "products" / "asking_widget.py", station_fixtures=("flasher",))
    running = tmp_path / "running.toml"
    running.write_text("[slots]\n1 = 'resets_on_open'\n")
    assert load_faults(running, StationConfig(sim=2, sim_board="devkitc"), widget).boards()
    running.write_text("[slots]\n1 = 'corrupt_write'\n")
    with pytest.raises(ConfigError, match="board faults need a product that flashes"):
        load_faults(running, StationConfig(sim=2, sim_board="devkitc"), widget)


def test_probabilities_are_drawn_per_slot_from_the_seed() -> None:
    text = "seed = 3\n[probability]\ndisconnect = 0.5\nrail_marginal = { probability = 0.5, offset = 0.08 }\n"
    plan = parse_fault_profile(text, 32)
    assert parse_fault_profile(text, 32) == plan
    assert parse_fault_profile(text, 40).slots.items() >= plan.slots.items()  # more slots, same first ones
    assert 6 < sum("disconnect" in str(s) for specs in plan.slots.values() for s in specs) < 26
    assert parse_fault_profile(text.replace("seed = 3", "seed = 4"), 32) != plan
    assert all(
        s.params["offset"] == 0.08 for specs in plan.slots.values() for s in specs if s.kind == "rail_marginal"
    )
    flaky = load_fault_profile(PROFILES / "flaky-line.toml", 16)
    assert flaky.slots and flaky.description


def test_slots_take_several_faults_and_parameters() -> None:
    plan = parse_fault_profile(
        '[slots]\n2 = ["garbage", { kind = "rail_high", rail = "5V0", offset = 1 }, "slow_flash"]\n', 4
    )
    assert plan.firmware() == {2: Faults(garbage=True, rail_offsets={"5V0": 1.0})}
    assert plan.boards() == {2: BoardFaults(block_delay_s=0.02)}
    assert plan.summary() == "2: garbage + rail_high(rail='5V0', offset=1.0) + slow_flash"


@pytest.mark.parametrize(
    "text, message",
    [
        ("[slots]\n1 = 'corupt_write'\n", "slots.1: unknown fault 'corupt_write' (known: no_download_mode,"),
        ("[slots]\n9 = 'hang'\n", "slots.9: the farm has slots 0..3"),
        ("[slots]\nx = 'hang'\n", "slots.x: a slot is a number"),
        ("[slots]\n1 = { kind = 'disconnect', after = 3 }\n", "disconnect: unknown parameter 'after'"),
        ("[slots]\n1 = { kind = 'slow', seconds = 'long' }\n", "slow.seconds must be like 1.5, got 'long'"),
        ("[slots]\n1 = { kind = 'rail_high', rail = '12V' }\n", "rail_high.rail must be one of 3V3, 5V0, VBAT"),
        ("[probability]\nhang = 2\n", "probability.hang: the probability must be a number from 0 to 1"),
        ("[slot]\n1 = 'hang'\n", "unknown key 'slot'"),
        ("[slots\n", "bad TOML"),
    ],
)
def test_bad_profiles_are_one_line_errors(text: str, message: str) -> None:
    with pytest.raises(FaultProfileError) as info:
        parse_fault_profile(text, 4, source="p.toml")
    assert message in str(info.value) and str(info.value).startswith("p.toml: ")
