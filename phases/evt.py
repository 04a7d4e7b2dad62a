"""EVT phases for boards running the test firmware (``fixtures/dut.py``).

Each phase asks for the ``dut`` fixture (a :class:`~fixtures.dut.TestFirmware`)
and declares its measurements with generic limits; a product wires them into
its graph with :meth:`~sequencer.phase.Phase.depends_on` and tightens limits
in its ``.limits.toml``.
"""

from __future__ import annotations

from sequencer import Measurement, phase

#: The DUT's model and firmware line as its boot banner states them.
BOOT_MEASUREMENTS = [
    Measurement("model").doc("model named in the boot banner"),
    Measurement("firmware_version").matches(r"\d+\.\d+\.\d+").doc("test firmware version"),
]


@phase(measurements=BOOT_MEASUREMENTS, timeout=15)
async def boot(ctx, dut):
    """Wait for the board to boot into the test firmware and say READY."""
    banner = await dut.wait_boot(10)
    ctx.measurements.model = banner.model
    ctx.measurements.firmware_version = banner.firmware
    if banner.unreadable:
        ctx.log.warning("unreadable boot lines", count=banner.unreadable)


@phase(
    measurements=[
        Measurement("serial").matches(r"SN\d{9}"),
        Measurement("mac").matches(r"([0-9A-F]{2}:){5}[0-9A-F]{2}"),
    ],
    timeout=5,
    retries=1,
)
async def identify(ctx, dut):
    """Read the DUT's identity and stamp it on the run record."""
    ident = await dut.identify()
    ctx.identify(serial=ident.serial, mac=ident.mac, model=ident.model, firmware=ident.firmware,
                 hardware_rev=ident.hardware_rev)
    ctx.measurements.serial = ident.serial
    ctx.measurements.mac = ident.mac


@phase(
    measurements=[
        Measurement("vdd_3v3", units="V", description="3.3 V regulator output").in_range(3.135, 3.465),
        Measurement("vdd_5v0", units="V", description="USB 5 V input").in_range(4.75, 5.25),
        Measurement("vbat", units="V", description="battery terminal").in_range(3.0, 4.3),
    ],
    timeout=5,
    retries=1,
)
async def supply_rails(ctx, dut):
    """Read every supply rail with the DUT's own ADC."""
    rails = await dut.read_rails()
    ctx.measurements.vdd_3v3 = rails.get("3V3")
    ctx.measurements.vdd_5v0 = rails.get("5V0")
    ctx.measurements.vbat = rails.get("VBAT")


@phase(
    measurements=[
        Measurement("regulator_startup", units="V", dimensions=[("t", "s")],
                    description="3.3 V rail during start-up").in_range(-0.05, 3.5),
    ],
    timeout=10,
)
async def regulator_startup(ctx, dut):
    """Capture the 3.3 V regulator's start-up: it must never overshoot."""
    ctx.measurements.regulator_startup = await dut.sample("3V3", 200)


@phase(
    measurements=[
        Measurement("temperature", units="degC").in_range(10, 40),
        Measurement("humidity", units="%RH").in_range(10, 80),
    ],
    timeout=5,
    retries=1,
)
async def environment_sensor(ctx, dut):
    """Read the SHT40 temperature/humidity sensor."""
    reading = await dut.read_sensor("SHT40")
    ctx.measurements.temperature = reading.get("temp_c")
    ctx.measurements.humidity = reading.get("rh_pct")


@phase(measurements=[Measurement("selftest_failures").equals("")], timeout=10)
async def self_test(ctx, dut):
    """Run the firmware's built-in self-test; every item must pass."""
    results = await dut.self_test()
    ctx.log.info("self-test", **{k: "PASS" if v else "FAIL" for k, v in results.items()})
    ctx.measurements.selftest_failures = ",".join(sorted(k for k, ok in results.items() if not ok))


@phase(
    measurements=[Measurement("sleep_current", units="A", description="deep-sleep supply current").in_range(0, 50e-6)],
    timeout=20,
)
async def sleep_current(ctx, dut, slot, resources):
    """Put the DUT to sleep and measure its supply current with the station's shared DMM."""
    await dut.enter_sleep()
    async with resources["dmm"] as dmm:
        await dmm.route(slot.index)
        ctx.measurements.sleep_current = await dmm.measure_current(1e-3)


@phase(teardown=True, timeout=10)
async def console_transcript(ctx, dut):
    """Keep the serial console transcript with the record, whatever happened."""
    ctx.attach("console.txt", dut.link.transcript_text(), "text/plain")
