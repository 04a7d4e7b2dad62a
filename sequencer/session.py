"""A station session, as ``sequencer run`` runs one: set up once, then one or more rounds of every slot.

The session owns what lasts from the first DUT to the last: the store's
writer, the MongoDB shipper, the flash workers, and where the operator's
answers come from (:mod:`sequencer.keyboard`, or the simulated operator).
Each round gets its own slots (under ``--sim``, a fresh farm: new boards),
shared instruments and display; between rounds the operator says whether
the next boards are in. The command line (:mod:`sequencer.cli`) turns the
result into reports, a summary and an exit code. The operator's stop
signals are the session's for all of it (:class:`StopSignals`): they stop
testing, never what follows it.

The session is core: it names no fixture and no store. What it opens
beyond the core comes from the command line, which builds it: the
station's hardware (:class:`Hardware`; ``fixtures/station.py`` for real
ports or the simulated farm) and the MongoDB shipper.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager, contextmanager
from functools import partial
from typing import Any, Protocol

import attrs
import trio
from rich.console import Console
from rich.markup import escape

from sequencer.config import ConfigError, SerialLines, StationConfig
from sequencer.continuous import Boards
from sequencer.control import WHO_IS_TESTING, StationControl
from sequencer.engine import RunSettings
from sequencer.events import Event, EventBus
from sequencer.fixtures import FixtureFactory
from sequencer.operator import NoOperator, OperatorDesk, Question
from sequencer.product import LoadedProduct
from sequencer.records import Outcome, RunRecord
from sequencer.resources import SharedResource
from sequencer.scans import ScanRules
from sequencer.station import StationResult
from sequencer.terminal import printable
from sequencer.verdicts import UnitHistorySource

__all__ = ["ContinuousSetup", "Hardware", "Panel", "RoundSetup", "SessionResult", "StopSignals", "run_session"]

#: What the operator sends to stop a station: Ctrl-C, ``kill`` (or a service manager), a closed terminal.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

@attrs.frozen
class RoundSetup:
    """One round's slots as the hardware side opened them: what :func:`sequencer.station.run_station` takes."""

    ports: Sequence[str]
    fixtures: Mapping[str, FixtureFactory]
    resources: Mapping[str, SharedResource]
    #: what the operator is told before the round (faults drawn, a simulated service's address)
    notices: tuple[str, ...] = ()
    #: per port, how its links hold DTR/RTS (:attr:`sequencer.fixtures.SlotInfo.lines`)
    lines: Mapping[str, SerialLines | None] = attrs.field(factory=dict)


@attrs.frozen
class ContinuousSetup:
    """A continuous station's slots as the hardware side opened them: what :func:`run_continuous` takes."""

    boards: Boards
    fixtures: Mapping[str, FixtureFactory]
    resources: Mapping[str, SharedResource]
    notices: tuple[str, ...] = ()
    #: how a port's links hold DTR/RTS (:attr:`sequencer.fixtures.SlotInfo.lines`), asked as each board arrives
    lines: Callable[[str], SerialLines | None] | None = None


class Hardware(Protocol):
    """The station's side of a session, open for all of it (the flash workers, say)."""

    def open_round(self, config: StationConfig) -> AbstractAsyncContextManager[RoundSetup]:
        """The round's ports, fixtures and shared instruments (under ``--sim``, a fresh farm)."""
        ...

    def open_continuous(self, config: StationConfig, bus: EventBus) -> AbstractAsyncContextManager[ContinuousSetup]:
        """The slots boards come and go in (under ``--sim``, a farm whose operator swaps boards; it watches ``bus``)."""
        ...

    async def answer_as_simulated_operator(self, desk: OperatorDesk, seed: int) -> None:
        """Answer the desk's questions as the simulated operator would, until cancelled."""
        ...

    async def read_scanner(self, config: StationConfig, control: StationControl) -> None:
        """Hand every code a serial scanner reads to ``control``, until cancelled (``[scan] port``; the
        simulated scanner under ``--sim``); return at once if the station has none."""
        ...


