"""Write the sensor products' image sets: small, real-looking ESP-IDF build outputs.

    python tools/make_esp32_images.py                      # both: products/data/esp32{,s3}_sensor/build
    python tools/make_esp32_images.py --chip esp32s3 DIR   # one chip's set, into DIR

One set per chip, as ``idf.py set-target`` and ``idf.py build`` leave them:
the ESP32's bootloader at 0x1000, the ESP32-S3's at 0x0, each image's chip
id and segment addresses its chip's, ``flasher_args.json`` naming the chip.

The files are what ``idf.py build`` leaves for ``idf.py flash``, at a tenth of
the size: ``flasher_args.json``, a 2nd-stage bootloader image, the partition
table (ESP-IDF's single-app layout and, after the app, ``dev_keys``: where the
test firmware keeps the device's key, apart from the ``nvs`` that per-device
configuration rewrites) and the test firmware app, whose ``esp_app_desc_t``
names the version the simulated test firmware reports. Every image has a
valid ESP image header, checksum and appended SHA-256, so both esptool's
parser and the simulated boot chain accept them. The content is seeded
pseudo-code (compressible, like real code), so the output is the same on
every run and the committed files can be checked against this script.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import attrs

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fixtures.partition_table import DATA, DEVICE_KEYS, NVS, Partition, PartitionTable, single_app_table  # noqa: E402
from fixtures.sim.esp_image import ESP32_CHIP_ID, ESP32S3_CHIP_ID, AppDescription, build_app_image  # noqa: E402

APP_VERSION = "1.4.2"  # what the simulated test firmware's BOOT line says


@attrs.frozen
class Target:
    """What differs between two chips' builds of the same firmware."""

    chip: str
    chip_id: int
    product: str
    bootloader_offset: int
    #: (load address, size) of the bootloader's segments, and its entry point
    bootloader_segments: tuple[tuple[int, int], ...]
    bootloader_entry: int
    drom: int
    dram: int
    iram: int
    irom: int
    app_entry: int
    #: ESP-IDF 5's default upper chip revision for the target (v3.99 ESP32, v0.99 S3)
    max_rev_full: int

    @property
    def app_name(self) -> str:
        return f"{self.product}-testfw.bin"

    @property
    def out(self) -> Path:
        return ROOT / "products" / "data" / self.product.replace("-", "_") / "build"


TARGETS = {
    "esp32": Target(
        "esp32", ESP32_CHIP_ID, "esp32-sensor", 0x1000,
        ((0x3FFF0030, 0x0A00), (0x40078000, 0x1400), (0x40080400, 0x0800)), 0x40080618,
        drom=0x3F400020, dram=0x3FFB0000, iram=0x40080000, irom=0x400D0000, app_entry=0x40081000, max_rev_full=399,
    ),
    "esp32s3": Target(
        "esp32s3", ESP32S3_CHIP_ID, "esp32s3-sensor", 0x0,
        ((0x3FCE3818, 0x0A00), (0x403C9700, 0x1400), (0x403CC710, 0x0800)), 0x403C98D4,
        drom=0x3C000020, dram=0x3FC92000, iram=0x40374000, irom=0x42000000, app_entry=0x40375000, max_rev_full=99,
    ),
}


def code_like(size: int, seed: int) -> bytes:
    """Bytes that deflate about as well as Xtensa code does (to roughly 60%)."""
    rng = random.Random(seed)
    words = [rng.randbytes(rng.choice((2, 3, 3, 4))) for _ in range(192)]
    out = bytearray()
    while len(out) < size:
        out += rng.choice(words) if rng.random() < 0.9 else rng.randbytes(3)
    return bytes(out[:size])


def bootloader(target: Target) -> bytes:
    return build_app_image(
        [(address, code_like(size, seed)) for seed, (address, size) in enumerate(target.bootloader_segments, 1)],
        entry_point=target.bootloader_entry, chip_id=target.chip_id, max_rev_full=target.max_rev_full,
    )


def app(target: Target) -> bytes:
    description = AppDescription(
        version=APP_VERSION,
        project_name=f"{target.product}-testfw",
        compile_time="10:00:00",
        compile_date="Mar  3 2025",
        idf_version="v5.1.2",
        secure_version=0,
        elf_sha256=bytes(range(32)),
    )
    segments = [
        (target.drom, description.to_bytes() + code_like(0x2F00, 4)),  # DROM: app description, rodata
        (target.dram, code_like(0x0C00, 5)),  # DRAM
        (target.iram, code_like(0x2800, 6)),  # IRAM
    ]
    # IROM is mapped through the MMU: its load address must agree with its
    # offset in flash modulo 64 KB (the image is flashed at 0x10000).
    position = 0x18 + sum(8 + len(data) + (-len(data) % 4) for _, data in segments) + 8
    segments.append((target.irom + position % 0x10000, code_like(0x6000, 7)))
    return build_app_image(segments, entry_point=target.app_entry, chip_id=target.chip_id,
                           max_rev_full=target.max_rev_full)


def partition_table() -> PartitionTable:
    """ESP-IDF's single-app layout, then the device-key partition: 3 pages, the least a writable NVS has."""
    return PartitionTable([*single_app_table(0x100000).partitions, Partition(DEVICE_KEYS, DATA, NVS, 0x110000, 0x3000)])


def write(out: Path, target: Target = TARGETS["esp32"]) -> list[Path]:
    bootloader_at = f"{target.bootloader_offset:#x}"
    files = {
        out / "bootloader" / "bootloader.bin": bootloader(target),
        out / "partition_table" / "partition-table.bin": partition_table().to_bytes(),
        out / target.app_name: app(target),
    }
    args = {
        "write_flash_args": ["--flash_mode", "dio", "--flash_size", "4MB", "--flash_freq", "40m"],
        "flash_settings": {"flash_mode": "dio", "flash_size": "4MB", "flash_freq": "40m"},
        "flash_files": {
            bootloader_at: "bootloader/bootloader.bin",
            "0x10000": target.app_name,
            "0x8000": "partition_table/partition-table.bin",
        },
        "bootloader": {"offset": bootloader_at, "file": "bootloader/bootloader.bin", "encrypted": "false"},
        "app": {"offset": "0x10000", "file": target.app_name, "encrypted": "false"},
        "partition-table": {
            "offset": "0x8000", "file": "partition_table/partition-table.bin", "encrypted": "false"
        },
        "extra_esptool_args": {"after": "hard_reset", "before": "default_reset", "stub": True, "chip": target.chip},
    }
    files[out / "flasher_args.json"] = (json.dumps(args, indent=4) + "\n").encode()
    for path, data in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return list(files)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chip", choices=sorted(TARGETS), help="one chip's image set (default: every chip's)")
    parser.add_argument("out", nargs="?", type=Path, help="where to write it (default: the product's build folder)")
    options = parser.parse_args()
    if options.out is not None and options.chip is None:
        parser.error("OUT_DIR needs --chip")
    for target in [TARGETS[options.chip]] if options.chip else TARGETS.values():
        for written in write(options.out or target.out, target):
            print(f"{written}  {written.stat().st_size} bytes")
