"""The product docs/writing-products.md builds, one feature at a time.

An ESP32 board with a 3.3 V regulator, a battery input, a temperature sensor
and, on revision C, an extra self-test. Try it on simulated boards::

    sequencer check docs/examples/tutorial_board.py
    sequencer run docs/examples/tutorial_board.py --sim 4

Its limits file, ``tutorial_board.limits.toml``, sits beside it.
"""

from pathlib import Path

from fixtures.dut import test_firmware
from phases import esp32, evt
from sequencer import Measurement, PhaseResult, Product, phase

IMAGES = Path(__file__).resolve().parents[2] / "products" / "data" / "esp32_sensor" / "build" / "flasher_args.json"

# Reusable phases, wired into this product's graph.
detect = esp32.detect
flash = esp32.flash_images(IMAGES, retries=1).depends_on(detect)
boot = esp32.boot.depends_on(flash)
identify = evt.identify.depends_on(boot)


@phase(
    measurements=[
        Measurement("vdd_3v3", units="V", description="3.3 V regulator output")
        .in_range(3.2, 3.4, marginal=(3.25, 3.35)),
        Measurement("vbat", units="V", description="battery input").within_percent(3.9, 10),
    ],
    timeout=5,
    retries=1,
    after=[identify],
)
async def rails(ctx, dut):
    """Read both supply rails with the board's own ADC."""
    reading = await dut.read_rails()
    ctx.measurements.vdd_3v3 = reading["3V3"]
    ctx.measurements.vbat = reading["VBAT"]


@phase(
    measurements=[
        Measurement("hardware_rev").one_of(["B", "C"]),
        Measurement("firmware").check(
            lambda v: tuple(int(x) for x in v.split(".")) >= (1, 4, 0), "test firmware 1.4.0 or later"
        ),
    ],
    after=[identify],
)
async def revision(ctx):
    """Judge what identify learned: a known board revision, a recent enough test firmware."""
    ctx.measurements.hardware_rev = ctx.dut["hardware_rev"]
    ctx.measurements.firmware = ctx.dut["firmware"]


@phase(
    measurements=[
        Measurement("startup", units="V", dimensions=[("t", "s")], description="3.3 V rail at power-up")
        .in_range(-0.05, 3.5),
    ],
    timeout=10,
    after=[identify],
)
async def regulator_startup(ctx, dut):
    """Capture the regulator's start-up; no point may overshoot."""
    points = await dut.sample("3V3", 100)
    ctx.measurements.startup = points
    ctx.attach("startup.csv", "t,volts\n" + "".join(f"{t},{v}\n" for t, v in points), "text/csv")


@phase(
    measurements=[Measurement("temperature", units="degC").in_range(15, 35)],
    timeout=5,
    repeat_limit=5,
    after=[identify],
)
async def temperature(ctx, dut):
    """Read the sensor twice; until two readings agree, it is still settling."""
    first = (await dut.read_sensor("SHT40"))["temp_c"]
    second = (await dut.read_sensor("SHT40"))["temp_c"]
    if abs(second - first) > 0.5:
        ctx.log.info("temperature still settling", first=first, second=second)
        return PhaseResult.REPEAT
    ctx.measurements.temperature = second


@phase(
    measurements=[Measurement("selftest_failures").equals("")],
    timeout=10,
    after=[identify],
    run_if=lambda record: record.dut.get("hardware_rev") == "C",
)
async def rev_c_self_test(ctx, dut):
    """Revision C boards have more on board: run the firmware's self-test on them."""
    results = await dut.self_test()
    ctx.measurements.selftest_failures = ",".join(sorted(item for item, ok in results.items() if not ok))


@phase(
    measurements=[Measurement("status_led_green", description="the operator saw the LED lit green").equals(True)],
    timeout=120,
    after=[identify],
)
async def status_led(ctx, dut, operator):
    """Light the status LED green and ask the operator: only a person can see it."""
    await dut.set_led("GREEN")
    ctx.measurements.status_led_green = await operator.confirm("Is the status LED green?")
    await dut.set_led("OFF")


@phase(
    measurements=[Measurement("sleep_current", units="A").in_range(0, 25e-6, marginal=(None, 15e-6))],
    timeout=20,
    after=[rails, regulator_startup, temperature, status_led],
)
async def sleep_current(ctx, dut, slot, resources):
    """Put the board to sleep and measure its supply current with the station's one DMM."""
    await dut.enter_sleep()
    async with resources["dmm"] as dmm:
        await dmm.route(slot.index)
        ctx.measurements.sleep_current = await dmm.measure_current(1e-3)


@phase(teardown=True, timeout=10)
async def console_transcript(ctx, dut):
    """Keep the serial console's transcript with the record, whatever happened."""
    ctx.attach("console.txt", dut.link.transcript_text())


product = Product(
    name="tutorial-board",
    version="1.0",
    phases=[detect, flash, boot, identify, rails, revision, regulator_startup, temperature, rev_c_self_test,
            sleep_current, status_led, console_transcript],
    fixtures={"dut": test_firmware(wait_boot=False)},
    resources={"dmm": "scpi-dmm"},
)
