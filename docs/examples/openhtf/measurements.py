"""OpenHTF's examples/measurements.py as a sequencer product, and a monitor (OpenHTF's monitors).

``sequencer run measurements.py --bench 1``: ``inline_phase`` sets 15
against 0..10 and FAILs, as in OpenHTF; the rest pass.
"""

import trio

from sequencer import Measurement, Monitor, Product, phase


@phase(measurements=[Measurement("hello_world_measurement")])
async def hello_phase(ctx):
    ctx.measurements.hello_world_measurement = "Hello!"


@phase(measurements=[Measurement(name) for name in ("first_measurement", "second_measurement", "third", "fourth")])
async def lots_of_measurements(ctx):
    ctx.measurements.first_measurement = "First!"
    ctx.measurements["second_measurement"] = "Second :("
    for name in ("third", "fourth"):
        ctx.measurements[name] = name + " is the best!"


@phase(measurements=[
    Measurement("validated_measurement", units="s").in_range(0, 10).doc("This measurement is validated."),
])
async def measure_seconds(ctx):
    ctx.measurements.validated_measurement = 5


@phase(measurements=[Measurement("inline_kwargs", units="Hz", description="declared inline").in_range(0, 10)])
async def inline_phase(ctx):
    ctx.measurements.inline_kwargs = 15  # FAILs: 15 is not within 0..10
    ctx.log.info("Set inline_kwargs to a failing value, test should FAIL!")


@phase(measurements=[
    Measurement("power_time_series", units="A").with_dimensions("ms", ("V", "V")),
    Measurement("average_voltage", units="V"),
    Measurement("resistance", units="ohm").in_range(9, 11),
])
async def multdim_measurements(ctx):
    for t in range(10):
        voltage = 10 + 10.0 * t
        ctx.measurements.power_time_series[t, voltage] = voltage / 10  # coordinates (ms, V), then the current
    series = ctx.measurements.power_time_series
    ctx.measurements.average_voltage = sum(v for _, v, _ in series) / len(series)
    average_current = sum(a for _, _, a in series) / len(series)
    ctx.measurements.resistance = ctx.measurements.average_voltage / average_current


@phase(measurements=[Measurement("resistance", units="ohm").in_range(5, 17, marginal=(9, 11))])
async def marginal_measurements(ctx):
    ctx.measurements.resistance = 13  # passes, marginal


def battery_voltage(slot):
    return 3.9 - 0.01 * slot.index


@phase(monitors=[Monitor(Measurement("vbat", units="V").in_range(3.6, 4.2), battery_voltage, period=0.05)])
async def monitored_phase(ctx):
    await trio.sleep(0.2)  # vbat is sampled every 50 ms meanwhile


product = Product("measurements", [hello_phase, lots_of_measurements, measure_seconds, inline_phase,
                                   multdim_measurements, marginal_measurements, monitored_phase], sequential=True)
