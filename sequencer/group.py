"""Phase groups: a setup, a main part and a teardown that belong together, as OpenHTF's ``PhaseGroup``.

::

    PhaseGroup(
        "psu",
        setup=[power_on],
        main=[rails, current, PhaseGroup("radio", main=[rf_sweep], teardown=[radio_off])],
        teardown=[power_off],
        stop_on_failure=True,
    )

A group stands wherever a phase may in a product's ``phases`` list (or in
another group's ``main``). What it promises:

* **setup** runs first; if a setup phase fails (FAIL, ERROR, TIMEOUT,
  ABORTED) or is skipped for a reason of the run's, the group is not
  entered: its main part is SKIPPED, and so is its teardown (as OpenHTF:
  a setup cleans up after itself when it fails). A setup phase skipping
  itself (``run_if``, ``PhaseResult.SKIP``) is not a failure.
* **main** runs once the setup has passed: in order when the product (or the
  group) is sequential, else as its phases' ``after``/``follows`` say.
* **teardown** runs as soon as everything in the main part has finished,
  whatever its outcome, before anything that comes after the group; one
  teardown phase after another, in order. It runs whenever the group was
  entered and anything of it started, also when the run is stopped or
  aborted (innermost groups' teardowns first, then the product's). Teardown
  phases are teardowns: 30 s timeout unless they set one, never stopped.
* **stop_on_failure**: the group's first failing phase stops the group, not
  the run: the group's phases in flight are cut short (ABORTED), the rest of
  its main part is SKIPPED, its teardown runs, and the run goes on after the
  group. A phase returning ``PhaseResult.FAIL_GROUP`` does the same to its
  innermost group whatever the group's option (OpenHTF's ``FAIL_SUBTEST``).

A group has a name (in reasons: "group 'psu' stopped: phase 'rails' ended
FAIL"); phases keep their own names, unique across the product.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from typing import Any

import attrs

from sequencer.phase import Phase, PhaseResult, phase
from sequencer.records import RunRecord

__all__ = ["PhaseGroup", "checkpoint"]

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]*")


def _items(value: Any) -> tuple[Any, ...]:
    if isinstance(value, (Phase, PhaseGroup)):
        return (value,)  # one item, not a list of one
    return tuple(value)


def _as_teardowns(value: Any) -> tuple[Any, ...]:
    # A group's teardown phases are teardowns: their default timeout, their place in the records.
    return tuple(p.configured(teardown=True) if isinstance(p, Phase) and not p.teardown else p
                 for p in _items(value))


@attrs.frozen
class PhaseGroup:
    """Phases that belong together: setup, main and teardown (see the module docstring)."""

    name: str
    main: tuple[Phase | PhaseGroup, ...] = attrs.field(default=(), converter=_items, kw_only=True)
    setup: tuple[Phase, ...] = attrs.field(default=(), converter=_items, kw_only=True)
    teardown: tuple[Phase, ...] = attrs.field(default=(), converter=_as_teardowns, kw_only=True)
    #: the group's first failing phase stops the group (not the run)
    stop_on_failure: bool = attrs.field(default=False, kw_only=True)
    #: each phase follows the one before; None: as the product (or the enclosing group) says
    sequential: bool | None = attrs.field(default=None, kw_only=True)

    def __attrs_post_init__(self) -> None:
        where = f"group {self.name!r}"
        if not isinstance(self.name, str) or not _NAME.fullmatch(self.name):
            raise ValueError(f"group {self.name!r}: name must start with a letter and use letters, digits, "
                             "'_', '-', '.'")
        for part in ("setup", "teardown"):
            for item in getattr(self, part):
                if not isinstance(item, Phase):
                    raise TypeError(f"{where}: {part} takes phases, got {item!r}")
        for item in self.main:
            if not isinstance(item, (Phase, PhaseGroup)):
                raise TypeError(f"{where}: main takes phases and groups, got {item!r}")
        for item in (*self.setup, *self.main):
            if isinstance(item, Phase) and item.teardown:
                raise ValueError(f"{where}: phase {item.name!r} is a teardown: give it in teardown=[...]")
        if not (self.setup or self.main or self.teardown):
            raise ValueError(f"{where}: has no phases")
        if not isinstance(self.stop_on_failure, bool):
            raise TypeError(f"{where}: stop_on_failure must be True or False, got {self.stop_on_failure!r}")
        if self.sequential is not None and not isinstance(self.sequential, bool):
            raise TypeError(f"{where}: sequential must be True, False or None, got {self.sequential!r}")

    def phases(self) -> Iterator[Phase]:
        """Every phase of the group, nested groups' included: setup, main, teardown."""
        yield from self.setup
        for item in self.main:
            if isinstance(item, PhaseGroup):
                yield from item.phases()
            else:
                yield item
        yield from self.teardown

    def groups(self) -> Iterator[PhaseGroup]:
        """This group and every group inside it, outermost first."""
        yield self
        for item in self.main:
            if isinstance(item, PhaseGroup):
                yield from item.groups()

    def replacing(self, replaced: dict[str, Phase]) -> PhaseGroup:
        """This group with the phases named in ``replaced`` swapped (a limits file's new measurements)."""

        def swap(items: Iterable[Any]) -> list[Any]:
            return [item.replacing(replaced) if isinstance(item, PhaseGroup) else replaced.get(item.name, item)
                    for item in items]

        return attrs.evolve(self, setup=swap(self.setup), main=swap(self.main), teardown=swap(self.teardown))


def checkpoint(name: str = "checkpoint", *, fail_group: bool = False) -> Phase:
    """A phase that passes if every phase finished before it passed, else FAILs and stops the run.

    OpenHTF's ``checkpoints.checkpoint()``: put it in a sequential product (or
    give it ``follows=``) before a long phase that is pointless on a unit that
    already failed. It looks at every phase of the run finished when it runs
    (teardowns aside) that ended FAIL, ERROR or TIMEOUT. With ``fail_group``
    it stops its group instead of the run (``PhaseResult.FAIL_GROUP``).
    """
    action = PhaseResult.FAIL_GROUP if fail_group else PhaseResult.STOP

    async def check(ctx: Any) -> PhaseResult | None:
        record: RunRecord = ctx.record
        failed = [p for p in record.phases if p.outcome.is_failure and not p.teardown]
        if not failed:
            return None
        ctx.log.info("checkpoint: earlier phases failed", phases=", ".join(p.name for p in failed))
        return action

    check.__doc__ = f"Checkpoint: {'stop the group' if fail_group else 'stop the run'} if an earlier phase failed."
    return phase(check, name=name)
