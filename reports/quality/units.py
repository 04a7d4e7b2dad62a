"""Which runs tested the same physical unit.

A product names the ``dut`` keys that identify a unit, most trusted first
(``Product(identity=("serial", "mac"))``, the default). Runs of one product
are the same unit when they share a value of any of those keys and disagree
on none: a board whose identify phase failed has no serial, but ``detect``
recorded its MAC, and its passing retest (serial and MAC) is the same board.

A run that agrees with an earlier unit on one key and disagrees on another
(the serial of one board with the MAC of another: a label printed twice, a
serial programmed into the wrong board) is not merged: it is a unit of its
own, flagged with the reason, so the yield never silently absorbs it and a
person looks at it. Runs are taken oldest first, so "earlier" is by start
time; a run with none of the keys is a unit of its own.

Units never span products: a board tested by the board test and then by the
final test is a unit of each, with a yield in each.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import attrs

from sequencer.records import RunRecord

_MAC_SEPARATORS = str.maketrans("", "", ":-. ")


def normal_value(key: str, value: str) -> str:
    """An identity value as compared: a MAC without separators and case, anything else stripped."""
    value = value.strip()
    if key.endswith("mac"):
        return value.translate(_MAC_SEPARATORS).lower()
    return value


@attrs.frozen
class Unit:
    """One physical unit of one product, and the runs that tested it, oldest first."""

    product: str
    #: what the unit was known by, in the product's identity order (values as first recorded)
    identity: tuple[tuple[str, str], ...]
    run_ids: tuple[str, ...]
    #: why this run was not taken as an earlier unit it partly matches (None for an ordinary unit)
    conflict: str | None = None

    @property
    def key(self) -> str:
        """A name for the unit within its product: its most trusted identity, or its only run."""
        if self.conflict is not None or not self.identity:
            return f"{self.product}\x1frun={self.run_ids[0]}"
        k, v = self.identity[0]
        return f"{self.product}\x1f{k}={normal_value(k, v)}"

    @property
    def serial(self) -> str | None:
        return dict(self.identity).get("serial")

    @property
    def label(self) -> str:
        """How a person names it: its most trusted identity (``mac 24:0a:...`` when it has no serial)."""
        if not self.identity:
            return "no identity"
        k, v = self.identity[0]
        return v if k == "serial" else f"{k} {v}"


@attrs.frozen
class Units:
    """The units of a set of runs, and which unit each run tested."""

    units: tuple[Unit, ...]
    by_run: Mapping[str, Unit]

    def of(self, run: RunRecord) -> Unit:
        return self.by_run[run.run_id]

    @property
    def conflicts(self) -> tuple[Unit, ...]:
        return tuple(u for u in self.units if u.conflict is not None)


class _Building:
    __slots__ = ("product", "order", "values", "first_run", "run_ids", "conflict")

    def __init__(self, product: str, order: Sequence[str], first_run: str) -> None:
        self.product = product
        self.order = order
        self.values: dict[str, str] = {}  # key -> value as first recorded
        self.first_run = first_run
        self.run_ids: list[str] = []  # left empty by a grouping that keeps no run ids
        self.conflict: str | None = None

    def freeze(self) -> Unit:
        rank = {k: i for i, k in enumerate(self.order)}
        known = sorted(self.values.items(), key=lambda kv: rank.get(kv[0], len(rank)))
        return Unit(self.product, tuple(known), tuple(self.run_ids), self.conflict)


def identity_of(run: RunRecord) -> list[tuple[str, str]]:
    """The run's identity values (non-empty), in its product's order."""
    return [(k, v) for k in run.identity if (v := run.dut.get(k, "").strip())]


class UnitGrouping:
    """:func:`group_units` a run at a time, for a report that streams its runs and keeps none.

    :meth:`add` each run, oldest first; it returns the unit the run joined
    (the same object for every run of a unit, so a caller can keep its own
    numbers per unit); :meth:`units` freezes them at the end. What is kept is
    the identity index and each run's id; without ``keep_runs``, only the
    identity index (a period's yields need each run's unit as it comes, not
    which runs each unit had), and :meth:`units` cannot be made.
    """

    def __init__(self, *, keep_runs: bool = True) -> None:
        self._keep_runs = keep_runs
        self._building: list[_Building] = []
        self._index: dict[tuple[str, str, str], _Building] = {}  # (product, key, normal value) -> unit
        self._by_run: dict[str, _Building] = {}

    def add(self, run: RunRecord) -> _Building:
        ids = identity_of(run)
        found = {}
        for k, v in ids:
            unit = self._index.get((run.product, k, normal_value(k, v)))
            if unit is not None:
                found.setdefault(id(unit), (unit, k, v))
        conflict = None
        unit = None
        if len(found) > 1:
            (a, ka, va), (b, kb, vb) = list(found.values())[:2]
            conflict = f"{ka} {va} belongs to one unit ({_name(a)}) and {kb} {vb} to another ({_name(b)})"
        elif found:
            (unit, k_same, v_same), = found.values()
            for k, v in ids:
                have = unit.values.get(k)
                if have is not None and normal_value(k, have) != normal_value(k, v):
                    conflict = (f"{k_same} {v_same} was tested before with {k} {have} (run {unit.first_run});"
                                f" this run reports {k} {v}")
                    unit = None
                    break
        if unit is None:
            unit = _Building(run.product, run.identity, run.run_id)
            unit.conflict = conflict
            if self._keep_runs:
                self._building.append(unit)
        for k, v in ids:
            unit.values.setdefault(k, v)
            # A flagged unit does not take over the values another unit already holds.
            self._index.setdefault((run.product, k, normal_value(k, v)), unit)
        if self._keep_runs:
            unit.run_ids.append(run.run_id)
            self._by_run[run.run_id] = unit
        return unit

    def units(self) -> Units:
        if not self._keep_runs:
            raise TypeError("a UnitGrouping made with keep_runs=False kept no runs to freeze into units")
        frozen = {id(b): b.freeze() for b in self._building}
        return Units(tuple(frozen[id(b)] for b in self._building),
                     {rid: frozen[id(b)] for rid, b in self._by_run.items()})


def group_units(ordered: Iterable[RunRecord]) -> Units:
    """Group runs (oldest first: see :func:`reports.quality.yields.chronological`) into units."""
    grouping = UnitGrouping()
    for run in ordered:
        grouping.add(run)
    return grouping.units()


def _name(unit: _Building) -> str:
    return ", ".join(f"{k} {v}" for k, v in unit.values.items()) or f"run {unit.first_run}"
