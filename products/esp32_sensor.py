"""ESP32 environmental sensor board: detect, flash, boot, identity, EVT, sleep current.

Graph (``sequencer check products/esp32_sensor.py``)::

    detect → flash (bootloader, partition table, app) → boot → identify
           → { supply_rails, regulator_startup, environment_sensor, self_test }
           → sleep_current (shared DMM) ;  teardown: console_transcript

Boards arrive factory-fresh, held in download mode by the jig. ``detect``
reads chip, revision and MAC from the ROM; ``flash`` writes the test
firmware build in ``data/esp32_sensor/build`` (ESP-IDF's ``flasher_args.json``)
with the station's ``flasher`` and starts it; one re-flash is allowed, for a
board that dropped off the line. See docs/flashing.md.

The four EVT phases are independent, so the engine starts them together; they
share the DUT console, whose client serialises commands. Limits live in
``esp32_sensor.limits.toml`` beside this file.

What the operator is told when a phase fails is said here, in the line's own
words (``on_fail``, and the bin: retest, rework or scrap); a unit may be
tested twice more after its first test (``max_retests``), then goes to rework.
"""

from pathlib import Path

from fixtures.dut import test_firmware
from phases import esp32, evt
from sequencer import Product

IMAGES = Path(__file__).resolve().parent / "data" / "esp32_sensor" / "build" / "flasher_args.json"

detect = esp32.detect
flash = esp32.flash_images(IMAGES, retries=1).depends_on(detect)
boot = esp32.boot.depends_on(flash)
identify = evt.identify.depends_on(boot)
evt_phases = [
    evt.supply_rails.depends_on(identify).configured(
        on_fail="Supply rail out of limits: check the 3.3 V regulator (U3) and its solder joints",
        disposition="rework"),
    evt.regulator_startup.depends_on(identify).configured(
        on_fail="Regulator overshoots at start-up: check the output capacitor (C12)", disposition="rework"),
    evt.environment_sensor.depends_on(identify).configured(
        on_fail="Reseat the sensor cable and retest", disposition="retest"),
    evt.self_test.depends_on(identify).configured(
        on_fail="Self-test failed: reseat the board in the jig and retest", disposition="retest"),
]
sleep_current = evt.sleep_current.depends_on(*evt_phases).configured(
    on_fail="Sleep current too high: look for a solder bridge near the sensor", disposition="rework")

product = Product(
    name="esp32-sensor",
    version="2.1",
    description="ESP32 environmental sensor board, EVT",
    phases=[detect, flash, boot, identify, *evt_phases, sleep_current, evt.console_transcript],
    fixtures={"dut": test_firmware(baudrate=115200, wait_boot=False)},
    resources={"dmm": "scpi-dmm"},
    max_retests=2,
    serial_pattern=r"SN\d{9}",  # what a label scanned for a slot must be ([scan] label = true)
)
