"""ESP32-S3 environmental sensor board: the esp32-sensor's test plan, flashing the ESP32-S3 build.

Graph (``sequencer check products/esp32s3_sensor.py``), esp32_sensor.py's::

    detect → flash (bootloader, partition table, app) → boot → identify
           → { supply_rails, regulator_startup, environment_sensor, self_test }
           → sleep_current (shared DMM) ;  teardown: console_transcript

Every phase is esp32_sensor.py's but the flash, which writes this board's
image set (``data/esp32s3_sensor/build``: ESP-IDF's ``flasher_args.json`` for
``esp32s3``, its bootloader at 0x0): detect, flash and the quality gates do
not care which chip they meet, and an ESP32 build on an S3 (or the reverse)
fails the flash phase's quality gate before anything is written. An S3 usually
reaches the station over its own USB-Serial/JTAG, reset into the ROM loader
with ``before = "usb-reset"`` and started with ``boot = "hard-reset"``;
simulated with ``sequencer run products/esp32s3_sensor.py --sim 8 --sim-board
esp32s3-usb``. Limits live in ``esp32s3_sensor.limits.toml`` beside this file.
"""

from pathlib import Path

import attrs

from phases import esp32
from products import esp32_sensor

IMAGES = Path(__file__).resolve().parent / "data" / "esp32s3_sensor" / "build" / "flasher_args.json"

flash = esp32.flash_images(IMAGES, retries=1).depends_on(esp32_sensor.detect)

product = attrs.evolve(
    esp32_sensor.product,
    name="esp32s3-sensor",
    version="1.0",
    description="ESP32-S3 environmental sensor board, EVT",
    phases=[flash if phase.name == "flash" else phase for phase in esp32_sensor.product.phases],
)
