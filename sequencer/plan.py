"""A product's schedule: what each phase waits for, what must have passed, and what its groups ask of it.

Worked out once per product (``Product.plan``), never per DUT: every slot's
scheduler reads it. A phase is ready when every phase it *waits for* has
finished; it then runs if those it *must pass* passed (its ``after``), and
if its groups let it (their setup passed, none of them stopped). What it
waits for is the union of

* its ``after`` (must have passed) and ``follows`` (finished, any outcome);
* in a sequential product or group, the item before it in the list (a
  group counts as finished when its teardown, or else its main part, has);
* in a group: its main part waits for the setup, its teardown for
  everything else of the group, each teardown phase for the one before.

The product's own teardowns (``teardown=True`` at the top of its list) are
not in the graph: they run after it, one after another.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import attrs

from sequencer.group import PhaseGroup
from sequencer.phase import Phase

__all__ = ["GraphError", "GroupPlan", "Plan", "Step", "compile_plan", "find_cycle"]


class GraphError(Exception):
    """The phases do not make a schedule; one line naming the phase or group (not the file)."""


@attrs.frozen(eq=False)
class GroupPlan:
    """A group as the scheduler sees it."""

    name: str
    setup: tuple[str, ...]
    teardown: tuple[str, ...]
    #: what a stop of this group cuts short or skips: its setup and main parts, nested groups' included,
    #: never a teardown
    members: frozenset[str]
    #: every phase of the group, teardowns included: the group was entered if any of them started
    every: frozenset[str]
    stop_on_failure: bool


@attrs.frozen(eq=False)
class Step:
    """One phase in the schedule."""

    phase: Phase
    #: every phase that must have finished before this one runs
    waits_for: tuple[str, ...]
    #: those of them that must have passed (the phase's ``after``)
    must_pass: tuple[str, ...]
    #: groups whose setup must have passed first (those whose main part holds it), innermost first
    entered: tuple[GroupPlan, ...] = ()
    #: groups whose stop skips it (those whose setup or main part holds it), innermost first
    stoppable: tuple[GroupPlan, ...] = ()
    #: the group this phase is a teardown of
    tears_down: GroupPlan | None = None
    #: the group ``PhaseResult.FAIL_GROUP`` stops (None: the run)
    group: GroupPlan | None = None
    name: str = attrs.field(init=False)
    #: whether any group has a say in whether it runs (the scheduler asks only then)
    grouped: bool = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        object.__setattr__(self, "name", self.phase.name)
        object.__setattr__(self, "grouped", bool(self.entered or self.stoppable or self.tears_down is not None))


@attrs.frozen(eq=False)
class Plan:
    """Every phase's step, in product order, and what the scheduler looks up per commit."""

    steps: Mapping[str, Step]
    #: the steps that wait for nothing: each starts a chain
    roots: tuple[Step, ...]
    #: for each phase, the steps that wait for it, in product order
    dependents: Mapping[str, tuple[Step, ...]]
    #: the groups, in the order their teardowns run after an abort: the last and innermost first
    groups: tuple[GroupPlan, ...]
    #: the product's own teardowns, in order
    teardowns: tuple[Phase, ...]

    @functools.cached_property
    def untorn(self) -> tuple[Phase, ...]:
        """Every phase in the graph that is not a teardown (a group's): what an abort records unfinished."""
        return tuple(s.phase for s in self.steps.values() if s.tears_down is None)

    def layers(self) -> list[list[str]]:
        """Steps by depth: layer k holds those whose longest chain of waits has length k."""
        depth: dict[str, int] = {}
        for name in self.steps:
            _depth(name, self.steps, depth)
        out: list[list[str]] = [[] for _ in range(max(depth.values(), default=-1) + 1)]
        for name in self.steps:
            out[depth[name]].append(name)
        return out


def _depth(name: str, steps: Mapping[str, Step], depth: dict[str, int]) -> int:
    if name not in depth:
        depth[name] = 1 + max((_depth(w, steps, depth) for w in steps[name].waits_for), default=-1)
    return depth[name]


def compile_plan(items: Sequence[Phase | PhaseGroup], *, sequential: bool = False) -> Plan:
    """The schedule of a product's ``phases`` list; :class:`GraphError` if it is not one."""
    builder = _Builder()
    product_teardowns = [i for i in items if isinstance(i, Phase) and i.teardown]
    builder.place_list([i for i in items if i not in product_teardowns], (), sequential, _Context())
    return builder.finish(product_teardowns)


@attrs.frozen
class _Context:
    entered: tuple[GroupPlan, ...] = ()
    stoppable: tuple[GroupPlan, ...] = ()
    group: GroupPlan | None = None


@attrs.define
class _Draft:
    phase: Phase
    implicit: tuple[str, ...]
    context: _Context
    tears_down: GroupPlan | None = None


