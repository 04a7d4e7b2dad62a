"""Events the engine publishes as a run progresses, and the bus that carries them.

Events are for watchers — the live terminal display, streaming sinks, progress
bars. They are *not* how records become durable: the engine commits each
finished phase to the local store itself before the slot moves on. That is
what lets the bus drop events for a subscriber that falls behind instead of
slowing every slot to the pace of the slowest consumer.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, TypeAlias

import attrs
import trio

from sequencer.records import MeasurementRecord, Outcome, PhaseRecord, RunRecord

if TYPE_CHECKING:
    from sequencer.operator import Question
    from sequencer.records import ScanRecord
    from sequencer.verdicts import UnitHistory


@attrs.frozen
class BoardArrived:
    """A board went into a slot of a continuous station; ``port`` is where it is reached."""

    slot: int
    port: str


@attrs.frozen
class BoardRemoved:
    """A continuous station's slot is empty again: the operator took its board out (or it was pulled)."""

    slot: int


@attrs.frozen
class SlotWaiting:
    """A slot with a board waits for the operator before it starts: ``what`` to do (scan its label, start it)."""

    slot: int
    what: str


@attrs.frozen
class ScanTaken:
    """A scan (or the panel's button) did something: ``said`` says what, for the operator; ``slot`` it concerns."""

    scan: ScanRecord
    slot: int | None
    said: str


@attrs.frozen
class ScanRefused:
    """A line scanned or typed that the station did not take, and why (a one-line hint)."""

    text: str
    reason: str
    source: str


@attrs.frozen
class RunStarted:
    run: RunRecord


@attrs.frozen
class PhaseStarted:
    run_id: str
    slot: int
    phase: str
    attempt: int


@attrs.frozen
class PhaseWaiting:
    """A phase waits to start: at a rendezvous for the other slots (``what`` says where, for whom)."""

    run_id: str
    slot: int
    phase: str
    what: str


@attrs.frozen
class MeasurementTaken:
    run_id: str
    slot: int
    phase: str
    measurement: MeasurementRecord


@attrs.frozen
class DutIdentified:
    run_id: str
    slot: int
    dut: dict[str, str]


@attrs.frozen
class UnitRecognised:
    """The station looked the unit up: ``history`` says whether (and how) it was tested before."""

    run_id: str
    slot: int
    history: UnitHistory


@attrs.frozen
class PhaseProgress:
    """A long phase (flashing) saying how far it is; ``fraction`` is 0..1."""

    run_id: str
    slot: int
    phase: str
    fraction: float
    detail: str = ""


@attrs.frozen
class PhaseFinished:
    run_id: str
    slot: int
    phase: PhaseRecord


@attrs.frozen
class RunFinished:
    run: RunRecord

    @property
    def outcome(self) -> Outcome:
        assert self.run.outcome is not None
        return self.run.outcome


@attrs.frozen
class OperatorAsked:
    """A phase asked the operator something (:class:`~sequencer.operator.Question`)."""

    question: Question


@attrs.frozen
class AnswerRefused:
    """What the operator answered is not an answer to the question; ``reason`` is the hint shown."""

    question: Question
    reason: str


@attrs.frozen
class OperatorAnswered:
    question: Question
    answer: str


Event: TypeAlias = (
    BoardArrived | BoardRemoved | SlotWaiting | ScanTaken | ScanRefused | RunStarted | PhaseStarted | PhaseWaiting | MeasurementTaken | DutIdentified | UnitRecognised | PhaseProgress | PhaseFinished
    | RunFinished | OperatorAsked | AnswerRefused | OperatorAnswered
)


class EventBus:
    """Fan-out of events to subscribers, each behind its own bounded buffer.

    :meth:`publish` never blocks: when a subscriber's buffer is full the event
    is dropped for that subscriber alone and counted in :attr:`dropped`, so a
    stalled display or sink costs at most ``buffer`` events of memory and no
    test time.
    """

    def __init__(self) -> None:
        self._subscribers: list[tuple[str, trio.MemorySendChannel[Event], frozenset[type] | None]] = []
        self.dropped: dict[str, int] = {}

    @property
    def has_subscribers(self) -> bool:
        """Whether anyone listens: a publisher may skip building an event nobody reads."""
        return bool(self._subscribers)

    def subscribe(self, name: str, buffer: int = 1024, *, kinds: frozenset[type] | None = None
                  ) -> trio.MemoryReceiveChannel[Event]:
        """A new subscriber's channel; with ``kinds``, only events of those types reach it.

        A watcher that ignores most events (every measurement taken) says so
        here, so they cost neither its buffer nor a wake-up of its task.
        """
        send, receive = trio.open_memory_channel[Event](buffer)
        self._subscribers.append((name, send, kinds))
        self.dropped[name] = 0
        return receive

    def publish(self, event: Event) -> None:
        for name, channel, kinds in self._subscribers:
            if kinds is not None and type(event) not in kinds:
                continue
            try:
                channel.send_nowait(event)
            except trio.WouldBlock:
                self.dropped[name] += 1
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass  # the subscriber went away; the others still get events

    def close(self) -> None:
        """End every subscriber's iteration once it has drained its buffer."""
        for _, channel, _ in self._subscribers:
            channel.close()
        self._subscribers.clear()
