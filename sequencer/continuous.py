"""Continuous testing: every slot runs its own cycle, a board at a time, until the operator stops the station.

In rounds (:mod:`sequencer.station`) every slot starts and ends together, so
one hung board holds the whole round. Here each slot is a place on the jig
where boards come and go (:class:`Boards`: a stable USB location, or a slot
of the ``--sim`` farm). A slot waits for a board, tests it, shows the
verdict until the board is taken out, and waits for the next; the others
never wait for it. What slots share is what the product says they share: an
instrument (:mod:`sequencer.resources`) or a rendezvous
(:mod:`sequencer.rendezvous`).

With a :class:`~sequencer.control.StationControl` (``control``), a slot
whose board is in waits for what the station needs from the operator before
it starts (its start scanned or pressed, its label scanned), and after its
verdict it waits for its board to be taken out *or* to be started again: a
jig whose USB adapter is always there never sees a board go. The control
can also stop one slot's run.

Ctrl-C, SIGTERM or SIGHUP behave as in rounds
(:class:`~sequencer.station.StopRequests`): the first aborts every run
under way (teardowns run, the runs are recorded ABORTED) and stops waiting
for boards; the second cuts teardowns short; later ones change nothing. A store that refuses a record
stops every slot, as in rounds. Nothing grows with the number of boards
tested: the result keeps each slot's last run and the shift's counts, the
records are in the store.
"""

from __future__ import annotations

import signal
from collections import Counter
from functools import partial
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Protocol, TypeVar

import structlog
import trio

from sequencer.config import SerialLines
from sequencer.control import StationControl
from sequencer.engine import RecordsNotWritten, RecordWriter, RunSettings, SlotControl, run_dut
from sequencer.events import BoardArrived, BoardRemoved, EventBus
from sequencer.fixtures import FixtureFactory, SlotInfo
from sequencer.operator import OperatorDesk
from sequencer.product import LoadedProduct
from sequencer.records import Outcome, RunRecord
from sequencer.rendezvous import Rendezvous
from sequencer.resources import SharedResource
from sequencer.station import StationResult, StopRequests
from sequencer.verdicts import UnitHistorySource

__all__ = ["Boards", "run_continuous"]

log = structlog.get_logger("sequencer.continuous")

T = TypeVar("T")


class Boards(Protocol):
    """Where boards come and go: one place per slot (``fixtures/presence.py``, or the ``--sim`` farm)."""

    @property
    def places(self) -> Sequence[str]:
        """Each slot's place, as the records and the operator name it (a by-path link, a USB location)."""
        ...

    async def arrived(self, slot: int) -> str:
        """Wait until a board is in ``slot``; the port to open for it."""
        ...

    async def removed(self, slot: int) -> None:
        """Wait until ``slot`` is empty."""
        ...


