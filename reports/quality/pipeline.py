"""A period report and measurement statistics computed inside MongoDB.

A period report over every station's runs cannot load 100,000 runs into
Python, nor keep a few numbers per unit. These aggregation pipelines compute
what :mod:`reports.quality.period` and :mod:`reports.quality.statistics`
compute in Python, over the ``runs`` collection (its flat ``measurements``
array) for any ``$match`` filter: a period, a product, a station, a batch
(the portal passes its own). :func:`period_pipeline` gives the outcome
counts, Paretos and yields (units grouped in the database where the rule of
:mod:`reports.quality.units` does not depend on the runs' order: see
:func:`_yields_facets`); :func:`statistics_pipeline` the same
:class:`Moments` (n, mean, sd, extremes, mean moving range in run order,
fails, marginals), histogram counts and newest values as Python's, summed
a chunk of runs at a time so that no array grows with the runs. What comes
back is a few rows per bucket and a few numbers per measurement.

Every pipeline is built from plain dicts and takes the caller's filter as
its first stage; ``allowDiskUse`` lets the server spill its groups.
"""

from __future__ import annotations

import datetime as dt
import math
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from reports.quality.period import TABLES, PeriodReport, PeriodTally, RunHeader, run_buckets
from reports.quality.statistics import HISTOGRAM_BINS, MeasurementStatistics, Moments, from_moments, histogram_bins
from reports.quality.units import identity_of, normal_value
from reports.quality.yields import FAILURE_OUTCOMES, TROUBLE_OUTCOMES, pareto
from sequencer.records import DEFAULT_IDENTITY, Limits, Outcome

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


def _bin_of(value: Any, count: int, start: Any = "$start", width: Any = "$width") -> dict[str, Any]:
    """:meth:`reports.quality.statistics.Bins.index` of ``value``: Python's float ``//``, then clamped.

    ``a // w`` is not ``floor(a / w)`` (``1 // 0.1`` is 9, ``1 / 0.1`` rounds
    to 10); CPython takes the remainder first, and so does this.
    """
    a = {"$subtract": [value, start]}
    # a - fmod(a, w) is k * w exactly (k = the floor of a / w), so the quotient is within a rounding of k:
    # rounded to the nearest integer (CPython: floor, plus one beyond a half), it is k. No $let: per value.
    floordiv = {"$round": {"$divide": [{"$subtract": [a, {"$mod": [a, width]}]}, width]}}
    return {"$min": [{"$max": [floordiv, 0]}, count - 1]}


