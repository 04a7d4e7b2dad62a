"""Running one product on one slot: the phase scheduler.

Per slot, the main phases run in one nursery. A phase becomes ready the
moment the last phase it waits for is committed (the product's plan,
sequencer/plan.py: ``after``, ``follows``, sequential order, groups); it then
runs if those it comes ``after`` passed and its groups let it (otherwise it
is SKIPPED and the record says why). A group's teardown runs in the graph,
as soon as the group's main part has ended. Independent phases therefore run concurrently. Phases with no
dependencies start in tasks of their own; a phase made ready by a commit runs
in the task that committed it, and any further phases that commit made ready
get tasks of their own. A chain of phases is one task, not a task per phase
waiting on an event per phase: at hundreds of slots that waiting was a large
part of the engine's own time.

Three kinds of cancellation, kept apart on purpose:

* a phase's **timeout** is its own ``move_on_after``; the attempt ends TIMEOUT
  (and may be retried);
* **stopping** the run (``stop_on_failure``, a phase returning STOP or
  repeating past its limit) cancels each in-flight phase's scope (its own,
  or for a phase without a timeout its chain's: see ``_phase_chain``): they
  end ABORTED with the reason, phases not yet started are SKIPPED, and
  teardowns run; the run's verdict is the stopping phase's (FAIL for STOP),
  not ABORTED;
* **aborting** the slot (the operator's Ctrl-C) cancels the slot's main
  scope: every unfinished phase is recorded, teardowns run shielded under
  their own timeouts, and the run is ABORTED. A second abort cancels the
  teardowns too. Records are written in every case.

Each finished phase is committed to the store before dependents may start, so
whatever happens to the process later, what was finished is on disk.
"""

from __future__ import annotations

import math
import traceback
import uuid
from collections.abc import Mapping
from typing import Any

import attrs
import trio

from sequencer.context import PhaseContext, PhaseLog, bind_logger
from sequencer.events import (
    DutIdentified,
    EventBus,
    PhaseFinished,
    PhaseStarted,
    PhaseWaiting,
    RunFinished,
    RunStarted,
    UnitRecognised,
)
from sequencer.fixture_log import FixtureLines, FixtureLog
from sequencer.fixtures import FixtureFactory, SlotInfo
from sequencer.operator import Operator, OperatorDesk
from sequencer.monitors import sample_until_cancelled
from sequencer.phase import Phase, PhaseResult
from sequencer.plan import GroupPlan, Step
from sequencer.product import LoadedProduct
from sequencer.records import (
    AttemptRecord,
    Attachment,
    ErrorInfo,
    MeasurementOutcome,
    MeasurementRecord,
    Outcome,
    PhaseRecord,
    RunRecord,
    ScanRecord,
    run_outcome,
    utcnow,
)
from sequencer.rendezvous import Rendezvous
from sequencer.resources import ResourceAccess, SharedResource
from sequencer.verdicts import UnitHistory, UnitHistorySource, decide, unit_identity
from sequencer.version import SEQUENCER_VERSION


#: Closing a fixture (a serial port) must not hold a slot forever.
FIXTURE_CLOSE_TIMEOUT_S = 10.0
#: How long a finished run waits for the look-up of its unit's earlier runs still under way.
LOOKUP_WAIT_S = 5.0


class FixtureError(Exception):
    """A fixture could not be opened; the message names it and says why, in one line."""


class RecordsNotWritten(Exception):
    """The store refused a slot's records; the slot stopped, ran its teardowns and closed its fixtures.

    ``run`` is the run as the engine knew it at the end, in memory only:
    what of it reached the store is whatever was committed before the
    store failed, and its outcome is INTERRUPTED, as the store will say
    (its record stops short: see :class:`~sequencer.records.Outcome`). ``None`` when the store
    refused the run's very beginning: no unit was tested, and the store
    has nothing of it. The message is the store's.
    """

    def __init__(self, message: str, run: RunRecord | None) -> None:
        super().__init__(message)
        self.run = run


class RecordWriter:
    """What the engine needs from a store (see :class:`reports.storage.store.LocalStore`).

    ``commit_phase`` returns once the record is durable, and should not be a
    checkpoint (or shield itself): a commit cancelled halfway would leave the
    engine unsure whether the store has the record. ``LocalStore`` never
    yields in its writes; a writer that does is also run correctly by the
    engine, but an abort may then land inside a commit.
    """

    async def begin_run(self, run: RunRecord) -> None: ...

    async def commit_phase(self, run_id: str, index: int, phase: PhaseRecord, dut: dict[str, str]) -> None: ...

    async def finish_run(self, run: RunRecord) -> None: ...


class _PhaseRun:
    """A phase in flight: its attempts so far, log and attachments, and the counts its retries go by."""

    __slots__ = ("attempts", "log", "attachments", "waited", "failures", "repeats")

    def __init__(self, log: PhaseLog) -> None:
        self.attempts: list[AttemptRecord] = []
        self.log = log
        self.attachments: list[Attachment] = []
        #: seconds waited at its rendezvous and for shared resources
        self.waited = 0.0
        self.failures = 0
        self.repeats = 0


class _Cut:
    """How an attempt ended, before it is judged; for one a stop cut short in its chain's scope, what ending it needs."""

    __slots__ = ("number", "started", "ctx", "access", "result", "error", "reason", "cut_short")

    def __init__(self, number: int, started: Any, ctx: PhaseContext, access: ResourceAccess, result: PhaseResult,
                 error: ErrorInfo | None, reason: str | None, cut_short: bool) -> None:
        self.number, self.started, self.ctx, self.access = number, started, ctx, access
        self.result, self.error, self.reason, self.cut_short = result, error, reason, cut_short


class _LeftSegment(Exception):
    """An attempt a stop meant to cut short ended without the Cancelled: its chain ends it outside its scope."""


def _only_cancelled(exc: BaseException) -> bool:
    """``exc`` is trio's Cancelled, or a group of nothing else."""
    if isinstance(exc, trio.Cancelled):
        return True
    return isinstance(exc, BaseExceptionGroup) and exc.split(trio.Cancelled)[1] is None


