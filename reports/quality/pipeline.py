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
from reports.quality.statistics import HISTOGRAM_BINS, Bins, MeasurementStatistics, Moments, from_moments
from reports.quality.yields import FAILURE_OUTCOMES, TROUBLE_OUTCOMES, pareto
from sequencer.records import Limits

#: The newest values of each measurement a period's control chart draws.
CHART_VALUES = 500

def _finite(x: Any) -> dict[str, Any]:
    """``x`` is neither infinite nor NaN.

    Not ``x == x``: MongoDB compares NaN equal to itself, and below every
    number, so it is outside (-inf, inf) as the infinities are.
    """
    return {"$and": [{"$gt": [x, -math.inf]}, {"$lt": [x, math.inf]}]}


def _key_lookup(table: Mapping[tuple[str, str, str], Any]) -> dict[str, Any]:
    """An expression: ``table``'s entry for the group's ``_id`` ({product, phase, name}), else null.

    Keys and values go in as literals (a measurement named ``$x`` is text).
    """
    keys = [{"product": k[0], "phase": k[1], "name": k[2]} for k in table]
    found = {"$indexOfArray": [{"$literal": keys}, "$_id"]}
    return {"$let": {"vars": {"i": found}, "in": {"$cond": [
        {"$lt": ["$$i", 0]}, None, {"$arrayElemAt": [{"$literal": list(table.values())}, "$$i"]}]}}}


def _bins_expression(limits: Mapping[tuple[str, str, str], Limits | None], count: int) -> dict[str, Any]:
    """:func:`reports.quality.statistics.histogram_bins`, step for step (so the same doubles), in the database.

    Over a group's ``minimum`` and ``maximum`` and its limits (looked up by
    ``_id``); ``{start, width}`` or null where Python's gives ``None``.
    """
    ends = _key_lookup({k: [x for x in (lim.low, lim.high) if x is not None and math.isfinite(x)]
                        for k, lim in limits.items() if lim is not None})
    lo_hi = {"lo": {"$min": {"$concatArrays": [["$minimum", "$maximum"], "$$ends"]}},
             "hi": {"$max": {"$concatArrays": [["$minimum", "$maximum"], "$$ends"]}}}
    same_pad = {"$let": {"vars": {"p": {"$multiply": [{"$abs": "$$lo"}, 0.05]}},
                         "in": {"$cond": [{"$eq": ["$$p", 0]}, 1.0, "$$p"]}}}
    pad = {"$cond": [{"$eq": ["$$hi", "$$lo"]}, same_pad, {"$multiply": [{"$subtract": ["$$hi", "$$lo"]}, 0.04]}]}
    padded = {"$let": {"vars": {"pad": pad}, "in": {
        "start": {"$subtract": ["$$lo", "$$pad"]},
        "width": {"$divide": [{"$subtract": [{"$add": ["$$hi", "$$pad"]}, {"$subtract": ["$$lo", "$$pad"]}]}, count]},
    }}}
    checked = {"$let": {"vars": {"b": padded}, "in": {"$cond": [
        {"$and": [_finite("$$b.start"), _finite("$$b.width"), {"$gt": ["$$b.width", 0]}]}, "$$b", None]}}}
    return {"$cond": [
        {"$eq": ["$minimum", None]}, None,
        {"$let": {"vars": {"ends": {"$ifNull": [ends, []]}}, "in": {"$let": {"vars": lo_hi, "in": {"$cond": [
            _finite({"$subtract": ["$$hi", "$$lo"]}), checked, None]}}}}},
    ]}


def _bin_of(value: Any, count: int) -> dict[str, Any]:
    """:meth:`reports.quality.statistics.Bins.index` of ``value``: Python's float ``//``, then clamped.

    ``a // w`` is not ``floor(a / w)`` (``1 // 0.1`` is 9, ``1 / 0.1`` rounds
    to 10); CPython takes the remainder first, and so does this.
    """
    a = {"$subtract": [value, "$start"]}
    floordiv = {"$let": {"vars": {"a": a}, "in": {"$let": {
        "vars": {"d": {"$divide": [{"$subtract": ["$$a", {"$mod": ["$$a", "$width"]}]}, "$width"]}},
        "in": {"$let": {"vars": {"f": {"$floor": "$$d"}}, "in": {
            "$cond": [{"$gt": [{"$subtract": ["$$d", "$$f"]}, 0.5]}, {"$add": ["$$f", 1]}, "$$f"]}}},
    }}}}
    return {"$min": [{"$max": [{"$toInt": floordiv}, 0]}, count - 1]}


