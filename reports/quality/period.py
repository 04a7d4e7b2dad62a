"""A period's yields, by day or hour and by station, slot and operator: the trend report's arithmetic.

Units are grouped as on the batch page (:mod:`reports.quality.units`) and
each unit is counted where and when it was *first* tested: its first-pass
yield belongs to that day, station, slot and operator, and so does its final
yield (a retest on another station does not move the unit). Runs are
counted where they ran. Everything is per product.

Only run headers are needed (product, identity, outcome, where and when).
A period over every station in MongoDB is counted in the database instead
(:mod:`reports.quality.pipeline`): :class:`PeriodTally` takes its counts
(:meth:`PeriodTally.add_counts`) and groups only the runs whose units the
database cannot (units only); the Paretos and measurement statistics come
from elsewhere (the batch arithmetic locally, aggregation pipelines in
MongoDB).
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Iterable, Sequence
from typing import Any

import attrs

from reports.quality.statistics import MeasurementStatistics, MeasurementTally
from reports.quality.units import UnitGrouping
from reports.quality.yields import BatchTally, ParetoRow
from sequencer.records import Outcome, RunRecord

_NO_OFFSET = dt.timedelta(0)
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
    # already UTC as the store and MongoDB give it: no conversion (a period of 100,000 runs makes 100,000)
    utc = when if when.utcoffset() == _NO_OFFSET else when.astimezone(dt.timezone.utc)
    return utc.strftime("%Y-%m-%d %H:00") if hourly else utc.strftime("%Y-%m-%d")


def is_hourly(since: dt.datetime | None, until: dt.datetime | None, first: dt.datetime | None,
              last: dt.datetime | None) -> bool:
    """By hour when the period (as asked, else as found: its ``first`` and ``last`` start) is a day or shorter."""
    start = since or first
    end = until or last
    return start is not None and end is not None and end - start <= HOURLY_UP_TO


def _natural(bucket: str) -> tuple[Any, ...]:
    """A bucket's sort key with its numbers as numbers: ``st1 slot 2`` before ``st1 slot 10``.

    ``re.split`` with a group alternates text and digits, text first, so two keys compare text with
    text and number with number.
    """
    return tuple(int(part) if i % 2 else part for i, part in enumerate(re.split(r"(\d+)", bucket)))


#: The tables of a period's yields, in the order :func:`run_buckets` gives a run's buckets.
TABLES = ("day", "hour", "station", "slot", "operator")


def run_buckets(r: Any) -> tuple[str, ...]:
    hour = time_bucket(r.started_at, True)
    return hour[:10], hour, r.station, f"{r.station} slot {r.slot}", r.operator or "(none)"


class _UnitYield:
    """A unit's place (its first run's buckets) and its first and last finished outcome."""

    __slots__ = ("product", "buckets", "first", "final")

    def __init__(self, product: str, buckets: tuple[str, ...]) -> None:
        self.product = product
        self.buckets = buckets
        self.first: Outcome | None = None
        self.final: Outcome | None = None


class PeriodTally:
    """:func:`period_yields` a run (or run header) at a time, oldest first, keeping none of them.

    What grows is per unit, not per run: its identity in the index
    (:class:`~reports.quality.units.UnitGrouping` without run ids), its first
    run's buckets and two outcomes. The runs' counts are per bucket. Both the
    hour and the day are counted, since whether the period is shown by hour
    is known only at its end. Counts made elsewhere (a database's) are added
    per bucket (:meth:`add_counts`, :meth:`add_span`); with
    ``count_runs=False`` the runs :meth:`add` is given count as units only.
    """

    def __init__(self, *, count_runs: bool = True) -> None:
        self._grouping = UnitGrouping(keep_runs=False)
        self._units: dict[Any, _UnitYield] = {}
        #: without it, :meth:`add` tallies units only (the runs are counted elsewhere: :meth:`add_counts`)
        self._count_runs = count_runs
        self._runs: dict[tuple[str, str, str], list[int]] = {}  # (table, product, bucket) -> [runs, passed]
        # counts tallied elsewhere (a database): (table, product, bucket) -> [runs, passed, units, first, final]
        self._counted: dict[tuple[str, str, str], list[int]] = {}
        # each distinct tuple of buckets once: a unit points at its first run's (a few hundred bytes less a unit)
        self._places: dict[tuple[str, ...], tuple[str, ...]] = {}
        self.first: dt.datetime | None = None
        self.last: dt.datetime | None = None

    def add(self, r: Any) -> None:
        building = self._grouping.add(r)
        buckets = run_buckets(r)
        unit = self._units.get(building)
        if unit is None:
            buckets = self._places.setdefault(buckets, buckets)
            unit = self._units[building] = _UnitYield(building.product, buckets)
        if self._count_runs:
            for table, bucket in zip(TABLES, buckets, strict=True):
                counts = self._runs.setdefault((table, r.product, bucket), [0, 0])
                counts[0] += 1
                counts[1] += r.outcome is Outcome.PASS
        if r.outcome is not None:
            if unit.first is None:
                unit.first = r.outcome
            unit.final = r.outcome
        if self._count_runs:
            if self.first is None:
                self.first = r.started_at
            self.last = r.started_at

    def add_counts(self, table: str, product: str, bucket: str, runs: int = 0, passed_runs: int = 0, units: int = 0,
                   first_pass_units: int = 0, final_pass_units: int = 0) -> None:
        """Counts of one bucket (``table`` one of day, hour, station, slot, operator) tallied elsewhere: a database
        counts the runs and the units whose runs all agree on their identity (:mod:`reports.quality.pipeline`)."""
        if table not in TABLES:
            raise ValueError(f"{table!r}: not one of {', '.join(TABLES)}")
        counts = self._counted.setdefault((table, product, bucket), [0] * 5)
        for i, n in enumerate((runs, passed_runs, units, first_pass_units, final_pass_units)):
            counts[i] += n

    def add_span(self, first: dt.datetime | None, last: dt.datetime | None) -> None:
        """The first and last start of runs counted elsewhere (whether the period is shown by hour)."""
        if first is not None and (self.first is None or first < self.first):
            self.first = first
        if last is not None and (self.last is None or last > self.last):
            self.last = last

    def yields(self, *, since: dt.datetime | None = None, until: dt.datetime | None = None) -> PeriodYields:
        hourly = is_hourly(since, until, self.first, self.last)
        rows: dict[str, dict[tuple[str, str], list[int]]] = {table: {} for table in TABLES}
        for (table, product, bucket), (runs, passed) in self._runs.items():
            rows[table][(product, bucket)] = [runs, passed, 0, 0, 0]
        for (table, product, bucket), counted in self._counted.items():
            counts = rows[table].setdefault((product, bucket), [0] * 5)
            for i, n in enumerate(counted):
                counts[i] += n
        for unit in self._units.values():
            if unit.first is None:
                continue  # never finished: not in the yields
            for table, bucket in zip(TABLES, unit.buckets, strict=True):
                counts = rows[table].setdefault((unit.product, bucket), [0] * 5)
                counts[2] += 1
                counts[3] += unit.first is Outcome.PASS
                counts[4] += unit.final is Outcome.PASS

        def table(name: str) -> tuple[YieldRow, ...]:
            ordered = sorted(rows[name].items(), key=lambda kv: (kv[0][0], _natural(kv[0][1])))
            return tuple(YieldRow(product, bucket, *counts) for (product, bucket), counts in ordered)

        return PeriodYields(since=since, until=until, hourly=hourly, by_time=table("hour" if hourly else "day"),
                            by_station=table("station"), by_slot=table("slot"), by_operator=table("operator"))


def period_yields(ordered: Iterable[Any], *, since: dt.datetime | None = None,
                  until: dt.datetime | None = None) -> PeriodYields:
    """The yields of ``ordered`` (oldest first; run headers are enough) by time, station, slot and operator."""
    tally = PeriodTally()
    for r in ordered:
        tally.add(r)
    return tally.yields(since=since, until=until)


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


def period_from_runs(ordered: Iterable[RunRecord], *, product: str, station: str | None = None,
                     since: dt.datetime | None = None, until: dt.datetime | None = None) -> PeriodReport:
    """A period report of whole runs (a station's local store), oldest first, read once as a stream.

    None of them is kept: what grows is the units' identity index (for the
    yields and the Paretos' tallies), each run's duration and each numeric
    value (8 bytes) for the histograms and charts, a week of a station's
    runs in tens of MB where holding the runs took gigabytes.
    """
    batch, yields, statistics = BatchTally(), PeriodTally(), MeasurementTally(drawing=True)
    for r in ordered:
        batch.add(r)
        yields.add(r)
        statistics.add(r)
    summary = batch.summary()
    return PeriodReport(
        product=product,
        station=station,
        yields=yields.yields(since=since, until=until),
        outcome_counts=summary.outcome_counts,
        phase_pareto=summary.phase_pareto,
        measurement_pareto=summary.measurement_pareto,
        trouble_pareto=summary.trouble_pareto,
        statistics=tuple(statistics.statistics()),
    )
