"""Batch arithmetic: outcome counts, yields and failure Paretos, as pure functions of run records.

Kept apart from the HTML so the CLI, exports and dashboards compute the same
numbers from the same definitions. Nothing here formats or rounds for display.

Definitions (also printed on the batch page):

* A **unit** is one physical device of one product: runs that share a value of
  any key of the product's ``identity`` (serial, then MAC, by default) and
  disagree on none are the same unit (:mod:`reports.quality.units`); a run
  with none of them is a unit of its own; a run whose serial and MAC disagree
  with an earlier unit's is a unit of its own, *flagged*.
* Yields are **per product**: a batch or period with two products has a yield
  for each (:attr:`BatchSummary.products`), never one across them.
* Only **finished** runs (``outcome`` is not ``None``) have a verdict. Open runs
  are counted as runs, never in a yield.
* **First-pass yield** = units whose *first* finished run passed / units with
  at least one finished run.
* **Final yield** = units whose *last* finished run passed / the same units.
  A unit that failed, was retested and then passed lowers first-pass yield but
  not final yield.
* Only ``PASS`` passes. ``ERROR``, ``TIMEOUT``, ``ABORTED`` and ``INTERRUPTED``
  runs are not passes either: the unit left the station without a passing record.
* "First" and "last" are by ``started_at`` (then run id, so ties are stable).
* The **failure Paretos** count every run, retests included (each failure cost
  station time). Product failures (phases that ended ``FAIL``: the unit was
  measured and judged bad) are counted apart from station or communication
  trouble (``ERROR`` and ``TIMEOUT``: nothing was judged); ``ABORTED`` and
  ``SKIPPED`` phases are consequences of another failure or of the operator,
  not causes. Runs are counted the same way: ``failed`` (FAIL), ``errored``
  (ERROR, TIMEOUT), ``other`` (ABORTED, INTERRUPTED, still running). A measurement counts when it ``FAIL``\\ ed in the
  last attempt of its phase (earlier attempts that a retry recovered from are
  not failures of the run).
* The **test code** of a batch is each distinct combination of product file,
  limits file (by SHA-256) and sequencer version its runs name.
* A **slot's pass rate** is its passed runs over its finished runs, retests
  included: it judges the fixture, which tested every one of them.
"""

from __future__ import annotations

import datetime as dt
import statistics
from array import array
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import attrs

from reports.quality.units import Unit, UnitGrouping, Units
from sequencer.records import MeasurementOutcome, Outcome, PhaseRecord, RunRecord

#: Phase outcomes that are the product's failures: the unit was measured and judged bad.
FAILURE_OUTCOMES = frozenset({Outcome.FAIL})
#: Phase outcomes that are station or communication trouble: nothing was judged.
TROUBLE_OUTCOMES = frozenset({Outcome.ERROR, Outcome.TIMEOUT})

#: Key used in ``outcome_counts`` for runs that have not finished.
RUNNING = "RUNNING"


@attrs.frozen
class UnitSummary:
    """One unit's history in the batch, oldest run first."""

    key: str
    serial: str | None
    run_ids: tuple[str, ...]
    first_outcome: Outcome | None
    final_outcome: Outcome | None
    product: str = ""
    #: how the unit is named where it has no serial (``mac 24:0a:...``)
    label: str = ""
    #: why its run was not merged with an earlier unit it partly matches
    conflict: str | None = None

    @property
    def retested(self) -> bool:
        return len(self.run_ids) > 1


@attrs.frozen
class ProductYield:
    """The yields of one product's units: what a batch or period is judged by, product by product."""

    product: str
    #: product versions and limits files (SHA-256) its runs name, oldest first
    versions: tuple[str, ...]
    limits_sha256: tuple[str | None, ...]
    runs: int
    units: int
    yield_units: int
    first_pass_units: int
    final_pass_units: int
    #: units flagged because their identity disagreed with an earlier unit's
    conflicts: int

    @property
    def first_pass_yield(self) -> float | None:
        return self.first_pass_units / self.yield_units if self.yield_units else None

    @property
    def final_yield(self) -> float | None:
        return self.final_pass_units / self.yield_units if self.yield_units else None


@attrs.frozen
class CodeVersion:
    """One combination of test code that runs of a batch were made with (what ``sequencer check`` prints)."""

    product: str  # name and version, as the product declares them
    product_sha256: str | None
    limits_sha256: str | None
    sequencer_version: str
    runs: int
    first_started_at: dt.datetime

    @property
    def uncommitted(self) -> bool:
        """The sequencer ran from a checkout with changes no commit holds."""
        return self.sequencer_version.endswith(".dirty")