def _bin_counts(values: Any, count: int) -> dict[str, Any]:
    """An expression: ``[{bin, n}]`` for each bin of ``count`` (``$bins``: start, width) that ``values`` fall in.

    Without a document per value: the values' bins sorted (``$sortArray``),
    where each bin's run starts found by ``$indexOfArray`` (a bin absent
    starts where the next does), and a bin's count the distance to the next
    start. A handful of expressions per chunk rather than an ``$unwind`` and
    a ``$group`` per value.
    """
    bins = {"$map": {"input": values, "in": _bin_of("$$this", count, "$bins.start", "$bins.width")}}
    starts = {"$reduce": {"input": list(range(count - 1, -1, -1)), "initialValue": [{"$size": "$$sorted"}], "in": {
        "$let": {"vars": {"i": {"$indexOfArray": ["$$sorted", "$$this"]}}, "in": {"$concatArrays": [
            [{"$cond": [{"$gte": ["$$i", 0]}, "$$i", {"$arrayElemAt": ["$$value", 0]}]}], "$$value"]}}}}}
    each = {"$map": {"input": list(range(count)), "as": "b", "in": {
        "bin": "$$b", "n": {"$subtract": [{"$arrayElemAt": ["$$starts", {"$add": ["$$b", 1]}]},
                                          {"$arrayElemAt": ["$$starts", "$$b"]}]}}}}
    return {"$let": {"vars": {"sorted": {"$sortArray": {"input": bins, "sortBy": 1}}}, "in": {
        "$let": {"vars": {"starts": starts}, "in": {"$filter": {"input": each, "cond": {"$gt": ["$$this.n", 0]}}}}}}}


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
    ``measurements`` filtered (numeric, judged) and unwound, and each
    measurement's values pushed in that order a *chunk*
    at a time (``bounds``: :func:`chunk_bounds`), never into one array: a
    chunk is some :data:`CHUNK_RUNS` runs, so a million runs make some
    4,000 small arrays per measurement, not one beyond 16 MB. Each chunk is
    summed (count, sum, mean, sd, extremes, its first and last value and the
    moving ranges inside it); a window over each measurement's chunks in
    order gives the moving range across each chunk boundary (``$shift``),
    the extremes, the mean, and the values after each chunk (so only the
    newest ``chart_values`` are kept). The histogram's bins come from the
    extremes and ``limits`` as Python makes them; each chunk's values are
    then counted per bin (:func:`_bin_counts`). Per-value expressions are
    kept few: they are what a period of 100,000 runs costs.
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
        # numeric and judged: filtered before they are unwound (a third of the cost of a $match after)
        {"$project": {"_id": 0, "product": 1, "c": _chunk_of(bounds), "measurements": {"$filter": {
            "input": "$measurements", "as": "m", "cond": {"$and": [
                {"$isNumber": "$$m.value"}, {"$not": [{"$in": ["$$m.outcome", ["UNSET", "SKIPPED"]]}]}]}}}}},
        {"$unwind": "$measurements"},
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
        {"$set": {"hist": {"$cond": [{"$and": [has, {"$ne": ["$bins", None]}]}, _bin_counts(v, bins), []]},
                  "v": "$$REMOVE"}},
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
                {"$project": {"hist": 1}},
                {"$unwind": "$hist"},
                {"$group": {"_id": {"key": key, "bin": "$hist.bin"}, "n": {"$sum": "$hist.n"}}},
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
                           chunk_runs: int = CHUNK_RUNS, bounds: list[Any] | None = None,
                           ) -> list[MeasurementStatistics]:
    """Every numeric measurement's statistics over the runs ``match`` selects in the ``runs`` collection.

    The limits (of the newest runs), the limits files (unless ``files``
    gives each product's count), the chunks' bounds (unless ``bounds`` gives
    them: from ``count`` runs, counted unless given) and
    :func:`statistics_pipeline`, which reads the runs once. What comes back
    to Python is a few numbers, the bins' counts and ``chart_values`` values
    per measurement, however many runs there are.
    """
    if files is None:
        found = runs.aggregate(limits_files_pipeline(match), allowDiskUse=True)
        files = {d["_id"]: len(d["files"]) for d in found}
    return _statistics_from(*_statistics_documents(runs, match, chart_values=chart_values, count=count,
                                                   chunk_runs=chunk_runs, bounds=bounds), files, chart_values)


def _statistics_documents(runs: Any, match: Mapping[str, Any], *, chart_values: int, count: int | None,
                          chunk_runs: int, bounds: list[Any] | None) -> tuple[dict[Any, Limits | None], Any]:
    """The limits of each measurement, and :func:`statistics_pipeline`'s document (``None`` without runs)."""
    options = {"allowDiskUse": True}
    limits_of = {_key(d["_id"]): _limits(d["limits"]) for d in runs.aggregate(limits_pipeline(match), **options)}
    if bounds is None:
        if count is None:
            count = runs.count_documents(dict(match))
        bounds = chunk_bounds(runs, match, count, chunk_runs) if count else []
    if not bounds:
        return limits_of, None
    [found] = runs.aggregate(statistics_pipeline(match, limits_of, bounds, chart_values=chart_values), **options)
    return limits_of, found


def _statistics_from(limits_of: Mapping[tuple[str, str, str], Limits | None], found: Any, files: Mapping[str, int],
                     chart_values: int) -> list[MeasurementStatistics]:
    if found is None:
        return []
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


# -- a period's yields, in the database ---------------------------------------------------------------

#: What Python's ``str.strip()`` strips (``$trim`` by default strips another set: NUL, but not \x1c-\x1f).
_WHITESPACE = "".join(c for c in map(chr, range(0x110000)) if c.isspace())
#: Separators of the strings the units are grouped by (an identity value, a run's identity): control characters
#: no product, key or value has (one that does is grouped in Python: ``odd``).
_SEP, _JOIN, _MARK = "\x1f", "\x1e", "\x1d"
#: A period whose units need Python's rule for more identity values than this streams every run's header
#: (the units' index then grows with them: see :func:`period_from_database`).
TANGLED_MAX = 10_000
#: The runs listed with each shared identity value (a MAC-only run and its retest are two): with them all, the
#: runs to put right are read by id; a value with more runs has them found by their identity in the database.
SHARED_RUNS = 8