async def run_continuous(
    product: LoadedProduct,
    boards: Boards,
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
    run_ended: Callable[[RunRecord], Awaitable[None]] | None = None,
    simulated: bool = False,
    lines: Callable[[str], SerialLines | None] | None = None,
    control: StationControl | None = None,
) -> StationResult:
    """Test every board put into any slot, each slot on its own, until stopped; see the module docstring.

    ``stop`` takes the operator's requests to stop; with ``handle_signals``,
    SIGINT, SIGTERM and SIGHUP received meanwhile are such requests (as in
    :func:`~sequencer.station.run_station`). ``run_ended`` is given each run as it ends (the command line writes its
    report then), before the slot waits for its board to be taken out.
    ``control``: what a slot waits for before it starts, and who may stop
    it (see the module docstring); its settings, not ``settings``, are then
    each run's.
    ``lines`` says how the links to a board's port hold DTR and RTS
    (:attr:`SlotInfo.lines`).
    Returns each slot's last run and how many runs ended each way
    (:attr:`StationResult.outcomes`).
    """
    places = list(boards.places)
    cycles = _Cycles(len(places))
    points = {name: Rendezvous(name) for name in product.product.rendezvous}
    stop = stop if stop is not None else StopRequests()
    if stop.count:
        return StationResult(runs=(), aborted=True, outcomes={})  # stopped before any slot started
    stop.attach(cycles)

    async def slot_cycle(index: int) -> None:
        while not cycles.stopping:
            port = await cycles.idle(index, boards.arrived, index)
            if port is None or cycles.stopping:
                return
            bus.publish(BoardArrived(index, port))
            run_settings = settings
            if control is not None:
                # The board is in: the operator may still have to start it, or scan its label.
                begun = await cycles.idle(index, _first, partial(control.ready, index),
                                          partial(boards.removed, index))
                if begun is None:
                    return
                if begun[0] == 1:  # taken out before it started
                    control.vacated(index)
                    bus.publish(BoardRemoved(index))
                    continue
                run_settings = begun[1]
            slot_control = cycles.begin(index)
            info = SlotInfo(index=index, port=port, station=settings.station, simulated=simulated,
                            lines=lines(port) if lines is not None else None)
            try:
                run = await run_dut(
                    product, info, settings=run_settings, store=store, bus=bus, resources=resources,
                    fixtures=fixtures, control=slot_control, desk=desk, history=history, rendezvous=points,
                )
            except RecordsNotWritten as exc:
                if exc.run is not None:  # None: the store refused its very beginning, so it is no run
                    cycles.finished(index, exc.run)
                else:
                    cycles.end(index)
                cycles.refused(str(exc), index, port)
                return
            except Exception as exc:
                # The engine records phase failures itself; reaching here is a bug. This slot
                # stops; the others go on (as in rounds).
                log.exception("slot failed outside any phase", slot=index, port=port)
                cycles.crashed.append(f"slot {index} {port}: {type(exc).__name__}: {exc}")
                cycles.end(index)
                return
            cycles.finished(index, run)
            if run_ended is not None:
                await run_ended(run)
            # The verdict stays on show until the operator takes the board out (or starts it again).
            waits = [partial(boards.removed, index)]
            if control is not None:
                waits.append(partial(control.restarted, index))
            gone = await cycles.idle(index, _first, *waits)
            if gone is None:
                return
            if gone[0] == 0:
                if control is not None:
                    control.vacated(index)
                bus.publish(BoardRemoved(index))

    async def watch_signals(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
            task_status.started()
            async for _ in signals:
                stop.request()

    if control is not None:
        control.attach(len(places), cycles.stop_slot)
    try:
        async with trio.open_nursery() as outer:
            if handle_signals:
                await outer.start(watch_signals)
            async with trio.open_nursery() as slots:
                for i in range(len(places)):
                    slots.start_soon(slot_cycle, i)
            outer.cancel_scope.cancel()
    finally:
        if control is not None:
            control.detach()
    return StationResult(
        runs=tuple(r for r in cycles.last if r is not None),
        aborted=stop.count > 0,
        write_error=cycles.write_error,
        crashed=tuple(cycles.crashed),
        outcomes=dict(cycles.outcomes),
    )


async def _first(*waits: Callable[[], Awaitable[object]]) -> tuple[int, object]:
    """Wait for whichever of ``waits`` returns first: its index and what it returned (the others are cancelled)."""
    done: list[tuple[int, object]] = []
    async with trio.open_nursery() as nursery:

        async def wait(i: int) -> None:
            value = await waits[i]()
            if not done:
                done.append((i, value))
                nursery.cancel_scope.cancel()

        for i in range(len(waits)):
            nursery.start_soon(wait, i)
    return done[0]


class _Cycles:
    """What the slots' cycles share: how to stop them, and what they tested (a fixed amount of it)."""

    def __init__(self, slots: int) -> None:
        self.stopping = False
        self.controls: list[SlotControl | None] = [None] * slots
        self.waits: list[trio.CancelScope | None] = [None] * slots
        self.last: list[RunRecord | None] = [None] * slots
        #: every run's outcome, counted
        self.outcomes: Counter[Outcome] = Counter()
        self.crashed: list[str] = []
        self.write_error: str | None = None
        self._skip_teardowns = False

    async def idle(self, slot: int, wait: Callable[..., Awaitable[T]], *args: object) -> T | None:
        """``await wait(*args)`` (a board coming or going) unless the station stops first: then None."""
        if self.stopping:
            return None
        scope = trio.CancelScope()
        self.waits[slot] = scope
        try:
            with scope:
                return await wait(*args)
            return None
        finally:
            self.waits[slot] = None

    def begin(self, slot: int) -> SlotControl:
        control = SlotControl()
        self.controls[slot] = control
        if self.stopping:
            control.abort(by=self._by)
            if self._skip_teardowns:
                control.skip_teardowns()
        return control

    def finished(self, slot: int, run: RunRecord) -> None:
        self.controls[slot] = None
        self.last[slot] = run
        self.outcomes[run.outcome or Outcome.ABORTED] += 1

    def end(self, slot: int) -> None:
        self.controls[slot] = None

    def stop_slot(self, slot: int, by: str) -> bool:
        """Abort one slot's run (the operator's Stop): its teardowns run, it is recorded ABORTED ``by``."""
        control = self.controls[slot]
        if control is None:
            return False
        control.abort(by=by)
        return True

    def refused(self, error: str, slot: int, port: str) -> None:
        """The store refused a record: stop every slot rather than test units nobody can record."""
        if self.write_error is None:
            self.write_error = error
            log.error("the store refused a record: stopping every slot", slot=slot, port=port, error=error)
        self._by = "because records cannot be written"
        self._stop()

    _by = "by the operator"

    def abort(self) -> None:
        """The operator's stop (:class:`~sequencer.station.StopRequests`)."""
        self._by = "by the operator"
        self._stop()

    def _stop(self) -> None:
        self.stopping = True
        for scope in self.waits:
            if scope is not None:
                scope.cancel()
        for control in self.controls:
            if control is not None:
                control.abort(by=self._by)

    def skip_teardowns(self) -> None:
        self._skip_teardowns = True
        for control in self.controls:
            if control is not None:
                control.skip_teardowns()
