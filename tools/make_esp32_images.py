"""Write the esp32-sensor product's image set: a small, real-looking ESP-IDF build output.

    python tools/make_esp32_images.py [OUT_DIR]     # default: products/data/esp32_sensor/build

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

import json
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fixtures.partition_table import DATA, DEVICE_KEYS, NVS, Partition, PartitionTable, single_app_table  # noqa: E402
from fixtures.sim.esp_image import AppDescription, build_app_image  # noqa: E402

APP_NAME = "esp32-sensor-testfw.bin"
APP_VERSION = "1.4.2"  # what the simulated test firmware's BOOT line says


def code_like(size: int, seed: int) -> bytes:
    """Bytes that deflate about as well as Xtensa code does (to roughly 60%)."""
    rng = random.Random(seed)
    words = [rng.randbytes(rng.choice((2, 3, 3, 4))) for _ in range(192)]
    out = bytearray()
    while len(out) < size:
        out += rng.choice(words) if rng.random() < 0.9 else rng.randbytes(3)
    return bytes(out[:size])


def bootloader() -> bytes:
    return build_app_image(
        [
            (0x3FFF0030, code_like(0x0A00, 1)),
            (0x40078000, code_like(0x1400, 2)),
            (0x40080400, code_like(0x0800, 3)),
        ],
        entry_point=0x40080618,
    )


def app() -> bytes:
    description = AppDescription(
        version=APP_VERSION,
        project_name="esp32-sensor-testfw",
        compile_time="10:00:00",
        compile_date="Mar  3 2025",
        idf_version="v5.1.2",
        secure_version=0,
        elf_sha256=bytes(range(32)),
    )
    segments = [
        (0x3F400020, description.to_bytes() + code_like(0x2F00, 4)),  # DROM: app description, rodata
        (0x3FFB0000, code_like(0x0C00, 5)),  # DRAM
        (0x40080000, code_like(0x2800, 6)),  # IRAM
    ]
    # IROM is mapped through the MMU: its load address must agree with its
    # offset in flash modulo 64 KB (the image is flashed at 0x10000).
    position = 0x18 + sum(8 + len(data) + (-len(data) % 4) for _, data in segments) + 8
    segments.append((0x400D0000 + position % 0x10000, code_like(0x6000, 7)))
    return build_app_image(segments, entry_point=0x40081000)


def partition_table() -> PartitionTable:
    """ESP-IDF's single-app layout, then the device-key partition: 3 pages, the least a writable NVS has."""
    return PartitionTable([*single_app_table(0x100000).partitions, Partition(DEVICE_KEYS, DATA, NVS, 0x110000, 0x3000)])


def write(out: Path) -> list[Path]:
    files = {
        out / "bootloader" / "bootloader.bin": bootloader(),
        out / "partition_table" / "partition-table.bin": partition_table().to_bytes(),
        out / APP_NAME: app(),
    }
    args = {
        "write_flash_args": ["--flash_mode", "dio", "--flash_size", "4MB", "--flash_freq", "40m"],
        "flash_settings": {"flash_mode": "dio", "flash_size": "4MB", "flash_freq": "40m"},
        "flash_files": {
            "0x1000": "bootloader/bootloader.bin",
            "0x10000": APP_NAME,
            "0x8000": "partition_table/partition-table.bin",
        },
        "bootloader": {"offset": "0x1000", "file": "bootloader/bootloader.bin", "encrypted": "false"},
        "app": {"offset": "0x10000", "file": APP_NAME, "encrypted": "false"},
        "partition-table": {
            "offset": "0x8000", "file": "partition_table/partition-table.bin", "encrypted": "false"
        },
        "extra_esptool_args": {"after": "hard_reset", "before": "default_reset", "stub": True, "chip": "esp32"},
    }
    files[out / "flasher_args.json"] = (json.dumps(args, indent=4) + "\n").encode()
    for path, data in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return list(files)


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "products" / "data" / "esp32_sensor" / "build"
    for written in write(target):
        print(f"{written}  {written.stat().st_size} bytes")
