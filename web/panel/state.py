"""What the operator panel shows: the station's slots, its questions and its scans, kept as the station runs.

The panel lives in the station's own process and trio loop, beside the
slots, so it must cost them next to nothing. It is an ordinary event-bus
subscriber with a :class:`~sequencer.display.StationDisplay` of its own
(the terminal's view model, verdicts and retests included): if the panel
falls behind, events are dropped for it alone. Each change bumps
:attr:`PanelState.version`; the page is rendered at most once per version
and per :data:`COALESCE_S`, however many browsers watch
(:meth:`PanelState.rendered`), so ten screens on a busy station cost one
render a few times a second, not one per event per screen.

The operator's questions and what the last scan did come from the
station's desk and control (:class:`~sequencer.operator.OperatorDesk`,
:class:`~sequencer.control.StationControl`), which the panel also watches.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

import attrs
import trio

from sequencer.control import DONE, RUNNING, WAITING, StationControl
from sequencer.display import StationDisplay
from sequencer.events import Event, RunFinished
from sequencer.operator import OperatorDesk, Question
from sequencer.records import Outcome
from sequencer.terminal import printable
from sequencer.verdicts import shortened, unit_label

__all__ = ["COALESCE_S", "PanelState", "QuestionView", "TileView"]

#: Changes closer together than this reach the browsers as one (a phase's progress ticks many times a second).
COALESCE_S = 0.2
#: The panel takes the station's events in batches at most this often (each batch one wake-up of its task).
DRAIN_S = 0.05

#: The colour class of a verdict's headline: good, a bin, station trouble, not tested to the end.
HEADLINE_CLASS = {"PASS": "pass", "RETEST": "bin", "REWORK": "bin", "SCRAP": "bin", "FAIL": "bin",
                  "CALL ENGINEER": "trouble", "ABORTED": "aborted"}


@attrs.frozen
class QuestionView:
    """An open question as a tile shows it: its number (what a button answers), words, and the answers offered."""

    number: int
    text: str
    choices: tuple[str, ...]
    expected: str
    default: str | None


@attrs.frozen
class TileView:
    """One slot's tile: everything in the words and colours the operator reads."""

    index: int
    port: str
    unit: str
    #: empty, board, ready (waits for the operator), testing, done
    state: str
    phase: str
    done: int
    total: int
    detail: str
    #: large: PASS, RETEST, ..., or while it runs ``testing`` / ``retest 2``
    headline: str
    headline_class: str
    instruction: str
    where: str
    retest: str
    #: the slot's last unit and its verdict, once its board is out: ``SN696100024 PASS``
    last: str
    questions: tuple[QuestionView, ...]
    can_start: bool
    can_stop: bool

    @property
    def percent(self) -> int:
        return round(100 * self.done / self.total) if self.total else 0


def _question(number: int, q: Question) -> QuestionView:
    return QuestionView(number, printable(q.text), q.choices, printable(q.expected), q.default)