@attrs.frozen
class SlotSummary:
    """How the runs on one slot of one station ended.

    A slot that fails more often than its neighbours on the same units
    points at its fixture (a worn pogo pin, a loose cable), not at the units.
    """

    station: str
    slot: int
    runs: int
    finished: int
    passed: int
    marginal: int

    @property
    def not_passed(self) -> int:
        return self.finished - self.passed

    @property
    def pass_rate(self) -> float | None:
        """Passed / finished runs; ``None`` while none has finished."""
        return self.passed / self.finished if self.finished else None


@attrs.frozen
class ParetoRow:
    """One bar of a Pareto: how often ``phase`` (or ``phase``/``measurement``) failed."""

    phase: str
    measurement: str | None
    count: int
    percent: float
    cumulative_percent: float

    @property
    def label(self) -> str:
        return self.phase if self.measurement is None else f"{self.phase} / {self.measurement}"


@attrs.frozen
class BatchSummary:
    """The numbers on top of a batch report; see the module docstring for definitions.

    ``first_pass_yield`` and ``final_yield`` are ``None`` when the runs are of
    more than one product: each product's are in ``products``.
    """

    runs: int
    units: int
    passed: int
    failed: int
    other: int
    running: int
    marginal: int
    outcome_counts: tuple[tuple[str, int], ...]
    first_pass_units: int
    final_pass_units: int
    yield_units: int
    first_pass_yield: float | None
    final_yield: float | None
    median_duration_s: float | None
    unit_summaries: tuple[UnitSummary, ...]
    #: phases that FAILed (product failures), every run
    phase_pareto: tuple[ParetoRow, ...]
    measurement_pareto: tuple[ParetoRow, ...]
    #: the test code the runs were made with, oldest first; more than one means the results may not compare
    code_versions: tuple[CodeVersion, ...] = ()
    #: every slot of every station that ran any of the runs, by station then slot
    slots: tuple[SlotSummary, ...] = ()
    #: runs that ended ERROR or TIMEOUT (station or communication trouble)
    errored: int = 0
    #: phases that ended ERROR or TIMEOUT, every run
    trouble_pareto: tuple[ParetoRow, ...] = ()
    #: each product's yields, by product name
    products: tuple[ProductYield, ...] = ()

    @property
    def conflicts(self) -> tuple[UnitSummary, ...]:
        """Units flagged because their identity disagreed with an earlier unit's."""
        return tuple(u for u in self.unit_summaries if u.conflict is not None)


#: Runs oldest first (:func:`chronological`), afresh at each call: one reading of a batch or a period that a
#: report may read twice (a store's or MongoDB's ``iter_runs``, or a list held in memory).
RunPasses = Callable[[], Iterable[RunRecord]]


def chronological(runs: Iterable[RunRecord]) -> list[RunRecord]:
    """Runs oldest first, ties broken by run id so every consumer agrees on "first"."""
    return sorted(runs, key=lambda r: (r.started_at, r.run_id))


def batch_summary(runs: Sequence[RunRecord]) -> BatchSummary:
    """Count outcomes, compute yields and Paretos for ``runs`` (any order, retests included)."""
    tally = BatchTally()
    for r in chronological(runs):
        tally.add(r)
    return tally.summary()


class _Verdicts:
    """A unit's first and last finished outcome, as its runs come."""

    __slots__ = ("first", "final")

    def __init__(self) -> None:
        self.first: Outcome | None = None
        self.final: Outcome | None = None


class _ProductRuns:
    __slots__ = ("versions", "limits", "runs")

    def __init__(self) -> None:
        self.versions: dict[str, None] = {}
        self.limits: dict[str | None, None] = {}
        self.runs = 0


