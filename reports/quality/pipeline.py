"""The measurement statistics of :mod:`reports.quality.statistics`, computed inside MongoDB.

A period report over every station's runs cannot load 100,000 runs into
Python. These aggregation pipelines compute the same :class:`Moments` (n,
mean, sd, extremes, mean moving range in run order, fails, marginals) and
the histogram counts in the database, over the ``runs`` collection's flat
``measurements`` array, for any ``$match`` filter: a period, a product, a
station, a batch (the portal passes its own). Python then only does the
arithmetic of :mod:`reports.quality.statistics` on a few numbers per
measurement, so its memory does not grow with the number of runs.

Every pipeline is built from plain dicts and takes the caller's filter as
its first stage; ``allowDiskUse`` lets the server spill the run-order sort.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import datetime as dt
from collections import Counter

from reports.quality.period import PeriodReport, RunHeader, period_yields
from reports.quality.statistics import Bins, MeasurementStatistics, Moments, from_moments, histogram_bins
from reports.quality.yields import FAILURE_OUTCOMES, TROUBLE_OUTCOMES, pareto
from sequencer.records import Limits

#: The newest values of each measurement a period's control chart draws.
CHART_VALUES = 500

_NUMERIC = {"$in": [{"$type": "$measurements.value"}, ["double", "int", "long", "decimal"]]}


def _numeric_measurements(match: Mapping[str, Any], *, in_run_order: bool = False) -> list[dict[str, Any]]:
    """Stages: the filter, then one document per numeric judged measurement (in run order if asked)."""
    order = [{"$sort": {"started_at": 1, "_id": 1}}] if in_run_order else []
    return [
        {"$match": dict(match)},
        *order,
        {"$project": {"product": 1, "measurements": 1}},
        {"$unwind": "$measurements"},
        {"$match": {"$expr": {"$and": [_NUMERIC, {"$not": [{"$in": ["$measurements.outcome", ["UNSET", "SKIPPED"]]}]}]}}},
        {"$project": {
            "_id": 0,
            "key": {"product": "$product", "phase": "$measurements.phase", "name": "$measurements.name"},
            "value": {"$toDouble": "$measurements.value"},
            "units": "$measurements.units",
            "fail": {"$cond": [{"$eq": ["$measurements.outcome", "FAIL"]}, 1, 0]},
            "marginal": {"$cond": ["$measurements.marginal", 1, 0]},
        }},
        {"$set": {"finite": {"$and": [{"$ne": ["$value", math.inf]}, {"$ne": ["$value", -math.inf]},
                                      {"$eq": ["$value", "$value"]}]}}},  # NaN is not equal to itself
    ]


def moments_pipeline(match: Mapping[str, Any], chart_values: int = 0) -> list[dict[str, Any]]:
    """One document per (product, phase, measurement): the fields of :class:`Moments`, its units, and
    its newest ``chart_values`` values for the control chart.

    The moving range needs the values in run order (``started_at``, then run
    id): the runs are sorted before they are unwound (the ``product,
    started_at`` index gives that order), ``$push`` keeps it, and one
    ``$reduce`` walks each measurement's values once.
    """
    walk = {"$reduce": {
        "input": "$values",
        "initialValue": {"prev": None, "sum": 0.0, "k": 0},
        "in": {"$cond": [
            {"$eq": ["$$value.prev", None]},
            {"prev": "$$this", "sum": "$$value.sum", "k": 0},
            {"prev": "$$this", "sum": {"$add": ["$$value.sum", {"$abs": {"$subtract": ["$$this", "$$value.prev"]}}]},
             "k": {"$add": ["$$value.k", 1]}},
        ]},
    }}
    finite = {"$cond": ["$finite", "$value", "$$REMOVE"]}
    return [
        *_numeric_measurements(match, in_run_order=True),
        {"$group": {
            "_id": "$key",
            "n": {"$sum": {"$cond": ["$finite", 1, 0]}},
            "mean": {"$avg": finite},
            "sd": {"$stdDevSamp": finite},
            "minimum": {"$min": finite},
            "maximum": {"$max": finite},
            "values": {"$push": finite},
            "fails": {"$sum": "$fail"},
            "marginals": {"$sum": "$marginal"},
            "units": {"$last": "$units"},
        }},
        {"$set": {"mr": walk}},
        {"$set": {"mr_mean": {"$cond": [{"$gt": ["$mr.k", 0]}, {"$divide": ["$mr.sum", "$mr.k"]}, None]},
                  "values": {"$slice": ["$values", -max(chart_values, 1)]} if chart_values else "$$REMOVE"}},
        {"$unset": "mr"},
    ]


def histogram_pipeline(match: Mapping[str, Any], bins: Mapping[tuple[str, str, str], Bins]) -> list[dict[str, Any]]:
    """Counts per bin of each measurement in ``bins`` (its start, width and count, from its moments)."""
    branches = [
        {"case": {"$and": [{"$eq": ["$key.product", product]}, {"$eq": ["$key.phase", phase]},
                           {"$eq": ["$key.name", name]}]},
         "then": {"start": b.start, "width": b.width, "count": b.count}}
        for (product, phase, name), b in bins.items()
    ]
    if not branches:
        return [{"$match": {"_id": {"$exists": False}}}]
    return [
        *_numeric_measurements(match),
        {"$match": {"finite": True}},
        {"$set": {"bins": {"$switch": {"branches": branches, "default": None}}}},
        {"$match": {"bins": {"$ne": None}}},
        {"$set": {"bin": {"$min": [{"$max": [0, {"$floor": {"$divide": [
            {"$subtract": ["$value", "$bins.start"]}, "$bins.width"]}}]}, {"$subtract": ["$bins.count", 1]}]}}},
        {"$group": {"_id": {"key": "$key", "bin": "$bin"}, "n": {"$sum": 1}}},
    ]


#: Limits are read from the newest runs of the period: what the measurements are judged by now.
LIMITS_FROM_RUNS = 1000


def limits_pipeline(match: Mapping[str, Any], newest: int = LIMITS_FROM_RUNS) -> list[dict[str, Any]]:
    """The limits each measurement was judged by in its newest run (of the ``newest`` runs)."""
    last_attempt = {"$let": {"vars": {"a": {"$last": "$$p.attempts"}}, "in": "$$a.measurements"}}
    return [
        {"$match": dict(match)},
        {"$sort": {"started_at": -1, "_id": -1}},
        {"$limit": newest},
        {"$project": {"product": 1, "phases": {"$map": {"input": "$phases", "as": "p",
                                                        "in": {"name": "$$p.name", "m": last_attempt}}}}},
        {"$unwind": "$phases"},
        {"$unwind": "$phases.m"},
        {"$match": {"phases.m.limits": {"$ne": None}}},
        {"$group": {"_id": {"product": "$product", "phase": "$phases.name", "name": "$phases.m.name"},
                    "limits": {"$first": "$phases.m.limits"}}},
    ]


def limits_files_pipeline(match: Mapping[str, Any]) -> list[dict[str, Any]]:
    """How many limits files (by SHA-256) each product's runs were judged by."""
    return [{"$match": dict(match)},
            {"$group": {"_id": "$product", "files": {"$addToSet": "$limits_sha256"}}}]