class PanelState:
    """The station as the panel shows it, and a way to wait for the next version of it."""

    def __init__(self, station: str, product: str, desk: OperatorDesk, control: StationControl) -> None:
        self.station = station
        self.product = product
        self.desk = desk
        self.control = control
        self.display = StationDisplay([], 0)
        #: each slot's last unit and verdict, kept when its board is taken out (which bin did it go to?)
        self.last: dict[int, str] = {}
        self.version = 1
        self._changed = trio.Event()
        self._rendered: tuple[int, str] | None = None
        #: the station is stopping: every browser's stream ends, so the server stops at once (:meth:`close`)
        self.closed = False

    # -- kept current -----------------------------------------------------------------------

    async def follow(self, events: trio.MemoryReceiveChannel[Event], places: Sequence[str], phases_per_run: int,
                     *, continuous: bool) -> None:
        """Apply a round's (or a shift's) events until the bus closes; the last state stays shown after it."""
        self.display = StationDisplay(places, phases_per_run, continuous=continuous)
        self.last = {}
        self._bump()
        async with events:
            while True:
                # Woken once per batch, not per event: a busy station's events cost the panel a task
                # switch every DRAIN_S, and the slots' loop stays theirs.
                try:
                    self._apply(await events.receive())
                    while True:
                        self._apply(events.receive_nowait())
                except trio.WouldBlock:
                    pass
                except trio.EndOfChannel:
                    self._bump()
                    return
                self._bump()
                await trio.sleep(DRAIN_S)

    def _apply(self, event: Event) -> None:
        self.display.apply(event)
        if isinstance(event, RunFinished) and 0 <= event.run.slot < len(self.display.slots):
            view = self.display.slots[event.run.slot]
            if view.verdict is not None:
                unit = printable(unit_label(event.run.dut)) or view.serial or "unit"
                self.last[view.index] = f"{unit} {view.verdict.headline}"

    async def watch_operator(self) -> None:
        """Bump the version whenever the desk (questions, hints) or the control (scans, starts) changes."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._watch, self.desk.wait_changed, lambda: self.desk.version)
            nursery.start_soon(self._watch, self.control.wait_changed, lambda: self.control.version)

    async def _watch(self, wait_changed: Callable[[int], Any], version: Callable[[], int]) -> None:
        seen = version()
        while True:
            seen = await wait_changed(seen)
            self._bump()

    def _bump(self) -> None:
        self.version += 1
        self._changed.set()
        self._changed = trio.Event()

    async def next(self, seen: int) -> int:
        """Wait until the version is past ``seen`` (at once if it is), or the panel closes; the version then."""
        while self.version <= seen and not self.closed:
            await self._changed.wait()
        return self.version

    def close(self) -> None:
        self.closed = True
        self._bump()

    # -- shown --------------------------------------------------------------------------------

    def rendered(self, render: Callable[[PanelState], str]) -> tuple[int, str]:
        """The current state as one event's data, rendered once per version however many browsers wait."""
        if self._rendered is None or self._rendered[0] != self.version:
            version = self.version
            self._rendered = (version, json.dumps({"version": version, "html": render(self)}))
        return self._rendered

    @property
    def settings(self) -> Any:
        return self.control.settings

    def counts(self) -> str:
        return self.display.counts().plain if self.display.slots else ""

    def station_questions(self) -> tuple[QuestionView, ...]:
        """The station's own questions (who is testing, the next round), and any slot's the tiles do not show."""
        shown = len(self.display.slots)
        return tuple(_question(n, q) for n, q in self.desk.open_questions if not 0 <= q.slot < shown)

    def tiles(self) -> list[TileView]:
        questions: dict[int, list[QuestionView]] = {}
        for number, q in self.desk.open_questions:
            questions.setdefault(q.slot, []).append(_question(number, q))
        attached = self.control.attached
        tiles = []
        for v in self.display.slots:
            verdict = v.verdict
            retest = printable(v.history.line()) if v.history is not None and v.history.retest else ""
            slot_state = self.control.slot_state(v.index) if attached else ""
            if verdict is not None:
                state, headline = "done", verdict.headline + (" (marginal)" if v.marginal else "")
                cls = HEADLINE_CLASS.get(verdict.headline, "bin")
            elif v.outcome is not None:  # finished, its verdict event lost
                state, headline, cls = "done", v.outcome.value, "pass" if v.outcome is Outcome.PASS else "bin"
            elif v.phase == "empty":
                state, headline, cls = "empty", "put a board in", "idle"
            elif v.phase == "ready":
                state, headline, cls = "ready", printable(v.detail), "ask"
            elif v.phase == "board in":
                state, headline, cls = "board", "board in", "idle"
            else:
                state, cls = "testing", "testing"
                headline = f"retest {v.history.tests}" if v.history is not None and v.history.retest else "testing"
            if questions.get(v.index):
                cls = "ask"
            tiles.append(TileView(
                index=v.index, port=v.port, unit=v.serial, state=state,
                phase=v.phase if state == "testing" else "", done=v.done, total=v.total,
                detail=printable(v.detail) if state == "testing" else "",
                headline=headline, headline_class=cls,
                instruction=printable(verdict.instruction) if verdict is not None and not verdict.passed else "",
                where=printable(shortened(verdict.where)) if verdict is not None and verdict.where else "",
                retest=retest if verdict is None else "",
                last=self.last.get(v.index, "") if state != "done" else "",
                questions=tuple(questions.get(v.index, ())),
                can_start=slot_state == DONE or (slot_state == WAITING and "start" in self.control.needs(v.index)),
                can_stop=slot_state == RUNNING,
            ))
        return tiles