class BatchTally:
    """:func:`batch_summary` a run at a time, for a report that streams its runs and keeps none of them.

    :meth:`add` the runs oldest first (:func:`chronological`); :meth:`summary`
    at the end. What grows with the runs is the units' identity index
    (:class:`~reports.quality.units.UnitGrouping`) and one number per run for
    the median duration; the runs themselves are not kept.
    """

    def __init__(self) -> None:
        self.grouping = UnitGrouping()
        self._verdicts: dict[str, _Verdicts] = {}  # a unit's first run id -> its verdicts
        self._counts: Counter[str] = Counter()
        self._durations = array("d")
        self._marginal = 0
        self._products: dict[str, _ProductRuns] = {}
        self._failures: Counter[tuple[str, str | None]] = Counter()
        self._trouble: Counter[tuple[str, str | None]] = Counter()
        self._measurements: Counter[tuple[str, str | None]] = Counter()
        self._code: dict[tuple[str, str | None, str | None, str], list[Any]] = {}
        self._slots: dict[tuple[str, int], list[int]] = {}

    def add(self, r: RunRecord) -> Any:
        """Count ``r`` (the next run, oldest first); the unit it joined (see :meth:`UnitGrouping.add`)."""
        unit = self.grouping.add(r)
        verdicts = self._verdicts.setdefault(unit.run_ids[0], _Verdicts())
        if r.outcome is not None:
            if verdicts.first is None:
                verdicts.first = r.outcome
            verdicts.final = r.outcome
        self._counts[r.outcome.value if r.outcome is not None else RUNNING] += 1
        if (d := r.duration_s) is not None:
            self._durations.append(d)
        marginal = r.marginal
        self._marginal += marginal
        product = self._products.get(r.product)
        if product is None:
            product = self._products[r.product] = _ProductRuns()
        product.versions[r.product_version] = None
        product.limits[r.limits_sha256] = None
        product.runs += 1
        self._failures.update(_failed_phases(r, FAILURE_OUTCOMES))
        self._trouble.update(_failed_phases(r, TROUBLE_OUTCOMES))
        self._measurements.update(_failed_measurements(r))
        code = self._code.setdefault(_code_of(r), [0, r.started_at])
        code[0] += 1
        slot = self._slots.setdefault((r.station, r.slot), [0, 0, 0, 0])
        slot[0] += 1
        slot[1] += r.outcome is not None
        slot[2] += r.outcome is Outcome.PASS
        slot[3] += marginal
        return unit

    def unit_summaries(self, units: Units | None = None) -> list[UnitSummary]:
        """Each unit so far with its first and final verdict (``units``: :meth:`UnitGrouping.units`, if made)."""
        units = units if units is not None else self.grouping.units()
        return [_unit_summary(u, self._verdicts[u.run_ids[0]]) for u in units.units]

    def summary(self, units: Units | None = None) -> BatchSummary:
        counts = self._counts
        runs = sum(counts.values())
        summaries = self.unit_summaries(units)
        products = tuple(
            _product_yield(name, p, [u for u in summaries if u.product == name])
            for name, p in sorted(self._products.items()))
        judged = [u for u in summaries if u.first_outcome is not None]
        first_pass = sum(u.first_outcome is Outcome.PASS for u in judged)
        final_pass = sum(u.final_outcome is Outcome.PASS for u in judged)
        blended = len(products) > 1
        passed = counts.get(Outcome.PASS.value, 0)
        failed = counts.get(Outcome.FAIL.value, 0)
        errored = counts.get(Outcome.ERROR.value, 0) + counts.get(Outcome.TIMEOUT.value, 0)
        return BatchSummary(
            runs=runs,
            units=len(summaries),
            passed=passed,
            failed=failed,
            other=runs - passed - failed - errored,
            running=counts.get(RUNNING, 0),
            marginal=self._marginal,
            outcome_counts=tuple(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))),
            first_pass_units=first_pass,
            final_pass_units=final_pass,
            yield_units=len(judged),
            first_pass_yield=first_pass / len(judged) if judged and not blended else None,
            final_yield=final_pass / len(judged) if judged and not blended else None,
            median_duration_s=statistics.median(self._durations) if self._durations else None,
            unit_summaries=tuple(summaries),
            phase_pareto=pareto(self._failures),
            measurement_pareto=pareto(self._measurements),
            code_versions=tuple(CodeVersion(product, product_sha, limits_sha, version, n, first)
                                for (product, product_sha, limits_sha, version), (n, first) in self._code.items()),
            slots=tuple(SlotSummary(station, slot, *counts) for (station, slot), counts in sorted(self._slots.items())),
            errored=errored,
            trouble_pareto=pareto(self._trouble),
            products=products,
        )


