"""OpenHTF's examples/hello_world.py as a sequencer product: ``sequencer run hello_world.py --bench 1``."""

from sequencer import Measurement, Product, phase


@phase(measurements=[Measurement("hello_world_measurement")])
async def hello_world(ctx):
    """A hello world test phase."""
    ctx.log.info("Hello World!")
    ctx.measurements.hello_world_measurement = "Hello Again!"


product = Product("hello-world", [hello_world])