def statistics_in_database(runs: Any, match: Mapping[str, Any], *,
                           chart_values: int = CHART_VALUES) -> list[MeasurementStatistics]:
    """Every numeric measurement's statistics over the runs ``match`` selects in the ``runs`` collection.

    Four aggregations (moments with the newest values, limits, limits files, histogram counts);
    what comes back to Python is a few numbers and ``chart_values`` values per
    measurement, however many runs there are.
    """
    options = {"allowDiskUse": True}
    found = {_key(d["_id"]): d for d in runs.aggregate(moments_pipeline(match, chart_values), **options)}
    limits = {_key(d["_id"]): d for d in runs.aggregate(limits_pipeline(match), **options)}
    moments_of = {
        key: Moments(int(d["n"]), d["mean"], d["sd"], d["minimum"], d["maximum"], d["mr_mean"], int(d["fails"]),
                     int(d["marginals"]))
        for key, d in found.items()
    }
    limits_of = {key: _limits(limits[key]["limits"]) if key in limits else None for key in found}
    files = {d["_id"]: len(d["files"]) for d in runs.aggregate(limits_files_pipeline(match), **options)}
    bins = {key: b for key, m in moments_of.items() if (b := histogram_bins(m, limits_of[key])) is not None}
    counts: dict[tuple[str, str, str], list[int]] = {key: [0] * b.count for key, b in bins.items()}
    for d in runs.aggregate(histogram_pipeline(match, bins), **options):
        counts[_key(d["_id"]["key"])][int(d["_id"]["bin"])] += int(d["n"])
    return sorted(
        (
            from_moments(*key, moments_of[key], units=found[key].get("units"), limits=limits_of[key],
                         chart_values=tuple(found[key].get("values") or ()), counts=counts.get(key), bins=bins.get(key),
                         limits_changed=files.get(key[0], 0) > 1)
            for key in found
        ),
        key=lambda s: (s.product, s.phase, s.name),
    )


