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
from reports.quality.statistics import HISTOGRAM_BINS, MeasurementStatistics, Moments, from_moments, histogram_bins
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


def _key_lookup(table: Mapping[tuple[str, str, str], Any], key: Any = "$_id") -> dict[str, Any]:
    """An expression: ``table``'s entry for ``key`` ({product, phase, name}: a group's ``_id``), else null.

    Keys and values go in as literals (a measurement named ``$x`` is text).
    """
    keys = [{"product": k[0], "phase": k[1], "name": k[2]} for k in table]
    found = {"$indexOfArray": [{"$literal": keys}, key]}
    return {"$let": {"vars": {"i": found}, "in": {"$cond": [
        {"$lt": ["$$i", 0]}, None, {"$arrayElemAt": [{"$literal": list(table.values())}, "$$i"]}]}}}


def _bins_expression(limits: Mapping[tuple[str, str, str], Limits | None], count: int,
                     key: Any = "$_id") -> dict[str, Any]:
    """:func:`reports.quality.statistics.histogram_bins`, step for step (so the same doubles), in the database.

    Over a document's ``minimum`` and ``maximum`` and its limits (looked up by
    ``key``); ``{start, width}`` or null where Python's gives ``None``.
    """
    ends = _key_lookup({k: [x for x in (lim.low, lim.high) if x is not None and math.isfinite(x)]
                        for k, lim in limits.items() if lim is not None}, key)
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


#: Runs a chunk of :func:`statistics_pipeline` holds on average: each measurement's values are pushed a chunk at
#: a time (in run order), so no array grows with the period (a 16 MB document holds about a million values).
CHUNK_RUNS = 256
#: At most this many chunks (a deeper search per run beyond); 4,096 chunks of a million values each is far
#: beyond any period.
MAX_CHUNKS = 4096


def chunk_bounds(runs: Any, match: Mapping[str, Any], count: int, chunk_runs: int = CHUNK_RUNS) -> list[Any]:
    """Where the chunks of :func:`statistics_pipeline` start: ``started_at`` values splitting the ``count`` runs
    ``match`` selects into parts of about ``chunk_runs`` runs (``$bucketAuto``: equal counts, however the
    runs are spread in time; runs that started at the same instant stay together)."""
    buckets = min(max(math.ceil(count / chunk_runs), 1), MAX_CHUNKS)
    found = runs.aggregate([{"$match": dict(match)}, {"$bucketAuto": {"groupBy": "$started_at", "buckets": buckets}}],
                           allowDiskUse=True)
    return [d["_id"]["min"] for d in found]


def _chunk_of(bounds: list[Any], lo: int = 0, hi: int | None = None) -> Any:
    """The index of the chunk a run's ``started_at`` falls in: a binary search of ``bounds`` as nested $cond
    (a dozen comparisons a run for 4,096 chunks)."""
    hi = len(bounds) if hi is None else hi
    if hi - lo <= 1:
        return {"$literal": lo}  # a bare 0 in $project would mean: leave the field out
    mid = (lo + hi) // 2
    return {"$cond": [{"$lt": ["$started_at", bounds[mid]]}, _chunk_of(bounds, lo, mid), _chunk_of(bounds, mid, hi)]}


