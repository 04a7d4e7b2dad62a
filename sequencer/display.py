"""What the operator sees while a station runs.

On a terminal: a line of counts (running, passed, failed, other), then one
live line per slot (port, unit, current phase, progress, result), redrawn
a few times a second from the trio loop (no refresh thread). More slots than
the terminal has rows go side by side in short cells, failures first when
even those do not fit (:meth:`StationDisplay.render`).
Elsewhere (CI, a pipe, a log file): one plain line per finished run and per
failed phase, which reads well in a log.

A slot's result is what the operator acts on (:mod:`sequencer.verdicts`):
PASS, or the bin (RETEST, REWORK, SCRAP), or CALL ENGINEER for station
trouble, in reverse video; under the slots, one line per slot that needs
the operator says what to do in the product's words and where the unit
failed, and a unit tested before says so while it runs ("retest 2: last
FAIL at supply_rails, vdd_3v3 3.59 V > 3.4 V"). A unit is shown by its
serial, or by its MAC until the serial is read.

When a phase asks the operator something (:mod:`sequencer.operator`), the
question is shown too: under the slots on a terminal, with what the operator
has typed so far; as a line of its own elsewhere.

The display is an ordinary event-bus subscriber: if it falls behind, events
are dropped for it alone and testing goes on at full speed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, TextIO

import attrs
import trio
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from sequencer.events import (
    AnswerRefused,
    BoardArrived,
    BoardRemoved,
    DutIdentified,
    Event,
    OperatorAnswered,
    OperatorAsked,
    PhaseFinished,
    PhaseProgress,
    PhaseStarted,
    PhaseWaiting,
    RunFinished,
    RunStarted,
    ScanRefused,
    ScanTaken,
    SlotWaiting,
    UnitRecognised,
)
from sequencer.operator import OperatorDesk, Question
from sequencer.records import Disposition, Outcome, RunRecord
from sequencer.terminal import printable
from sequencer.verdicts import UnitHistory, Verdict, shortened, unit_label, verdict_of

if TYPE_CHECKING:
    from sequencer.control import StationControl

OUTCOME_STYLE = {
    Outcome.PASS: "bold green",
    Outcome.FAIL: "bold red",
    Outcome.ERROR: "bold magenta",
    Outcome.TIMEOUT: "bold yellow",
    Outcome.ABORTED: "bold bright_black",
    Outcome.SKIPPED: "bright_black",
    Outcome.INTERRUPTED: "bold bright_black",
}

#: How a verdict's headline is drawn: reverse video, the nearest a terminal has to large.
HEADLINE_STYLE = {
    "PASS": "bold black on green",
    Disposition.RETEST.value.upper(): "bold white on red",
    Disposition.REWORK.value.upper(): "bold white on red",
    Disposition.SCRAP.value.upper(): "bold white on red",
    "FAIL": "bold white on red",
    "CALL ENGINEER": "bold white on magenta",
    "ABORTED": "bold white on bright_black",
}
RETEST_STYLE = "bold yellow"


#: Every kind of event :meth:`StationDisplay.apply` shows (not each measurement taken: the phase's end says it).
SHOWN_EVENTS: frozenset[type] = frozenset({
    RunStarted, BoardArrived, BoardRemoved, SlotWaiting, ScanTaken, ScanRefused, DutIdentified, UnitRecognised,
    PhaseStarted, PhaseWaiting, PhaseProgress, PhaseFinished, OperatorAsked, AnswerRefused, OperatorAnswered,
    RunFinished,
})


@attrs.define
class SlotView:
    index: int
    port: str
    serial: str = ""
    phase: str = "waiting"
    detail: str = ""
    done: int = 0
    total: int = 0
    outcome: Outcome | None = None
    marginal: bool = False
    failure: str = ""
    #: the unit's earlier runs, once the station has looked it up
    history: UnitHistory | None = None
    #: how the finished run reads to the operator
    verdict: Verdict | None = None

    def word(self) -> str:
        """The unit in one word, for a line a log reader splits on spaces: ``SN1``, ``mac=24:0A:...``, ``-``."""
        return self.serial.replace(" ", "=") if self.serial else "-"

    def result(self) -> Text:
        """The result cell: the verdict's headline, ``retest N`` while a retested unit runs, else ``running``."""
        if self.verdict is not None:
            marginal = " (marginal)" if self.marginal else ""
            return Text(f" {self.verdict.headline}{marginal} ", style=HEADLINE_STYLE.get(self.verdict.headline, ""))
        if self.outcome is not None:  # finished, verdict unknown (an event lost)
            return Text(self.outcome.value, style=OUTCOME_STYLE[self.outcome])
        if self.history is not None and self.history.retest:
            return Text(f"retest {self.history.tests}", style=RETEST_STYLE)
        if self.phase == "empty":
            return Text("put a board in", style="bright_black")
        if self.phase == "ready":
            return Text(self.detail, style="bold yellow")
        return Text("running", style="cyan")

    def note(self) -> Text | None:
        """What the operator should read about this slot beyond its row: what to do, or that the unit is a retest."""
        who = f"slot {self.index}" + (f" {self.serial}" if self.serial else "")
        if self.verdict is not None and not self.verdict.passed and (self.verdict.instruction or self.verdict.where):
            line = Text(f"{who}: ", style="bold")
            line.append(f" {self.verdict.headline} ", style=HEADLINE_STYLE.get(self.verdict.headline, ""))
            line.append(f" {printable(self.verdict.instruction)}", style="bold")
            if self.verdict.where:
                line.append(f"  ({printable(shortened(self.verdict.where))})")
            return line
        if self.outcome is None and self.history is not None and self.history.retest:
            return Text(f"{who}: {printable(self.history.line())}", style=RETEST_STYLE)
        return None