def _unit_summary(unit: Unit, verdicts: _Verdicts) -> UnitSummary:
    return UnitSummary(
        key=unit.key,
        serial=unit.serial,
        run_ids=unit.run_ids,
        first_outcome=verdicts.first,
        final_outcome=verdicts.final,
        product=unit.product,
        label=unit.label,
        conflict=unit.conflict,
    )


def unit_summaries(ordered: Sequence[RunRecord], units: Units) -> list[UnitSummary]:
    """Each unit of ``units`` (grouped from ``ordered``, oldest first) with its first and final verdict."""
    by_id = {r.run_id: r for r in ordered}
    out = []
    for u in units.units:
        verdicts = _Verdicts()
        finished = [o for rid in u.run_ids if (o := by_id[rid].outcome) is not None]
        if finished:
            verdicts.first, verdicts.final = finished[0], finished[-1]
        out.append(_unit_summary(u, verdicts))
    return out


def _product_yield(product: str, runs: _ProductRuns, units: Sequence[UnitSummary]) -> ProductYield:
    judged = [u for u in units if u.first_outcome is not None]
    return ProductYield(
        product=product,
        versions=tuple(runs.versions),
        limits_sha256=tuple(runs.limits),
        runs=runs.runs,
        units=len(units),
        yield_units=len(judged),
        first_pass_units=sum(u.first_outcome is Outcome.PASS for u in judged),
        final_pass_units=sum(u.final_outcome is Outcome.PASS for u in judged),
        conflicts=sum(u.conflict is not None for u in units),
    )


def _code_of(r: RunRecord) -> tuple[str, str | None, str | None, str]:
    return f"{r.product} {r.product_version}".strip(), r.product_sha256, r.limits_sha256, r.sequencer_version


def code_versions(runs: Iterable[RunRecord]) -> tuple[CodeVersion, ...]:
    """Each distinct combination of product file, limits file and sequencer the runs were made with.

    Oldest first (by its first run). A batch whose rows are more than one was
    not all tested by the same code: a limit widened mid-batch moves its
    yield, and quality must see that beside the yield, not find it by
    comparing run pages.
    """
    tally = BatchTally()
    for r in chronological(runs):
        tally.add(r)
    return tally.summary().code_versions


def _failed_phases(r: RunRecord, outcomes: frozenset[Outcome]) -> Iterator[tuple[str, str | None]]:
    for p in r.phases:
        if p.outcome in outcomes:
            yield (p.name, None)


def _failed_measurements(r: RunRecord) -> Iterator[tuple[str, str | None]]:
    for p in r.phases:
        for m in p.measurements:
            if m.outcome is MeasurementOutcome.FAIL:
                yield (p.name, m.name)


def phase_failures(
    runs: Iterable[RunRecord], outcomes: frozenset[Outcome] = FAILURE_OUTCOMES,
) -> Counter[tuple[str, str | None]]:
    """How many times each phase ended in one of ``outcomes`` (product failures: FAIL), over all runs."""
    return Counter(k for r in runs for k in _failed_phases(r, outcomes))


def measurement_failures(runs: Iterable[RunRecord]) -> Counter[tuple[str, str | None]]:
    """How many times each (phase, measurement) failed in its phase's last attempt, over all runs."""
    return Counter(k for r in runs for k in _failed_measurements(r))


def pareto(counts: Counter[tuple[str, str | None]]) -> tuple[ParetoRow, ...]:
    """Rows sorted by count (descending, then name) with share and cumulative share in percent."""
    total = sum(counts.values())
    rows = []
    cumulative = 0
    for (phase, measurement), count in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0][0], kv[0][1] or "")):
        cumulative += count
        rows.append(ParetoRow(phase, measurement, count, 100.0 * count / total, 100.0 * cumulative / total))
    return tuple(rows)


def first_failure(run: RunRecord) -> PhaseRecord | None:
    """The phase that failed the run first (in record order), or ``None``."""
    for p in run.phases:
        if p.outcome.is_failure:
            return p
    return None


def failure_summary(run: RunRecord) -> str | None:
    """Why a run did not pass, in one line: ``FAIL at supply_rails: measurement 'vdd_3v3': 3.59 is above 3.4``.

    ``None`` for a run that passed or is still running.
    """
    if run.outcome is None or run.outcome is Outcome.PASS:
        return None
    p = first_failure(run)
    if p is None:
        return run.outcome.value
    why = p.reason or (f"{p.error.type}: {p.error.message}" if p.error is not None else "")
    return f"{p.outcome.value} at {p.name}" + (f": {why}" if why else "")