def _identity_pairs() -> dict[str, Any]:
    """An expression: the run's identity as ``{pairs, odd}``.

    ``pairs``: ``product <US> key <US> normal value`` for each of the run's
    identity keys (its ``identity``, else ``DEFAULT_IDENTITY``) whose ``dut``
    value is text that is not blank: :func:`reports.quality.units.normal_value`
    step for step (stripped of what Python strips; a MAC without ``:-. `` and
    lower case). ``odd``: a value the database cannot normalise as Python
    does (not text; a MAC with non-ASCII characters, which ``$toLower``
    leaves as they are; a separator of these strings in the product, key or
    value): the caller then groups every unit in Python.
    """
    given = {"$ifNull": ["$identity", []]}
    keys = {"$cond": [{"$gt": [{"$size": given}, 0]}, given, list(DEFAULT_IDENTITY)]}
    encoded: Any = "$$k"  # reports.storage.mongo.encode_key, in the database
    for a, b in (("%", "%25"), ("$", "%24"), (".", "%2E"), ("\x00", "%00")):
        encoded = {"$replaceAll": {"input": encoded, "find": {"$literal": a}, "replacement": b}}
    encoded = {"$cond": [{"$eq": ["$$k", ""]}, "%", encoded]}
    field = {"$filter": {"input": "$$dut", "as": "e", "cond": {"$eq": ["$$e.k", encoded]}}}
    raw = {"$let": {"vars": {"f": field}, "in": {"$cond": [{"$gt": [{"$size": "$$f"}, 0]},
                                                            {"$arrayElemAt": ["$$f.v", 0]}, None]}}}
    any_key = {"$map": {"input": keys, "as": "k", "in": _identity_value(
        "$$k", raw, {"$regexMatch": {"input": "$$k", "regex": r"mac\z"}})}}
    # The usual identity (serial, then MAC) read by name: a third of the work of looking each key up.
    usual = [_identity_value({"$literal": k}, f"$dut.{k}", k.endswith("mac")) for k in DEFAULT_IDENTITY]
    each = {"$cond": [{"$in": [{"$ifNull": ["$identity", None]}, [None, [], list(DEFAULT_IDENTITY)]]}, usual, {
        "$let": {"vars": {"dut": {"$objectToArray": {"$ifNull": ["$dut", {}]}}}, "in": any_key}}]}
    return {"$let": {"vars": {"each": each}, "in": {
        "pairs": {"$map": {"input": {"$filter": {"input": "$$each", "cond": {"$ne": ["$$this.pair", None]}}},
                           "in": "$$this.pair"}},
        "odd": {"$anyElementTrue": [{"$map": {"input": "$$each", "in": "$$this.odd"}}]}}}}


def _identity_value(key: Any, raw: Any, mac: Any) -> dict[str, Any]:
    """``{pair, odd}`` of one identity ``key`` whose ``dut`` value is ``raw`` (``mac``: whether it is a MAC)."""
    squeezed: Any = "$$s"
    for ch in ":-. ":
        squeezed = {"$replaceAll": {"input": squeezed, "find": ch, "replacement": ""}}
    return {"$let": {"vars": {"raw": raw}, "in": {"$let": {
        "vars": {"s": {"$cond": [{"$eq": [{"$type": "$$raw"}, "string"]},
                                 {"$trim": {"input": "$$raw", "chars": _WHITESPACE}}, ""]}},
        "in": {
            "pair": {"$cond": [{"$eq": ["$$s", ""]}, None, {"$concat": [
                "$product", _SEP, key, _SEP, {"$cond": [mac, {"$toLower": squeezed}, "$$s"]} if mac is not False
                else "$$s"]}]},
            "odd": {"$or": [{"$not": [{"$in": [{"$type": "$$raw"}, ["string", "null", "missing"]]}]},
                            *([{"$and": [mac, {"$regexMatch": {"input": "$$s", "regex": "[^\\x00-\\x7f]"}}]}]
                              if mac is not False else []),
                            {"$regexMatch": {"input": {"$concat": ["$product", key, "$$s"]},
                                             "regex": "[\\x1d\\x1e\\x1f]"}}]},
        }}}}}




