"""Running a product on every slot of a station at once.

All slots run in one nursery. A slot cannot crash its neighbours: phase
exceptions are records, not exceptions; a bug elsewhere in a slot's run ends
that run in ERROR (teardowns still run); and anything that still escapes one
slot's engine is logged and reported for that slot alone
(:attr:`StationResult.crashed`), never taken for a pass. The only
things that stop every slot are the operator (Ctrl-C / SIGTERM, or SIGHUP:
the terminal was closed or the SSH session dropped) and the store
failing (:class:`~sequencer.engine.RecordsNotWritten` from any slot: the
others are aborted, their teardowns still run), because testing without
recording is worse than not testing.

Ctrl-C once: every slot is aborted, teardowns run, every unfinished run is
recorded ABORTED. Ctrl-C twice: remaining teardowns are cut short too; the records are
still flushed. Later ones change nothing (:class:`StopRequests`). The caller exits 130 when
:attr:`StationResult.aborted`.
"""

from __future__ import annotations

import gc
import signal
from collections.abc import Callable, Mapping, Sequence
from typing import Protocol

import attrs
import structlog
import trio

from sequencer.engine import RecordsNotWritten, RecordWriter, RunSettings, SlotControl, run_dut
from sequencer.events import EventBus
from sequencer.config import SerialLines
from sequencer.fixtures import FixtureFactory, SlotInfo
from sequencer.operator import OperatorDesk
from sequencer.product import LoadedProduct
from sequencer.records import Outcome, RunRecord
from sequencer.rendezvous import Rendezvous
from sequencer.resources import SharedResource
from sequencer.verdicts import UnitHistorySource

log = structlog.get_logger("sequencer.station")

#: The cyclic collector's thresholds in a station process (CPython's default is (700, 10, 10)).
STATION_GC_THRESHOLDS = (20_000, 20, 20)


def tune_garbage_collector() -> None:
    """Make the cyclic garbage collector fit a station process; call once, before testing starts.

    ``sequencer report`` and ``export`` call it too: they read a batch's
    tens of thousands of records in one pass, hundreds of thousands of
    short-lived objects that hold no cycles, and with CPython's thresholds
    the collector's walks were a tenth of a batch page's time.

    Why: a station keeps many objects alive for a whole run (every slot's
    tasks, fixtures and finished phase records) and allocates quickly, so
    with CPython's default thresholds the collector ran hundreds of times a
    second and kept walking the same long-lived objects: at 256 slots it
    took about a fifth of the station's CPU. ``gc.freeze()`` puts what
    exists at start (modules, the product, the configuration) out of its
    sight for good, and a young-generation threshold of 20,000 allocations
    collects short-lived cycles (trio's cancellations, tracebacks) about 30
    times less often.

    What it costs in memory depends on what a run leaves in reference
    cycles, because only the collector frees those, and with these
    thresholds a full collection comes every few tens of thousands of runs.
    A finished run leaves none (``tests/test_memory.py`` runs every way a
    phase ends with the collector off), so a 32-slot soak (tools/bench/soak.py)
    holds the same RSS with these thresholds as with CPython's. A cycle that
    held a run would not be freed for hours: when a run's objects stopped
    being freed by reference counting (a phase's ctx and its measurements
    referred to each other), a station grew to 2 GB between full collections.

    Process-wide, so the application calls it (``sequencer run`` does), never
    the library on its own.
    """
    gc.freeze()
    gc.set_threshold(*STATION_GC_THRESHOLDS)


class StopRequests:
    """The operator's requests to stop one station run (Ctrl-C, SIGTERM, SIGHUP), wherever they come from.

    The first aborts every slot: phases are cancelled, teardowns run, every
    unfinished run is recorded ABORTED. The second skips the teardowns still
    running. That is all a request can do: later ones, and any that come
    once the slots have ended, change nothing, so flushing the records, the
    summary and the report always follow (a terminal sends each Ctrl-C to the
    whole process group, whatever the station is doing at that moment).
    Requests made before the station starts its slots are kept: it then
    starts none. What is stopped is a :class:`Stoppable`: the slots of a
    round (:func:`run_station`), or a continuous station's cycles
    (:mod:`sequencer.continuous`).
    """

    def __init__(self, on_request: Callable[[int], object] | None = None) -> None:
        #: how many requests so far
        self.count = 0
        self._on_request = on_request
        self._target: Stoppable | None = None

    def request(self) -> None:
        """One more request; tells ``on_request(count)``, which must not block."""
        self.count += 1
        if self.count == 1:
            log.warning("abort requested: stopping every slot, running teardowns")
            if self._target is not None:
                self._target.abort()
        elif self.count == 2:
            log.warning("second abort: skipping remaining teardowns, flushing records")
            if self._target is not None:
                self._target.skip_teardowns()
        if self._on_request is not None:
            self._on_request(self.count)

    def attach(self, target: Stoppable) -> None:
        """What the requests stop from now on; those already made apply to it at once."""
        self._target = target
        if self.count >= 1:
            target.abort()
        if self.count >= 2:
            target.skip_teardowns()


