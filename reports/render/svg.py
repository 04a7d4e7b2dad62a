"""Small inline SVG graphics for reports: a series plot, a limit gauge, a histogram and an I-MR chart.

Built in Python rather than in a template because the geometry is arithmetic.
Safety rule: the SVG text is assembled only from numbers this module computes
and from labels passed through :func:`markupsafe.escape`, so the result can be
marked safe (:class:`markupsafe.Markup`) and inlined. Attachments that *are*
SVG never come through here: they are untrusted and go into an ``<img>``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from markupsafe import Markup, escape

from reports.quality.statistics import CHART_COLUMNS, MeasurementStatistics, Trace
from sequencer.records import Limits

# Colours match the report stylesheet.
_PASS_ZONE = "#e3f4e8"
_MARGINAL_ZONE = "#fdf0d5"
_FAIL = "#c62828"
_LINE = "#1f5fa8"
_AXIS = "#8a94a6"
_TEXT = "#4a5568"
_MARGINAL_LINE = "#b7791f"


def _tick(x: float) -> str:
    """Axis labels: four significant digits are plenty to read a plot by."""
    return f"{x:.4g}"


def _f(x: float) -> str:
    """Coordinates with two decimals: short output, sub-pixel precision."""
    return f"{x:.2f}"


def _f1(x: float) -> str:
    """Coordinates of the many points of a chart: a tenth of a pixel is plenty, and a page holds fifty charts."""
    return f"{x:.1f}"


def series_plot(
    points: Sequence[tuple[float, float]],
    *,
    limits: Limits | None = None,
    x_label: str = "",
    y_units: str = "",
    width: int = 220,
    height: int = 100,
    title: str = "",
) -> Markup:
    """A line plot of ``points`` with the limit lines and marginal band drawn in.

    Points outside the limits are marked red. Returns empty markup when there is
    nothing finite to plot.
    """
    pts = [(float(x), float(y)) for x, y in points if math.isfinite(x) and math.isfinite(y)]
    if not pts:
        return Markup("")
    pts.sort()
    left, right, top, bottom = 40.0, 6.0, 14.0, 24.0
    pw, ph = width - left - right, height - top - bottom
    xs = [p[0] for p in pts]
    ys = [p[1] for p in pts]
    lim_values = [] if limits is None else [v for v in (limits.low, limits.high) if v is not None and math.isfinite(v)]
    y_lo, y_hi = min(ys + lim_values), max(ys + lim_values)
    if y_hi == y_lo:
        y_lo, y_hi = y_lo - 1.0, y_hi + 1.0
    pad = (y_hi - y_lo) * 0.08
    y_lo, y_hi = y_lo - pad, y_hi + pad
    x_lo, x_hi = min(xs), max(xs)
    if x_hi == x_lo:
        x_lo, x_hi = x_lo - 1.0, x_hi + 1.0

    def sx(x: float) -> float:
        return left + (x - x_lo) / (x_hi - x_lo) * pw

    def sy(y: float) -> float:
        return top + (y_hi - y) / (y_hi - y_lo) * ph

    parts = [
        f'<svg class="plot" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img">',
        f"<title>{escape(title)}</title>",
        f'<rect x="{_f(left)}" y="{_f(top)}" width="{_f(pw)}" height="{_f(ph)}" fill="#fff"/>',
    ]
    if limits is not None:
        band_lo = limits.low if limits.low is not None else y_lo
        band_hi = limits.high if limits.high is not None else y_hi
        if limits.low is not None or limits.high is not None:
            a, b = sy(min(max(band_hi, y_lo), y_hi)), sy(max(min(band_lo, y_hi), y_lo))
            parts.append(f'<rect x="{_f(left)}" y="{_f(a)}" width="{_f(pw)}" height="{_f(max(b - a, 0))}" '
                         f'fill="{_PASS_ZONE}"/>')
        for v, colour, dash in (
            (limits.low, _FAIL, "4 3"),
            (limits.high, _FAIL, "4 3"),
            (limits.marginal_low, _MARGINAL_LINE, "2 3"),
            (limits.marginal_high, _MARGINAL_LINE, "2 3"),
        ):
            if v is not None and math.isfinite(v) and y_lo <= v <= y_hi:
                parts.append(f'<line x1="{_f(left)}" x2="{_f(left + pw)}" y1="{_f(sy(v))}" y2="{_f(sy(v))}" '
                             f'stroke="{colour}" stroke-width="1" stroke-dasharray="{dash}"/>')
    parts.append(f'<rect x="{_f(left)}" y="{_f(top)}" width="{_f(pw)}" height="{_f(ph)}" fill="none" '
                 f'stroke="{_AXIS}" stroke-width="0.75"/>')
    poly = " ".join(f"{_f(sx(x))},{_f(sy(y))}" for x, y in pts)
    parts.append(f'<polyline points="{poly}" fill="none" stroke="{_LINE}" stroke-width="1.5" '
                 f'stroke-linejoin="round"/>')
    for x, y in pts:
        bad = limits is not None and (
            (limits.low is not None and y < limits.low) or (limits.high is not None and y > limits.high)
        )
        colour, r = (_FAIL, 3.0) if bad else (_LINE, 1.6)
        parts.append(f'<circle cx="{_f(sx(x))}" cy="{_f(sy(y))}" r="{r}" fill="{colour}"/>')
    text = f'font-family="sans-serif" font-size="9" fill="{_TEXT}"'
    # Label the limit lines (the numbers a reader checks against); without limits, the data range.
    y_marks = sorted({v for v in lim_values if y_lo <= v <= y_hi} or {min(ys), max(ys)}, reverse=True)
    last_y = -100.0
    for v in y_marks:
        ty = sy(v) + 3
        if ty - last_y >= 10:
            parts.append(f'<text x="{_f(left - 4)}" y="{_f(ty)}" text-anchor="end" {text}>{escape(_tick(v))}</text>')
            last_y = ty
    if y_units:
        parts.append(f'<text x="{_f(left - 4)}" y="{_f(top - 3)}" text-anchor="end" {text}>{escape(y_units)}</text>')
    parts += [
        f'<text x="{_f(left)}" y="{_f(top + ph + 11)}" {text}>{escape(_tick(x_lo))}</text>',
        f'<text x="{_f(left + pw)}" y="{_f(top + ph + 11)}" text-anchor="end" {text}>{escape(_tick(x_hi))}</text>',
        f'<text x="{_f(left + pw / 2)}" y="{_f(height - 2)}" text-anchor="middle" {text}>{escape(x_label)}</text>',
        "</svg>",
    ]
    return Markup("".join(parts))


def limit_gauge(value: float, limits: Limits, *, width: int = 110, height: int = 14) -> Markup:
    """Where ``value`` sits between ``low`` and ``high``: a bar with the marginal zones shaded.

    Only drawn for two-sided finite limits; returns empty markup otherwise. A
    value outside the limits is pinned to the nearest end and drawn red.
    """
    lo, hi = limits.low, limits.high
    if lo is None or hi is None or not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
        return Markup("")
    if not math.isfinite(value):
        return Markup("")
    span = hi - lo
    view_lo, view_hi = lo - 0.15 * span, hi + 0.15 * span

    def sx(x: float) -> float:
        x = min(max(x, view_lo), view_hi)
        return 1 + (x - view_lo) / (view_hi - view_lo) * (width - 2)

    mid = height / 2
    parts = [
        f'<svg class="gauge" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" aria-hidden="true">',
        f'<rect x="{_f(sx(lo))}" y="{_f(mid - 3)}" width="{_f(sx(hi) - sx(lo))}" height="6" fill="{_MARGINAL_ZONE}"/>',
    ]
    m_lo = limits.marginal_low if limits.marginal_low is not None else lo
    m_hi = limits.marginal_high if limits.marginal_high is not None else hi
    if math.isfinite(m_lo) and math.isfinite(m_hi) and m_hi >= m_lo:
        parts.append(f'<rect x="{_f(sx(m_lo))}" y="{_f(mid - 3)}" width="{_f(sx(m_hi) - sx(m_lo))}" height="6" '
                     f'fill="#bfe3c8"/>')
    for edge in (lo, hi):
        parts.append(f'<line x1="{_f(sx(edge))}" x2="{_f(sx(edge))}" y1="{_f(mid - 5)}" y2="{_f(mid + 5)}" '
                     f'stroke="{_AXIS}" stroke-width="1"/>')
    outside = value < lo or value > hi
    marginal = not outside and (value < m_lo or value > m_hi)
    colour = _FAIL if outside else (_MARGINAL_LINE if marginal else "#1a202c")
    parts.append(f'<rect x="{_f(sx(value) - 1.5)}" y="1" width="3" height="{height - 2}" rx="1" fill="{colour}"/>')
    parts.append("</svg>")
    return Markup("".join(parts))


# -- measurement statistics ---------------------------------------------------------------------

_BAR = "#7f9cc4"
_CENTRE = "#2f855a"


def capability_histogram(stats: MeasurementStatistics, *, width: int = 320, height: int = 132) -> Markup:
    """The histogram of a measurement's values with its limits, marginal band and mean drawn in."""
    hist = stats.histogram
    if hist is None or not any(hist.counts):
        return Markup("")
    bins, lim = hist.bins, stats.limits
    left, right, top, bottom = 8.0, 8.0, 16.0, 26.0
    pw, ph = width - left - right, height - top - bottom
    x_lo, x_hi = bins.start, bins.start + bins.width * bins.count
    tallest = max(hist.counts)

    def sx(x: float) -> float:
        return left + (min(max(x, x_lo), x_hi) - x_lo) / (x_hi - x_lo) * pw

    title = f"{stats.label}: histogram of {stats.moments.n} values"
    parts = [
        f'<svg class="histogram" width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img">',
        f"<title>{escape(title)}</title>",
    ]
    if lim is not None and (lim.low is not None or lim.high is not None):
        a = sx(lim.low) if lim.low is not None else left
        b = sx(lim.high) if lim.high is not None else left + pw
        parts.append(f'<rect x="{_f(a)}" y="{_f(top)}" width="{_f(max(b - a, 0))}" height="{_f(ph)}" '
                     f'fill="{_PASS_ZONE}"/>')
        m_lo = lim.marginal_low if lim.marginal_low is not None else lim.low
        m_hi = lim.marginal_high if lim.marginal_high is not None else lim.high
        for edge, band_end in ((lim.low, m_lo), (lim.high, m_hi)):
            if edge is not None and band_end is not None and band_end != edge:
                a, b = sorted((sx(edge), sx(band_end)))
                parts.append(f'<rect x="{_f(a)}" y="{_f(top)}" width="{_f(b - a)}" height="{_f(ph)}" '
                             f'fill="{_MARGINAL_ZONE}"/>')
    bar_w = pw / bins.count
    for i, n in enumerate(hist.counts):
        if n:
            h = n / tallest * ph
            parts.append(f'<rect x="{_f(left + i * bar_w + 0.5)}" y="{_f(top + ph - h)}" '
                         f'width="{_f(max(bar_w - 1, 0.5))}" height="{_f(h)}" fill="{_BAR}"/>')
    parts.append(f'<line x1="{_f(left)}" x2="{_f(left + pw)}" y1="{_f(top + ph)}" y2="{_f(top + ph)}" '
                 f'stroke="{_AXIS}" stroke-width="0.75"/>')
    text = f'font-family="sans-serif" font-size="9" fill="{_TEXT}"'
    marks: list[tuple[float, str, str, str]] = []
    if lim is not None:
        for v, name, colour, dash in ((lim.low, "LSL", _FAIL, "4 3"), (lim.high, "USL", _FAIL, "4 3"),
                                      (lim.marginal_low, "", _MARGINAL_LINE, "2 3"),
                                      (lim.marginal_high, "", _MARGINAL_LINE, "2 3")):
            if v is not None and math.isfinite(v):
                marks.append((v, name, colour, dash))
    if stats.moments.mean is not None:
        marks.append((stats.moments.mean, "mean", _CENTRE, ""))
    for v, name, colour, dash in marks:
        x = sx(v)
        dashes = f' stroke-dasharray="{dash}"' if dash else ""
        parts.append(f'<line x1="{_f(x)}" x2="{_f(x)}" y1="{_f(top - 2)}" y2="{_f(top + ph)}" stroke="{colour}" '
                     f'stroke-width="1.2"{dashes}/>')
        if name:
            anchor = "start" if x < left + pw / 2 else "end"
            label = name if name == "mean" else f"{name} {_tick(v)}"
            parts.append(f'<text x="{_f(x + (2 if anchor == "start" else -2))}" y="{_f(top - 5)}" '
                         f'text-anchor="{anchor}" {text}>{escape(label)}</text>')
    parts += [
        f'<text x="{_f(left)}" y="{_f(top + ph + 11)}" {text}>{escape(_tick(x_lo))}</text>',
        f'<text x="{_f(left + pw)}" y="{_f(top + ph + 11)}" text-anchor="end" {text}>{escape(_tick(x_hi))}</text>',
        f'<text x="{_f(left + pw / 2)}" y="{_f(height - 3)}" text-anchor="middle" {text}>'
        f'{escape(stats.units or "value")}</text>',
        "</svg>",
    ]
    return Markup("".join(parts))


