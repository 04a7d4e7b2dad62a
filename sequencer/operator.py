"""Questions for the person at the station: a phase's ``operator`` parameter.

Some checks need a person: is the status LED green, did the buzzer sound,
scan the label on the enclosure. A phase asks by naming an ``operator``
parameter::

    @phase(measurements=[Measurement("led_green").equals(True)], timeout=120)
    async def status_led(ctx, dut, operator):
        await dut.query("LED GREEN")
        ctx.measurements.led_green = await operator.confirm("Is the status LED green?")

A station has one operator and many slots, so every slot's questions queue
at one :class:`OperatorDesk`. The operator sees the oldest first, with the
slot, port and serial it comes from and how many more are waiting. An answer
is checked before it is taken (one of the choices, or text matching a
pattern); a wrong one leaves the question open with a hint, as a typo should.

Waiting for the operator is part of the phase's time, so the phase's timeout
covers it: a question nobody answers ends its phase TIMEOUT, and a timed-out
or aborted phase's question leaves the queue. Every question and its answer
go into the phase's log, so the record says who was asked what.

Where answers come from is the station's business, not the phase's: the
keyboard or lines on standard input (:mod:`sequencer.keyboard`), or under
``--sim`` a simulated operator (:mod:`fixtures.sim.operator`).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

import attrs
import trio

from sequencer.events import AnswerRefused, Event, EventBus, OperatorAnswered, OperatorAsked

__all__ = ["NoOperator", "Operator", "OperatorDesk", "Question"]

#: The choices :meth:`Operator.confirm` offers.
YES_NO = ("yes", "no")
#: Longer answers are refused: nothing an operator types or scans is this long.
MAX_ANSWER_CHARS = 200


class NoOperator(Exception):
    """Nobody can answer: the station has no operator, or its input has ended."""


@attrs.frozen(eq=False)
class Question:
    """One question from one slot (or, with ``slot`` -1, from the station), and what counts as an answer.

    ``choices`` empty means free text; ``pattern`` (a regular expression the
    whole answer must match) narrows it. Compared by identity: two slots may
    ask the same words, and each is answered on its own.
    """

    slot: int
    port: str
    serial: str
    text: str
    choices: tuple[str, ...] = ()
    pattern: str | None = None
    #: the run and phase asking
    run_id: str = ""
    phase: str = ""
    #: the answer Enter alone gives (one of ``choices``), if any
    default: str | None = None
    #: what the simulated operator types to a free-text question (the phase's ``sim_answer``)
    sim_answer: str | None = None

    @property
    def expected(self) -> str:
        """What to type, in a few words: ``yes/no``, ``text matching SN\\d{10}``."""
        if self.choices:
            return "/".join(self.choices) + (f", Enter: {self.default}" if self.default is not None else "")
        return f"text matching {self.pattern}" if self.pattern is not None else "text"

    def answer_from(self, typed: str) -> str:
        """The answer ``typed`` stands for; :class:`ValueError` with a one-line hint if it is none.

        A choice may be typed in any case, or shortened to a prefix only it
        has: ``y`` is ``yes``.
        """
        text = typed.strip()
        if not text and self.default is not None:
            return self.default
        if not text:
            raise ValueError(f"type {self.expected}, then Enter")
        if len(text) > MAX_ANSWER_CHARS:
            raise ValueError(f"an answer is at most {MAX_ANSWER_CHARS} characters")
        if self.choices:
            folded = text.casefold()
            for choice in self.choices:
                if choice.casefold() == folded:
                    return choice
            starting = [c for c in self.choices if c.casefold().startswith(folded)]
            if len(starting) == 1:
                return starting[0]
            raise ValueError(f"{text!r} is not one of {', '.join(self.choices)}")
        if self.pattern is not None and re.fullmatch(self.pattern, text) is None:
            raise ValueError(f"{text!r} does not match {self.pattern}")
        return text


@attrs.define(eq=False)
class _Pending:
    question: Question
    #: the desk's own count of questions asked: how a panel's button names the question it answers
    number: int
    answered: trio.Event = attrs.field(factory=trio.Event)
    answer: str | None = None
    refusal: str | None = None


class OperatorDesk:
    """The station's one operator: questions in the order asked, answered oldest first.

    The desk is also what a live display shows: :attr:`current`,
    :attr:`waiting`, the operator's :attr:`draft` as typed so far and the
    :attr:`hint` why the last answer was refused. :attr:`version` changes
    whenever any of them does, and :meth:`wait_changed` waits for that. With
    a ``bus``, every question asked, answer refused and answer taken is also
    published, for a log-like display and any other watcher.
    """

    def __init__(self, bus: EventBus | None = None) -> None:
        self._bus = bus
        self._queue: list[_Pending] = []
        self._closed: str | None = None
        self.draft = ""
        self.hint = ""
        self.version = 0
        self._changed = trio.Event()
        self._asked = 0

    @property
    def current(self) -> Question | None:
        """The question the operator is asked now (the oldest open one)."""
        return self._queue[0].question if self._queue else None

    @property
    def waiting(self) -> int:
        """Open questions, the current one included."""
        return len(self._queue)

    @property
    def open_questions(self) -> tuple[tuple[int, Question], ...]:
        """Every open question, oldest first, with its number (:meth:`answer` ``number=``).

        A panel shows each slot's question on the slot's tile: the operator
        answers the one in front of them, not only the oldest.
        """
        return tuple((p.number, p.question) for p in self._queue)

    async def ask(self, question: Question) -> str:
        """Queue ``question`` and wait for its answer.

        Cancelled (the phase timed out, the station aborts), the question
        leaves the queue, and the operator is not left answering it.
        """
        if self._closed is not None:
            raise NoOperator(self._closed)
        self._asked += 1
        pending = _Pending(question, self._asked)
        self._queue.append(pending)
        self._publish(OperatorAsked(question))
        self._bump()
        try:
            await pending.answered.wait()
        finally:
            if pending in self._queue:
                first = self._queue[0] is pending
                self._queue.remove(pending)
                if first:
                    self.draft = self.hint = ""
                self._bump()
        if pending.refusal is not None:
            raise NoOperator(pending.refusal)
        assert pending.answer is not None
        return pending.answer

    def type(self, draft: str) -> None:
        """What the operator has typed so far for the current question (for the display)."""
        if draft != self.draft:
            self.draft = draft[:MAX_ANSWER_CHARS + 1]
            self._bump()

    def answer(self, typed: str, number: int | None = None) -> bool:
        """Answer the current question with ``typed`` (or, with ``number``, that open question).

        False when there is no such question (a panel's button for a question
        answered meanwhile), or the answer is refused; then :attr:`hint` says
        why, and the question stays open.
        """
        head = next((p for p in self._queue if p.number == number), None) if number is not None else (
            self._queue[0] if self._queue else None)
        if head is None:
            return False
        try:
            head.answer = head.question.answer_from(typed)
        except ValueError as exc:
            self.hint = str(exc)
            self.draft = ""
            self._publish(AnswerRefused(head.question, self.hint))
            self._bump()
            return False
        first = self._queue[0] is head
        self._queue.remove(head)
        if first:
            self.draft = ""
        self.hint = ""
        head.answered.set()
        self._publish(OperatorAnswered(head.question, head.answer))
        self._bump()
        return True

    def close(self, reason: str) -> None:
        """Nobody will answer any more (standard input ended): open and later questions raise :class:`NoOperator`."""
        self._closed = reason
        for pending in self._queue:
            pending.refusal = reason
            pending.answered.set()
        self._queue.clear()
        self._bump()

    async def wait_changed(self, seen: int) -> int:
        """Wait until :attr:`version` is not ``seen``; return it."""
        while self.version == seen:
            await self._changed.wait()
        return self.version

    async def wait_question(self) -> Question:
        """Wait until a question is open; return it."""
        seen = self.version
        while self.current is None:
            seen = await self.wait_changed(seen)
        assert self.current is not None
        return self.current

    def _publish(self, event: Event) -> None:
        if self._bus is not None:
            self._bus.publish(event)

    def _bump(self) -> None:
        self.version += 1
        self._changed.set()
        self._changed = trio.Event()


class Operator:
    """What a phase's ``operator`` parameter is: this slot's questions, kept in the phase's log.

    Ask nothing secret: answers are kept in the record like any log line.
    """

    def __init__(
        self, desk: OperatorDesk | None, *, run_id: str, phase: str, slot: int, port: str,
        serial: Callable[[], str], log: Any, sim_answer: str | None = None,
    ) -> None:
        self._sim_answer = sim_answer
        self._desk = desk
        self._run_id = run_id
        self._phase = phase
        self._slot = slot
        self._port = port
        self._serial = serial
        self._log = log

    async def confirm(self, question: str) -> bool:
        """A yes/no question: True for yes."""
        return await self._ask(question, YES_NO, None) == "yes"

    async def choose(self, question: str, choices: Sequence[str]) -> str:
        """One of ``choices``, exactly as given here."""
        options = tuple(choices)
        if isinstance(choices, str) or not options or not all(isinstance(c, str) and c.strip() for c in options):
            raise ValueError(f"choices must be a list of non-empty strings, got {choices!r}")
        if len({c.casefold() for c in options}) != len(options):
            raise ValueError(f"choices must differ in more than case: {options!r}")
        return await self._ask(question, options, None)

    async def ask(self, question: str, *, matches: str | None = None) -> str:
        """Free text (a scanned label, a reading off a meter); ``matches`` is a regular expression for all of it."""
        if matches is not None:
            try:
                re.compile(matches)
            except re.error as exc:
                raise ValueError(f"matches={matches!r} is not a regular expression: {exc}") from None
            if self._sim_answer is not None and re.fullmatch(matches, self._sim_answer) is None:
                # A simulated operator typing it would be refused, and the phase would wait for its timeout.
                raise ValueError(f"phase {self._phase!r}: sim_answer {self._sim_answer!r} does not match {matches!r}")
        return await self._ask(question, (), matches)

    async def _ask(self, text: str, choices: tuple[str, ...], pattern: str | None) -> str:
        if self._desk is None:
            raise NoOperator("this station has no operator to answer questions")
        question = Question(self._slot, self._port, self._serial(), str(text), choices, pattern,
                            self._run_id, self._phase, sim_answer=None if choices else self._sim_answer)
        asked = trio.current_time()
        self._log.info("asked the operator", question=question.text, expected=question.expected)
        answer = await self._desk.ask(question)
        self._log.info("the operator answered", answer=answer, after_s=round(trio.current_time() - asked, 1))
        return answer
