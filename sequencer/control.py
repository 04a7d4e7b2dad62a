"""The operator's hand on the station: what a scan does, and starting and stopping slots.

Whatever the operator scans or types, and whatever they press on the panel
(:mod:`web.panel`), comes here, from whichever input it arrived on: the
keyboard (a keyboard-wedge scanner types there too), a serial scanner, the
panel's buttons. :meth:`StationControl.take` tells a scan from an answer by
the station's rules (:mod:`sequencer.scans`):

* a badge names who is testing, a work order the batch: every run started
  from then on is stamped with them, and keeps the scan in its record;
* on a continuous station (:mod:`sequencer.continuous`), the control is what
  a slot with a board in waits on before it starts: a start (the ``START``
  code, the slot's own code, the panel's Start) when the station starts on
  scans (``[scan] start = "scan"``, a jig whose USB adapter is always
  there), and the unit's label when every label is scanned (``[scan] label
  = true``). A label goes to the slot the operator scanned the code of, else
  to the slot that has waited longest for one; the same serial is never in
  two slots. A stop aborts one slot's run (its teardowns run; it is recorded
  ABORTED);
* anything else answers the operator's open question
  (:class:`~sequencer.operator.OperatorDesk`), as typed text always did. A
  label that the open question would refuse (a yes/no question is open) is
  taken as a label instead.

A scan that cannot be taken is refused with a one-line hint, and nothing
changes. Every scan taken and refused is published on the bus
(:class:`~sequencer.events.ScanTaken`, :class:`~sequencer.events.ScanRefused`),
and :attr:`StationControl.said` keeps the last for a live display.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import attrs
import trio

from sequencer.engine import RunSettings
from sequencer.events import EventBus, ScanRefused, ScanTaken, SlotWaiting
from sequencer.operator import OperatorDesk, Question
from sequencer.records import ScanRecord, utcnow
from sequencer.scans import BADGE, LABEL, SLOT, START, WORK_ORDER, ScanConfig, ScanRules, check_value

__all__ = ["WHO_IS_TESTING", "StationControl"]

#: ``ask_operator``: the station's first question, whose answer is stamped on every run of the session.
WHO_IS_TESTING = Question(-1, "", "", "who is testing? Scan your badge or type your name, then press Enter")
#: A slot's code scanned more than this long ago no longer says which slot the next label is for.
SELECTION_S = 60.0

#: Where a slot is in its cycle, as the control sees it.
EMPTY, WAITING, RUNNING, DONE = "empty", "waiting", "running", "done"


@attrs.define
class _Slot:
    state: str = EMPTY
    #: the start asked for it (a scan, the panel), not yet taken by a run
    start: ScanRecord | None = None
    #: the label scanned for its next unit
    label: ScanRecord | None = None
    #: when it began waiting (the label without a slot's code goes to the longest waiting)
    since: float = 0.0
    #: the label of the unit it tests now (or last tested, its board still in)
    testing: str | None = None


class StationControl:
    """Scans, starts and stops for one station session; see the module docstring.

    ``settings`` are who tests and for which batch at first; badges and work
    orders change them (:attr:`settings`). The slots are :meth:`attach`-ed by
    a continuous station for as long as it runs.
    """

    def __init__(self, rules: ScanRules, config: ScanConfig, settings: RunSettings, *,
                 desk: OperatorDesk | None = None, bus: EventBus | None = None) -> None:
        self.rules = rules
        self.config = config
        self.settings = settings
        self._desk = desk
        self._bus = bus
        #: the scans that set the operator and the batch, kept in each run's record
        self._badge: ScanRecord | None = None
        self._work_order: ScanRecord | None = None
        self._slots: list[_Slot] = []
        self._stop_slot: Callable[[int, str], bool] | None = None
        self._selected: tuple[int, float] | None = None
        #: what the last scan did, or why it was refused
        self.said = ""
        self.version = 0
        self._changed = trio.Event()

    # -- what a continuous station asks ------------------------------------------------

    def attach(self, slots: int, stop: Callable[[int, str], bool]) -> None:
        """A continuous station's ``slots`` start and stop here now; ``stop(slot, by)`` aborts one slot's run."""
        self._slots = [_Slot() for _ in range(slots)]
        self._stop_slot = stop
        self._bump()

    def detach(self) -> None:
        self._slots, self._stop_slot, self._selected = [], None, None
        self._bump()

    async def ready(self, slot: int) -> RunSettings:
        """Wait until the board in ``slot`` may start (its start, its label); the settings its run is stamped with.

        Cancelled (the board was taken out, the station stops), the slot
        keeps its start and label for its next board only if the board is
        still in: see :meth:`vacated`.
        """
        s = self._slots[slot]
        if s.state != WAITING:
            s.state, s.since = WAITING, trio.current_time()
            self._bump()
        told = ""
        while True:
            needs = self._needs(s)
            if not needs:
                break
            if needs != told:
                told = needs
                self._publish(SlotWaiting(slot, needs))
            await self._wait_changed()
        scans = tuple(x for x in (self._badge, self._work_order, s.label, s.start) if x is not None)
        s.state, s.testing = RUNNING, s.label.value if s.label is not None else None
        s.start, s.label = None, None
        if self._selected is not None and self._selected[0] == slot:
            self._selected = None
        self._bump()
        return attrs.evolve(self.settings, scans=scans)

    async def restarted(self, slot: int) -> None:
        """Wait until the operator starts ``slot`` again with its board still in (the verdict shown until then)."""
        s = self._slots[slot]
        s.state = DONE
        self._bump()
        while s.start is None:
            await self._wait_changed()

    def vacated(self, slot: int) -> None:
        """The board in ``slot`` was taken out: what was scanned for it is forgotten."""
        if slot < len(self._slots):
            self._slots[slot] = _Slot()
            self._bump()

    @property
    def attached(self) -> bool:
        """Whether a continuous station's slots start and stop here now (a station in rounds has none)."""
        return bool(self._slots)

    def slot_state(self, slot: int) -> str:
        return self._slots[slot].state if slot < len(self._slots) else EMPTY

    def needs(self, slot: int) -> str:
        """What ``slot`` waits for from the operator ('' for nothing): ``scan its label``, ``start it``."""
        if slot >= len(self._slots) or self._slots[slot].state != WAITING:
            return ""
        return self._needs(self._slots[slot])

    def _needs(self, s: _Slot) -> str:
        label = self.config.label and s.label is None
        start = self.config.start == "scan" and s.start is None
        if label and start:
            return "scan its label, then start it"
        if label:
            return "scan its label"
        return "start it: scan START or its slot's code, or press Start" if start else ""

    # -- what the operator does -----------------------------------------------------------

    def take(self, text: str, source: str) -> bool:
        """A line scanned or typed (Enter pressed): a scan, else the answer to the open question.

        True if it was taken; refused, :attr:`said` says why and nothing changed.
        """
        text = text.strip()
        if not text:  # Enter alone: the open question's default, if it has one
            return self._desk.answer(text) if self._desk is not None and self._desk.current is not None else False
        found = self.rules.classify(text)
        if found is not None and found[0] != LABEL:
            return self._scan(found[0], found[1], source)
        question = self._desk.current if self._desk is not None else None
        if question is not None and (found is None or _accepts(question, text)):
            return self._desk.answer(text)  # type: ignore[union-attr]
        if found is not None:
            return self._scan(LABEL, found[1], source)
        why = "no question is open, and " if question is None else ""
        return self._refuse(text, f"{why}{text!r} is not a scan this station knows ({self.rules.describe()})",
                            source)

    async def take_line(self, text: str, source: str) -> None:
        """A line of standard input that is not a terminal: a scan at once, else the answer to the next question.

        A script may feed answers ahead of their questions, as it always could.
        """
        stripped = text.strip()
        found = self.rules.classify(stripped) if stripped else None
        if found is not None and (found[0] != LABEL or self._desk is None or self._desk.current is None):
            self._scan(found[0], found[1], source)
            return
        if self._desk is None:
            self._refuse(stripped, "this station asks no questions", source)
            return
        question = await self._desk.wait_question()
        if found is not None and not _accepts(question, stripped):
            self._scan(LABEL, found[1], source)
        else:
            self._desk.answer(text)

    def start(self, slot: int | None, source: str) -> bool:
        """Start ``slot`` (None: every slot whose board waits, or shows its verdict); the panel's Start."""
        return self._scan(SLOT if slot is not None else START, "" if slot is None else str(slot), source,
                          starting=True)

    def stop(self, slot: int, source: str) -> bool:
        """Abort the run under way in ``slot``: its teardowns run, and it is recorded ABORTED."""
        if not self._slots:
            return self._refuse(f"stop {slot}", "this station has no slots to stop now", source)
        if not 0 <= slot < len(self._slots):
            return self._refuse(f"stop {slot}", f"there is no slot {slot} (0 to {len(self._slots) - 1})", source)
        if self._slots[slot].state != RUNNING or self._stop_slot is None:
            return self._refuse(f"stop {slot}", f"slot {slot} is not testing", source)
        self._stop_slot(slot, f"at {source}" if source == "the panel" else f"by the operator ({source})")
        return self._taken(ScanRecord("stop", str(slot), utcnow(), source), slot, f"slot {slot}: stopping its test")

    def operator_is(self, name: str) -> None:
        """Who is testing, as the station's question was answered (typed, not scanned)."""
        if name != self.settings.operator:
            self.settings = attrs.evolve(self.settings, operator=name)
            self._badge = None
            self._bump()

    # -- scans ----------------------------------------------------------------------------------

    def _scan(self, kind: str, value: str, source: str, *, starting: bool = False) -> bool:
        """Do what a scan of ``kind`` says (or refuse it, saying why)."""
        text = value
        try:
            check_value(kind, value)
        except ValueError as exc:
            return self._refuse(text, str(exc), source)
        scan = ScanRecord(kind, value, utcnow(), source)
        if kind == BADGE:
            self._badge = scan
            self.settings = attrs.evolve(self.settings, operator=value)
            if self._desk is not None and self._desk.current is WHO_IS_TESTING:
                self._desk.answer(value)
            return self._taken(scan, None, f"operator: {value}")
        if kind == WORK_ORDER:
            self._work_order = scan
            self.settings = attrs.evolve(self.settings, batch=value)
            return self._taken(scan, None, f"work order {value}: the batch of every run from now on")
        if not self._slots:
            return self._refuse(value, "this station tests in rounds: its slots start together, and a question "
                                       "asks for what it needs", source)
        if kind == SLOT:
            return self._slot_code(scan, starting)
        if kind == START:
            return self._start_all(scan)
        return self._label(scan)

    def _slot_code(self, scan: ScanRecord, starting: bool) -> bool:
        try:
            slot = int(scan.value)
        except ValueError:
            slot = -1
        if not 0 <= slot < len(self._slots):
            return self._refuse(scan.value, f"{scan.value!r} is not a slot of this station (0 to "
                                            f"{len(self._slots) - 1})", scan.source)
        s = self._slots[slot]
        if s.state == RUNNING:
            return self._refuse(scan.value, f"slot {slot} is testing; its next label and start wait until its "
                                            "board is out", scan.source)
        if s.state == EMPTY:
            return self._refuse(scan.value, f"slot {slot} has no board: put one in first", scan.source)
        self._selected = (slot, trio.current_time())
        reads_label = self.config.label and s.label is None
        if starting or self.config.start == "scan" or s.state == DONE:
            s.start = scan  # on a station that starts on scans, the slot's code is its start; else a retest
            more = ", once its label is scanned" if reads_label else ""
            return self._taken(scan, slot, f"slot {slot}: starting{more}")
        return self._taken(scan, slot, f"slot {slot}: scan its label" if reads_label else f"slot {slot}")

    def _start_all(self, scan: ScanRecord) -> bool:
        started = [i for i, s in enumerate(self._slots) if s.state in (WAITING, DONE) and s.start is None]
        if not started:
            return self._refuse(scan.value or "START", "no slot has a board waiting for its start", scan.source)
        for i in started:
            self._slots[i].start = scan
        label = [i for i in started if self.config.label and self._slots[i].label is None]
        more = f"; slot(s) {', '.join(map(str, label))} once their labels are scanned" if label else ""
        return self._taken(scan, None, f"starting slot(s) {', '.join(map(str, started))}{more}")

    def _label(self, scan: ScanRecord) -> bool:
        for i, s in enumerate(self._slots):
            if s.label is not None and s.label.value == scan.value:
                return self._refuse(scan.value, f"{scan.value} is already scanned for slot {i}", scan.source)
            if s.testing == scan.value and s.state == RUNNING:
                return self._refuse(scan.value, f"{scan.value} is the unit under test in slot {i}", scan.source)
        selected = self._selected
        if selected is not None and trio.current_time() - selected[1] <= SELECTION_S:
            slot = selected[0]
            if self._slots[slot].state not in (WAITING, DONE):
                return self._refuse(scan.value, f"slot {slot} is {self._slots[slot].state}: its label waits for its "
                                                "next board", scan.source)
        else:
            waiting = [(s.since, i) for i, s in enumerate(self._slots)
                       if s.state == WAITING and s.label is None and self.config.label]
            if not waiting:
                return self._refuse(scan.value, "no slot waits for a label: scan the slot's code first, or put the "
                                                "board in", scan.source)
            slot = min(waiting)[1]
        s = self._slots[slot]
        s.label = scan
        self._selected = None
        if self.config.start == "scan" and s.start is None and s.state == WAITING:
            s.start = scan  # the label is the start: "scan to start"
        return self._taken(scan, slot, f"slot {slot}: label {scan.value}")

    # -- telling ------------------------------------------------------------------------------

    def _taken(self, scan: ScanRecord, slot: int | None, said: str) -> bool:
        self.said = said
        self._publish(ScanTaken(scan, slot, said))
        self._bump()
        return True

    def _refuse(self, text: str, reason: str, source: str) -> bool:
        self.said = f"not taken: {reason}"
        self._publish(ScanRefused(text, reason, source))
        self._bump()
        return False

    def _publish(self, event: object) -> None:
        if self._bus is not None:
            self._bus.publish(event)  # type: ignore[arg-type]

    def _bump(self) -> None:
        self.version += 1
        self._changed.set()
        self._changed = trio.Event()

    async def _wait_changed(self) -> None:
        await self._changed.wait()

    async def wait_changed(self, seen: int) -> int:
        """Wait until :attr:`version` is not ``seen``; return it."""
        while self.version == seen:
            await self._changed.wait()
        return self.version


def _accepts(question: Question, text: str) -> bool:
    try:
        question.answer_from(text)
    except ValueError:
        return False
    return True
