"""A product that records what its station process holds as it runs (tests/test_memory.py).

A station that runs for days must not keep anything of its earlier rounds:
the run records alive, the open file descriptors and the trio tasks a run
counts should not grow with the rounds before it.
"""

import gc
import os

import trio

from sequencer import Measurement, Product, phase
from sequencer.records import RunRecord


def _tasks(task: trio.lowlevel.Task) -> int:
    return 1 + sum(_tasks(child) for nursery in task.child_nurseries for child in nursery.child_tasks)


@phase(measurements=[Measurement("run_records_alive"), Measurement("open_fds"), Measurement("tasks")])
async def count(ctx):
    ctx.measurements.run_records_alive = sum(type(o) is RunRecord for o in gc.get_objects())
    ctx.measurements.open_fds = len(os.listdir("/proc/self/fd"))
    ctx.measurements.tasks = _tasks(trio.lowlevel.current_root_task())


product = Product("counting-widget", [count], version="1.0")