def _run_fields() -> dict[str, Any]:
    """A run's fields for the yields: where and when (``b``, a bucket per table), how it ended, its identity."""
    operator = {"$ifNull": ["$operator", ""]}
    return {
        "product": 1, "t": "$started_at",
        "out": {"$ifNull": ["$outcome", None]},
        "fin": {"$cond": [{"$eq": [{"$ifNull": ["$outcome", None]}, None]}, 0, 1]},
        "b": [
            {"$dateToString": {"date": "$started_at", "format": "%Y-%m-%d", "timezone": "UTC"}},
            {"$dateToString": {"date": "$started_at", "format": "%Y-%m-%d %H:00", "timezone": "UTC"}},
            "$station",
            {"$concat": ["$station", " slot ", {"$toString": "$slot"}]},
            {"$cond": [{"$eq": [operator, ""]}, "(none)", operator]},
        ],
        "id": _identity_pairs(),
    }


def _yields_facets() -> dict[str, list[dict[str, Any]]]:
    """The ``$facet`` branches of a period's yields over :func:`_run_fields` documents.

    ``runs``: runs and passed runs per (table, product, bucket). ``units``:
    the runs grouped by their whole identity (all its values: ``pairs``),
    each group counted as a unit at its first run's buckets (its first and
    last finished outcome), or each run with no identity. ``shared``: the
    identity values more than one such group has (at most
    :data:`TANGLED_MAX` listed, all counted), each with its first
    :data:`SHARED_RUNS` runs' ids and how many runs it has.

    The rule of :class:`reports.quality.units.UnitGrouping` depends on the
    order the runs came in only where runs disagree on their identity (a
    MAC-only run, then the same MAC with a serial; a serial seen with two
    MACs): where they share a value. A group none of whose values another
    group has is one unit, exactly as Python takes it (its runs agree on
    every value and share none with a run outside it). The groups with a
    shared value are put right in Python (:func:`_regroup`).
    """
    by_table = [{"$unwind": {"path": "$b", "includeArrayIndex": "table"}}]
    # a run's identity as one string (its values joined), or its own id (a run with none is a unit of its own)
    pairs = "$id.pairs"
    joined = {"$reduce": {"input": pairs, "initialValue": "", "in": {"$concat": ["$$value", _JOIN, "$$this"]}}}
    unit_key = {"$cond": [{"$gt": [{"$size": pairs}, 0]}, joined, {"$concat": [_MARK, "$_id"]}]}
    # (start, run id, outcome) as a string that sorts in run order: the least is the first finished run's
    when = {"$concat": [{"$dateToString": {"date": "$t", "format": "%Y-%m-%dT%H:%M:%S.%L", "timezone": "UTC"}},
                        _SEP, "$_id", _MARK, "$out"]}
    finished = {"$cond": [{"$eq": ["$fin", 1]}, when, None]}

    def passed(o: str) -> dict[str, Any]:
        last = {"$arrayElemAt": [{"$split": [o, _MARK]}, -1]}
        return {"$cond": [{"$eq": [{"$ifNull": [o, None]}, None]}, 0, {"$cond": [{"$eq": [last, "PASS"]}, 1, 0]}]}

    return {
        "runs": [
            {"$project": {"product": 1, "b": 1, "passed": {"$cond": [{"$eq": ["$out", "PASS"]}, 1, 0]}}},
            *by_table,
            {"$group": {"_id": {"p": "$product", "table": "$table", "b": "$b"}, "runs": {"$sum": 1},
                        "passed": {"$sum": "$passed"}}},
        ],
        "span": [{"$group": {"_id": None, "first": {"$min": "$t"}, "last": {"$max": "$t"},
                             "odd": {"$sum": {"$cond": ["$id.odd", 1, 0]}}}}],
        "units": [
            # each identity's runs (in run order: the first's place), and the first and last finished outcome
            {"$group": {"_id": unit_key, "place": {"$first": "$b"}, "f": {"$min": finished},
                        "l": {"$max": finished}, "p": {"$first": "$product"}}},
            {"$project": {"p": 1, "place": 1, "u": {"$cond": [{"$eq": [{"$ifNull": ["$f", None]}, None]}, 0, 1]},
                          "fp": passed("$f"), "lp": passed("$l")}},
            {"$unwind": {"path": "$place", "includeArrayIndex": "table"}},
            {"$group": {"_id": {"p": "$p", "table": "$table", "b": "$place"}, "units": {"$sum": "$u"},
                        "first_pass": {"$sum": "$fp"}, "final_pass": {"$sum": "$lp"}}},
        ],
        "shared": [
            {"$project": {"key": unit_key, "v": {"$setUnion": [pairs]}}},
            {"$unwind": "$v"},
            {"$group": {"_id": "$v", "low": {"$min": "$key"}, "high": {"$max": "$key"}, "runs": {"$sum": 1},
                        "ids": {"$firstN": {"n": SHARED_RUNS, "input": "$_id"}}}},
            {"$match": {"$expr": {"$ne": ["$low", "$high"]}}},
            {"$group": {"_id": None, "n": {"$sum": 1}, "values": {"$firstN": {
                "n": TANGLED_MAX + 1, "input": {"v": "$_id", "runs": "$runs", "ids": "$ids"}}}}},
        ],
    }