class _Builder:
    def __init__(self) -> None:
        self.drafts: dict[str, _Draft] = {}
        self.groups: list[GroupPlan] = []
        self.group_names: set[str] = set()
        #: per group, what something after it waits for
        self.exits: dict[str, tuple[str, ...]] = {}

    def place_list(self, items: Iterable[Any], waits: tuple[str, ...], sequential: bool,
                   context: _Context) -> tuple[str, ...]:
        """Place ``items`` after ``waits``; return what something after all of them waits for."""
        if sequential:
            exits = waits
            for item in items:
                exits = self.place_item(item, exits, sequential, context)
            return exits
        found: list[str] = []
        for item in items:
            found.extend(self.place_item(item, waits, sequential, context))
        return tuple(dict.fromkeys(found)) or waits

    def place_item(self, item: Any, waits: tuple[str, ...], sequential: bool, context: _Context) -> tuple[str, ...]:
        if isinstance(item, PhaseGroup):
            return self.place_group(item, waits, sequential, context)
        if not isinstance(item, Phase):
            raise GraphError(f"{item!r} is not a phase (decorate it with @phase) nor a PhaseGroup")
        self.add(_Draft(item, waits, context))
        return (item.name,)

    def place_group(self, group: PhaseGroup, waits: tuple[str, ...], sequential: bool,
                    context: _Context) -> tuple[str, ...]:
        if group.name in self.group_names:
            raise GraphError(f"group {group.name!r}: the name is used twice")
        self.group_names.add(group.name)
        every = frozenset(p.name for p in group.phases())
        teardown_names = {p.name for g in group.groups() for p in g.teardown}
        plan = GroupPlan(group.name, tuple(p.name for p in group.setup), tuple(p.name for p in group.teardown),
                         every - teardown_names, every, group.stop_on_failure)
        self.groups.append(plan)
        inner = group.sequential if group.sequential is not None else sequential
        stoppable = (plan, *context.stoppable)
        setup_exits = self.place_list(group.setup, waits, inner, _Context(context.entered, stoppable, plan))
        main_exits = self.place_list(group.main, setup_exits, inner,
                                     _Context((plan, *context.entered), stoppable, plan))
        # Teardown phases: one after another, after everything else of the group, whatever its outcome.
        exits = main_exits
        for p in group.teardown:
            self.add(_Draft(p, exits, _Context(), tears_down=plan))
            exits = (p.name,)
        self.exits[group.name] = exits
        return exits

    def add(self, draft: _Draft) -> None:
        if draft.phase.name in self.drafts:
            raise GraphError(f"phase {draft.phase.name!r}: the name is used twice")
        self.drafts[draft.phase.name] = draft

    def finish(self, product_teardowns: list[Phase]) -> Plan:
        names = set(self.drafts)
        for p in product_teardowns:
            if p.name in names:
                raise GraphError(f"phase {p.name!r}: the name is used twice")
            names.add(p.name)
        clash = sorted(self.group_names & names)
        if clash:
            raise GraphError(f"group {clash[0]!r}: a phase has the same name")
        teardowns = {p.name for p in product_teardowns} | {d.phase.name for d in self.drafts.values()
                                                           if d.tears_down is not None}
        for p in [*(d.phase for d in self.drafts.values()), *product_teardowns]:
            for option in ("after", "follows"):
                for dep in getattr(p, option):
                    if dep in self.exits and option == "follows" and not p.teardown:
                        continue  # following a group: waiting for its end, teardown included
                    if dep in self.exits:
                        raise GraphError(f"phase {p.name!r}: after={dep!r} names a group; after= takes phases that "
                                         f"must pass (follows={dep!r} waits for the group, whatever its outcome)")
                    if dep not in names:
                        raise GraphError(f"phase {p.name!r}: depends on unknown phase {dep!r}")
                    if p.teardown:
                        # A teardown always runs, whatever ran before it; the order of teardowns is the list's.
                        raise GraphError(
                            f"phase {p.name!r}: a teardown cannot depend on {dep!r}; teardowns run after every "
                            "main phase, one after another in the product's order, whatever happened before"
                        )
                    if dep in teardowns:
                        raise GraphError(f"phase {p.name!r}: a main phase cannot depend on {dep!r}; teardowns "
                                         "run after every main phase")
        steps: dict[str, Step] = {}
        for name, d in self.drafts.items():
            p = d.phase
            # Following a group is waiting for what something after the group waits for.
            follows = [w for f in p.follows for w in self.exits.get(f, (f,))]
            steps[name] = Step(
                p, tuple(dict.fromkeys((*p.after, *follows, *d.implicit))), p.after,
                entered=d.context.entered, stoppable=d.context.stoppable, tears_down=d.tears_down,
                group=d.context.group,
            )
        cycle = find_cycle({name: s.waits_for for name, s in steps.items()})
        if cycle:
            implicit = next(((a, b) for a, b in zip(cycle, cycle[1:])
                             if b not in (*steps[a].phase.after, *steps[a].phase.follows)
                             and not any(b in self.exits.get(f, ()) for f in steps[a].phase.follows)), None)
            note = "" if implicit is None else (f" ({implicit[0]!r} comes after {implicit[1]!r} by the order of a "
                                                "sequential list or of its group)")
            raise GraphError(f"phase {cycle[0]!r}: dependency cycle {' -> '.join(cycle)}{note}")
        dependents: dict[str, list[Step]] = {name: [] for name in steps}
        for step in steps.values():
            for w in step.waits_for:
                dependents[w].append(step)
        return Plan(
            steps=steps,
            roots=tuple(s for s in steps.values() if not s.waits_for),
            dependents={name: tuple(ds) for name, ds in dependents.items()},
            groups=tuple(reversed(self.groups)),
            teardowns=tuple(product_teardowns),
        )


def find_cycle(graph: Mapping[str, Iterable[str]]) -> list[str] | None:
    """A cycle of ``graph`` (name -> the names it waits for) as a list (first name repeated last), or None."""
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for d in graph.get(n, ()):
            if state.get(d) == 1:
                return stack[stack.index(d) :] + [d]
            if d not in state and d in graph:
                found = visit(d)
                if found:
                    return found
        stack.pop()
        state[n] = 2
        return None

    for n in graph:
        if n not in state:
            found = visit(n)
            if found:
                return found
    return None