class SlotControl:
    """The station's handle on a running slot: abort it, then (if asked twice) its teardowns."""

    def __init__(self) -> None:
        self.main_scope = trio.CancelScope()
        self.teardown_scope = trio.CancelScope(shield=True)
        self.aborted = False
        #: why, as the records say it: "aborted <by>"
        self.aborted_by = "by the operator"
        #: groups' teardowns running among the main phases, each in a scope an abort does not reach
        self._shields: set[trio.CancelScope] = set()

    def abort(self, by: str = "by the operator") -> None:
        if not self.aborted:
            self.aborted, self.aborted_by = True, by
        self.main_scope.cancel()

    def skip_teardowns(self) -> None:
        self.teardown_scope.cancel()
        for scope in self._shields:
            scope.cancel()

    def teardown_shield(self) -> trio.CancelScope:
        """Where a group's teardown runs among the main phases: a first abort lets it finish, a second does not.

        Enter it, and :meth:`release` it when done.
        """
        scope = trio.CancelScope(shield=True)
        if self.teardown_scope.cancel_called:
            scope.cancel()
        self._shields.add(scope)
        return scope

    def release(self, shield: trio.CancelScope) -> None:
        self._shields.discard(shield)


@attrs.frozen
class RunSettings:
    """Who and what a run is for; stamped on its record."""

    station: str
    operator: str = ""
    batch: str = ""
    #: what was scanned for the run (the badge, the work order, the unit's label, its start: sequencer/control.py)
    scans: tuple[ScanRecord, ...] = ()


def new_run_id() -> str:
    return uuid.uuid4().hex


async def run_dut(
    product: LoadedProduct,
    slot: SlotInfo,
    *,
    settings: RunSettings,
    store: RecordWriter,
    bus: EventBus,
    resources: Mapping[str, SharedResource] | None = None,
    fixtures: Mapping[str, FixtureFactory] | None = None,
    control: SlotControl | None = None,
    desk: OperatorDesk | None = None,
    history: UnitHistorySource | None = None,
    rendezvous: Mapping[str, Rendezvous] | None = None,
) -> RunRecord:
    """Run every phase of ``product`` on one DUT and return its finished record.

    ``fixtures`` are station-provided factories; the product's own take
    precedence. ``desk`` is where phases' questions for the operator go
    (none: asking raises :class:`~sequencer.operator.NoOperator`).
    ``history`` is where the unit's earlier runs are looked up as soon as
    a phase identifies it (retest awareness, ``max_retests``; see
    :mod:`sequencer.verdicts`). ``rendezvous`` are the station's meeting
    points by name, shared by its slots (:mod:`sequencer.rendezvous`).
    Exceptions raised by phases never escape: they are recorded.
    """
    runner = _SlotRun(
        product=product,
        slot=slot,
        settings=settings,
        store=store,
        bus=bus,
        resources=resources or {},
        fixtures={**(fixtures or {}), **product.product.fixtures},
        control=control or SlotControl(),
        desk=desk,
        history=history,
        rendezvous=rendezvous or {},
    )
    return await runner.run()