def _regroup(tally: PeriodTally, tangled: Iterable[RunHeader]) -> None:
    """Put right the units of the runs ``tangled`` (oldest first: every run of an identity that has a shared
    value): take back what the database counted for each of their identities as a unit, and count their
    units by Python's rule instead. What is kept is per identity of these runs only."""
    naive: dict[tuple[Any, ...], list[Any]] = {}  # identity -> [product, buckets, first, final]
    for h in tangled:
        tally.add(h)
        key = (h.product, *((k, normal_value(k, v)) for k, v in identity_of(h)))
        unit = naive.get(key)
        if unit is None:
            unit = naive[key] = [h.product, run_buckets(h), None, None]
        if h.outcome is not None:
            if unit[2] is None:
                unit[2] = h.outcome
            unit[3] = h.outcome
    for product, buckets, first, final in naive.values():
        if first is None:
            continue
        for table, bucket in zip(TABLES, buckets, strict=True):
            tally.add_counts(table, product, bucket, units=-1, first_pass_units=-(first is Outcome.PASS),
                             final_pass_units=-(final is Outcome.PASS))


def tangled_stages(shared: Iterable[str]) -> list[dict[str, Any]]:
    """Stages that keep the runs carrying any of the identity values ``shared`` (as :func:`_identity_pairs` makes
    them): each run's values made once, then the query matcher's ``$in`` (a set, not a scan of the list)."""
    return [{"$set": {"_identity": {"$let": {"vars": {"id": _identity_pairs()}, "in": "$$id.pairs"}}}},
            {"$match": {"_identity": {"$in": list(shared)}}}]


def _outcome_fields() -> dict[str, Any]:
    """A run's fields for the outcome counts and Paretos: how it ended, the phases that ended FAIL or in
    station trouble, the measurements that FAILed in their phase's last attempt."""
    failing, trouble = [o.value for o in FAILURE_OUTCOMES], [o.value for o in TROUBLE_OUTCOMES]

    def phases_ending(outcomes: list[str]) -> dict[str, Any]:
        return {"$map": {"input": {"$filter": {"input": "$phases", "as": "p",
                                               "cond": {"$in": ["$$p.outcome", outcomes]}}},
                         "as": "p", "in": "$$p.name"}}

    return {
        "outcome": {"$ifNull": ["$outcome", "RUNNING"]},
        "failures": phases_ending(failing),
        "trouble": phases_ending(trouble),
        "failed": {"$map": {
            "input": {"$filter": {"input": "$measurements", "as": "m", "cond": {"$eq": ["$$m.outcome", "FAIL"]}}},
            "as": "m", "in": {"phase": "$$m.phase", "name": "$$m.name"}}},
    }


def _outcome_facets() -> dict[str, list[dict[str, Any]]]:
    def count(field: str) -> list[dict[str, Any]]:
        return [{"$unwind": f"${field}"}, {"$group": {"_id": f"${field}", "n": {"$sum": 1}}}]

    return {
        "counts": [{"$group": {"_id": "$outcome", "n": {"$sum": 1}}}],
        "failures": count("failures"),
        "trouble": count("trouble"),
        "measurements": count("failed"),
    }