class StopSignals:
    """The operator's stop signals for a whole ``sequencer run``, each taken where it means something.

    A terminal sends every Ctrl-C to the whole process group, whatever the
    station is doing: a second one often comes while the records are being
    flushed or the report written. A signal received by nobody there became
    a ``KeyboardInterrupt`` (or, for SIGTERM and SIGHUP, death) that cut off
    the summary, the report and the shipper's last drain. So one receiver
    takes them for the whole session, and each goes to what is happening:
    while the session is set up, it stops the session (nothing was tested);
    while a round's slots run, to its :class:`~sequencer.station.StopRequests`
    (abort, then skip teardowns); while the station asks its own question,
    it ends the question; between rounds, the session stops after the round;
    once the last round has ended, it changes nothing but a line on the
    terminal. Before and after the event loop, :meth:`held` keeps them
    from interrupting (``sequencer run`` holds them until its exit code).
    """

    def __init__(self) -> None:
        #: signals received so far, by the session's receiver or while held
        self.received = 0
        #: received while held, outside the event loop: the session's receiver acts on them when it starts
        self._unheard = 0
        self._routes: list[Callable[[], object]] = []

    @contextmanager
    def held(self) -> Iterator[StopSignals]:
        """Outside the event loop, count stop signals instead of dying of them (main thread only).

        Once one has come, they are ignored after the block: the process
        is on its way out with its exit status decided, and a signal that
        comes while the interpreter shuts down must not change it (SIGHUP
        would kill it, Ctrl-C print a traceback; and the interpreter puts
        the default action back for any Python handler as it finalizes).
        Otherwise the handlers are restored.
        """

        def count(signum: int, frame: object) -> None:
            self.received += 1
            self._unheard += 1

        previous = {sig: signal.signal(sig, count) for sig in STOP_SIGNALS}
        try:
            yield self
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, signal.SIG_IGN if self.received else handler)

    @contextmanager
    def routed(self, route: Callable[[], object]) -> Iterator[None]:
        """Send the signals that come during the block to ``route()`` (which must not block)."""
        self._routes.append(route)
        try:
            yield
        finally:
            self._routes.remove(route)

    @asynccontextmanager
    async def listening(self) -> AsyncIterator[None]:
        """Receive stop signals for the duration of the block, routing each; those counted before it first."""
        async with trio.open_nursery() as nursery:
            await nursery.start(self._listen)
            try:
                yield
            finally:
                nursery.cancel_scope.cancel()

    async def _listen(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        with trio.open_signal_receiver(*STOP_SIGNALS) as signals:
            task_status.started()
            for _ in range(self._unheard):
                self._route()
            self._unheard = 0
            async for _ in signals:
                self.received += 1
                self._route()

    def _route(self) -> None:
        if self._routes:
            self._routes[-1]()


class Panel(Protocol):
    """A screen beside the terminal, served while the session runs (the operator panel, ``web/panel``).

    It shows each round's (or the shift's) slots from their events, and
    answers, starts and stops through the session's desk and control.
    """

    url: str

    async def follow(self, events: trio.MemoryReceiveChannel[Event], places: Sequence[str], phases_per_run: int,
                     *, continuous: bool) -> None:
        """Show the slots at ``places`` from ``events`` until the bus closes."""
        ...


async def run_session(
    loaded: LoadedProduct,
    config: StationConfig,
    store: Any,
    console: Console,
    live: bool,
    *,
    open_hardware: Callable[[], AbstractAsyncContextManager[Hardware]],
    open_shipping: Callable[[], AbstractAsyncContextManager[object]],
    round_ended: Callable[[StationResult], Awaitable[None]] | None = None,
    history: UnitHistorySource | None = None,
    stops: StopSignals | None = None,
    open_panel: Callable[[OperatorDesk, StationControl], AbstractAsyncContextManager[Panel]] | None = None,
) -> SessionResult:
    """The station session: set up once, then rounds of every slot, the operator saying when to go on.

    ``config.rounds`` rounds, or with 0 until the operator types stop. What
    lasts the whole session is opened once: the store's writer, the
    MongoDB shipper, the flash workers, the operator's input. Each round gets
    its own slots (under ``--sim``, a fresh farm: new boards, new serials),
    instruments and display. ``open_shipping`` forwards the store to MongoDB
    while the session runs (or does nothing); ``open_hardware`` opens the
    station's side; ``history`` finds each unit's earlier runs (retests);
    ``open_panel`` serves the operator panel over the session's desk and
    control (``--panel``), for the whole session.

    ``round_ended`` is given each round's result as the round ends (the
    command line writes its runs' reports then). The session itself keeps
    only the last round's runs and counts: a station that runs all week
    must not hold every record it ever took.

    SIGINT, SIGTERM and SIGHUP are received for the whole session and go
    where :class:`StopSignals` says (give ``stops`` to hold them before and
    after the event loop too).
    """
    stops = stops if stops is not None else StopSignals()
    rounds = config.rounds  # 0: until the operator says stop
    bus = EventBus()
    settings = RunSettings(station=config.station, operator=config.operator, batch=config.batch_or_default)
    interactive = live and console.is_terminal
    desk = (OperatorDesk(bus) if rounds != 1 or config.continuous or loaded.product.uses("operator")
            or config.ask_operator or config.scan.port or open_panel is not None else None)
    # Where scans and the panel's buttons go; the same desk answers what is not a scan.
    control = (StationControl(ScanRules.of(config.scan, loaded.product.serial_pattern, loaded.name), config.scan,
                              settings, desk=desk, bus=bus) if desk is not None else None)
    tally = _Tally()
    stopped: str | None = None  # when the operator stopped the session with no run open
    nobody: NoOperator | None = None
    testing_started = False

    def stop_session() -> None:
        # Nothing tested yet: a stop ends the set-up. Once testing has begun,
        # rounds take their own; one that comes after the rounds changes
        # nothing, so the records, the summary and the report follow.
        if not testing_started:
            setting_up.cancel()
            return
        try:
            console.print("[yellow]the slots have stopped: writing the records, then the summary and the "
                          "report[/yellow]")
        except OSError:
            pass  # the terminal is gone; the records and the report are not

    with trio.CancelScope() as setting_up, stops.routed(stop_session):
        async with stops.listening(), AsyncExitStack() as stack:
            # Entered first so it exits last: its final drain sees the writer's final flush.
            await stack.enter_async_context(open_shipping())
            await stack.enter_async_context(store.writer())
            hardware = await stack.enter_async_context(open_hardware())
            panel: Panel | None = None
            if open_panel is not None:
                assert desk is not None and control is not None
                panel = await stack.enter_async_context(open_panel(desk, control))
                console.print(f"panel: {escape(panel.url)}/ (the operator's screen: tiles, questions, start and stop)")
            async with trio.open_nursery() as answering:
                if desk is not None:
                    assert control is not None
                    answering.start_soon(_answer_operator_questions, desk, control, config, hardware, console,
                                         interactive, panel is not None)
                try:
                    testing = True
                    if config.ask_operator and not config.operator:
                        assert desk is not None
                        try:
                            name = await _ask_station(desk, bus, WHO_IS_TESTING, console, interactive)
                        except NoOperator as exc:
                            nobody, name = exc, None
                        if name is None:  # nobody said who is testing: test nothing
                            stopped, testing = ("before any board was tested" if nobody is None else None), False
                        else:
                            assert control is not None
                            control.operator_is(name)  # a badge scanned says so itself, keeping its scan
                    if testing and config.continuous:
                        testing_started = True
                        assert control is not None
                        result = await _run_continuous(loaded, config, store, console, bus, control, desk, hardware,
                                                       interactive, stops, history, round_ended, panel)
                        tally.add(result)
                        testing = False
                    number = 0
                    while testing:
                        number += 1
                        testing_started = True
                        # New simulated boards each round: the same slots, other units.
                        round_config = attrs.evolve(config, seed=config.seed + 1000 * (number - 1))
                        if control is not None:  # who tests, for which work order: as last scanned
                            settings = control.settings
                        result = await _run_round(loaded, round_config, store, console, bus, settings, desk,
                                                  hardware, interactive, stops,
                                                  f" (round {number}{_of(rounds)})" if rounds != 1 else "", history,
                                                  panel)
                        tally.add(result)
                        if round_ended is not None:
                            await round_ended(result)
                        if number == rounds or result.aborted or result.write_error is not None:
                            break
                        assert desk is not None  # there is one whenever there are rounds
                        # A stop between rounds ends the session here, whether it comes during the
                        # summary or the question.
                        with trio.CancelScope() as between, stops.routed(between.cancel):
                            go_on = await _next_round(desk, bus, result, number, rounds, console, interactive)
                        if between.cancelled_caught:
                            go_on = "interrupted"
                        if go_on != "next":
                            stopped = "between rounds" if go_on == "interrupted" else None
                            break
                finally:
                    answering.cancel_scope.cancel()
    if setting_up.cancelled_caught:
        stopped = "before any board was tested"
    if nobody is not None:
        raise ConfigError(f"the station asks who is testing (ask_operator), and nobody can answer: {nobody}; "
                          "give --operator NAME")
    return tally.result(stopped)


@attrs.frozen
class SessionResult:
    """How a session went: its last round's runs, and counts over every round."""

    #: the last round's runs (the earlier rounds' were summed up as they ended)
    last_round: tuple[RunRecord, ...]
    #: runs taken in the whole session, by outcome
    outcomes: Mapping[Outcome, int]
    aborted: bool = False
    #: the store's first refusal: the station stopped testing
    write_error: str | None = None
    #: when the operator stopped the session while no run was open: "between rounds", ...
    stopped: str | None = None
    #: one line per slot whose run escaped the engine, in every round
    crashed: tuple[str, ...] = ()

    @property
    def runs(self) -> int:
        return sum(self.outcomes.values())

    @property
    def passed(self) -> int:
        return self.outcomes.get(Outcome.PASS, 0)


class _Tally:
    """A session's rounds added up as they end, so no round's records outlive the next round."""

    def __init__(self) -> None:
        self.last_round: tuple[RunRecord, ...] = ()
        self.outcomes: dict[Outcome, int] = {}
        self.aborted = False
        self.write_error: str | None = None
        self.crashed: list[str] = []

    def add(self, result: StationResult) -> None:
        self.last_round = result.runs
        if result.outcomes is not None:  # a continuous station counted its runs as they ended
            for outcome, n in result.outcomes.items():
                self.outcomes[outcome] = self.outcomes.get(outcome, 0) + n
        else:
            for run in result.runs:
                outcome = run.outcome or Outcome.ABORTED
                self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1
        self.aborted = self.aborted or result.aborted
        if self.write_error is None:
            self.write_error = result.write_error
        self.crashed += result.crashed

    def result(self, stopped: str | None) -> SessionResult:
        return SessionResult(self.last_round, dict(self.outcomes), aborted=self.aborted or stopped is not None,
                             write_error=self.write_error, stopped=stopped, crashed=tuple(self.crashed))


async def _run_round(
    loaded: LoadedProduct, config: StationConfig, store: Any, console: Console, bus: EventBus,
    settings: RunSettings, desk: OperatorDesk | None, hardware: Hardware, interactive: bool, stops: StopSignals,
    which: str, history: UnitHistorySource | None, panel: Panel | None,
) -> StationResult:
    """One round: every slot runs the product once, shown live (or as plain lines).

    Stop signals go to the round's :class:`~sequencer.station.StopRequests`
    from its set-up on: one that comes while its boards are prepared starts
    no slot.
    """
    from sequencer.station import StopRequests, run_station

    stop = StopRequests(on_request=partial(_tell_operator, console))
    with stops.routed(stop.request):
        async with hardware.open_round(config) as setup:
            async with _shown(loaded, setup.ports, setup.notices, settings, console, bus, desk, interactive, which,
                              panel=panel):
                return await run_station(
                    loaded, setup.ports, settings=settings, store=store, bus=bus, resources=setup.resources,
                    handle_signals=False, stop=stop, fixtures=setup.fixtures, desk=desk, history=history,
                    simulated=bool(config.sim), lines=setup.lines,
                )


@asynccontextmanager
async def _shown(
    loaded: LoadedProduct, places: Sequence[str], notices: Sequence[str], settings: RunSettings, console: Console,
    bus: EventBus, desk: OperatorDesk | None, interactive: bool, which: str, *, continuous: bool = False,
    control: StationControl | None = None, panel: Panel | None = None,
) -> AsyncIterator[None]:
    """The notices and the header, then the slots shown live (or as plain lines) while the block runs."""
    from sequencer.display import SHOWN_EVENTS, StationDisplay, show_live, show_plain

    for notice in notices:
        console.print(escape(notice))
    display = StationDisplay(places, len(loaded.product.all_phases), continuous=continuous)
    events = bus.subscribe("display", buffer=4096)
    # The panel's own subscription: a browser falling behind drops events for the panel alone.
    panel_events = bus.subscribe("panel", buffer=4096, kinds=SHOWN_EVENTS) if panel is not None else None
    tested_by = f", operator {escape(printable(settings.operator))}" if settings.operator else ""
    console.print(f"[bold]{escape(printable(loaded.name))}[/bold] on {len(places)} slot(s), batch "
                  f"{escape(printable(settings.batch))}, station {escape(printable(settings.station))}"
                  f"{tested_by}{which}")
    async with trio.open_nursery() as nursery:
        if interactive:
            nursery.start_soon(show_live, display, events, console, desk, control)
        else:
            nursery.start_soon(show_plain, display, events, sys.stdout)
        if panel is not None:
            nursery.start_soon(partial(panel.follow, panel_events, places, len(loaded.product.all_phases),
                                       continuous=continuous))
        try:
            yield
        finally:
            bus.close()  # ends the display; the next round subscribes anew


async def _run_continuous(
    loaded: LoadedProduct, config: StationConfig, store: Any, console: Console, bus: EventBus,
    control: StationControl, desk: OperatorDesk | None, hardware: Hardware, interactive: bool, stops: StopSignals,
    history: UnitHistorySource | None, round_ended: Callable[[StationResult], Awaitable[None]] | None,
    panel: Panel | None,
) -> StationResult:
    """Every slot on its own cycle until Ctrl-C, shown live (or as plain lines); each run's report as it ends."""
    from sequencer.continuous import run_continuous
    from sequencer.station import StopRequests

    async def run_ended(run: RunRecord) -> None:
        if round_ended is not None:
            await round_ended(StationResult((run,)))

    stop = StopRequests(on_request=partial(_tell_operator, console))
    with stops.routed(stop.request):
        async with hardware.open_continuous(config, bus) as setup:
            async with _shown(loaded, setup.boards.places, setup.notices, control.settings, console, bus, desk,
                              interactive, _shift_words(config), continuous=True, control=control,
                              panel=panel):
                return await run_continuous(
                    loaded, setup.boards, settings=control.settings, store=store, bus=bus, resources=setup.resources,
                    handle_signals=False, stop=stop, fixtures=setup.fixtures, desk=desk, history=history,
                    run_ended=run_ended, simulated=bool(config.sim), lines=setup.lines, control=control,
                )


def _shift_words(config: StationConfig) -> str:
    """How a continuous shift goes, in the header's words."""
    scan = config.scan
    if scan.start == "scan":
        what = "put a board in, scan its label, then start it" if scan.label else "put a board in, then start it"
    else:
        what = "put a board in any slot, then scan its label" if scan.label else "put a board in any slot"
    return f", continuous: {what}; Ctrl-C ends the shift"


def _tell_operator(console: Console, aborts: int) -> None:
    """What a stop signal does, said as it is done."""
    try:
        if aborts == 1:
            console.print("[yellow]aborting: running teardowns and recording every run "
                          "(Ctrl-C again to skip teardowns)[/yellow]")
        elif aborts == 2:
            console.print("[yellow]skipping remaining teardowns; writing records[/yellow]")
    except OSError:
        pass  # the terminal is gone (it may be why we abort); the abort goes on


async def _next_round(
    desk: OperatorDesk, bus: EventBus, result: StationResult, number: int, rounds: int, console: Console,
    interactive: bool,
) -> str:
    """Between two rounds: this round's summary, then the operator says go on (Enter) or stop.

    ``"next"``; ``"stop"`` when the operator says so or nobody is left to
    answer (standard input ended). A stop signal cancels it (the caller's scope).
    """
    from sequencer.display import station_summary

    passed = sum(r.outcome is Outcome.PASS for r in result.runs)
    console.print(station_summary(result.runs))
    console.print(f"round {number}{_of(rounds)}: {passed}/{len(result.runs)} passed")
    question = Question(-1, "", "", f"round {number + 1}{_of(rounds)}: put the next boards in, then press Enter",
                        ("next", "stop"), default="next")
    try:
        answer = await _ask_station(desk, bus, question, console, interactive)
    except NoOperator as exc:
        console.print(f"[yellow]{escape(str(exc))}: stopping after round {number}[/yellow]")
        return "stop"
    return answer


def _of(rounds: int) -> str:
    """`` of N`` after a round's number, or nothing when the session goes on until the operator stops it."""
    return f" of {rounds}" if rounds else ""


async def _ask_station(
    desk: OperatorDesk, bus: EventBus, question: Question, console: Console, interactive: bool
) -> str:
    """Ask the station's own question while no slot runs, and wait for the answer.

    No run is open, so a stop signal here has nothing to abort: the
    session's scope around the question is cancelled (:class:`StopSignals`).
    :class:`NoOperator` (nobody left to answer) propagates.
    """
    from sequencer.display import StationDisplay, show_plain, show_question_live

    nobody: NoOperator | None = None
    answer = ""  # given when nobody is None
    async with trio.open_nursery() as printing:
        if not interactive:
            # Ends when the bus closes, after printing what the desk published (the answer too).
            printing.start_soon(show_plain, StationDisplay([], 0), bus.subscribe("station question"), sys.stdout)
        try:
            async with trio.open_nursery() as asking:
                if interactive:
                    asking.start_soon(show_question_live, desk, console)
                try:
                    answer = await desk.ask(question)
                except NoOperator as exc:
                    nobody = exc  # raised outside the nurseries, not wrapped in an exception group
                asking.cancel_scope.cancel()
        finally:
            bus.close()
    if nobody is not None:
        raise nobody
    return answer


async def _answer_operator_questions(
    desk: OperatorDesk, control: StationControl, config: StationConfig, hardware: Hardware, console: Console,
    interactive: bool, panel: bool,
) -> None:
    """Feed the desk answers and the control scans for the whole session: the simulated operator, the keyboard
    (and a keyboard-wedge scanner) or standard input, and a serial scanner.

    With a ``panel``, a person answers there, under ``--sim`` too (the simulated operator stays out of it), and
    standard input ending does not leave the station without an operator.
    """
    from sequencer.keyboard import answer_from_keyboard, answer_from_lines

    async with trio.open_nursery() as nursery:
        nursery.start_soon(hardware.read_scanner, config, control)
        if config.sim and not panel:
            console.print("operator: the simulated operator answers the station's questions")
            await hardware.answer_as_simulated_operator(desk, config.seed)
        elif sys.stdin is None:
            # Started with standard input closed: descriptor 0 may since be some file the station opened.
            if not panel:
                desk.close("the station has no standard input: nobody can answer the operator's questions")
        elif interactive and os.isatty(0):
            console.print("operator: questions appear below the slots; type the answer (or scan), then Enter")
            await answer_from_keyboard(desk, submit=partial(control.take, source="keyboard"))
        else:
            console.print("operator: each line of standard input is a scan, or answers the oldest open question")
            await answer_from_lines(desk, submit=partial(control.take_line, source="standard input"),
                                    close_at_end=not panel)
