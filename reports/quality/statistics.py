"""Statistics of numeric measurements: capability (Cp, Cpk, Pp, Ppk), histograms, I-MR control charts.

Pure arithmetic, no formatting and no I/O, so the batch page, the exports,
the period reports and the portal show the same numbers. The work is split
where a database can take over: :class:`Moments` is what a set of values
sums to (count, mean, standard deviation, extremes, mean moving range,
fails, marginals); a MongoDB aggregation computes the same fields over
every station's runs (:mod:`reports.quality.pipeline`) and everything after
it (:func:`capability`, :func:`histogram_bins`, :func:`control_limits`) is
shared.

Nothing here holds a measurement's values: a batch of 100,000 runs is read
as a stream, twice (:class:`MeasurementTally`). The first reading sums the
moments a value at a time (:class:`RunningMoments`); they give the
histogram's bins and the control limits, and the second reading counts the
histogram and draws the control chart (:class:`RunOrderChart`: every value
while they are few, each pixel column's range and mean beyond that, and the
points beyond the control limits).

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
from collections.abc import Iterable, Iterator, Sequence

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
    for x in values:
        running.add(x)
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
        e = math.frexp(x)[1]
        if e > self._exp or not self.n:
            if self.n:
                shift = self._exp - e
                self._sum, self._sum_c = math.ldexp(self._sum, shift), math.ldexp(self._sum_c, shift)
                self._mean = math.ldexp(self._mean, shift)
                self._m2 = math.ldexp(self._m2, 2 * shift)
                self._mr, self._mr_c = math.ldexp(self._mr, shift), math.ldexp(self._mr_c, shift)
            self._exp = e
        u = math.ldexp(x, -self._exp)
        self.n += 1
        total = self._sum + u
        if abs(self._sum) >= abs(u):
            self._sum_c += (self._sum - total) + u
        else:
            self._sum_c += (u - total) + self._sum
        self._sum = total
        delta = u - self._mean
        self._mean += delta / self.n
        self._m2 += delta * (u - self._mean)
        if self.n > 1:
            step = abs(u - math.ldexp(self._prev, -self._exp))
            total = self._mr + step
            if self._mr >= step:
                self._mr_c += (self._mr - total) + step
            else:
                self._mr_c += (step - total) + self._mr
            self._mr = total
            self.mr_peak = max(self.mr_peak, abs(x - self._prev))
        self._prev = x
        if x < self.minimum:
            self.minimum = x
        if x > self.maximum:
            self.maximum = x

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
    for v in values:
        counts[bins.index(v)] += 1
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


class _TraceBuilder:
    """A :class:`Trace`, a value at a time: the points, or each pixel column (its values kept while it is drawn)."""

    __slots__ = ("count", "offset", "span", "lower", "upper", "points", "columns", "column", "column_values",
                 "beyond", "i", "low", "high")

    def __init__(self, count: int, offset: int, span: int, lower: float, upper: float) -> None:
        self.count, self.offset, self.span, self.lower, self.upper = count, offset, span, lower, upper
        self.points: list[float] = []
        self.columns: list[tuple[int, float, float, float]] = []
        self.column = -1
        self.column_values: list[float] = []
        self.beyond: list[tuple[int, float]] = []
        self.i = 0
        self.low, self.high = math.inf, -math.inf

    def add(self, v: float) -> None:
        i = self.i
        self.i += 1
        if self.count <= CHART_COLUMNS:
            self.points.append(v)
        else:
            c = int((self.offset + i) / self.span * (CHART_COLUMNS - 1))
            if c != self.column:
                self._close_column()
                self.column = c
            self.column_values.append(v)
        if (v > self.upper or v < self.lower) and len(self.beyond) < CHART_COLUMNS:
            self.beyond.append((i, v))
        if v < self.low:
            self.low = v
        if v > self.high:
            self.high = v

    def _close_column(self) -> None:
        vs = self.column_values
        if vs:
            self.columns.append((self.column, min(vs), max(vs), math.fsum(vs) / len(vs)))
            self.column_values = []

    def trace(self) -> Trace:
        self._close_column()
        return Trace(self.i, self.offset, self.span, tuple(self.points), tuple(self.columns), tuple(self.beyond),
                     self.low, self.high)


class ChartBuilder:
    """A :class:`RunOrderChart` from ``count`` values added in run order, against the control limits ``lines``."""

    __slots__ = ("total", "_values", "_ranges", "_prev")

    def __init__(self, count: int, lines: ControlLimits, total: int | None = None) -> None:
        span = max(count - 1, 1)
        self.total = count if total is None else total
        self._values = _TraceBuilder(count, 0, span, lines.lower, lines.upper)
        self._ranges = _TraceBuilder(count - 1, 1, span, -math.inf, lines.mr_upper)
        self._prev: float | None = None

    def add(self, v: float) -> None:
        self._values.add(v)
        if self._prev is not None:
            self._ranges.add(abs(v - self._prev))
        self._prev = v

    def chart(self) -> RunOrderChart:
        return RunOrderChart(self._values.trace(), self._ranges.trace(), self.total)


def run_order_chart(values: Sequence[float], lines: ControlLimits | None, *,
                    total: int | None = None) -> RunOrderChart | None:
    """The chart of ``values`` (in run order; the newest ``len(values)`` of ``total``); ``None`` below two."""
    if lines is None or len(values) < 2:
        return None
    builder = ChartBuilder(len(values), lines, total)
    for v in values:
        builder.add(v)
    return builder.chart()


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


def _numeric_values(run: RunRecord) -> Iterator[tuple[tuple[str, str, str], float, MeasurementRecord]]:
    """Each numeric judged measurement of ``run`` (its phases' last attempts): its key, value, and record.

    A value that is NaN, infinite, or an integer beyond a double comes as an infinity or NaN: a fail,
    never in the moments.
    """
    for p in run.phases:
        for m in p.measurements:
            if m.dimensions or m.outcome in _NOT_JUDGED or not is_numeric(m.value):
                continue
            try:
                value = float(m.value)
            except OverflowError:  # an integer beyond a double: not a quantity to average
                value = math.inf
            yield (run.product, p.name, m.name), value, m


class _Measurement:
    __slots__ = ("moments", "fails", "marginals", "units", "limits", "limits_changed", "histogram", "bins",
                 "chart")

    def __init__(self) -> None:
        self.moments = RunningMoments()
        self.fails = 0
        self.marginals = 0
        self.units: str | None = None
        self.limits: Limits | None = None
        self.limits_changed = False
        self.bins: Bins | None = None
        self.histogram: list[int] | None = None
        self.chart: ChartBuilder | None = None


class MeasurementTally:
    """:func:`measurement_statistics` over runs read as a stream, twice, keeping none of them.

    :meth:`add` every run (oldest first); :meth:`statistics` then has the
    moments and capability (what a table shows). For the histograms and
    control charts, :meth:`draw` every run again, in the same order, then
    take :meth:`statistics`. Measurements come in the order they first
    appear (a product's phase order).
    """

    def __init__(self) -> None:
        self._of: dict[tuple[str, str, str], _Measurement] = {}
        self._drawing = False

    def add(self, run: RunRecord) -> None:
        for key, value, m in _numeric_values(run):
            s = self._of.get(key)
            if s is None:
                s = self._of[key] = _Measurement()
            elif m.limits != s.limits:
                s.limits_changed = True
            s.units, s.limits = m.units, m.limits
            if math.isfinite(value):
                s.moments.add(value)
            s.fails += m.outcome is MeasurementOutcome.FAIL
            s.marginals += m.marginal

    def draw(self, run: RunRecord) -> None:
        """The second reading: count each value into its histogram and draw it on its chart."""
        if not self._drawing:
            self._drawing = True
            for s in self._of.values():
                m = s.moments.moments()
                s.bins = histogram_bins(m, s.limits)
                s.histogram = [0] * s.bins.count if s.bins is not None else None
                lines = control_limits(m)
                s.chart = ChartBuilder(m.n, lines) if lines is not None and m.n >= 2 else None
        for key, value, _ in _numeric_values(run):
            if not math.isfinite(value):
                continue
            s = self._of[key]
            if s.histogram is not None:
                s.histogram[s.bins.index(value)] += 1  # type: ignore[union-attr]
            if s.chart is not None:
                s.chart.add(value)

    def statistics(self) -> list[MeasurementStatistics]:
        """Every measurement's statistics; its histogram and chart once every run was drawn (else ``None``)."""
        out = []
        for (product, phase, name), s in self._of.items():
            m = s.moments.moments(fails=s.fails, marginals=s.marginals)
            hist = drawn = None
            if self._drawing:
                hist = Histogram(s.bins, tuple(s.histogram)) if s.bins is not None and s.histogram else None
                drawn = s.chart.chart() if s.chart is not None else None
            out.append(MeasurementStatistics(product, phase, name, s.units, s.limits, m, capability(m, s.limits),
                                             hist, control_limits(m), drawn, s.limits_changed))
        return out


def measurement_statistics(ordered: Sequence[RunRecord]) -> list[MeasurementStatistics]:
    """Statistics of every numeric measurement of ``ordered`` (oldest run first), per product, phase and name.

    In the order the measurements first appear (a product's phase order).
    """
    tally = MeasurementTally()
    for run in ordered:
        tally.add(run)
    for run in ordered:
        tally.draw(run)
    return tally.statistics()