def _key(doc: Mapping[str, Any]) -> tuple[str, str, str]:
    return (doc["product"], doc["phase"], doc["name"])


def _limits(doc: Mapping[str, Any] | None) -> Limits | None:
    if not doc:
        return None
    return Limits(doc.get("low"), doc.get("high"), doc.get("marginal_low"), doc.get("marginal_high"))


def ordered_like(stats: Iterable[MeasurementStatistics], order: Iterable[tuple[str, str, str]]) -> list[MeasurementStatistics]:
    """``stats`` in the given (product, phase, name) order, any others after."""
    rank = {k: i for i, k in enumerate(order)}
    return sorted(stats, key=lambda s: rank.get((s.product, s.phase, s.name), len(rank)))


def outcome_counts_pipeline(match: Mapping[str, Any]) -> list[dict[str, Any]]:
    return [{"$match": dict(match)}, {"$group": {"_id": {"$ifNull": ["$outcome", "RUNNING"]}, "n": {"$sum": 1}}}]


def phase_outcomes_pipeline(match: Mapping[str, Any], outcomes: Iterable[str]) -> list[dict[str, Any]]:
    """How many times each phase ended in one of ``outcomes``, over every run."""
    return [
        {"$match": dict(match)},
        {"$project": {"phases": {"$filter": {"input": "$phases", "as": "p",
                                             "cond": {"$in": ["$$p.outcome", list(outcomes)]}}}}},
        {"$unwind": "$phases"},
        {"$group": {"_id": "$phases.name", "n": {"$sum": 1}}},
    ]


def measurement_failures_pipeline(match: Mapping[str, Any]) -> list[dict[str, Any]]:
    """How many times each (phase, measurement) FAILed in its phase's last attempt, over every run."""
    return [
        {"$match": dict(match)},
        {"$project": {"measurements": {"$filter": {"input": "$measurements", "as": "m",
                                                   "cond": {"$eq": ["$$m.outcome", "FAIL"]}}}}},
        {"$unwind": "$measurements"},
        {"$group": {"_id": {"phase": "$measurements.phase", "name": "$measurements.name"}, "n": {"$sum": 1}}},
    ]


def period_from_database(runs: Any, match: Mapping[str, Any], headers: Iterable[RunHeader], *, product: str,
                         station: str | None = None, since: dt.datetime | None = None,
                         until: dt.datetime | None = None) -> PeriodReport:
    """A period report over the ``runs`` collection: yields from ``headers``, the rest aggregated in the database."""
    options = {"allowDiskUse": True}
    counts = sorted(((d["_id"], int(d["n"])) for d in runs.aggregate(outcome_counts_pipeline(match), **options)),
                    key=lambda kv: (-kv[1], kv[0]))

    def by_phase(outcomes: frozenset[Any]) -> Counter[tuple[str, str | None]]:
        found = runs.aggregate(phase_outcomes_pipeline(match, [o.value for o in outcomes]), **options)
        return Counter({(d["_id"], None): int(d["n"]) for d in found})

    measurements = Counter({(d["_id"]["phase"], d["_id"]["name"]): int(d["n"])
                            for d in runs.aggregate(measurement_failures_pipeline(match), **options)})
    return PeriodReport(
        product=product,
        station=station,
        yields=period_yields(list(headers), since=since, until=until),
        outcome_counts=tuple(counts),
        phase_pareto=pareto(by_phase(FAILURE_OUTCOMES)),
        measurement_pareto=pareto(measurements),
        trouble_pareto=pareto(by_phase(TROUBLE_OUTCOMES)),
        statistics=tuple(statistics_in_database(runs, match)),
    )
