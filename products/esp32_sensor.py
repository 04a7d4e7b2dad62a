"""ESP32 environmental sensor board: boot, identity, EVT, sleep current.

Graph (``sequencer check products/esp32_sensor.py``)::

    boot → identify → { supply_rails, regulator_startup, environment_sensor, self_test }
         → sleep_current (shared DMM) ;  teardown: console_transcript

The four EVT phases are independent, so the engine starts them together; they
share the DUT console, whose client serialises commands. Limits live in
``esp32_sensor.limits.toml`` beside this file.
"""

from fixtures.dut import test_firmware
from phases import evt
from sequencer import Product

boot = evt.boot
identify = evt.identify.depends_on(boot)
evt_phases = [
    evt.supply_rails.depends_on(identify),
    evt.regulator_startup.depends_on(identify),
    evt.environment_sensor.depends_on(identify),
    evt.self_test.depends_on(identify),
]
sleep_current = evt.sleep_current.depends_on(*evt_phases)

product = Product(
    name="esp32-sensor",
    version="2.1",
    description="ESP32 environmental sensor board, EVT",
    phases=[boot, identify, *evt_phases, sleep_current, evt.console_transcript],
    fixtures={"dut": test_firmware(baudrate=115200, wait_boot=False)},
    resources={"dmm": "scpi-dmm"},
)