class Stoppable(Protocol):
    """What :class:`StopRequests` stops."""

    def abort(self) -> None:
        """Abort every run under way (teardowns run) and start no more."""

    def skip_teardowns(self) -> None:
        """Cut short the teardowns still running."""


@attrs.frozen
class _EverySlot:
    """A round's slots, as :class:`StopRequests` stops them."""

    controls: Sequence[SlotControl]

    def abort(self) -> None:
        for c in self.controls:
            c.abort()

    def skip_teardowns(self) -> None:
        for c in self.controls:
            c.skip_teardowns()


@attrs.frozen
class StationResult:
    runs: tuple[RunRecord, ...]
    aborted: bool = False
    #: the store's first refusal, if it refused a record: the station stopped testing
    write_error: str | None = None
    #: when the operator stopped a session while no run was open (``aborted`` too): "between rounds", ...
    stopped: str | None = None
    #: one line per slot whose run escaped the engine (a bug): "slot 3 /dev/ttyUSB3: RuntimeError: ..."
    crashed: tuple[str, ...] = ()
    #: every run's outcome, counted, when ``runs`` holds only each slot's last (a continuous station)
    outcomes: Mapping[Outcome, int] | None = None

    @property
    def all_passed(self) -> bool:
        return bool(self.runs) and not self.crashed and all(r.outcome is Outcome.PASS for r in self.runs)


async def run_station(
    product: LoadedProduct,
    ports: Sequence[str],
    *,
    settings: RunSettings,
    store: RecordWriter,
    bus: EventBus,
    resources: Mapping[str, SharedResource] | None = None,
    fixtures: Mapping[str, FixtureFactory] | None = None,
    handle_signals: bool = True,
    stop: StopRequests | None = None,
    desk: OperatorDesk | None = None,
    history: UnitHistorySource | None = None,
    simulated: bool = False,
    lines: Mapping[str, SerialLines | None] | None = None,
) -> StationResult:
    """Run ``product`` once on each port, concurrently; return every run's record.

    ``stop`` takes the operator's requests to stop (:class:`StopRequests`);
    with ``handle_signals``, SIGINT, SIGTERM and SIGHUP received while the
    station runs are such requests. (``sequencer run`` receives them for its
    whole session instead, so that none lands after the slots have ended.)
    ``desk`` queues the phases' questions for the operator (:mod:`sequencer.operator`);
    ``history`` finds each unit's earlier runs (:mod:`sequencer.verdicts`); ``lines`` says, per
    port, how its links hold DTR and RTS (:attr:`SlotInfo.lines`).
    ``simulated``: the slots are simulated (``--sim``), and each fixture's
    ``SlotInfo`` says so.
    """
    controls = [SlotControl() for _ in ports]
    points = {name: Rendezvous(name) for name in product.product.rendezvous}  # none for most products
    results: list[RunRecord | None] = [None] * len(ports)
    crashed: list[str] = []
    write_error: str | None = None
    stop = stop if stop is not None else StopRequests()
    if stop.count:
        return StationResult(runs=(), aborted=True)  # stopped before any slot started
    stop.attach(_EverySlot(controls))

    async def slot_task(index: int, port: str) -> None:
        nonlocal write_error
        info = SlotInfo(index=index, port=port, station=settings.station, simulated=simulated,
                        lines=(lines or {}).get(port))
        try:
            results[index] = await run_dut(
                product, info, settings=settings, store=store, bus=bus,
                resources=resources, fixtures=fixtures, control=controls[index], desk=desk, history=history,
                rendezvous=points,
            )
        except RecordsNotWritten as exc:
            # This slot has stopped and run its teardowns. The store is shared,
            # so stop the others too rather than test units nobody can record.
            results[index] = exc.run
            if write_error is None:
                write_error = str(exc)
                log.error("the store refused a record: stopping every slot", slot=index, port=port, error=str(exc))
                for c in controls:
                    c.abort(by="because records cannot be written")
        except Exception as exc:
            # The engine records phase failures itself; reaching here is a bug
            # in the engine or the store. Keep the other slots running.
            log.exception("slot failed outside any phase", slot=index, port=port)
            crashed.append(f"slot {index} {port}: {type(exc).__name__}: {exc}")

    async def watch_signals(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        # SIGHUP too: a closed terminal would otherwise kill the station with
        # its DUTs powered and its runs left open (INTERRUPTED at the next start).
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
            task_status.started()
            async for _ in signals:
                stop.request()

    async with trio.open_nursery() as outer:
        if handle_signals:
            await outer.start(watch_signals)
        async with trio.open_nursery() as slots:
            for i, port in enumerate(ports):
                slots.start_soon(slot_task, i, port)
        outer.cancel_scope.cancel()
    return StationResult(
        runs=tuple(r for r in results if r is not None),
        aborted=stop.count > 0,
        write_error=write_error,
        crashed=tuple(crashed),
    )