def statistics_pipeline(match: Mapping[str, Any], limits: Mapping[tuple[str, str, str], Limits | None], *,
                        chart_values: int = 0, bins: int = HISTOGRAM_BINS) -> list[dict[str, Any]]:
    """One document with two lists: ``moments``, a document per (product, phase, measurement) with the
    fields of :class:`Moments`, its units and its newest ``chart_values`` values; ``histograms``, the
    count of each (measurement, bin).

    The runs are read once, in run order (``started_at``, then run id: the
    ``product, started_at, _id`` index gives it without a sort), their flat
    ``measurements`` unwound and filtered by the query matcher (numeric,
    judged), and each measurement's values pushed in that order. The rest is
    arithmetic on those arrays, in the server: the moments, the moving
    ranges of consecutive values, the histogram's bins from the extremes and
    ``limits`` (as Python makes them), and the counts per bin. Per-value
    expressions are kept few: they are what a period of 100,000 runs costs.
    """
    values = "$values"
    size = {"$size": values}
    consecutive = {"$zip": {"inputs": [{"$slice": [values, 0, {"$max": [{"$subtract": [size, 1]}, 1]}]},
                                       {"$slice": [values, 1, {"$max": [size, 1]}]}]}}
    ranges = {"$map": {"input": consecutive, "as": "p", "in": {"$abs": {"$subtract": [
        {"$arrayElemAt": ["$$p", 1]}, {"$arrayElemAt": ["$$p", 0]}]}}}}
    return [
        {"$match": dict(match)},
        {"$sort": {"started_at": 1, "_id": 1}},
        {"$project": {"_id": 0, "product": 1, "measurements": 1}},
        {"$unwind": "$measurements"},
        {"$match": {"measurements.value": {"$type": "number"}, "measurements.outcome": {"$nin": ["UNSET", "SKIPPED"]}}},
        {"$group": {
            "_id": {"product": "$product", "phase": "$measurements.phase", "name": "$measurements.name"},
            "all": {"$push": "$measurements.value"},
            "fails": {"$sum": {"$cond": [{"$eq": ["$measurements.outcome", "FAIL"]}, 1, 0]}},
            "marginals": {"$sum": {"$cond": ["$measurements.marginal", 1, 0]}},
            "units": {"$last": "$measurements.units"},
        }},
        # NaN and infinities are fails, never values (as in Python).
        {"$set": {"values": {"$filter": {"input": {"$map": {"input": "$all", "in": {"$toDouble": "$$this"}}},
                                         "cond": _finite("$$this")}}, "all": "$$REMOVE"}},
        {"$set": {"n": size, "mean": {"$avg": values}, "sd": {"$stdDevSamp": values},
                  "minimum": {"$min": values}, "maximum": {"$max": values}}},
        {"$set": {"mr_mean": {"$cond": [{"$gt": ["$n", 1]}, {"$avg": ranges}, None]}}},
        {"$set": {"bins": _bins_expression(limits, bins)}},
        {"$facet": {
            "moments": [{"$set": {"values": {"$slice": [values, -max(chart_values, 1)]} if chart_values
                                  else "$$REMOVE"}}],
            "histograms": [
                {"$match": {"bins": {"$ne": None}}},
                {"$project": {"values": 1, "start": "$bins.start", "width": "$bins.width"}},
                {"$unwind": values},
                {"$group": {"_id": {"key": "$_id", "bin": _bin_of(values, bins)}, "n": {"$sum": 1}}},
            ],
        }},
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

    Three aggregations: the limits (of the newest runs), the limits files,
    and :func:`statistics_pipeline`, which reads the runs once. What comes
    back to Python is a few numbers, the bins' counts and ``chart_values``
    values per measurement, however many runs there are.
    """
    options = {"allowDiskUse": True}
    limits_of = {_key(d["_id"]): _limits(d["limits"]) for d in runs.aggregate(limits_pipeline(match), **options)}
    files = {d["_id"]: len(d["files"]) for d in runs.aggregate(limits_files_pipeline(match), **options)}
    [found] = runs.aggregate(statistics_pipeline(match, limits_of, chart_values=chart_values), **options)
    counts: dict[tuple[str, str, str], list[int]] = {}
    for d in found["histograms"]:
        counts.setdefault(_key(d["_id"]["key"]), [0] * HISTOGRAM_BINS)[int(d["_id"]["bin"])] += int(d["n"])
    out = []
    for d in found["moments"]:
        key = _key(d["_id"])
        m = Moments(int(d["n"]), d["mean"], d["sd"], d["minimum"], d["maximum"], d["mr_mean"], int(d["fails"]),
                    int(d["marginals"]))
        limits = limits_of.get(key)
        b = d.get("bins")
        bins = Bins(b["start"], b["width"], HISTOGRAM_BINS) if b else None
        out.append(from_moments(*key, m, units=d.get("units"), limits=limits, chart_values=tuple(d.get("values") or ()),
                                counts=counts.get(key, [0] * HISTOGRAM_BINS) if bins else None, bins=bins,
                                limits_changed=files.get(key[0], 0) > 1))
    return sorted(out, key=lambda s: (s.product, s.phase, s.name))


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


def outcomes_pipeline(match: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One document: how the runs ended (``counts``), and how many times each phase ended FAIL (``failures``)
    or in station trouble (``trouble``), and each (phase, measurement) FAILed in its phase's last attempt
    (``measurements``): the runs read once, each cut to those few fields before the four tallies."""
    failing, trouble = [o.value for o in FAILURE_OUTCOMES], [o.value for o in TROUBLE_OUTCOMES]

    def phases_ending(outcomes: list[str]) -> dict[str, Any]:
        return {"$map": {"input": {"$filter": {"input": "$phases", "as": "p",
                                               "cond": {"$in": ["$$p.outcome", outcomes]}}},
                         "as": "p", "in": "$$p.name"}}

    def count(field: str, key: Any) -> list[dict[str, Any]]:
        return [{"$unwind": f"${field}"}, {"$group": {"_id": key, "n": {"$sum": 1}}}]

    return [
        {"$match": dict(match)},
        {"$project": {
            "_id": 0,
            "outcome": {"$ifNull": ["$outcome", "RUNNING"]},
            "failures": phases_ending(failing),
            "trouble": phases_ending(trouble),
            "measurements": {"$map": {
                "input": {"$filter": {"input": "$measurements", "as": "m", "cond": {"$eq": ["$$m.outcome", "FAIL"]}}},
                "as": "m", "in": {"phase": "$$m.phase", "name": "$$m.name"}}},
        }},
        {"$facet": {
            "counts": [{"$group": {"_id": "$outcome", "n": {"$sum": 1}}}],
            "failures": count("failures", "$failures"),
            "trouble": count("trouble", "$trouble"),
            "measurements": count("measurements", "$measurements"),
        }},
    ]


def period_from_database(runs: Any, match: Mapping[str, Any], headers: Iterable[RunHeader], *, product: str,
                         station: str | None = None, since: dt.datetime | None = None,
                         until: dt.datetime | None = None) -> PeriodReport:
    """A period report over the ``runs`` collection: yields from ``headers`` (streamed, kept per unit, not per
    run), the rest aggregated in the database."""
    options = {"allowDiskUse": True}
    [found] = runs.aggregate(outcomes_pipeline(match), **options)
    counts = sorted(((d["_id"], int(d["n"])) for d in found["counts"]), key=lambda kv: (-kv[1], kv[0]))
    measurements = Counter({(d["_id"]["phase"], d["_id"]["name"]): int(d["n"]) for d in found["measurements"]})
    return PeriodReport(
        product=product,
        station=station,
        yields=period_yields(headers, since=since, until=until),
        outcome_counts=tuple(counts),
        phase_pareto=pareto(Counter({(d["_id"], None): int(d["n"]) for d in found["failures"]})),
        measurement_pareto=pareto(measurements),
        trouble_pareto=pareto(Counter({(d["_id"], None): int(d["n"]) for d in found["trouble"]})),
        statistics=tuple(statistics_in_database(runs, match)),
    )
