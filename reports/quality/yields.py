"""Batch arithmetic: outcome counts, yields and failure Paretos, as pure functions of run records.

Kept apart from the HTML so the CLI, exports and dashboards compute the same
numbers from the same definitions. Nothing here formats or rounds for display.

Definitions (also printed on the batch page):

* A **unit** is one physical device: runs with the same non-empty ``serial``
  are the same unit; a run without a serial is a unit of its own (keyed by its
  run id), because there is no way to tell that it was a retest.
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
  station time). A phase counts when it ended ``FAIL``, ``ERROR`` or ``TIMEOUT``;
  ``ABORTED`` and ``SKIPPED`` phases are consequences of another failure or of
  the operator, not causes. A measurement counts when it ``FAIL``\\ ed in the
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
from collections import Counter
from collections.abc import Iterable, Sequence

import attrs

from sequencer.records import MeasurementOutcome, Outcome, RunRecord

#: Phase outcomes that count as a cause of failure in the phase Pareto.
PARETO_PHASE_OUTCOMES = frozenset({Outcome.FAIL, Outcome.ERROR, Outcome.TIMEOUT})

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

    @property
    def retested(self) -> bool:
        return len(self.run_ids) > 1


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
    """The numbers on top of a batch report; see the module docstring for definitions."""

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
    phase_pareto: tuple[ParetoRow, ...]
    measurement_pareto: tuple[ParetoRow, ...]
    #: the test code the runs were made with, oldest first; more than one means the results may not compare
    code_versions: tuple[CodeVersion, ...] = ()
    #: every slot of every station that ran any of the runs, by station then slot
    slots: tuple[SlotSummary, ...] = ()


def unit_key(run: RunRecord) -> str:
    """The identity a run is grouped by: its serial, or its run id when it has none."""
    serial = run.serial
    return f"serial:{serial}" if serial else f"run:{run.run_id}"


def chronological(runs: Iterable[RunRecord]) -> list[RunRecord]:
    """Runs oldest first, ties broken by run id so every consumer agrees on "first"."""
    return sorted(runs, key=lambda r: (r.started_at, r.run_id))


def unit_run_numbers(ordered: Sequence[RunRecord]) -> list[int]:
    """For each of ``ordered`` (oldest first), which test of its unit it is: 1 the first, 2 the first retest, ..."""
    seen: Counter[str] = Counter()
    numbers = []
    for r in ordered:
        key = unit_key(r)
        seen[key] += 1
        numbers.append(seen[key])
    return numbers


def batch_summary(runs: Sequence[RunRecord]) -> BatchSummary:
    """Count outcomes, compute yields and Paretos for ``runs`` (any order, retests included)."""
    ordered = chronological(runs)
    counts = Counter(r.outcome.value if r.outcome is not None else RUNNING for r in ordered)
    units = _units(ordered)
    judged = [u for u in units if u.first_outcome is not None]
    first_pass = sum(u.first_outcome is Outcome.PASS for u in judged)
    final_pass = sum(u.final_outcome is Outcome.PASS for u in judged)
    durations = [d for r in ordered if (d := r.duration_s) is not None]
    passed = counts.get(Outcome.PASS.value, 0)
    failed = counts.get(Outcome.FAIL.value, 0)
    running = counts.get(RUNNING, 0)
    return BatchSummary(
        runs=len(ordered),
        units=len(units),
        passed=passed,
        failed=failed,
        other=len(ordered) - passed - failed,
        running=running,
        marginal=sum(r.marginal for r in ordered),
        outcome_counts=tuple(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))),
        first_pass_units=first_pass,
        final_pass_units=final_pass,
        yield_units=len(judged),
        first_pass_yield=first_pass / len(judged) if judged else None,
        final_yield=final_pass / len(judged) if judged else None,
        median_duration_s=statistics.median(durations) if durations else None,
        unit_summaries=tuple(units),
        phase_pareto=pareto(phase_failures(ordered)),
        measurement_pareto=pareto(measurement_failures(ordered)),
        code_versions=code_versions(ordered),
        slots=slot_summaries(ordered),
    )


def slot_summaries(runs: Iterable[RunRecord]) -> tuple[SlotSummary, ...]:
    """How the runs of each (station, slot) ended, retests included, sorted by station then slot."""
    groups: dict[tuple[str, int], list[RunRecord]] = {}
    for r in runs:
        groups.setdefault((r.station, r.slot), []).append(r)
    return tuple(
        SlotSummary(
            station=station, slot=slot, runs=len(group),
            finished=sum(r.outcome is not None for r in group),
            passed=sum(r.outcome is Outcome.PASS for r in group),
            marginal=sum(r.marginal for r in group),
        )
        for (station, slot), group in sorted(groups.items())
    )


def code_versions(runs: Iterable[RunRecord]) -> tuple[CodeVersion, ...]:
    """Each distinct combination of product file, limits file and sequencer the runs were made with.

    Oldest first (by its first run). A batch whose rows are more than one was
    not all tested by the same code: a limit widened mid-batch moves its
    yield, and quality must see that beside the yield, not find it by
    comparing run pages.
    """
    groups: dict[tuple[str, str | None, str | None, str], list[RunRecord]] = {}
    for r in chronological(runs):
        product = f"{r.product} {r.product_version}".strip()
        groups.setdefault((product, r.product_sha256, r.limits_sha256, r.sequencer_version), []).append(r)
    return tuple(
        CodeVersion(product, product_sha, limits_sha, version, len(group), group[0].started_at)
        for (product, product_sha, limits_sha, version), group in groups.items()
    )


def _units(ordered: Sequence[RunRecord]) -> list[UnitSummary]:
    groups: dict[str, list[RunRecord]] = {}
    for r in ordered:
        groups.setdefault(unit_key(r), []).append(r)
    result = []
    for key, group in groups.items():
        finished = [r for r in group if r.outcome is not None]
        result.append(
            UnitSummary(
                key=key,
                serial=group[0].serial or None,
                run_ids=tuple(r.run_id for r in group),
                first_outcome=finished[0].outcome if finished else None,
                final_outcome=finished[-1].outcome if finished else None,
            )
        )
    return result


def phase_failures(runs: Iterable[RunRecord]) -> Counter[tuple[str, str | None]]:
    """How many times each phase was the cause of a failure, over all runs."""
    found: Counter[tuple[str, str | None]] = Counter()
    for r in runs:
        for p in r.phases:
            if p.outcome in PARETO_PHASE_OUTCOMES:
                found[(p.name, None)] += 1
    return found


def measurement_failures(runs: Iterable[RunRecord]) -> Counter[tuple[str, str | None]]:
    """How many times each (phase, measurement) failed in its phase's last attempt, over all runs."""
    found: Counter[tuple[str, str | None]] = Counter()
    for r in runs:
        for p in r.phases:
            for m in p.measurements:
                if m.outcome is MeasurementOutcome.FAIL:
                    found[(p.name, m.name)] += 1
    return found


def pareto(counts: Counter[tuple[str, str | None]]) -> tuple[ParetoRow, ...]:
    """Rows sorted by count (descending, then name) with share and cumulative share in percent."""
    total = sum(counts.values())
    rows = []
    cumulative = 0
    for (phase, measurement), count in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0][0], kv[0][1] or "")):
        cumulative += count
        rows.append(ParetoRow(phase, measurement, count, 100.0 * count / total, 100.0 * cumulative / total))
    return tuple(rows)
