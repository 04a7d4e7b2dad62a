"""A period's yields, by day or hour and by station, slot and operator: the trend report's arithmetic.

Units are grouped as on the batch page (:mod:`reports.quality.units`) and
each unit is counted where and when it was *first* tested: its first-pass
yield belongs to that day, station, slot and operator, and so does its final
yield (a retest on another station does not move the unit). Runs are
counted where they ran. Everything is per product.

Only run headers are needed (product, identity, outcome, where and when),
so a period over every station in MongoDB streams them with the phases left
out; the Paretos and measurement statistics come from elsewhere (the batch
arithmetic locally, aggregation pipelines in MongoDB).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import attrs

from reports.quality.statistics import MeasurementStatistics, measurement_statistics
from reports.quality.units import group_units
from reports.quality.yields import ParetoRow, batch_summary
from sequencer.records import Outcome, RunRecord

#: A period longer than this is shown by day, a shorter one by hour.
HOURLY_UP_TO = dt.timedelta(days=1)


@attrs.frozen
class YieldRow:
    """One bucket of a period (a day, a station, a slot, an operator) of one product."""

    product: str
    bucket: str
    runs: int
    passed_runs: int
    units: int
    first_pass_units: int
    final_pass_units: int

    @property
    def first_pass_yield(self) -> float | None:
        return self.first_pass_units / self.units if self.units else None

    @property
    def final_yield(self) -> float | None:
        return self.final_pass_units / self.units if self.units else None


@attrs.frozen
class PeriodYields:
    """A period's yields, each table sorted by product then bucket."""

    since: dt.datetime | None
    until: dt.datetime | None
    hourly: bool
    by_time: tuple[YieldRow, ...]
    by_station: tuple[YieldRow, ...]
    by_slot: tuple[YieldRow, ...]
    by_operator: tuple[YieldRow, ...]


def time_bucket(when: dt.datetime, hourly: bool) -> str:
    utc = when.astimezone(dt.timezone.utc)
    return utc.strftime("%Y-%m-%d %H:00") if hourly else utc.strftime("%Y-%m-%d")


def is_hourly(since: dt.datetime | None, until: dt.datetime | None, ordered: Sequence[Any]) -> bool:
    """By hour when the period (as asked, else as found) is a day or shorter."""
    start = since or (ordered[0].started_at if ordered else None)
    end = until or (ordered[-1].started_at if ordered else None)
    return start is not None and end is not None and end - start <= HOURLY_UP_TO


def period_yields(ordered: Sequence[RunRecord], *, since: dt.datetime | None = None,
                  until: dt.datetime | None = None) -> PeriodYields:
    """The yields of ``ordered`` (oldest first; run headers are enough) by time, station, slot and operator."""
    hourly = is_hourly(since, until, ordered)
    units = group_units(ordered)
    first_run: dict[str, RunRecord] = {}
    finished: dict[str, list[RunRecord]] = {}
    for r in ordered:
        key = units.of(r).key
        first_run.setdefault(key, r)
        if r.outcome is not None:
            finished.setdefault(key, []).append(r)

    def table(bucket_of: Callable[[RunRecord], str]) -> tuple[YieldRow, ...]:
        rows: dict[tuple[str, str], list[int]] = {}
        for r in ordered:
            counts = rows.setdefault((r.product, bucket_of(r)), [0] * 5)
            counts[0] += 1
            counts[1] += r.outcome is Outcome.PASS
        for key, runs in finished.items():
            counts = rows.setdefault((runs[0].product, bucket_of(first_run[key])), [0] * 5)
            counts[2] += 1
            counts[3] += runs[0].outcome is Outcome.PASS
            counts[4] += runs[-1].outcome is Outcome.PASS
        return tuple(YieldRow(product, bucket, *counts) for (product, bucket), counts in sorted(rows.items()))

    return PeriodYields(
        since=since,
        until=until,
        hourly=hourly,
        by_time=table(lambda r: time_bucket(r.started_at, hourly)),
        by_station=table(lambda r: r.station),
        by_slot=table(lambda r: f"{r.station} slot {r.slot}"),
        by_operator=table(lambda r: r.operator or "(none)"),
    )


@attrs.frozen(slots=True)
class RunHeader:
    """What yields need of a run (who, where, when, how it ended): a period streams these, not whole runs."""

    run_id: str
    product: str
    started_at: dt.datetime
    outcome: Outcome | None
    station: str
    slot: int
    operator: str
    identity: tuple[str, ...]
    #: the identity keys' values only
    dut: dict[str, str]


@attrs.frozen
class PeriodReport:
    """Everything a period report shows: yields, outcome counts, Paretos, measurement statistics."""

    product: str
    station: str | None
    yields: PeriodYields
    outcome_counts: tuple[tuple[str, int], ...]
    phase_pareto: tuple[ParetoRow, ...]
    measurement_pareto: tuple[ParetoRow, ...]
    trouble_pareto: tuple[ParetoRow, ...]
    statistics: tuple[MeasurementStatistics, ...]

    @property
    def runs(self) -> int:
        return sum(n for _, n in self.outcome_counts)

    @property
    def total(self) -> YieldRow:
        """The whole period as one row (its units counted once)."""
        rows = self.yields.by_station
        return YieldRow(self.product, "all", *(sum(getattr(r, f) for r in rows) for f in
                                               ("runs", "passed_runs", "units", "first_pass_units",
                                                "final_pass_units")))

    def count(self, *outcomes: str) -> int:
        return sum(n for name, n in self.outcome_counts if name in outcomes)


def period_from_runs(ordered: Sequence[RunRecord], *, product: str, station: str | None = None,
                     since: dt.datetime | None = None, until: dt.datetime | None = None) -> PeriodReport:
    """A period report of whole runs (a station's local store), oldest first."""
    summary = batch_summary(ordered)
    return PeriodReport(
        product=product,
        station=station,
        yields=period_yields(ordered, since=since, until=until),
        outcome_counts=summary.outcome_counts,
        phase_pareto=summary.phase_pareto,
        measurement_pareto=summary.measurement_pareto,
        trouble_pareto=summary.trouble_pareto,
        statistics=tuple(measurement_statistics(ordered)),
    )
