"""Statistics of numeric measurements: capability (Cp, Cpk, Pp, Ppk), histograms, I-MR control charts.

Pure arithmetic, no formatting and no I/O, so the batch page, the exports,
the period reports and the portal show the same numbers. The work is split
where a database can take over: :class:`Moments` is what a set of values
sums to (count, mean, standard deviation, extremes, mean moving range,
fails, marginals); a MongoDB aggregation computes the same fields over
every station's runs (:mod:`reports.quality.pipeline`) and everything after
it (:func:`capability`, :func:`histogram_bins`, :func:`control_limits`) is
shared.

Definitions (printed on the batch page too):

* The values of a measurement are its numeric, finite values in the last
  attempt of its phase, in run order (``started_at``, then run id), retests
  included: every run the station measured. Booleans, text, series, and
  measurements never set or left unjudged (SKIPPED) are not counted. A value that is NaN or
  infinite is counted as a fail, never in the moments.
* **sd** is the sample standard deviation (n - 1), the *overall* sigma.
* **Within sigma** is the mean moving range of consecutive values divided by
  d2 = 1.128 (the individuals chart's estimate): it sees short-term noise,
  not drift between the start and the end of the batch.
* **Cp** = (high - low) / 6 sigma_within; **Cpk** = min(high - mean, mean - low) /
  3 sigma_within, one-sided (Cpu or Cpl) when only one limit exists.
  **Pp** and **Ppk** are the same with the overall sd. None of them exists
  without a limit, with fewer than two values, or with zero spread.
* The **individuals and moving-range chart** has its centre line at the mean
  and 3-sigma limits at mean ± 2.66 × mean moving range (= 3 sigma_within);
  the moving-range chart's upper limit is 3.267 × mean moving range.
* A measurement whose Cpk is below the threshold (1.33 unless the station
  file says otherwise) is *not capable* and is listed first.
"""

from __future__ import annotations

import math
from array import array
from collections.abc import Iterable, Sequence

import attrs

from sequencer.records import Limits, MeasurementOutcome, RunRecord

#: d2 for ranges of two consecutive values: sigma_within = mean moving range / D2.
D2 = 1.128
#: D4 for ranges of two: the moving-range chart's upper control limit is D4 x mean moving range.
D4 = 3.267
#: Cpk below this is "not capable" unless the station file sets ``[quality] cpk_threshold``.
DEFAULT_CPK_THRESHOLD = 1.33
#: Bars of a histogram.
HISTOGRAM_BINS = 24


@attrs.frozen
class Moments:
    """What a measurement's values add up to: all that capability needs, and what a database can compute."""

    n: int
    mean: float | None
    sd: float | None
    minimum: float | None
    maximum: float | None
    #: mean of |x[i] - x[i-1]| over consecutive values in run order (n - 1 ranges)
    mr_mean: float | None
    fails: int = 0
    marginals: int = 0

    @property
    def sigma_within(self) -> float | None:
        return self.mr_mean / D2 if self.mr_mean else None


@attrs.frozen
class Capability:
    """Cp and Cpk (within sigma), Pp and Ppk (overall sd); ``None`` where undefined."""

    cp: float | None
    cpk: float | None
    pp: float | None
    ppk: float | None