def statistics_pipeline(match: Mapping[str, Any], limits: Mapping[tuple[str, str, str], Limits | None],
                        bounds: list[Any], *, chart_values: int = 0,
                        bins: int = HISTOGRAM_BINS) -> list[dict[str, Any]]:
    """One document with two lists: ``moments``, a document per (product, phase, measurement) with the
    fields of :class:`Moments` (``m2``, ``mr`` and ``total`` as sums: :func:`_moments` divides), its units
    and its newest ``chart_values`` values (``tails``, a part per chunk); ``histograms``, the count of each
    (measurement, bin).

    The runs are read once, in run order (``started_at``, then run id: the
    ``product, started_at, _id`` index gives it without a sort), their flat
    ``measurements`` unwound and filtered by the query matcher (numeric,
    judged), and each measurement's values pushed in that order a *chunk*
    at a time (``bounds``: :func:`chunk_bounds`), never into one array: a
    chunk is some :data:`CHUNK_RUNS` runs, so a million runs make some
    4,000 small arrays per measurement, not one beyond 16 MB. Each chunk is
    summed (count, sum, mean, sd, extremes, its first and last value and the
    moving ranges inside it); a window over each measurement's chunks in
    order gives the moving range across each chunk boundary (``$shift``),
    the extremes, the mean, and the values after each chunk (so only the
    newest ``chart_values`` are kept). The histogram's bins come from the
    extremes and ``limits`` as Python makes them; each chunk's values are
    then counted per bin. Per-value expressions are kept few: they are what
    a period of 100,000 runs costs.
    """
    v = "$v"
    size = {"$size": v}
    consecutive = {"$zip": {"inputs": [{"$slice": [v, 0, {"$max": [{"$subtract": [size, 1]}, 1]}]},
                                       {"$slice": [v, 1, {"$max": [size, 1]}]}]}}
    ranges = {"$map": {"input": consecutive, "as": "p", "in": {"$abs": {"$subtract": [
        {"$arrayElemAt": ["$$p", 1]}, {"$arrayElemAt": ["$$p", 0]}]}}}}
    key = {"product": "$_id.product", "phase": "$_id.phase", "name": "$_id.name"}
    whole = {"documents": ["unbounded", "unbounded"]}
    has = {"$gt": ["$n", 0]}
    sd = {"$ifNull": ["$sd", 0]}
    off = {"$subtract": ["$avg", "$mean"]}
    keep = max(chart_values, 0)
    return [
        {"$match": dict(match)},
        {"$sort": {"started_at": 1, "_id": 1}},
        {"$project": {"_id": 0, "product": 1, "c": _chunk_of(bounds), "measurements": 1}},
        {"$unwind": "$measurements"},
        {"$match": {"measurements.value": {"$type": "number"}, "measurements.outcome": {"$nin": ["UNSET", "SKIPPED"]}}},
        {"$group": {
            "_id": {"product": "$product", "phase": "$measurements.phase", "name": "$measurements.name", "c": "$c"},
            "all": {"$push": "$measurements.value"},
            "fails": {"$sum": {"$cond": [{"$eq": ["$measurements.outcome", "FAIL"]}, 1, 0]}},
            "marginals": {"$sum": {"$cond": ["$measurements.marginal", 1, 0]}},
            "units": {"$last": "$measurements.units"},
        }},
        # NaN and infinities are fails, never values (as in Python).
        {"$set": {"v": {"$filter": {"input": {"$map": {"input": "$all", "in": {"$toDouble": "$$this"}}},
                                    "cond": _finite("$$this")}}, "all": "$$REMOVE"}},
        {"$set": {"n": size, "sum": {"$sum": v}, "avg": {"$avg": v}, "sd": {"$stdDevSamp": v}, "lo": {"$min": v},
                  "hi": {"$max": v}, "first": {"$first": v}, "last": {"$last": v}, "mr": {"$sum": ranges}}},
        # A chunk with no value (every one NaN) is a partition of its own: it breaks no moving range.
        {"$setWindowFields": {
            "partitionBy": {"product": "$_id.product", "phase": "$_id.phase", "name": "$_id.name", "has": has},
            "sortBy": {"_id.c": 1},
            "output": {
                "prev": {"$shift": {"output": "$last", "by": -1}},
                "minimum": {"$min": "$lo", "window": whole},
                "maximum": {"$max": "$hi", "window": whole},
                "total": {"$sum": "$sum", "window": whole},
                "count": {"$sum": "$n", "window": whole},
                "later": {"$sum": "$n", "window": {"documents": [1, "unbounded"]}},
            },
        }},
        {"$set": {"mean": {"$cond": [{"$gt": ["$count", 0]}, {"$divide": ["$total", "$count"]}, None]}}},
        {"$set": {
            "mr": {"$add": ["$mr", {"$cond": [{"$and": [has, {"$ne": [{"$ifNull": ["$prev", None]}, None]}]},
                                              {"$abs": {"$subtract": ["$first", "$prev"]}}, 0]}]},
            # Chan's parallel update: each chunk's squares about its own mean, plus its mean's offset.
            "m2": {"$cond": [has, {"$add": [{"$multiply": [sd, sd, {"$subtract": ["$n", 1]}]},
                                            {"$multiply": ["$n", off, off]}]}, 0]},
            "tail": {"$cond": [{"$and": [has, {"$lt": ["$later", keep]}]},
                               {"$slice": [v, {"$subtract": ["$later", keep]}]}, []]},
            "bins": _bins_expression(limits, bins, key),
        }},
        {"$facet": {
            "moments": [{"$group": {
                "_id": key, "n": {"$sum": "$n"}, "total": {"$sum": "$sum"}, "m2": {"$sum": "$m2"},
                "mr": {"$sum": "$mr"}, "minimum": {"$min": "$lo"}, "maximum": {"$max": "$hi"},
                "fails": {"$sum": "$fails"}, "marginals": {"$sum": "$marginals"},
                "units": {"$bottom": {"sortBy": {"_id.c": 1}, "output": "$units"}},
                "tails": {"$push": {"$cond": [{"$gt": [{"$size": "$tail"}, 0]}, {"c": "$_id.c", "v": "$tail"},
                                              "$$REMOVE"]}},
            }}],
            "histograms": [
                {"$match": {"bins": {"$ne": None}, "n": {"$gt": 0}}},
                {"$project": {"v": 1, "start": "$bins.start", "width": "$bins.width"}},
                {"$unwind": v},
                {"$group": {"_id": {"key": key, "bin": _bin_of(v, bins)}, "n": {"$sum": 1}}},
            ],
        }},
    ]


