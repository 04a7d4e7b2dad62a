"""Statistics of numeric measurements: capability (Cp, Cpk, Pp, Ppk), histograms, I-MR control charts.

Pure arithmetic, no formatting and no I/O, so the batch page, the exports,
the period reports and the portal show the same numbers. The work is split
where a database can take over: :class:`Moments` is what a set of values
sums to (count, mean, standard deviation, extremes, mean moving range,
fails, marginals); a MongoDB aggregation computes the same fields over
every station's runs (:mod:`reports.quality.pipeline`) and everything after
it (:func:`capability`, :func:`histogram_bins`, :func:`control_limits`) is
shared.

Runs are read once, as a stream (:class:`MeasurementTally`), and none is
kept: the moments are summed a value at a time (:class:`RunningMoments`).
Where the histograms and control charts are wanted, each finite value is
kept as well, 8 bytes in an ``array('d')``: 4 MB for 10,000 runs of 50
measurements, where reading those runs back a second time (some 450 MB of
stored JSON made into records again) cost more than the rest of a batch
page together; their moments are then summed from the kept values in one
loop. The moments give the histogram's bins and the control limits, and
the kept values fill the histogram and draw the chart
(:class:`RunOrderChart`: every value while they are few, each pixel
column's range and mean beyond that, and the points beyond the control
limits).

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

import itertools
import math
import operator
from array import array
from collections.abc import Iterable, Sequence

import attrs

from sequencer.records import Limits, MeasurementOutcome, MeasurementRecord, RunRecord

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
    #: the I-MR chart's points in run order (every value from a batch, the newest from a period in MongoDB)
    drawn: RunOrderChart | None = None
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


def moments(values: Iterable[float], *, fails: int = 0, marginals: int = 0) -> Moments:
    """The moments of ``values`` (finite numbers, in run order)."""
    running = RunningMoments()
    running.extend(values)
    return running.moments(fails=fails, marginals=marginals)


def _times_two_to(x: float, e: int) -> float:
    """``x * 2**e``, exactly, or an infinity where that is beyond the largest double."""
    try:
        return math.ldexp(x, e)
    except OverflowError:
        return math.copysign(math.inf, x)


class RunningMoments:
    """The moments of values added one at a time, in run order, keeping none of them.

    The values are summed as multiples of a power of two at least as large
    as the largest magnitude seen (exactly: only the exponent changes), so
    numbers near the largest double give a mean and (possibly infinite)
    spreads, not an overflow error; the scale grows as larger values come.
    The mean and the mean moving range are compensated sums (Neumaier), so a
    mean of exact values is exact; the spread is Welford's update.
    """

    __slots__ = ("n", "_exp", "_sum", "_sum_c", "_mean", "_m2", "_mr", "_mr_c", "_prev", "minimum", "maximum",
                 "mr_peak")

    def __init__(self) -> None:
        self.n = 0
        self._exp = 0
        self._sum = self._sum_c = self._mean = self._m2 = self._mr = self._mr_c = 0.0
        self._prev = 0.0
        self.minimum = math.inf
        self.maximum = -math.inf
        #: the largest moving range (the MR chart's scale)
        self.mr_peak = 0.0

    def add(self, x: float) -> None:
        self.extend((x,))

    def extend(self, values: Iterable[float]) -> None:
        """:meth:`add` each of ``values`` in turn: the same arithmetic, its state in locals for the loop."""
        frexp, ldexp = math.frexp, math.ldexp
        n, exp, prev = self.n, self._exp, self._prev
        s, s_c, mean, m2, mr, mr_c = self._sum, self._sum_c, self._mean, self._m2, self._mr, self._mr_c
        low, high, peak = self.minimum, self.maximum, self.mr_peak
        for x in values:
            e = frexp(x)[1]
            if e > exp or not n:
                if n:
                    shift = exp - e
                    s, s_c, mean = ldexp(s, shift), ldexp(s_c, shift), ldexp(mean, shift)
                    m2 = ldexp(m2, 2 * shift)
                    mr, mr_c = ldexp(mr, shift), ldexp(mr_c, shift)
                exp = e
            u = ldexp(x, -exp)
            n += 1
            total = s + u
            if abs(s) >= abs(u):
                s_c += (s - total) + u
            else:
                s_c += (u - total) + s
            s = total
            delta = u - mean
            mean += delta / n
            m2 += delta * (u - mean)
            if n > 1:
                step = abs(u - ldexp(prev, -exp))
                total = mr + step
                if mr >= step:
                    mr_c += (mr - total) + step
                else:
                    mr_c += (step - total) + mr
                mr = total
                jump = abs(x - prev)
                if jump > peak:
                    peak = jump
            prev = x
            if x < low:
                low = x
            if x > high:
                high = x
        self.n, self._exp, self._prev = n, exp, prev
        self._sum, self._sum_c, self._mean, self._m2, self._mr, self._mr_c = s, s_c, mean, m2, mr, mr_c
        self.minimum, self.maximum, self.mr_peak = low, high, peak

    def moments(self, *, fails: int = 0, marginals: int = 0) -> Moments:
        n = self.n
        if n == 0:
            return Moments(0, None, None, None, None, None, fails, marginals)
        e = self._exp
        mean = _times_two_to((self._sum + self._sum_c) / n, e)
        sd = mr = None
        if n > 1:
            sd = _times_two_to(math.sqrt(max(self._m2, 0.0) / (n - 1)), e)
            mr = _times_two_to((self._mr + self._mr_c) / (n - 1), e)
        return Moments(n, mean, sd, self.minimum, self.maximum, mr, fails, marginals)


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
    start, width, last = bins.start, bins.width, bins.count - 1
    for v in values:  # Bins.index, inline: this loop sees every value of a batch
        i = int((v - start) // width) if width else 0
        counts[0 if i < 0 else last if i > last else i] += 1
    return Histogram(bins, tuple(counts))


# -- the control chart's points ------------------------------------------------------------------

#: Points an I-MR chart draws one by one; beyond, each pixel column is drawn as its range (min to max)
#: and mean, so a batch of 100,000 runs costs what 240 points do and no outlier is hidden.
CHART_COLUMNS = 240


@attrs.frozen
class Trace:
    """One panel of an I-MR chart (the values, or their moving ranges) in run order, as it is drawn.

    Position ``offset + i`` of ``span`` holds the panel's ``i``-th value
    (the moving ranges start at 1: the first value has none).
    """

    count: int
    offset: int
    span: int
    #: every value, while there are at most CHART_COLUMNS of them
    points: tuple[float, ...]
    #: beyond that, each pixel column's (column, lowest, highest, mean)
    columns: tuple[tuple[int, float, float, float], ...]
    #: the first CHART_COLUMNS values beyond the control limits, (index, value)
    beyond: tuple[tuple[int, float], ...]
    low: float
    high: float


@attrs.frozen
class RunOrderChart:
    """What an I-MR chart draws: its two panels, and how many values the measurement has in all."""

    values: Trace
    ranges: Trace
    #: the measurement's values in all; more than ``values.count`` when only the newest are drawn
    total: int


def _trace(vs: Sequence[float], offset: int, span: int, lower: float, upper: float) -> Trace:
    """The :class:`Trace` of ``vs``: each value while they are few, else each pixel column's range and mean.

    Value ``i`` falls in column ``int((offset + i) / span * (CHART_COLUMNS - 1))``,
    which never decreases with ``i``: a column is a slice, found from its
    first value, and summed by ``min``, ``max`` and ``fsum`` rather than a
    value at a time (a batch's chart has tens of thousands of values).
    """
    count = len(vs)
    points: tuple[float, ...] = ()
    columns: list[tuple[int, float, float, float]] = []
    if count <= CHART_COLUMNS:
        points = tuple(vs)
    else:
        scale = CHART_COLUMNS - 1

        def column(i: int) -> int:
            return int((offset + i) / span * scale)

        first = 0
        while first < count:
            c = column(first)
            # the first value past column c: estimated, then made exact with the formula itself
            end = min(max(first + 1, math.ceil((c + 1) * span / scale) - offset), count)
            while end > first + 1 and column(end - 1) != c:
                end -= 1
            while end < count and column(end) == c:
                end += 1
            part = vs[first:end]
            columns.append((c, min(part), max(part), math.fsum(part) / len(part)))
            first = end
    low, high = (min(vs), max(vs)) if count else (math.inf, -math.inf)
    beyond: tuple[tuple[int, float], ...] = ()
    if high > upper or low < lower:  # else no value is beyond them, and none need be looked at
        beyond = tuple(itertools.islice(((i, v) for i, v in enumerate(vs) if v > upper or v < lower), CHART_COLUMNS))
    return Trace(count, offset, span, points, tuple(columns), beyond, low, high)


def run_order_chart(values: Sequence[float], lines: ControlLimits | None, *,
                    total: int | None = None) -> RunOrderChart | None:
    """The chart of ``values`` (in run order; the newest ``len(values)`` of ``total``); ``None`` below two."""
    n = len(values)
    if lines is None or n < 2:
        return None
    span = max(n - 1, 1)
    ranges = list(map(abs, map(operator.sub, values[1:], values[:-1])))
    return RunOrderChart(_trace(values, 0, span, lines.lower, lines.upper),
                         _trace(ranges, 1, span, -math.inf, lines.mr_upper), n if total is None else total)


# -- statistics of a measurement ---------------------------------------------------------------


def statistics_of(product: str, phase: str, name: str, values: Sequence[float], *, units: str | None = None,
                  limits: Limits | None = None, fails: int = 0, marginals: int = 0,
                  limits_changed: bool = False) -> MeasurementStatistics:
    """All of a measurement's statistics from its values in run order."""
    m = moments(values, fails=fails, marginals=marginals)
    return from_moments(product, phase, name, m, units=units, limits=limits, chart_values=values,
                        limits_changed=limits_changed)


def from_moments(product: str, phase: str, name: str, m: Moments, *, units: str | None, limits: Limits | None,
                 chart_values: Sequence[float] = (), counts: Sequence[int] | None = None, bins: Bins | None = None,
                 drawn: RunOrderChart | None = None, limits_changed: bool = False) -> MeasurementStatistics:
    """Statistics from moments computed elsewhere (a stream, a database), with the histogram counted there too.

    Without ``counts`` the histogram is counted from ``chart_values``; without
    ``drawn``, the chart draws ``chart_values`` (the newest ``len(chart_values)`` of ``m.n``).
    """
    bins = bins or histogram_bins(m, limits)
    if bins is None:
        hist = None
    elif counts is not None:
        hist = Histogram(bins, tuple(counts))
    else:
        hist = histogram(chart_values, bins)
    lines = control_limits(m)
    if drawn is None:
        drawn = run_order_chart(chart_values, lines, total=m.n)
    return MeasurementStatistics(product, phase, name, units, limits, m, capability(m, limits), hist,
                                 lines, drawn, limits_changed)


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


class _Measurement:
    __slots__ = ("moments", "fails", "marginals", "units", "limits", "limits_changed", "values")

    def __init__(self, drawing: bool) -> None:
        self.moments = RunningMoments()
        self.fails = 0
        self.marginals = 0
        self.units: str | None = None
        self.limits: Limits | None = None
        self.limits_changed = False
        #: the finite values in run order, for the histogram and the chart (``None``: not drawn)
        self.values: array[float] | None = array("d") if drawing else None


class MeasurementTally:
    """:func:`measurement_statistics` over runs read once as a stream, keeping none of them.

    :meth:`add` every run (oldest first), then take :meth:`statistics`.
    With ``drawing``, each measurement's finite values are kept (8 bytes
    each) so its histogram and control chart can be drawn; without, the
    statistics are the moments and capability alone (what a table shows).
    Measurements come in the order they first appear (a product's phase
    order).
    """

    def __init__(self, *, drawing: bool = False) -> None:
        self._of: dict[tuple[str, str, str], _Measurement] = {}
        self._drawing = drawing

    def add(self, run: RunRecord) -> None:
        """Count each numeric judged measurement of ``run`` (its phases' last attempts).

        A value that is NaN, infinite, or an integer beyond a double counts as a fail, never in the
        moments. This loop sees every measurement of a batch: it is written out, its lookups in locals.
        """
        of, drawing, product, fail = self._of, self._drawing, run.product, MeasurementOutcome.FAIL
        for p in run.phases:
            phase = p.name
            for m in p.measurements:
                if m.dimensions or m.outcome in _NOT_JUDGED:
                    continue
                value = m.value
                if type(value) is not float:
                    if not is_numeric(value):
                        continue
                    try:
                        value = float(value)
                    except OverflowError:  # an integer beyond a double: not a quantity to average
                        value = math.inf
                key = (product, phase, m.name)
                s = of.get(key)
                if s is None:
                    s = of[key] = _Measurement(drawing)
                elif m.limits is not s.limits and m.limits != s.limits:  # read back, equal limits are one object
                    s.limits_changed = True
                s.units, s.limits = m.units, m.limits
                if math.isfinite(value):
                    if s.values is not None:
                        s.values.append(value)  # summed into the moments, all at once, by statistics()
                    else:
                        s.moments.add(value)
                if m.outcome is fail:
                    s.fails += 1
                if m.marginal:
                    s.marginals += 1

    def statistics(self) -> list[MeasurementStatistics]:
        """Every measurement's statistics; with ``drawing``, its histogram and control chart too (else ``None``)."""
        out = []
        for (product, phase, name), s in self._of.items():
            if s.values is not None and s.moments.n < len(s.values):
                s.moments.extend(s.values[s.moments.n:])
            m = s.moments.moments(fails=s.fails, marginals=s.marginals)
            hist = drawn = None
            if s.values is not None:
                hist, drawn = _drawn(s.values, m, s.limits)
            out.append(MeasurementStatistics(product, phase, name, s.units, s.limits, m, capability(m, s.limits),
                                             hist, control_limits(m), drawn, s.limits_changed))
        return out


def measurement_statistics(ordered: Sequence[RunRecord]) -> list[MeasurementStatistics]:
    """Statistics of every numeric measurement of ``ordered`` (oldest run first), per product, phase and name.

    In the order the measurements first appear (a product's phase order).
    """
    tally = MeasurementTally(drawing=True)
    for run in ordered:
        tally.add(run)
    return tally.statistics()


def _drawn(values: Sequence[float], m: Moments, limits: Limits | None) -> tuple[Histogram | None,
                                                                                 RunOrderChart | None]:
    """The histogram and the I-MR chart of ``values`` (run order), whose moments are ``m``."""
    bins = histogram_bins(m, limits)
    return (histogram(values, bins) if bins is not None else None), run_order_chart(values, control_limits(m))
