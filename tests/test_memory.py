"""A station runs for days: nothing of a finished run may stay behind.

Reference counting frees a run's objects the moment its last reference goes;
anything caught in a reference cycle waits for the cyclic collector, which in
a station (see :func:`sequencer.station.tune_garbage_collector`) may not look
for minutes, and by then thousands of runs' fixtures and records pile up. So
these tests run with the collector off: what a finished run leaves alive is
what a station would accumulate.
"""

from __future__ import annotations

import gc
import weakref
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import trio

from reports.storage.store import LocalStore
from sequencer import Measurement, PhaseResult, Product, phase
from sequencer.events import EventBus
from sequencer.fixtures import SlotInfo
from sequencer.cli import main
from tests.conftest import run_product

COUNTING = Path(__file__).resolve().parent / "products" / "counting_widget.py"


@contextmanager
def collector_off() -> Iterator[None]:
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


class Hardware:
    """What a fixture hands a phase (it only needs to be weakly referenceable)."""

    log: Any = None


class Watched:
    """Weak references to what phases saw; alive() names those still alive."""

    def __init__(self) -> None:
        self.refs: dict[str, weakref.ref[Any]] = {}

    def watch(self, name: str, obj: Any) -> None:
        self.refs[name] = weakref.ref(obj)

    def alive(self) -> list[str]:
        return sorted(name for name, ref in self.refs.items() if ref() is not None)


def product_watched_by(watched: Watched) -> Product:
    """Phases that pass, fail, raise, time out, retry and stop a repeat; a fixture; a teardown."""

    @asynccontextmanager
    async def hardware(slot: SlotInfo) -> AsyncIterator[Hardware]:
        value = Hardware()
        value.log = slot.log  # a fixture keeps its logger: that must not lead back to its run
        watched.watch(f"fixture {slot.index}", value)
        watched.watch(f"fixture log {slot.index}", slot.log)
        slot.log.info("hardware on")
        yield value
        slot.log.info("hardware off")

    @phase(measurements=[Measurement("v").in_range(0, 10), Measurement("curve")])
    async def measure(ctx: Any, hw: Hardware) -> None:
        watched.watch("ctx", ctx)
        watched.watch("measurements", ctx.measurements)
        watched.watch("log", ctx.log)
        ctx.measurements.v = 5.0
        ctx.measurements.curve = [(0.0, 1.0), (1.0, 2.0)]
        ctx.log.info("measured", v=5.0)
        ctx.attach("console.txt", "hello")

    @phase(after=[measure], retries=1)
    async def raises(ctx: Any) -> None:
        watched.watch(f"raising ctx {ctx.attempt}", ctx)
        raise RuntimeError("the DUT said no")

    @phase(after=[measure], timeout=0.01)
    async def times_out(ctx: Any) -> None:
        watched.watch("timed-out ctx", ctx)
        await trio.sleep_forever()

    @phase(after=[measure], timeout=1)
    async def nursery_raises(ctx: Any) -> None:
        async def fails() -> None:
            raise ValueError("one task of the phase failed")

        watched.watch("nursery ctx", ctx)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.sleep_forever)
            nursery.start_soon(fails)

    @phase(after=[measure])
    async def repeats(ctx: Any) -> PhaseResult | None:
        watched.watch(f"repeating ctx {ctx.attempt}", ctx)
        # Repeats, then passes: asking past repeat_limit would stop the run, cutting the other phases short.
        return PhaseResult.REPEAT if ctx.attempt < 5 else None

    @phase(teardown=True)
    async def power_off(hw: Hardware) -> None:
        pass

    return Product("p", [measure, raises, times_out, nursery_raises, repeats, power_off], fixtures={"hw": hardware})


async def test_a_finished_run_leaves_nothing_for_the_cyclic_collector(store_path: Path) -> None:
    watched = Watched()
    bus = EventBus()
    events = bus.subscribe("watcher", buffer=10_000)  # measurements judged live, events built
    with collector_off():
        runs = await run_product(product_watched_by(watched), store_path, slots=2, bus=bus)
        assert [r.phase("times_out").outcome.value for r in runs] == ["TIMEOUT", "TIMEOUT"]
        assert runs[0].phase("nursery_raises").outcome.value == "ERROR"
        watched.watch("record", runs[0])
        del runs
        bus.close()
        async for event in events:
            del event  # the last one would hold the last run's record
        del events
        assert len(watched.refs) > 8
        assert watched.alive() == []


def test_a_session_of_many_rounds_keeps_no_earlier_round(tmp_path: Path) -> None:
    # Every run counts the run records alive in its station, its open file
    # descriptors and its trio tasks; a session that kept every round's runs
    # (for the summary and reports at its end) held two more records a round.
    store = tmp_path / "s.sqlite"
    assert main(["run", str(COUNTING), "--sim", "2", "--rounds", "5", "--plain", "--store", str(store)]) == 0
    reader = LocalStore.open(store)
    try:
        runs = reader.find_runs()
    finally:
        reader.close()
    assert len(runs) == 10  # oldest first: two runs per round
    for name in ("run_records_alive", "open_fds", "tasks"):
        per_run = [next(m.value for m in r.phases[0].measurements if m.name == name) for r in runs]
        assert max(per_run[-2:]) <= max(per_run[2:4]), (name, per_run)  # round 5 against round 2