def outcomes_pipeline(match: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One document: how the runs ended (``counts``), and how many times each phase ended FAIL (``failures``)
    or in station trouble (``trouble``), and each (phase, measurement) FAILed in its phase's last attempt
    (``measurements``): the runs read once, each cut to those few fields before the four tallies."""
    return [{"$match": dict(match)}, {"$project": {"_id": 0, **_outcome_fields()}}, {"$facet": _outcome_facets()}]


def period_pipeline(match: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Everything of a period but its measurement statistics, the runs read once: the outcome counts and
    Paretos (:func:`outcomes_pipeline`'s lists), each product's limits files (``files``), and the yields
    (:func:`_yields_facets`: ``runs``, ``span``, ``units``, ``shared``). Each list is a few rows per bucket or product,
    however many runs and units the period has (but the shared identity values, at most
    :data:`TANGLED_MAX`)."""
    return [
        {"$match": dict(match)},
        {"$sort": {"started_at": 1, "_id": 1}},  # the index's order: a unit's first run is its first
        {"$project": {**_outcome_fields(), **_run_fields(), "sha": "$limits_sha256"}},
        {"$facet": {
            **_outcome_facets(),
            "files": [{"$group": {"_id": "$product", "files": {"$addToSet": "$sha"}}}],
            **_yields_facets(),
        }},
    ]


def period_from_database(runs: Any, match: Mapping[str, Any],
                         headers: Callable[[list[dict[str, Any]] | None], Iterable[RunHeader]], *, product: str,
                         station: str | None = None, since: dt.datetime | None = None,
                         until: dt.datetime | None = None, chunk_runs: int = CHUNK_RUNS) -> PeriodReport:
    """A period report over the ``runs`` collection, computed in the database: two aggregations that each
    read the runs once (:func:`period_pipeline`, :func:`statistics_pipeline`), and a count and the newest
    runs' limits from the index.

    ``headers(stages)`` streams the headers of the runs ``match`` selects (and aggregation ``stages`` keep),
    oldest first. Python keeps
    nothing per run or unit, but for the units the database cannot group as Python's rule does
    (:func:`_yields_facets`): the runs that share an identity value with a run of another identity are
    streamed and grouped here (units only: their runs are counted in the database). Where such values are
    more than :data:`TANGLED_MAX`, or an identity value is one the database cannot normalise as Python
    does, every header is streamed to :class:`PeriodTally` instead, as before: exact, and the memory is
    then the units' index.
    """
    count = runs.count_documents(dict(match))
    if not count:
        empty = PeriodTally(count_runs=False).yields(since=since, until=until)
        return PeriodReport(product=product, station=station, yields=empty, outcome_counts=(), phase_pareto=(),
                            measurement_pareto=(), trouble_pareto=(), statistics=())
    bounds = chunk_bounds(runs, match, count, chunk_runs)
    # The two aggregations at once: each keeps a core of the server busy (most of a period's time).
    with ThreadPoolExecutor(max_workers=1) as pool:
        measured = pool.submit(_statistics_documents, runs, match, chart_values=CHART_VALUES, count=count,
                               chunk_runs=chunk_runs, bounds=bounds)
        [found] = runs.aggregate(period_pipeline(match), allowDiskUse=True)
        limits_of, in_db = measured.result()
    counts = sorted(((d["_id"], int(d["n"])) for d in found["counts"]), key=lambda kv: (-kv[1], kv[0]))
    measurements = Counter({(d["_id"]["phase"], d["_id"]["name"]): int(d["n"]) for d in found["measurements"]})
    [span] = found["span"]
    [shared] = found["shared"] or [{"n": 0, "values": []}]
    if span["odd"] or shared["n"] > TANGLED_MAX:
        tally = PeriodTally()
        for h in headers(None):
            tally.add(h)
    else:
        tally = PeriodTally(count_runs=False)
        tally.add_span(span["first"], span["last"])
        for d in found["runs"]:
            k = d["_id"]
            tally.add_counts(TABLES[k["table"]], k["p"], k["b"], runs=int(d["runs"]), passed_runs=int(d["passed"]))
        for d in found["units"]:
            k = d["_id"]
            tally.add_counts(TABLES[k["table"]], k["p"], k["b"], units=int(d["units"]),
                             first_pass_units=int(d["first_pass"]), final_pass_units=int(d["final_pass"]))
        if shared["values"]:
            listed = all(d["runs"] <= len(d["ids"]) for d in shared["values"])
            _regroup(tally, headers(
                [{"$match": {"_id": {"$in": sorted({i for d in shared["values"] for i in d["ids"]})}}}] if listed
                else tangled_stages(d["v"] for d in shared["values"])))
    return PeriodReport(
        product=product,
        station=station,
        yields=tally.yields(since=since, until=until),
        outcome_counts=tuple(counts),
        phase_pareto=pareto(Counter({(d["_id"], None): int(d["n"]) for d in found["failures"]})),
        measurement_pareto=pareto(measurements),
        trouble_pareto=pareto(Counter({(d["_id"], None): int(d["n"]) for d in found["trouble"]})),
        statistics=tuple(_statistics_from(limits_of, in_db, {d["_id"]: len(d["files"]) for d in found["files"]},
                                          CHART_VALUES)),
    )
