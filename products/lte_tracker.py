"""LTE asset tracker (ESP32 + SIM7600-class modem): test and provision each unit end to end.

Graph (``sequencer check products/lte_tracker.py``)::

    detect → retest_gate → flash → boot → identify → { supply_rails, self_test, keygen, cellular_identity }
           → nvs_config → register → label ;  teardown: console_transcript

* ``detect`` reads chip, revision and eFuse MAC from the ROM loader.
* ``retest_gate`` looks the MAC up at the provisioning service before anything
  is written: a unit that already passed and was registered is retested
  keeping its identity and device id (policy ``"allow"``), and the record
  says so.
* ``flash`` writes the factory test firmware; ``boot`` waits for it.
* ``keygen`` has the device make its P-256 key and prove it holds it;
  ``cellular_identity`` reads IMEI, IMSI and ICCID from the modem (the
  slot's second port) and picks the APN from ``data/apn.toml``.
* ``nvs_config`` builds the unit's NVS partition from the layers in
  ``data/lte_tracker/config`` (cluster < class < group < device: MQTT client
  id, username, a random password, the APN) with secrets from the station,
  restarts the firmware into the jig's download mode, writes and verifies the
  partition, and waits for the firmware to come back. It runs after the
  cellular phase because the device layer needs the serial and the APN.
* ``register`` posts the unit (identity, public key, broker credentials) to
  the provisioning service under an idempotency key; ``label`` prints the
  QR label (serial, MAC, claim code) on the station's shared printer.

With ``--sim N`` the station simulates everything this needs: ESP32 boards
held in download mode, a modem per slot, the printer, a provisioning service
on loopback, and throwaway secrets. See docs/provisioning.md.
"""

from pathlib import Path

from fixtures.device_config import device_config_store
from fixtures.dut import test_firmware
from phases import esp32, evt
from phases.cellular import cellular_identity
from phases.keygen import keygen
from phases.label import label_phase
from phases.nvs_config import nvs_config
from phases.register import register_phase
from phases.retest_gate import retest_gate
from sequencer import Product

DATA = Path(__file__).resolve().parent / "data"
#: The factory test firmware build, shared with the sensor board.
IMAGES = DATA / "esp32_sensor" / "build" / "flasher_args.json"
CONFIG = DATA / "lte_tracker" / "config"

detect = esp32.detect
gate = retest_gate("allow").depends_on(detect)
flash = esp32.flash_images(IMAGES, retries=1).depends_on(gate)
boot = esp32.boot.depends_on(flash)
identify = evt.identify.depends_on(boot)
checks = [
    evt.supply_rails.depends_on(identify),
    evt.self_test.depends_on(identify),
    keygen.depends_on(identify),
    cellular_identity.depends_on(identify),
]
configure = nvs_config(CONFIG, partition_table=IMAGES, from_app=True).depends_on(*checks)
register = register_phase(device_config=True).depends_on(configure)
label = label_phase(product_name="LTE Tracker").depends_on(register)

product = Product(
    name="lte-tracker",
    version="1.0",
    description="LTE asset tracker: EVT, keys, cellular identity, per-device config, registration, label",
    phases=[detect, gate, flash, boot, identify, *checks, configure, register, label, evt.console_transcript],
    fixtures={
        "dut": test_firmware(baudrate=115200, wait_boot=False),
        "device_config": device_config_store(),
    },
    resources={"printer": "zpl-printer"},
)