def control_chart(stats: MeasurementStatistics, *, width: int = 420, height: int = 170) -> Markup:
    """Individuals and moving-range charts of the values in run order: centre lines, 3-sigma limits.

    A point beyond a control limit is red. More values than ``CHART_COLUMNS``
    are drawn per pixel column (range and mean; :class:`~reports.quality.statistics.RunOrderChart`),
    so the file stays small. When only the newest values are drawn (a period in MongoDB), the chart says so.
    """
    drawn = stats.drawn
    lines = stats.chart
    if drawn is None or drawn.values.count < 2 or lines is None:
        return Markup("")
    values, ranges = drawn.values, drawn.ranges
    n = values.count
    left, right, top, gap, bottom = 44.0, 8.0, 12.0, 16.0, 14.0
    pw = width - left - right
    i_h = (height - top - gap - bottom) * 0.68
    mr_h = height - top - gap - bottom - i_h
    i_lo = min(values.low, lines.lower)
    i_hi = max(values.high, lines.upper)
    mr_hi = max(ranges.high, lines.mr_upper) or 1.0
    if i_hi == i_lo:
        i_lo, i_hi = i_lo - 1.0, i_hi + 1.0
    pad = (i_hi - i_lo) * 0.06
    i_lo, i_hi = i_lo - pad, i_hi + pad
    text = f'font-family="sans-serif" font-size="9" fill="{_TEXT}"'
    shown = f"{n} values" if drawn.total <= n else f"the newest {n:,} of {drawn.total:,} values"
    title = f"{stats.label}: individuals and moving range of {shown} in run order"
    parts = [
        f'<svg class="control-chart" width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img">',
        f"<title>{escape(title)}</title>",
    ]

    def panel(trace: Trace, y0: float, h: float, lo: float, hi: float, rules: list[tuple[float, str, str]]) -> None:
        def sx(i: int) -> float:
            return left + i / trace.span * pw

        def sy(v: float) -> float:
            return y0 + (hi - v) / (hi - lo) * h

        parts.append(f'<rect x="{_f(left)}" y="{_f(y0)}" width="{_f(pw)}" height="{_f(h)}" fill="#fff" '
                     f'stroke="{_AXIS}" stroke-width="0.75"/>')
        last_label = -100.0
        for v, name, colour in sorted(rules, key=lambda r: -r[0]):
            dash = "" if name.startswith("x̄") or name.startswith("MR̄") else ' stroke-dasharray="4 3"'
            parts.append(f'<line x1="{_f(left)}" x2="{_f(left + pw)}" y1="{_f(sy(v))}" y2="{_f(sy(v))}" '
                         f'stroke="{colour}" stroke-width="1"{dash}/>')
            ty = sy(v) + 3
            if ty - last_label >= 9:
                parts.append(f'<text x="{_f(left - 3)}" y="{_f(ty)}" text-anchor="end" {text}>'
                             f'{escape(_tick(v))}</text>')
                last_label = ty
        if trace.count <= CHART_COLUMNS:
            pts = " ".join(f"{_f1(sx(trace.offset + i))},{_f1(sy(v))}" for i, v in enumerate(trace.points))
            parts.append(f'<polyline points="{pts}" fill="none" stroke="{_LINE}" stroke-width="1"/>')
        else:
            path = []
            means = []
            for c, low, high, mean in trace.columns:
                x = left + c / (CHART_COLUMNS - 1) * pw
                path.append(f"M{_f1(x)} {_f1(sy(high))}V{_f1(sy(low))}")
                means.append(f"{_f1(x)},{_f1(sy(mean))}")
            parts.append(f'<path d="{"".join(path)}" stroke="#b8c7dd" stroke-width="1"/>')
            parts.append(f'<polyline points="{" ".join(means)}" fill="none" stroke="{_LINE}" stroke-width="1"/>')
        for i, v in trace.beyond:
            parts.append(f'<circle cx="{_f(sx(trace.offset + i))}" cy="{_f(sy(v))}" r="2.2" fill="{_FAIL}"/>')

    panel(values, top, i_h, i_lo, i_hi,
          [(lines.upper, "UCL", _FAIL), (lines.centre, "x̄", _CENTRE), (lines.lower, "LCL", _FAIL)])
    mr_top = top + i_h + gap
    panel(ranges, mr_top, mr_h, 0.0, mr_hi * 1.06, [(lines.mr_upper, "UCL", _FAIL), (lines.mr_centre, "MR̄", _CENTRE)])
    parts += [
        f'<text x="{_f(left)}" y="{_f(top - 3)}" {text}>Individuals{escape(f" ({stats.units})" if stats.units else "")}'
        f"</text>",
        f'<text x="{_f(left)}" y="{_f(mr_top - 3)}" {text}>Moving range</text>',
        f'<text x="{_f(left + pw)}" y="{_f(height - 2)}" text-anchor="end" {text}>run order, {escape(shown)}</text>',
        "</svg>",
    ]
    return Markup("".join(parts))