def _moments(d: Mapping[str, Any]) -> Moments:
    """The :class:`Moments` of a ``moments`` document of :func:`statistics_pipeline`."""
    n = int(d["n"])
    if n == 0:
        return Moments(0, None, None, None, None, None, int(d["fails"]), int(d["marginals"]))
    sd = mr = None
    if n > 1:
        # Equal values have no spread, exactly (as Welford's update in Python gives): not a rounding's worth.
        sd = 0.0 if d["minimum"] == d["maximum"] else math.sqrt(max(d["m2"], 0.0) / (n - 1))
        mr = d["mr"] / (n - 1)
    return Moments(n, d["total"] / n, sd, d["minimum"], d["maximum"], mr, int(d["fails"]), int(d["marginals"]))


def _tail(d: Mapping[str, Any], keep: int) -> tuple[float, ...]:
    """The newest ``keep`` values of a ``moments`` document, its chunks' tails in run order."""
    values = [x for part in sorted(d.get("tails") or (), key=lambda t: t["c"]) for x in part["v"]]
    return tuple(values[-keep:]) if keep else ()


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


def statistics_in_database(runs: Any, match: Mapping[str, Any], *, chart_values: int = CHART_VALUES,
                           files: Mapping[str, int] | None = None, count: int | None = None,
                           chunk_runs: int = CHUNK_RUNS,
                           ) -> list[MeasurementStatistics]:
    """Every numeric measurement's statistics over the runs ``match`` selects in the ``runs`` collection.

    The limits (of the newest runs), the limits files (unless ``files``
    gives each product's count), the chunks' bounds (from ``count`` runs,
    counted unless given) and :func:`statistics_pipeline`, which reads the
    runs once. What comes back to Python is a few numbers, the bins' counts
    and ``chart_values`` values per measurement, however many runs there are.
    """
    options = {"allowDiskUse": True}
    limits_of = {_key(d["_id"]): _limits(d["limits"]) for d in runs.aggregate(limits_pipeline(match), **options)}
    if files is None:
        files = {d["_id"]: len(d["files"]) for d in runs.aggregate(limits_files_pipeline(match), **options)}
    if count is None:
        count = runs.count_documents(dict(match))
    if not count:
        return []
    bounds = chunk_bounds(runs, match, count, chunk_runs)
    [found] = runs.aggregate(statistics_pipeline(match, limits_of, bounds, chart_values=chart_values), **options)
    counts: dict[tuple[str, str, str], list[int]] = {}
    for d in found["histograms"]:
        counts.setdefault(_key(d["_id"]["key"]), [0] * HISTOGRAM_BINS)[int(d["_id"]["bin"])] += int(d["n"])
    out = []
    for d in found["moments"]:
        key = _key(d["_id"])
        m = _moments(d)
        limits = limits_of.get(key)
        bins = histogram_bins(m, limits)
        out.append(from_moments(*key, m, units=d.get("units"), limits=limits, chart_values=_tail(d, chart_values),
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
