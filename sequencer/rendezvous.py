"""Rendezvous: a phase that every active slot reaches before any slot starts it.

One thermal chamber for the whole station, one fixture move that lifts
every board at once: ``@phase(rendezvous="chamber")`` makes each slot wait
at that phase until every other slot that will get there has arrived, then
all of them start it together. A slot that can no longer get there never
holds the others: its run failed before it (a dependency did not pass, the
run was stopped), it was aborted, or it ended. A slot that is slow is waited
for at most ``rendezvous_timeout`` seconds from the first arrival; then the
slots that are there go on without it, and it goes through on its own when
it arrives.

The station keeps one :class:`Rendezvous` per name for as long as its slots
run (a round, or a continuous session, where a slot that starts a new run
owes the next meeting). A product without a rendezvous phase has none, and
its slots never look at one.
"""

from __future__ import annotations

import math

import attrs
import trio

__all__ = ["Meeting", "Rendezvous"]


@attrs.frozen
class Meeting:
    """How a slot's wait at a rendezvous ended: who met, and who was not waited for any longer."""

    name: str
    slots: tuple[int, ...]
    #: slots still on their way when the wait timed out (empty: everyone met)
    missing: tuple[int, ...] = ()
    waited_s: float = 0.0


class _Group:
    """The slots waiting at one meeting."""

    def __init__(self) -> None:
        self.arrived: list[int] = []
        self.deadline = math.inf
        self.met = trio.Event()
        self.missing: tuple[int, ...] = ()


class Rendezvous:
    """Where the slots meet before the phase named by ``name``; see the module docstring."""

    def __init__(self, name: str) -> None:
        self.name = name
        #: slots whose current run will arrive here or say it will not
        self._owing: set[int] = set()
        self._group = _Group()

    @property
    def waiting(self) -> tuple[int, ...]:
        """The slots waiting now."""
        return tuple(self._group.arrived)

    @property
    def owing(self) -> tuple[int, ...]:
        """The slots still on their way."""
        return tuple(sorted(self._owing))

    def expect(self, slot: int) -> None:
        """A run starts on ``slot`` that will reach this rendezvous: the slots waiting now wait for it too."""
        self._owing.add(slot)

    def leave(self, slot: int) -> None:
        """``slot`` will not arrive (its run failed before, was stopped or ended): nobody waits for it."""
        if slot in self._owing:
            self._owing.discard(slot)
            self._meet_if_all_here()

    async def arrive(self, slot: int, timeout: float) -> Meeting:
        """Wait here until every slot on its way has arrived (or ``timeout`` from the first arrival); then go.

        Cancelled (an abort), the slot leaves the meeting: nobody waits for it.
        """
        started = trio.current_time()
        self._owing.discard(slot)
        group = self._group
        group.arrived.append(slot)
        if not group.met.is_set():
            group.deadline = min(group.deadline, started + timeout)
            self._meet_if_all_here()
        try:
            with trio.move_on_at(group.deadline):
                await group.met.wait()
        except BaseException:
            if not group.met.is_set():
                group.arrived.remove(slot)
                self._meet_if_all_here()
            raise
        if not group.met.is_set():
            # The first to see the deadline pass lets everyone there go; the late ones go on their own.
            self._meet(group, missing=tuple(sorted(self._owing)))
        return Meeting(self.name, tuple(sorted(group.arrived)), group.missing, trio.current_time() - started)

    def _meet_if_all_here(self) -> None:
        if not self._owing and self._group.arrived:
            self._meet(self._group, missing=())

    def _meet(self, group: _Group, missing: tuple[int, ...]) -> None:
        group.missing = missing
        group.met.set()
        if group is self._group:
            self._group = _Group()  # later arrivals meet anew