class _SlotRun:
    def __init__(
        self,
        *,
        product: LoadedProduct,
        slot: SlotInfo,
        settings: RunSettings,
        store: RecordWriter,
        bus: EventBus,
        resources: Mapping[str, SharedResource],
        fixtures: Mapping[str, FixtureFactory],
        control: SlotControl,
        desk: OperatorDesk | None,
        history: UnitHistorySource | None,
        rendezvous: Mapping[str, Rendezvous],
    ) -> None:
        self.product = product.product
        self.plan = self.product.plan
        self.store = store
        self.bus = bus
        self.resources = resources
        self.fixture_factories = fixtures
        self.control = control
        self.desk = desk
        run_id = new_run_id()
        self.log = bind_logger(slot=slot.index, port=slot.port, run_id=run_id)
        self.slot = attrs.evolve(slot, log=self.log)
        self.header = RunRecord(
            run_id=run_id,
            product=self.product.name,
            product_version=self.product.version,
            station=settings.station,
            slot=slot.index,
            port=slot.port,
            operator=settings.operator,
            batch=settings.batch,
            started_at=utcnow(),
            limits_file=str(product.limits_file) if product.limits_file else None,
            limits_sha256=product.limits_sha256,
            product_sha256=product.source_sha256,
            product_files=product.source_files,
            sequencer_version=SEQUENCER_VERSION,
            identity=self.product.identity,
            scans=settings.scans,
        )
        #: the serial on the unit's label, scanned for this slot: the unit's serial from the start
        self.label = next((s.value for s in settings.scans if s.kind == "label"), None)
        if self.label is not None:
            self.header = attrs.evolve(self.header, dut={"serial": self.label})
        self.dut: dict[str, str] = dict(self.header.dut)
        self.committed: list[PhaseRecord] = []
        self.outcomes: dict[str, Outcome] = {}
        #: phases whose record is committed
        self.committed_names: set[str] = set()
        self.recorded: set[str] = set()
        self.stop_reason: str | None = None
        #: the running attempt's cancel scope, per phase
        self.in_flight: dict[str, trio.CancelScope] = {}
        #: phases whose attempt a stop (the run's or a group's) cancelled, as opposed to their deadline; why
        self.stopped: dict[str, str] = {}
        #: groups stopped by a failure or FAIL_GROUP, and why
        self.group_stops: dict[str, str] = {}
        #: phases that skipped themselves (run_if false, PhaseResult.SKIP): no failure of a group's setup
        self.chose_skip: set[str] = set()
        #: per group whose setup has ended: why it was not entered, or None
        self.setup_verdicts: dict[GroupPlan, str | None] = {}
        self.started_at: dict[str, Any] = {}
        #: attempts, log and attachments of phases in flight, for recording an abort
        self.partial: dict[str, _PhaseRun] = {}
        #: attempts a stop cut short in their chain's scope, for the chain to end (see _phase_chain)
        self.cut: dict[str, _Cut] = {}
        #: per phase about to run in a chain, the chain's scope it may run its attempts in
        self.segments: dict[str, trio.CancelScope] = {}
        self.fixture_values: dict[str, Any] = {}
        self.fixture_locks: dict[str, trio.Lock] = {}
        #: where each fixture lives, in a task of its own (see _host_fixture); set by run()
        self.fixture_hosts: trio.Nursery | None = None
        #: per open fixture, in the order opened: what ends its host, and its host's end
        self.fixture_holds: list[tuple[trio.CancelScope, trio.Event]] = []
        #: where the fixtures' log lines go in the record; made when the first fixture opens
        self.fixture_lines: FixtureLines | None = None
        #: the store's first refusal; the run stops, teardowns still run
        self.write_error: Exception | None = None
        #: a bug that escaped the phases (the engine's, a fixture's): this run ends ERROR, no other slot cares
        self.engine_error: Exception | None = None
        self.history_source = history
        #: the unit's identity last looked up, and what was found (see _look_up)
        self.looked_up: tuple[tuple[str, str], ...] = ()
        self.unit_history: UnitHistory | None = None
        #: set while a look-up runs; the look-ups in flight, cancelled when the run ends
        self.looking_up: trio.Event | None = None
        self.lookups: set[trio.CancelScope] = set()
        #: why the unit was sent to rework untested (past the product's max_retests)
        self.refused: str | None = None
        #: the station's meeting points, and those this run has yet to reach or leave
        self.points = rendezvous
        self.owing: set[str] = set()

    # -- the run ---------------------------------------------------------

    def snapshot(self) -> RunRecord:
        return attrs.evolve(self.header, dut=dict(self.dut), phases=tuple(self.committed))

    async def run(self) -> RunRecord:
        try:
            await self.store.begin_run(self.header)
        except Exception as exc:
            # Nothing has touched the DUT yet: testing a unit that cannot be
            # recorded is worse than not testing it.
            self.write_error = exc
            raise RecordsNotWritten(str(exc), None) from exc
        self.bus.publish(RunStarted(self.header))
        self.log.info("run started", product=self.product.name)
        for name in self.product.rendezvous:
            if name in self.points:
                self.points[name].expect(self.slot.index)
                self.owing.add(name)
        # Outside the main scope: an abort does not close the fixtures under the teardowns.
        async with trio.open_nursery() as self.fixture_hosts:
            if self.label is not None:
                self._identify({})  # known by its label: its earlier runs are looked up before any phase
            try:
                try:
                    with self.control.main_scope:
                        async with trio.open_nursery() as nursery:
                            roots = self.plan.roots
                            for step in roots[1:]:
                                nursery.start_soon(self._phase_chain, nursery, step)
                            if roots:
                                # The first chain runs in this task: no task to spawn, and
                                # the slot starts testing without first waiting for every
                                # other slot of the station to start its run.
                                await self._phase_chain(nursery, roots[0])
                except Exception as exc:
                    self._engine_failed(exc)
                try:
                    with self.control.teardown_scope:
                        await self._record_unfinished(self.plan.untorn)
                        await self._run_group_teardowns()
                        for p in self.plan.teardowns:
                            await self._run_and_commit(p)
                except Exception as exc:
                    self._engine_failed(exc)
            finally:
                # Whatever happened above (a second Ctrl-C included), record what
                # was not recorded and close the hardware; both are shielded
                # because they are how the station keeps its promises.
                self._leave(tuple(self.owing))  # whatever it did not reach, nobody waits for it there
                with trio.CancelScope(shield=True):
                    try:
                        await self._record_unfinished(self.product.all_phases)
                    finally:
                        await self._close_fixtures()  # whatever else failed, the ports are released
                    await self._last_look_up()
                    final = self._finish()
                    try:
                        await self.store.finish_run(final)
                    except Exception as exc:
                        self._store_failed(exc)
                        final = self._finish()  # INTERRUPTED now: the record could not be closed
        self.bus.publish(RunFinished(final))
        self.log.info("run finished", outcome=final.outcome.value if final.outcome else None)
        if self.write_error is not None:
            raise RecordsNotWritten(str(self.write_error), final) from self.write_error
        return final

    def _finish(self) -> RunRecord:
        phases = tuple(self.committed)
        if self.write_error is not None:
            # Whatever the phases say, the unit has no complete record; the
            # store, once it can be written again, says INTERRUPTED of a run
            # whose end it never got, and the terminal must say the same.
            outcome = Outcome.INTERRUPTED
        elif self.engine_error is not None:
            outcome = Outcome.ERROR  # the unit was not tested as the product says
        elif self.control.aborted:
            outcome = Outcome.ABORTED
        elif self.refused is not None:
            outcome = Outcome.FAIL  # the unit failed too often before: it was not tested again
        elif self.stopped:
            # A stop is the verdict of the phase that asked for it; the phases it cut short
            # (ABORTED) are its consequence, not an operator's abort.
            outcome = run_outcome(tuple(p for p in phases if p.name not in self.stopped))
        else:
            outcome = run_outcome(phases)
        logs = tuple(self.fixture_lines.outside.lines) if self.fixture_lines is not None else ()
        run = attrs.evolve(self.header, dut=dict(self.dut), phases=phases, ended_at=utcnow(), outcome=outcome,
                           logs=logs)
        disposition, instruction = decide(run, self.product.declared, max_retests=self.product.max_retests,
                                          history=self.unit_history, refused=self.refused)
        return attrs.evolve(run, disposition=disposition, instruction=instruction)

    async def _record_unfinished(self, phases: tuple[Phase, ...]) -> None:
        """Record every phase that has no record yet (after an abort or a stop)."""
        for p in phases:
            if p.name in self.recorded:
                continue
            if p.name in self.partial:
                run = self.partial[p.name]
                attempts, log, attachments = run.attempts, run.log, run.attachments
                now, why = utcnow(), self._abort_reason(p)
                aborted = AttemptRecord(len(attempts) + 1, Outcome.ABORTED, now, now, reason=why)
                rec = attrs.evolve(
                    self._phase_record(p, Outcome.ABORTED, self.started_at[p.name], reason=why,
                                       attempts=(*attempts, aborted)),
                    logs=tuple(log.lines),
                    attachments=tuple(attachments),
                )
            else:
                if self.control.aborted:
                    reason = f"run aborted {self.control.aborted_by}"
                else:
                    reason = self.stop_reason or "not run"
                if p.teardown and self.control.teardown_scope.cancel_called:
                    reason = "teardowns skipped by a second abort"
                rec = self._skipped(p, reason)
            await self._commit(p, rec)

    def _abort_reason(self, p: Phase) -> str:
        if self.control.aborted:
            return f"aborted {self.control.aborted_by}" if not p.teardown else "teardown cut short by a second abort"
        return self.stopped.get(p.name) or self.stop_reason or "aborted"

    async def _run_group_teardowns(self) -> None:
        """After an abort (or a bug), the teardowns of the groups entered and not yet torn down, innermost first.

        The teardowns of groups never entered are recorded SKIPPED after them.
        """
        held: list[tuple[Phase, str]] = []
        for group in self.plan.groups:
            for name in group.teardown:
                if name in self.recorded:
                    continue
                step = self.plan.steps[name]
                why = self._held_by_group(step)
                if why is not None:
                    held.append((step.phase, why))
                else:
                    await self._run_and_commit(step.phase, step)
        for p, why in held:
            await self._commit(p, self._skipped(p, why))

    # -- scheduling ------------------------------------------------------

    async def _phase_chain(self, nursery: trio.Nursery, step: Step) -> None:
        """Run ``step``, then each phase its commit made ready: one here, the others in new tasks.

        The chain's phases that have no timeout of their own run their
        attempts in the chain's scope, ``segment``, rather than each in a
        scope of its own (entering and leaving a trio cancel scope was about
        a tenth of a phase's instructions at 256 slots); a stop cancels the
        segment as it would the attempt's own scope. The attempt it cut
        short is then ended here, outside the stopped segment (``cut``),
        exactly as it would have ended in its own scope, and the chain goes
        on in a new segment.
        """
        dependents = self.plan.dependents
        segments = self.segments
        while True:
            segment = trio.CancelScope()
            try:
                with segment:
                    while True:
                        segments[step.name] = segment
                        await self._run_ready(step)
                        # No await since the commit returned: exactly one committer (the
                        # last of a phase's dependencies) sees the phase ready.
                        ready = [d for d in dependents[step.name] if self.committed_names.issuperset(d.waits_for)]
                        if not ready:
                            return
                        # An abort that came during the commit ends the chain here, before
                        # any phase it made ready touches the DUT; the phases not started
                        # are recorded as such.
                        await trio.lowlevel.checkpoint_if_cancelled()
                        for other in ready[1:]:
                            nursery.start_soon(self._phase_chain, nursery, other)
                        step = ready[0]
            except _LeftSegment:
                pass
            # Only a stop of an attempt running in the segment ends it early
            # (an abort goes on up): that attempt, in self.cut, is ended in the next one.

    async def _run_ready(self, step: Step) -> None:
        p = step.phase
        segment = self.segments.pop(p.name, None)
        cut = self.cut.pop(p.name, None)
        if cut is not None:
            # Its attempt, cut short by a stop, is ended here: whether it could run was decided when it began.
            await self._run_and_commit(p, step, segment, cut)
            return
        if self.stop_reason is not None and not p.teardown:
            await self._commit(p, self._skipped(p, self.stop_reason))
            return
        for dep in step.must_pass:
            dep_outcome = self.outcomes[dep]
            if dep_outcome is not Outcome.PASS:
                await self._commit(p, self._skipped(p, f"dependency {dep!r} ended {dep_outcome.value}"))
                return
        if step.grouped:
            why = self._held_by_group(step)
            if why is not None:
                await self._commit(p, self._skipped(p, why))
                return
            if step.tears_down is not None:
                shield = self.control.teardown_shield()  # a group's teardown finishes even through an abort
                try:
                    with shield:
                        await self._run_and_commit(p, step)
                finally:
                    self.control.release(shield)
                return
        await self._run_and_commit(p, step, segment)

    def _held_by_group(self, step: Step) -> str | None:
        """Why a group keeps ``step`` from running (its setup failed, it stopped, it never began), or None."""
        if self.group_stops:
            for group in step.stoppable:
                why = self.group_stops.get(group.name)
                if why is not None:
                    return why
        verdicts = self.setup_verdicts
        for group in step.entered:
            why = verdicts.get(group, _UNDECIDED)
            if why is _UNDECIDED:
                why = self._setup_failed(group)
            if why is not None:
                return why
        group = step.tears_down
        if group is not None:
            why = self._setup_failed(group)
            if why is not None:
                return why
            if self.started_at.keys().isdisjoint(group.every):
                return f"group {group.name!r} was not entered"
        return None

    def _setup_failed(self, group: GroupPlan) -> str | None:
        """Why ``group`` was not entered (a setup phase failed or did not run), or None; asked once its setup ended."""
        if group in self.setup_verdicts:
            return self.setup_verdicts[group]
        why = None
        for name in group.setup:
            outcome = self.outcomes.get(name)
            if outcome is not Outcome.PASS and name not in self.chose_skip:
                ended = outcome.value if outcome is not None else "unfinished"
                why = f"group {group.name!r} not entered: setup phase {name!r} ended {ended}"
                break
        self.setup_verdicts[group] = why
        return why

    def _stop_group(self, group: GroupPlan, reason: str) -> None:
        """Stop one group: its phases in flight are cut short, the rest of its main part is skipped."""
        if group.name in self.group_stops:
            return
        self.group_stops[group.name] = reason
        self.log.info("group stopping", group=group.name, reason=reason)
        for name, scope in self.in_flight.items():
            if name in group.members and not scope.cancel_called:
                self.stopped[name] = reason
                scope.cancel()

    def _engine_failed(self, exc: Exception) -> None:
        """Something other than a phase raised (a bug): this run stops and ends ERROR; teardowns still run."""
        if self.engine_error is None:
            self.engine_error = exc
            self.log.error("the engine failed outside any phase; stopping the run", error=_describe(exc),
                           traceback="".join(traceback.format_exception(exc)))
        self._stop(f"run stopped: the engine failed ({_describe(exc)})")

    def _store_failed(self, exc: Exception) -> None:
        """The store refused a record: stop the run, but still run the teardowns (the hardware needs them)."""
        if self.write_error is None:
            self.write_error = exc
            self.log.error("records cannot be written; stopping the run", error=str(exc))
        self._stop(f"run stopped: records cannot be written ({exc})")

    def _stop(self, reason: str) -> None:
        if self.stop_reason is None:
            self.stop_reason = reason
            self.log.info("run stopping", reason=reason)
        self._leave(tuple(self.owing))
        for name, scope in self.in_flight.items():
            step = self.plan.steps.get(name)
            if step is not None and step.tears_down is not None:
                continue  # a group's teardown: teardowns run whatever stopped
            if not scope.cancel_called:  # its deadline came first: that stays a TIMEOUT
                self.stopped.setdefault(name, reason)
            scope.cancel()

    async def _run_and_commit(
        self, p: Phase, step: Step | None = None, segment: trio.CancelScope | None = None, cut: _Cut | None = None,
    ) -> PhaseRecord | None:
        """Run ``p`` (``step`` is its place in the graph; None for the product's teardowns) and commit it.

        ``segment``: the chain's scope its attempts may run in; ``cut``: the
        attempt of ``p`` a stop cut short there, to end and go on from.
        """
        if p.run_if is not None and cut is None:
            try:
                wanted = bool(p.run_if(self.snapshot()))
            except Exception as exc:
                record = self._phase_record(
                    p, Outcome.ERROR, utcnow(), reason=f"run_if raised {type(exc).__name__}: {exc}", attempts=()
                )
                self._decide(p, step, record, None)
                await self._commit(p, record)
                return record
            if not wanted:
                self.chose_skip.add(p.name)
                record = self._skipped(p, "run_if was false")
                await self._commit(p, record)
                return record
        record, result = await self._execute(p, step.group if step is not None else None, segment, cut)
        if self.looking_up is not None and self.product.max_retests is not None:
            # The phase identified the unit: whether it may be tested further is
            # known before anything that depends on this phase starts.
            await self.looking_up.wait()
        # Decide on stopping before the commit wakes this phase's dependents.
        self._decide(p, step, record, result)
        await self._commit(p, record)
        return record

    def _decide(self, p: Phase, step: Step | None, record: PhaseRecord, result: PhaseResult | None) -> None:
        """What a finished phase does to the run and its groups: stop one, the other, or nothing."""
        if result is PhaseResult.STOP:
            self._stop(f"run stopped by phase {p.name!r}")
        elif p.teardown:
            return  # a teardown stops nothing: everything it could stop has ended
        elif result is PhaseResult.SKIP:
            self.chose_skip.add(p.name)
        elif result is PhaseResult.FAIL_GROUP:
            group = step.group if step is not None else None
            if group is None:  # outside any group, the group is the run
                self._stop(f"run stopped by phase {p.name!r}")
            else:
                self._stop_group(group, f"group {group.name!r} stopped by phase {p.name!r}")
        elif result is PhaseResult.REPEAT and record.outcome is Outcome.FAIL:
            self._stop(f"run stopped: phase {p.name!r} reached its repeat limit")
        elif record.outcome.is_failure:
            if self.product.stop_on_failure:
                self._stop(f"run stopped: phase {p.name!r} ended {record.outcome.value}")
            elif step is not None and step.stoppable:
                for group in step.stoppable:
                    if group.stop_on_failure:
                        self._stop_group(group, f"group {group.name!r} stopped: phase {p.name!r} ended "
                                                f"{record.outcome.value}")

    async def _commit(self, p: Phase, record: PhaseRecord) -> None:
        if p.name in self.recorded:
            return
        self.recorded.add(p.name)
        index = len(self.committed)
        self.committed.append(record)
        self.outcomes[p.name] = record.outcome
        if self.owing:
            # Recorded without meeting (skipped, aborted), or failed before a meeting: nobody waits for it.
            self._leave((p.rendezvous,) if p.rendezvous is not None else ())
            if record.outcome is not Outcome.PASS:
                self._leave(self.product.rendezvous_after.get(p.name, ()))
        # The commit raises no Cancelled: a record it took is never reported as lost.
        try:
            await self.store.commit_phase(self.header.run_id, index, record, dict(self.dut))
        except Exception as exc:
            self._store_failed(exc)  # dependents are skipped: the run is stopping
        # Only now may dependents start: what they build on is on disk.
        self.committed_names.add(p.name)
        if self.bus.has_subscribers:
            self.bus.publish(PhaseFinished(self.header.run_id, self.header.slot, record))

    # -- rendezvous -------------------------------------------------------

    async def _meet(self, p: Phase, log: PhaseLog) -> float:
        """Wait at ``p``'s rendezvous for the slots still on their way; the seconds waited.

        A stop while waiting (a cancel of the phase's own scope) leaves the
        phase to be recorded ABORTED without an attempt; an abort propagates.
        """
        assert p.rendezvous is not None
        point = self.points[p.rendezvous]
        self.owing.discard(p.rendezvous)
        if self.bus.has_subscribers:
            others = ", ".join(str(s) for s in point.owing if s != self.slot.index)
            self.bus.publish(PhaseWaiting(self.header.run_id, self.header.slot, p.name,
                                          f"at {p.rendezvous!r} for slot(s) {others}" if others else
                                          f"at {p.rendezvous!r}"))
        scope = trio.CancelScope()
        self.in_flight[p.name] = scope
        started = trio.current_time()
        try:
            with scope:
                meeting = await point.arrive(self.slot.index, p.rendezvous_timeout)
        finally:
            del self.in_flight[p.name]
        if scope.cancelled_caught:
            return trio.current_time() - started
        slots = ", ".join(str(s) for s in meeting.slots)
        log.info(f"met slots {slots} at rendezvous {p.rendezvous!r} after {round(meeting.waited_s, 1):g} s")
        if meeting.missing:
            missing = ", ".join(str(s) for s in meeting.missing)
            log.warning(f"went on without slot {missing} (not there after {p.rendezvous_timeout:g} s)")
        return meeting.waited_s

    def _leave(self, names: tuple[str, ...]) -> None:
        for name in names:
            if name in self.owing:
                self.owing.discard(name)
                self.points[name].leave(self.slot.index)

    # -- one phase -------------------------------------------------------

    async def _execute(
        self, p: Phase, group: GroupPlan | None, segment: trio.CancelScope | None = None, cut: _Cut | None = None,
    ) -> tuple[PhaseRecord, PhaseResult]:
        if cut is None:
            started = utcnow()
            self.started_at[p.name] = started
            run = _PhaseRun(PhaseLog(self.log, phase=p.name))
            self.partial[p.name] = run
            if p.rendezvous is not None and p.rendezvous in self.owing:
                run.waited += await self._meet(p, run.log)
        else:
            started, run = self.started_at[p.name], self.partial[p.name]
        attempts, log, attachments = run.attempts, run.log, run.attachments
        result = PhaseResult.CONTINUE
        while True:
            if cut is not None:
                attempt, result, final = self._attempt_record(p, group, cut)
                access, cut = cut.access, None
            else:
                if self.stop_reason is not None and (attempts or p.name in self.stopped) and not p.teardown:
                    # stopped between two attempts, or while it waited to start
                    now = utcnow()
                    attempts.append(AttemptRecord(len(attempts) + 1, Outcome.ABORTED, now, now,
                                                  reason=self.stop_reason))
                    break
                access = ResourceAccess(self.resources)
                attempt, result, final = await self._attempt(p, group, len(attempts) + 1, run, access, segment)
            run.waited += access.waited_s
            attempts.append(attempt)
            if result is PhaseResult.REPEAT and attempt.outcome is Outcome.SKIPPED:
                run.repeats += 1
                if run.repeats < p.repeat_limit:
                    continue
                # As OpenHTF: asking to repeat on the last allowed run fails the phase (and stops the run).
                attempts[-1] = attrs.evolve(
                    attempt, outcome=Outcome.FAIL,
                    reason=f"repeat limit {p.repeat_limit} reached: the phase asked to repeat on its last allowed run",
                )
                break
            if (attempt.outcome in (Outcome.FAIL, Outcome.ERROR, Outcome.TIMEOUT) and run.failures < p.retries
                    and result not in _STOPPING):  # a phase that stops the run (or its group) is not tried again
                if final is not None:
                    log.info("not retried: a retry cannot change this", reason=final)
                    break
                run.failures += 1
                log.info("retrying", attempt=attempt.number, outcome=attempt.outcome.value)
                continue
            break
        del self.partial[p.name]
        last = attempts[-1]
        record = PhaseRecord(
            name=p.name,
            outcome=last.outcome,
            started_at=started,
            ended_at=utcnow(),
            attempts=tuple(attempts),
            reason=last.reason,
            teardown=p.teardown,
            resource_wait_s=run.waited,
            logs=tuple(log.lines),
            attachments=tuple(attachments),
        )
        return record, result

    async def _attempt(
        self, p: Phase, owner: GroupPlan | None, number: int, run: _PhaseRun, access: ResourceAccess,
        segment: trio.CancelScope | None,
    ) -> tuple[AttemptRecord, PhaseResult, str | None]:
        """One attempt of ``p``: its record, what the phase returned, and why it may not be retried (if so).

        A phase with a timeout (every teardown has one) runs each attempt in
        a scope of its own, which carries the deadline and is also what a
        stop cancels. One without runs it in ``segment``, its chain's scope,
        if it has one: a stop cancels that, and the attempt is then ended by
        the chain, outside it (see :meth:`_phase_chain`); what ending it
        needs is left in ``self.cut``.
        """
        if self.bus.has_subscribers:
            self.bus.publish(PhaseStarted(self.header.run_id, self.header.slot, p.name, number))
        started = utcnow()
        ctx = PhaseContext(
            phase=p,
            attempt=number,
            run_id=self.header.run_id,
            slot=self.header.slot,
            bus=self.bus,
            log=run.log,
            attachments=run.attachments,
            snapshot=self.snapshot,
            identify=self._identify,
        )
        timeout = p.effective_timeout
        if timeout is None and segment is not None:
            self.in_flight[p.name] = segment
            try:
                result, error, reason, cut_short = await self._call(p, ctx, access, segment)
            except BaseException as exc:
                if segment.cancel_called and _only_cancelled(exc):
                    # Cut short by the stop: the segment's exit takes the Cancelled (an abort goes on up).
                    self.cut[p.name] = _Cut(number, started, ctx, access, PhaseResult.CONTINUE, None, None, True)
                raise
            finally:
                del self.in_flight[p.name]
            if segment.cancel_called:
                # Stopped, yet it ended without the Cancelled (it raised, or it caught it): ended outside too.
                self.cut[p.name] = _Cut(number, started, ctx, access, result, error, reason, cut_short)
                raise _LeftSegment
        else:
            scope = trio.CancelScope(deadline=trio.current_time() + timeout if timeout is not None else math.inf)
            self.in_flight[p.name] = scope
            try:
                with scope:
                    result, error, reason, cut_short = await self._call(p, ctx, access, scope)
            finally:
                del self.in_flight[p.name]
            if scope.cancelled_caught:
                result, error, reason, cut_short = PhaseResult.CONTINUE, None, None, True
        return self._attempt_record(p, owner, _Cut(number, started, ctx, access, result, error, reason, cut_short))

    async def _call(
        self, p: Phase, ctx: PhaseContext, access: ResourceAccess, scope: trio.CancelScope,
    ) -> tuple[PhaseResult, ErrorInfo | None, str | None, bool]:
        """Call the phase: what it returned, what it raised and why (as the record says it), and whether it was
        cut short (a nursery of its own, cancelled, raised with an error); ``scope`` is what a stop cancels."""
        error: ErrorInfo | None = None
        reason: str | None = None
        try:
            kwargs = {}
            for name, source in p.sources:
                value = self._builtin(source, ctx, access)
                kwargs[name] = await self._fixture(source) if value is _FIXTURE else value
            if p.arguments:
                kwargs.update(p.arguments)
            if p.monitors:
                returned = await self._monitored(p, ctx, access, kwargs)
            else:
                returned = await p.fn(**kwargs)
            if returned is not None and not isinstance(returned, PhaseResult):
                raise TypeError(f"phase returned {returned!r}; return a PhaseResult or None")
            return returned or PhaseResult.CONTINUE, None, None, False
        except Exception as exc:
            error = ErrorInfo(type(exc).__name__, str(exc), traceback.format_exc())
            reason = str(exc) if isinstance(exc, FixtureError) else _describe(exc)
            ctx.log.error("phase raised", error=reason)
            return PhaseResult.CONTINUE, error, reason, False
        except BaseExceptionGroup as group:
            # A nursery in the phase, cancelled (timeout, stop, abort)
            # while a task of it raised: Cancelled and the error together.
            cancelled, raised = group.split(trio.Cancelled)
            if raised is None or raised.split(Exception)[1] is not None:
                raise  # only cancellation (the scopes take it), or KeyboardInterrupt and the like
            error = ErrorInfo(type(raised).__name__, str(raised), "".join(traceback.format_exception(raised)))
            reason = _describe(raised)
            ctx.log.error("phase raised", error=reason)
            if cancelled is not None and not scope.cancel_called:
                raise cancelled from None  # an abort from outside this phase goes on
            return PhaseResult.CONTINUE, error, reason, cancelled is not None

    def _attempt_record(self, p: Phase, owner: GroupPlan | None, cut: _Cut) -> tuple[AttemptRecord, PhaseResult,
                                                                                       str | None]:
        """How an attempt ended, judged: its record, what the phase returned, and why it may not be retried."""
        ctx, result, reason = cut.ctx, cut.result, cut.reason
        if not cut.cut_short and cut.error is None and (result is PhaseResult.SKIP or result is PhaseResult.REPEAT):
            # SKIP and REPEAT: what the attempt measured is kept, and decides nothing.
            outcome, reason = Outcome.SKIPPED, _UNJUDGED[result]
            why = f"not judged: the phase returned {result.value}"
            measurements = tuple(ctx.measurements.unjudged(m, why) for m in p.measurements)
        else:
            measurements = tuple(ctx.measurements.record(m) for m in p.measurements)
            if cut.cut_short and p.name in self.stopped:
                outcome, reason = Outcome.ABORTED, self._abort_reason(p)
            elif cut.cut_short:
                outcome, reason = Outcome.TIMEOUT, f"timed out after {p.effective_timeout:g} s"
            elif cut.error is not None:
                outcome = Outcome.ERROR
            elif result is PhaseResult.FAIL:
                outcome, reason = Outcome.FAIL, "failed by the phase"
            elif result is PhaseResult.FAIL_GROUP:
                outcome = Outcome.FAIL
                if p.teardown:
                    reason = "failed by the phase"
                elif owner is not None:
                    reason = f"failed by the phase: group {owner.name!r} stops"
                else:
                    reason = f"run stopped by phase {p.name!r}"
            else:
                outcome, reason = _judge(measurements)
                if result is PhaseResult.STOP and outcome is Outcome.PASS:
                    # As OpenHTF: a test a phase stopped is not a pass, whatever that phase measured.
                    outcome, reason = Outcome.FAIL, f"run stopped by phase {p.name!r}"
        return (
            AttemptRecord(cut.number, outcome, cut.started, utcnow(), measurements, reason=reason, error=cut.error),
            result,
            ctx.no_retry_reason,
        )

    async def _monitored(self, p: Phase, ctx: PhaseContext, access: ResourceAccess, kwargs: dict[str, Any]) -> Any:
        """Run the phase with its monitors sampling beside it; they stop when it returns."""
        start = trio.current_time()
        async with trio.open_nursery() as sampling:
            for m in p.monitors:
                arguments = {name: await self._argument(name, ctx, access) for name in m.parameters}
                sampling.start_soon(sample_until_cancelled, m, ctx.measurements[m.name], arguments, start)
            returned = await p.fn(**kwargs)
            sampling.cancel_scope.cancel()
        return returned

    async def _argument(self, name: str, ctx: PhaseContext, access: ResourceAccess) -> Any:
        value = self._builtin(name, ctx, access)
        return await self._fixture(name) if value is _FIXTURE else value

    def _builtin(self, name: str, ctx: PhaseContext, access: ResourceAccess) -> Any:
        """What the engine itself hands a phase for parameter ``name``, or ``_FIXTURE``: a fixture's (awaited)."""
        if name == "ctx":
            return ctx
        if name == "resources":
            return access
        if name == "slot":
            return self.slot
        if name == "port":
            return self.slot.port
        if name == "operator":
            return Operator(self.desk, run_id=self.header.run_id, phase=ctx.phase.name, slot=self.slot.index,
                            port=self.slot.port, serial=lambda: self.dut.get("serial", ""), log=ctx.log,
                            sim_answer=ctx.phase.sim_answer)
        return _FIXTURE

    async def _fixture(self, name: str) -> Any:
        if name in self.fixture_values:
            return self.fixture_values[name]
        lock = self.fixture_locks.setdefault(name, trio.Lock())
        async with lock:  # two concurrent phases asking for it open it once
            if name not in self.fixture_values:
                assert self.fixture_hosts is not None
                try:
                    self.fixture_values[name] = await self.fixture_hosts.start(
                        self._host_fixture, name, self.fixture_factories[name]
                    )
                except Exception as exc:
                    # One line naming the fixture: "fixture 'dmm' cannot open: OSError: ...", not the port's words alone.
                    self.log.error("a fixture cannot open", fixture=name, error=_describe(exc))
                    raise FixtureError(f"fixture {name!r} cannot open: {_describe(exc)}") from exc
        return self.fixture_values[name]

    async def _host_fixture(
        self, name: str, factory: FixtureFactory, *, task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Open a fixture, hand it to the phase that asked for it, and keep it open until the run closes it.

        In a task of its own, because a fixture may hold tasks or cancel
        scopes across its ``yield`` (a reader task in a nursery, say), and
        trio closes a scope only in the task that opened it; the phases that
        use a fixture come and go in other tasks. Opening happens under the
        asking phase's timeout (``nursery.start``), and an error opening it
        is that phase's.
        """
        hold, closed = trio.CancelScope(), trio.Event()
        opened = False
        if self.fixture_lines is None:
            self.fixture_lines = FixtureLines(self.product.all_phases, self.in_flight, self.partial)
        slot = attrs.evolve(self.slot, log=FixtureLog(name, self.log, self.fixture_lines))
        try:
            async with factory(slot) as value:
                with hold:
                    self.fixture_holds.append((hold, closed))
                    opened = True
                    task_status.started(value)
                    await trio.sleep_forever()
        except Exception as exc:
            if not opened:
                raise
            self.log.warning("a fixture failed while open or closing", fixture=name, error=_describe(exc))
        except BaseExceptionGroup as group:
            if not opened:
                raise
            cancelled, raised = group.split(trio.Cancelled)
            if raised is not None:
                self.log.warning("a fixture failed while open or closing", fixture=name, error=_describe(raised))
            if cancelled is not None:
                raise cancelled from None
        finally:
            closed.set()

    async def _close_fixtures(self) -> None:
        """Close every fixture, the last opened first, within FIXTURE_CLOSE_TIMEOUT_S in all."""
        with trio.move_on_after(FIXTURE_CLOSE_TIMEOUT_S) as scope:
            for hold, closed in reversed(self.fixture_holds):
                hold.cancel()
                await closed.wait()
        if scope.cancelled_caught:
            self.log.warning("closing fixtures timed out", seconds=FIXTURE_CLOSE_TIMEOUT_S)
            assert self.fixture_hosts is not None
            self.fixture_hosts.cancel_scope.cancel()  # what is still closing is cut short

    def _identify(self, fields: dict[str, str]) -> None:
        said = fields.get("serial")
        if self.label is not None and said and said != self.label and self.refused is None:
            # The board is not the unit its label says: testing it on would record one unit's results
            # under the other's serial. It goes to rework, as a unit past its retests does.
            self.refused = (f"The label scanned for slot {self.header.slot} says {self.label}, the board says "
                            f"{said}: put it in the rework bin to be relabelled")
            self.log.warning("the board is not the unit its label says", label=self.label, board=said)
            self._stop(f"run stopped: {self.refused}")
        self.dut.update(fields)
        self.log = self.log.bind(serial=self.dut.get("serial"))
        self.bus.publish(DutIdentified(self.header.run_id, self.header.slot, dict(self.dut)))
        if self.history_source is not None:
            identity = unit_identity(self.dut, self.product.identity)
            if identity and identity != self.looked_up:
                self.looked_up = identity
                self.looking_up = trio.Event()
                assert self.fixture_hosts is not None
                self.fixture_hosts.start_soon(self._look_up, identity, self.looking_up)

    async def _last_look_up(self) -> None:
        """Let a look-up still running finish (briefly: the verdict counts the unit's tests), then end them all."""
        if self.looking_up is not None and not self.control.aborted:  # an aborted run's verdict counts no tests
            with trio.move_on_after(LOOKUP_WAIT_S):
                await self.looking_up.wait()
        for lookup in self.lookups:
            lookup.cancel()

    async def _look_up(self, identity: tuple[tuple[str, str], ...], done: trio.Event) -> None:
        """Find the unit's earlier runs: say so on the bus; past ``max_retests``, refuse the unit."""
        assert self.history_source is not None
        scope = trio.CancelScope()
        self.lookups.add(scope)
        try:
            with scope:
                try:
                    found = await self.history_source.history(self.product.name, identity,
                                                              run_id=self.header.run_id)
                except Exception as exc:
                    # Not knowing the unit's past never stops its test: it is tested as a new unit.
                    self.log.warning("could not look up the unit's earlier runs", error=_describe(exc))
                    return
                if identity != self.looked_up:
                    return  # the unit was identified further meanwhile; that look-up decides
                self.unit_history = found
                if found.tests:
                    self.log.info("retest", tests_before=found.tests, last=found.line())
                self.bus.publish(UnitRecognised(self.header.run_id, self.header.slot, found))
                limit = self.product.max_retests
                if limit is not None and found.tests > limit and self.refused is None:
                    self.refused = (f"Retest limit reached: tested {found.tests} times before (max {limit} "
                                    f"retest{'s' if limit != 1 else ''}); put it in the rework bin untested"
                                    + (f" (last {found.last_outcome.value} at {found.last_where})"
                                       if found.last_outcome is not None and found.last_where else ""))
                    self._stop(f"run stopped: {self.refused}")
        finally:
            self.lookups.discard(scope)
            done.set()
            if self.looking_up is done:
                self.looking_up = None

    # -- records ---------------------------------------------------------

    def _skipped(self, p: Phase, reason: str) -> PhaseRecord:
        now = utcnow()
        return self._phase_record(p, Outcome.SKIPPED, now, reason=reason, attempts=())

    def _phase_record(
        self, p: Phase, outcome: Outcome, started: Any, *, reason: str, attempts: tuple[AttemptRecord, ...]
    ) -> PhaseRecord:
        return PhaseRecord(
            name=p.name, outcome=outcome, started_at=started, ended_at=utcnow(), attempts=attempts,
            reason=reason, teardown=p.teardown,
        )


#: A group whose setup verdict is not worked out yet.
_UNDECIDED = object()

#: A phase parameter the engine does not hand out itself: a fixture's, opened (or found open) by awaiting it.
_FIXTURE = object()

#: The results that stop the run or a group: a phase that returns one is not retried.
_STOPPING = frozenset({PhaseResult.STOP, PhaseResult.FAIL_GROUP})

#: The results that leave an attempt's measurements unjudged, and the attempt's reason.
_UNJUDGED = {PhaseResult.SKIP: "skipped by the phase", PhaseResult.REPEAT: "repeated: the phase returned REPEAT"}


def _describe(exc: BaseException) -> str:
    """``Type: message`` of an exception; of each one a group holds, when it is a group."""
    if isinstance(exc, BaseExceptionGroup):
        return "; ".join(_describe(e) for e in exc.exceptions)
    return f"{type(exc).__name__}: {exc}"


def _judge(measurements: tuple[MeasurementRecord, ...]) -> tuple[Outcome, str | None]:
    for m in measurements:
        if m.outcome is MeasurementOutcome.UNSET:
            return Outcome.FAIL, f"measurement {m.name!r} was never set"
        if m.outcome is MeasurementOutcome.FAIL:
            return Outcome.FAIL, f"measurement {m.name!r}: {m.reason}"
    return Outcome.PASS, None