@attrs.frozen
class Bins:
    """Equal-width histogram bins: ``count`` bins of ``width`` from ``start``."""

    start: float
    width: float
    count: int

    @property
    def edges(self) -> tuple[float, ...]:
        return tuple(self.start + i * self.width for i in range(self.count + 1))

    def index(self, value: float) -> int:
        """The bin ``value`` falls in; the last bin holds its upper edge."""
        i = int((value - self.start) // self.width) if self.width else 0
        return min(max(i, 0), self.count - 1)


@attrs.frozen
class Histogram:
    bins: Bins
    counts: tuple[int, ...]


@attrs.frozen
class ControlLimits:
    """The individuals (I) and moving-range (MR) charts' centre lines and 3-sigma limits."""

    centre: float
    lower: float
    upper: float
    mr_centre: float
    mr_upper: float


@attrs.frozen
class MeasurementStatistics:
    """Everything the reports show of one numeric measurement of one product."""

    product: str
    phase: str
    name: str
    units: str | None
    #: the limits of the newest run (see ``limits_changed``)
    limits: Limits | None
    moments: Moments
    capability: Capability
    histogram: Histogram | None
    chart: ControlLimits | None
    #: the values in run order (all of them from a batch, the newest from a period in MongoDB)
    values: Sequence[float] = ()
    #: the runs did not all judge it against the same limits
    limits_changed: bool = False

    @property
    def label(self) -> str:
        return f"{self.phase} / {self.name}"

    def capable(self, threshold: float = DEFAULT_CPK_THRESHOLD) -> bool | None:
        """Whether Cpk reaches ``threshold``; ``None`` when Cpk does not exist."""
        cpk = self.capability.cpk
        return None if cpk is None else cpk >= threshold


# -- the arithmetic ---------------------------------------------------------------------------


def moments(values: Sequence[float], *, fails: int = 0, marginals: int = 0) -> Moments:
    """The moments of ``values`` (finite numbers, in run order).

    Summed on values scaled by the largest magnitude, so numbers near the
    largest double give a mean and (possibly infinite) spreads, not an
    overflow error.
    """
    n = len(values)
    if n == 0:
        return Moments(0, None, None, None, None, None, fails, marginals)
    scale = max(abs(x) for x in values) or 1.0
    unit = [x / scale for x in values]
    mean_u = math.fsum(unit) / n
    sd = mr = None
    if n > 1:
        sd = scale * math.sqrt(math.fsum((u - mean_u) ** 2 for u in unit) / (n - 1))
        mr = scale * (math.fsum(abs(b - a) for a, b in zip(unit, unit[1:])) / (n - 1))
    return Moments(n, scale * mean_u, sd, min(values), max(values), mr, fails, marginals)


def capability(m: Moments, limits: Limits | None) -> Capability:
    """Cp, Cpk, Pp and Ppk of ``m`` against ``limits`` (one-sided Cpk and Ppk with one limit)."""
    low, high = (limits.low, limits.high) if limits is not None else (None, None)
    cp, cpk = _indices(m.mean, m.sigma_within if m.n > 1 else None, low, high)
    pp, ppk = _indices(m.mean, m.sd, low, high)
    return Capability(cp, cpk, pp, ppk)


def _indices(mean: float | None, sigma: float | None, low: float | None,
             high: float | None) -> tuple[float | None, float | None]:
    if mean is None or not sigma or (low is None and high is None):
        return None, None
    spread = (high - low) / (6 * sigma) if low is not None and high is not None else None
    sides = [(high - mean) / (3 * sigma)] if high is not None else []
    if low is not None:
        sides.append((mean - low) / (3 * sigma))
    return spread, min(sides)


def control_limits(m: Moments) -> ControlLimits | None:
    """The I-MR charts' lines, or ``None`` with fewer than two values."""
    if m.mean is None or m.mr_mean is None:
        return None
    half = 3 * m.mr_mean / D2
    return ControlLimits(m.mean, m.mean - half, m.mean + half, m.mr_mean, D4 * m.mr_mean)


def histogram_bins(m: Moments, limits: Limits | None, count: int = HISTOGRAM_BINS) -> Bins | None:
    """Bins spanning the values and the limits, so a reader sees where the spread sits between them."""
    if m.minimum is None or m.maximum is None:
        return None
    ends = [m.minimum, m.maximum]
    if limits is not None:
        ends += [x for x in (limits.low, limits.high) if x is not None and math.isfinite(x)]
    lo, hi = min(ends), max(ends)
    if not math.isfinite(hi - lo):  # values near the largest double: no bin width can span them
        return None
    if hi == lo:
        pad = abs(lo) * 0.05 or 1.0
        lo, hi = lo - pad, hi + pad
    else:
        pad = (hi - lo) * 0.04
        lo, hi = lo - pad, hi + pad
    width = (hi - lo) / count
    if not (math.isfinite(lo) and math.isfinite(width) and width > 0):
        return None  # padded past the largest double, or a span below its precision
    return Bins(lo, width, count)


def histogram(values: Iterable[float], bins: Bins) -> Histogram:
    counts = [0] * bins.count
    for v in values:
        counts[bins.index(v)] += 1
    return Histogram(bins, tuple(counts))


def statistics_of(product: str, phase: str, name: str, values: Sequence[float], *, units: str | None = None,
                  limits: Limits | None = None, fails: int = 0, marginals: int = 0,
                  limits_changed: bool = False) -> MeasurementStatistics:
    """All of a measurement's statistics from its values in run order."""
    m = moments(values, fails=fails, marginals=marginals)
    return from_moments(product, phase, name, m, units=units, limits=limits, values=values,
                        limits_changed=limits_changed)


def from_moments(product: str, phase: str, name: str, m: Moments, *, units: str | None, limits: Limits | None,
                 values: Sequence[float] = (), counts: Sequence[int] | None = None, bins: Bins | None = None,
                 limits_changed: bool = False) -> MeasurementStatistics:
    """Statistics from moments computed elsewhere (a database), with the histogram counted there too.

    Without ``counts`` the histogram is counted from ``values``.
    """
    bins = bins or histogram_bins(m, limits)
    if bins is None:
        hist = None
    elif counts is not None:
        hist = Histogram(bins, tuple(counts))
    else:
        hist = histogram(values, bins)
    return MeasurementStatistics(product, phase, name, units, limits, m, capability(m, limits), hist,
                                 control_limits(m), values, limits_changed)


def worst_first(stats: Iterable[MeasurementStatistics],
                threshold: float = DEFAULT_CPK_THRESHOLD) -> list[MeasurementStatistics]:
    """Measurements not capable (Cpk below ``threshold``) first, lowest Cpk first; then the rest as given."""
    listed = list(stats)
    low = sorted((s for s in listed if s.capable(threshold) is False), key=lambda s: s.capability.cpk)
    return low + [s for s in listed if s.capable(threshold) is not False]


# -- from run records -------------------------------------------------------------------------


#: Values no limit judged (never set; set in a phase that asked to skip or repeat): they decide nothing.
_NOT_JUDGED = frozenset({MeasurementOutcome.UNSET, MeasurementOutcome.SKIPPED})


def is_numeric(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class _Samples:
    __slots__ = ("values", "fails", "marginals", "units", "limits", "limits_changed")

    def __init__(self) -> None:
        self.values = array("d")
        self.fails = 0
        self.marginals = 0
        self.units: str | None = None
        self.limits: Limits | None = None
        self.limits_changed = False


def measurement_statistics(ordered: Iterable[RunRecord]) -> list[MeasurementStatistics]:
    """Statistics of every numeric measurement of ``ordered`` (oldest run first), per product, phase and name.

    In the order the measurements first appear (a product's phase order).
    """
    samples: dict[tuple[str, str, str], _Samples] = {}
    for run in ordered:
        for p in run.phases:
            for m in p.measurements:
                if m.dimensions or m.outcome in _NOT_JUDGED or not is_numeric(m.value):
                    continue
                s = samples.get((run.product, p.name, m.name))
                if s is None:
                    s = samples[(run.product, p.name, m.name)] = _Samples()
                elif m.limits != s.limits:
                    s.limits_changed = True
                s.units, s.limits = m.units, m.limits
                try:
                    value = float(m.value)
                except OverflowError:  # an integer beyond a double: not a quantity to average
                    value = math.inf
                if math.isfinite(value):
                    s.values.append(value)
                s.fails += m.outcome is MeasurementOutcome.FAIL
                s.marginals += m.marginal
    return [
        statistics_of(product, phase, name, s.values, units=s.units, limits=s.limits, fails=s.fails,
                      marginals=s.marginals, limits_changed=s.limits_changed)
        for (product, phase, name), s in samples.items()
    ]
