"""A product that asks the operator: a yes/no check of the status LED, then the label scanned."""

from fixtures.dut import test_firmware
from sequencer import Measurement, Product, phase


@phase(timeout=10)
async def identify(ctx, dut):
    await dut.wait_boot()
    ident = await dut.identify()
    ctx.identify(serial=ident.serial)


@phase(measurements=[Measurement("led_green").equals(True)], timeout=60, after=[identify])
async def status_led(ctx, operator):
    ctx.measurements.led_green = await operator.confirm("Is the status LED green?")


@phase(measurements=[Measurement("label").matches(r"SN\d+")], timeout=60, after=[status_led])
async def scan_label(ctx, operator):
    ctx.measurements.label = await operator.ask("Scan the label", matches=r"SN\d+")


product = Product(name="asking-widget", version="1", phases=[identify, status_led, scan_label],
                  fixtures={"dut": test_firmware(wait_boot=False)})
