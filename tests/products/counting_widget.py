"""A product that records how many run records its station process holds (tests/test_memory.py).

A station that runs for days must not keep the runs of earlier rounds: the
count a run takes should not grow with the rounds before it.
"""

import gc

from sequencer import Measurement, Product, phase
from sequencer.records import RunRecord


@phase(measurements=[Measurement("run_records_alive")])
async def count(ctx):
    ctx.measurements.run_records_alive = sum(type(o) is RunRecord for o in gc.get_objects())


product = Product("counting-widget", [count], version="1.0")