class StationDisplay:
    """Keeps a :class:`SlotView` per slot up to date from events and renders it."""

    def __init__(self, ports: Sequence[str], phases_per_run: int, *, continuous: bool = False) -> None:
        self.slots = [SlotView(i, p, total=phases_per_run, phase="empty" if continuous else "waiting")
                      for i, p in enumerate(ports)]
        #: boards come and go (sequencer/continuous.py): the counts are the shift's
        self.continuous = continuous
        #: every run that ended, by its verdict's headline (a continuous station's shift)
        self.tally: dict[str, int] = {}

    def apply(self, event: Event) -> str | None:
        """Update the views; return a plain-text line worth printing, if any."""
        if isinstance(event, RunStarted):
            view = self.slots[event.run.slot]
            if view.outcome is not None:  # a slot's next board (continuous): nothing of the last one stays
                self.slots[view.index] = view = SlotView(view.index, view.port, total=view.total)
            view.phase = "starting"
        elif isinstance(event, BoardArrived):
            view = self.slots[event.slot]
            self.slots[view.index] = view = SlotView(view.index, view.port, total=view.total, phase="board in")
        elif isinstance(event, BoardRemoved):
            view = self.slots[event.slot]
            self.slots[view.index] = SlotView(view.index, view.port, total=view.total, phase="empty")
        elif isinstance(event, SlotWaiting):
            view = self.slots[event.slot]
            view.phase, view.detail = "ready", event.what
            return f"slot {view.index} {view.port}: {event.what}"
        elif isinstance(event, ScanTaken):
            if event.scan.kind == "label" and event.slot is not None and 0 <= event.slot < len(self.slots):
                self.slots[event.slot].serial = printable(event.scan.value)
            return f"scan: {printable(event.said)}"
        elif isinstance(event, ScanRefused):
            return f"scan not taken: {printable(event.reason)}"
        elif isinstance(event, DutIdentified):
            self.slots[event.slot].serial = printable(unit_label(event.dut))
        elif isinstance(event, UnitRecognised):
            view = self.slots[event.slot]
            view.history = event.history
            if event.history.retest:
                return f"slot {event.slot} {view.port} {view.word()}: {printable(event.history.line())}"
        elif isinstance(event, PhaseStarted):
            view = self.slots[event.slot]
            view.phase = event.phase if event.attempt == 1 else f"{event.phase} (attempt {event.attempt})"
            view.detail = ""
        elif isinstance(event, PhaseWaiting):
            view = self.slots[event.slot]
            view.phase, view.detail = f"{event.phase} (waiting)", printable(event.what)
        elif isinstance(event, PhaseProgress):
            view = self.slots[event.slot]
            view.detail = f"{event.fraction:4.0%} {event.detail}".rstrip()
        elif isinstance(event, PhaseFinished):
            view = self.slots[event.slot]
            view.done += 1
            rec = event.phase
            if rec.outcome.is_failure and not view.failure:
                reason = printable(rec.reason)
                view.failure = f"{rec.name}: {reason or rec.outcome.value}"
                return f"slot {event.slot} {view.port} {view.word()}: {rec.name} {rec.outcome.value}: {reason}"
        elif isinstance(event, OperatorAsked):
            q = event.question
            if 0 <= q.slot < len(self.slots):  # which boards wait for the operator, at a glance
                self.slots[q.slot].detail = "waiting for the operator"
            return f"? {_asker(q)}: {printable(q.text)} [{printable(q.expected)}]"
        elif isinstance(event, AnswerRefused):
            return f"  {_who(event.question)}: not taken: {printable(event.reason)}"
        elif isinstance(event, OperatorAnswered):
            if 0 <= event.question.slot < len(self.slots):
                self.slots[event.question.slot].detail = ""
            return f"  {_who(event.question)}: answered {printable(repr(event.answer))}"
        elif isinstance(event, RunFinished):
            view = self.slots[event.run.slot]
            view.outcome = event.run.outcome
            view.marginal = event.run.marginal
            view.verdict = verdict = verdict_of(event.run)
            self.tally[verdict.headline] = self.tally.get(verdict.headline, 0) + 1
            view.phase = "done"
            view.detail = ""
            marginal = " (marginal)" if event.run.marginal else ""
            todo = ""
            if not verdict.passed:
                # On a line of its own: the run's line stays what a log reader matches.
                todo = f"\n  → {verdict.headline}: {printable(verdict.instruction)}"
                todo += f" ({printable(verdict.where)})" if verdict.where else ""
            return (
                f"slot {view.index} {view.port} {view.word()}: "
                f"{event.run.outcome.value if event.run.outcome else '?'}{marginal}{todo}"
            )
        return None

    def counts(self) -> Text:
        """One line: how many slots are running, passed, failed, and otherwise done (a shift's counts, continuous)."""
        if self.continuous:
            return self._shift_counts()
        running = sum(v.outcome is None for v in self.slots)
        passed = sum(v.outcome is Outcome.PASS for v in self.slots)
        failed = sum(v.outcome is Outcome.FAIL for v in self.slots)
        other = len(self.slots) - running - passed - failed
        line = Text(f"{len(self.slots)} slot(s): ")
        parts = [(running, "running", "cyan"), (passed, "passed", "green"), (failed, "failed", "red"),
                 (other, "error, timeout or aborted", "magenta")]
        for i, (n, label, style) in enumerate(parts):
            line.append(f"{n} {label}", style=style if n else "bright_black")
            if i < len(parts) - 1:
                line.append(" · ")
        return line

    def _shift_counts(self) -> Text:
        """``8 slot(s): 3 testing · 2 empty · 3 to take out  |  tested 120: 100 PASS · 12 RETEST · ...``"""
        testing = sum(v.outcome is None and v.phase not in ("empty", "board in") for v in self.slots)
        done = sum(v.outcome is not None for v in self.slots)
        empty = len(self.slots) - testing - done
        line = Text(f"{len(self.slots)} slot(s): ")
        line.append(f"{testing} testing", style="cyan" if testing else "bright_black")
        line.append(" · ")
        line.append(f"{empty} empty", style="bold" if empty else "bright_black")
        line.append(" · ")
        line.append(f"{done} to take out", style="bold" if done else "bright_black")
        tested = sum(self.tally.values())
        line.append(f"  |  tested {tested}", style="bold")
        if tested:
            line.append(": " + " · ".join(f"{n} {headline}" for headline, n in
                                          sorted(self.tally.items(), key=lambda kv: (-kv[1], kv[0]))))
        return line

    def render(self, width: int, height: int, desk: OperatorDesk | None = None, control: StationControl | None = None) -> Group:
        """The live view for a terminal of ``width`` x ``height``: the counts, every slot that fits, the question.

        The operator's open question, if any, takes the bottom lines
        (:func:`question_lines`), and under it what the last scan did and what
        is being typed (``control``, a :class:`~sequencer.control.StationControl`);
        the slots get what is left.
        """
        asking = question_lines(desk, control) if desk is not None else []
        notes = self.notes(width, max(0, height // 3))
        below = [*notes, *asking]
        if not below:
            return self._render_slots(width, height)
        rows = sum(_rows(line, width) for line in below)
        return Group(self._render_slots(width, max(4, height - rows)), *below)

    def notes(self, width: int, rows: int) -> list[Text]:
        """The slots' notes (what to do, retests), failures first, in at most ``rows`` terminal lines."""
        notes = [n for v in sorted(self.slots, key=lambda v: (v.verdict is None, v.index)) if (n := v.note())]
        shown: list[Text] = []
        used = 0
        for i, note in enumerate(notes):
            need = _rows(note, width)
            last = i == len(notes) - 1
            if used + need > rows - (0 if last else 1):
                shown.append(Text(f"… {len(notes) - i} more slot(s) to see to", style="bright_black"))
                break
            shown.append(note)
            used += need
        return shown

    def _render_slots(self, width: int, height: int) -> Group:
        """The counts, then every slot that fits in ``width`` x ``height``.

        A row per slot while the rows fit. Beyond that (a 64-slot station in
        a 30-line window) the slots go side by side in short cells; if even
        those do not fit, the slots an operator must act on come first
        (failed, then running) and the rest are counted on a last line. What
        does not fit is never silently cut: rich would crop the bottom of the
        table, hiding the highest-numbered slots for the whole run.
        """
        # Lines the counts, the table's rules and rich's own cursor line take.
        if len(self.slots) <= height - 6:
            return Group(self.counts(), self.table(width))
        columns = max(1, (width + 2) // (_MIN_CELL + 2))
        cell = min(_MAX_CELL, (width + 2) // columns - 2)  # spare width goes to phase names
        rows = max(1, height - 3)
        shown = self.slots
        hidden: list[SlotView] = []
        if len(shown) > columns * rows:
            urgency = {True: 0, None: 1, False: 2}  # failed, running, the rest
            ordered = sorted(self.slots, key=lambda v: (urgency[_failed(v)], v.index))
            shown, hidden = ordered[: columns * rows - columns], ordered[columns * rows - columns :]
            shown = sorted(shown, key=lambda v: v.index)
        grid = Table.grid(padding=(0, 2))
        for _ in range(columns):
            grid.add_column(width=cell, no_wrap=True, overflow="ellipsis")
        per_column = -(-len(shown) // columns)  # slots run down the columns, as in a list
        for r in range(per_column):
            grid.add_row(*(_cell(shown[c * per_column + r]) if c * per_column + r < len(shown) else ""
                           for c in range(columns)))
        parts: list[Text | Table] = [self.counts(), grid]
        if hidden:
            passed = sum(v.outcome is Outcome.PASS for v in hidden)
            running = sum(v.outcome is None for v in hidden)
            parts.append(Text(f"… {len(hidden)} more slot(s) not shown: {passed} passed, {running} running, "
                              f"{len(hidden) - passed - running} other", style="bright_black"))
        return Group(*parts)

    def table(self, width: int | None = None) -> Table:
        """A row per slot; within ``width`` columns, cutting the progress detail rather than wrapping it."""
        rows = []
        for v in self.slots:
            outcome = v.result()
            progress = f"{v.done}/{v.total}" + (f"  {v.detail}" if v.detail else "")
            # Text, not str: a cell's string would be read as console markup, and
            # a serial or a reason is whatever the DUT sent ("[/]" must not crash the display).
            rows.append((Text(str(v.index)), Text(v.port), Text(v.serial or "-"), Text(v.phase), Text(progress),
                         outcome))
        columns = ("slot", "port", "unit", "phase", "progress", "result")
        widths = [max([len(col), *(len(row[i]) for row in rows)]) for i, col in enumerate(columns)]
        if width is not None:
            # One line per slot, always: a wrapped cell makes the table taller
            # than render() planned, and rich would crop the last slots again.
            # Slot, serial, phase and outcome keep their width; the progress
            # detail gives way first, then a long port path (its end kept).
            rules = 3 * len(columns) + 1  # a space each side of every cell, and the vertical rules
            progress, port = columns.index("progress"), columns.index("port")
            others = sum(w for i, w in enumerate(widths) if i != progress)
            widths[progress] = max(8, min(widths[progress], width - rules - others))
            over = rules + sum(widths) - width
            if over > 0:
                widths[port] = max(len("port"), MIN_PORT, widths[port] - over)
                rows = [(r[0], Text(short_port(r[1].plain, widths[port])), *r[2:]) for r in rows]
        table = Table(expand=False, header_style="bold")
        for col, w in zip(columns, widths):
            table.add_column(col, no_wrap=True, overflow="ellipsis", width=w)
        for row in rows:
            table.add_row(*row)
        return table


def _rows(line: Text, width: int) -> int:
    """Terminal lines ``line`` takes at ``width`` columns."""
    return max(1, -(-line.cell_len // max(1, width)))


def question_lines(desk: OperatorDesk, control: StationControl | None = None) -> list[Text]:
    """The open question (slot, port, serial, words, what to type), the draft, and why an answer was refused.

    With a ``control`` (scans are taken), also what the last scan did and,
    with no question open, what is being typed.
    """
    said = [Text(f"  {printable(control.said)}", style="red" if control.said.startswith("not taken") else "green")
            ] if control is not None and control.said else []
    question = desk.current
    if question is None:
        return ([Text(f"> {printable(desk.draft)}\u2588")] if desk.draft else []) + said
    head = Text("? ", style="bold yellow")
    head.append(_asker(question), style="bold")
    head.append(f": {printable(question.text)}  ")
    head.append(f"[{printable(question.expected)}]", style="cyan")
    if desk.waiting > 1:
        head.append(f"  (+{desk.waiting - 1} waiting)", style="bright_black")
    lines = [head, Text(f"> {printable(desk.draft)}\u2588")]  # a block for the cursor the terminal no longer shows
    if desk.hint:
        lines.append(Text(f"  {printable(desk.hint)}", style="red"))
    return lines + said


def _who(question: Question) -> str:
    return "station" if question.slot < 0 else f"slot {question.slot}"


def _asker(question: Question) -> str:
    """Who asks, as the operator finds it: the slot, its port and the DUT's serial."""
    if question.slot < 0:
        return _who(question)
    return f"{_who(question)} {question.port}" + (f" {printable(question.serial)}" if question.serial else "")


async def show_question_live(desk: OperatorDesk, console: Console) -> None:
    """When no slot is shown (between rounds): the open question and the draft, redrawn as the operator types.

    A terminal that goes away only ends the drawing, as for :func:`show_live`.
    """
    try:
        with Live(Group(*question_lines(desk)), console=console, auto_refresh=False, transient=False) as live:
            console.bell()
            seen = desk.version
            while True:
                seen = await desk.wait_changed(seen)
                live.update(Group(*question_lines(desk)), refresh=True)
    except OSError:
        pass


#: A port path is never shown narrower than this (its end: ``…-if00-port0``).
MIN_PORT = 12


def short_port(port: str, width: int) -> str:
    """``port`` in at most ``width`` characters, keeping its end: by-id paths differ only there."""
    return port if len(port) <= width else "…" + port[-(width - 1):]


#: Width of a slot's cell when slots go side by side: "123 SN6961000012   flash 3/10" fits.
_MIN_CELL, _MAX_CELL = 36, 56


def _failed(v: SlotView) -> bool | None:
    """True: the run ended and did not pass; None: still running; False: passed."""
    if v.outcome is None:
        return None
    return v.outcome is not Outcome.PASS


def _cell(v: SlotView) -> Text:
    """A slot in a few words: ``12 SN6961000012 flash 3/10`` or ``12 SN6961000012 FAIL`` (cut with … if long)."""
    text = Text(f"{v.index:>3} ", style="bold")
    text.append(f"{v.serial or v.port:<14} ")
    if v.outcome is None:
        text.append(f"{v.phase} {v.done}/{v.total}", style="cyan")
    else:
        text.append(v.result())
    return text


async def show_live(
    display: StationDisplay,
    events: trio.MemoryReceiveChannel[Event],
    console: Console,
    desk: OperatorDesk | None = None,
    control: StationControl | None = None,
) -> None:
    """Redraw the slot view (and ``desk``'s open question) from events until the bus closes.

    A terminal that goes away (closed window, dropped SSH session: writes
    fail with EIO) ends the drawing, never the testing: the events are then
    taken and dropped until the station is done.
    """

    def view() -> Group:
        return display.render(console.width, console.height, desk, control)

    async with events:
        try:
            await _draw_live(display, events, console, view, desk)
        except OSError:
            async for _ in events:
                pass


#: Least time between two redraws while slots run, and while the operator types an answer. Drawing
#: a 64-slot view takes rich several milliseconds of the trio thread the slots run on: redrawn at
#: every event, a 64-slot station spent over a quarter of its time drawing.
REDRAW_S, TYPING_REDRAW_S = 0.2, 0.03
#: With nothing new to draw, how often the operator's desk is looked at for a new question.
_IDLE_POLL_S = 0.25


async def _draw_live(
    display: StationDisplay,
    events: trio.MemoryReceiveChannel[Event],
    console: Console,
    view: Callable[[], Group],
    desk: OperatorDesk | None,
) -> None:
    """Apply events as they come; redraw at most every :data:`REDRAW_S`, and at once after a quiet spell."""
    with Live(view(), console=console, auto_refresh=False, transient=False) as live:
        drawn_at = trio.current_time()
        dirty = False
        seen = desk.version if desk is not None else 0
        closed = False
        while not closed:
            # While a question is open the operator is typing: redraw soon after each key.
            asking = desk is not None and desk.current is not None
            due = drawn_at + (TYPING_REDRAW_S if asking else REDRAW_S)
            with trio.move_on_at(due if dirty else trio.current_time() + (TYPING_REDRAW_S if asking else _IDLE_POLL_S)):
                while True:
                    try:
                        event = await events.receive()
                    except trio.EndOfChannel:
                        closed = True
                        break
                    display.apply(event)
                    dirty = True
                    if trio.current_time() >= due:
                        break  # the first event after a quiet spell is shown at once
            if desk is not None and desk.version != seen:
                seen = desk.version
                dirty = True
                # A new question, or a key typed: shown as soon as a typist would expect.
                due = drawn_at + TYPING_REDRAW_S
                if not asking and desk.current is not None:
                    # A question after none: the operator's hands are on the boards, not the keyboard.
                    console.bell()
            if dirty and trio.current_time() >= due:
                live.update(view(), refresh=True)
                drawn_at = trio.current_time()
                dirty = False
        live.update(view(), refresh=True)


async def show_plain(display: StationDisplay, events: trio.MemoryReceiveChannel[Event], out: TextIO) -> None:
    """Print a line per finished run, failed phase and operator question; a closed or full output only stops that.

    What the operator sees must never stop the testing: if stdout is a pipe
    whose reader has gone, the lines are dropped and every slot goes on.
    """
    printing = True

    def emit(line: str) -> None:
        nonlocal printing
        if printing:
            try:
                print(line, file=out, flush=True)
            except OSError:  # BrokenPipeError, a full disk under a redirect
                printing = False

    async with events:
        async for event in events:
            line = display.apply(event)
            if line:
                emit(line)


#: The widest a port is shown in the station summary: slot, serial and outcome must fit beside it.
SUMMARY_PORT = 28


def station_summary(runs: Sequence[RunRecord]) -> Group:
    """The end-of-station summary: one short row per slot, then each first failure in full and what to do.

    The failures are printed under the table, not in a column of it: a reason
    (a port, an exception, the bytes a DUT sent) is often longer than a
    terminal is wide, and squeezed into a column it would wrap every row into a
    dozen lines at 80 columns. Below the table it wraps at the full width.
    """
    rows: list[tuple[str, Text, Text, Text, str]] = []
    failures: list[Text] = []
    for r in sorted(runs, key=lambda r: r.slot):
        failed = next((p for p in r.phases if p.outcome.is_failure), None)
        outcome = r.outcome or Outcome.ABORTED
        if failed is None and outcome is not Outcome.PASS:
            # Not passed, yet no phase failed (the run was stopped before its
            # phases ran): the first phase that says why it did not run.
            failed = next((p for p in r.phases if p.reason), None)
        verdict = verdict_of(r)
        result = Text(outcome.value + (" (marginal)" if r.marginal else ""), style=OUTCOME_STYLE[outcome])
        if not verdict.passed and verdict.headline != outcome.value:
            result.append(" → ")
            result.append(verdict.headline, style=HEADLINE_STYLE.get(verdict.headline, ""))
        rows.append((
            str(r.slot),
            Text(short_port(r.port, SUMMARY_PORT)),
            Text(printable(unit_label(r.dut) or "-")),
            result,
            f"{r.duration_s:.1f} s" if r.duration_s is not None else "-",
        ))
        if failed is not None:
            line = Text(f"slot {r.slot} {r.port}", style="bold")
            line.append(f" {failed.name}: ", style=OUTCOME_STYLE[failed.outcome])
            line.append(printable(failed.reason or failed.outcome.value))
            failures.append(line)
        if verdict.instruction:
            failures.append(Text(f"    {verdict.headline}: {printable(verdict.instruction)}", style="bold"))
    table = Table(title="Summary", header_style="bold")
    # Slot, port, unit and result are what an operator acts on: never
    # wrapped or cut short.
    for i, col in enumerate(("slot", "port", "unit", "result", "duration")):
        width = max([len(col), *(len(str(row[i])) for row in rows)])
        table.add_column(col, no_wrap=True, min_width=width)
    for row in rows:
        table.add_row(*row)
    if failures:
        failures.insert(0, Text("First failure of each slot that did not pass, and what to do:", style="bold"))
    return Group(table, *failures)
