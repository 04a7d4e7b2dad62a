"""How record values read on a report: numbers, times, durations, sizes and CSS classes.

Kept apart from the templates so every report (HTML today, PDF or CSV later)
prints a value the same way, and so the choices are testable. All functions
return plain text; escaping is the template's job. CSS class names are only
ever chosen from fixed tables here, never built from record text, because
record text may come from a hostile device.
"""

from __future__ import annotations

import datetime as dt
import json
import math
from typing import Any

from sequencer.records import MeasurementOutcome, MeasurementRecord, Outcome

#: Ten significant digits: enough for any instrument, few enough to hide float noise (0.1 + 0.2).
_SIGNIFICANT = 10

_LEVEL_CLASSES = {
    "debug": "lvl-debug",
    "info": "lvl-info",
    "warning": "lvl-warning",
    "warn": "lvl-warning",
    "error": "lvl-error",
    "exception": "lvl-error",
    "critical": "lvl-error",
}


def number(x: float | int) -> str:
    """A number as an engineer writes it: ``3.301``, ``41``, ``1e-07``, ``NaN``, ``+inf``."""
    if isinstance(x, bool):
        return "true" if x else "false"
    if isinstance(x, int):
        return str(x)
    if math.isnan(x):
        return "NaN"
    if math.isinf(x):
        return "+inf" if x > 0 else "-inf"
    return f"{x:.{_SIGNIFICANT}g}"


def is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def is_series(m: MeasurementRecord) -> bool:
    """True for a dimensioned measurement whose value is a list of ``[x, y]`` points."""
    return bool(m.dimensions) and isinstance(m.value, (list, tuple))


def value(v: Any) -> str:
    """A measurement value as text. Series are summarised by :func:`series_summary` instead."""
    if v is None:
        return "—"
    if isinstance(v, bool):
        return "true" if v else "false"
    if is_number(v):
        return number(v)
    if isinstance(v, str):
        return v
    try:
        return json.dumps(v, ensure_ascii=False, default=str)
    except (TypeError, ValueError):
        return repr(v)


def series_summary(m: MeasurementRecord) -> str:
    """``13 points, frequency 2412–2472 MHz, y -42–-32.4 dBm``: what a plot shows, in words."""
    points = finite_points(m.value)
    total = len(m.value) if isinstance(m.value, (list, tuple)) else 0
    if not points:
        return f"{total} points"
    xname, xunits = m.dimensions[0] if m.dimensions else ("x", "")
    xs = [p[0] for p in points]
    ys = [p[1] for p in points]
    text = f"{total} points, {xname} {number(min(xs))}–{number(max(xs))}"
    if xunits:
        text += f" {xunits}"
    text += f"; min {number(min(ys))}, max {number(max(ys))}"
    if m.units:
        text += f" {m.units}"
    return text


def finite_points(v: Any) -> list[tuple[float, float]]:
    """The plottable ``(x, y)`` points of a series: its first coordinate and its value (a series over several
    dimensions is drawn against the first); anything else (NaN, text, bad shapes) is left out."""
    if not isinstance(v, (list, tuple)):
        return []
    out = []
    for p in v:
        if isinstance(p, (list, tuple)) and len(p) >= 2 and all(is_number(c) and math.isfinite(c)
                                                                   for c in (p[0], p[-1])):
            out.append((float(p[0]), float(p[-1])))
    return out


def utc(t: dt.datetime | None) -> str:
    """``2024-05-14 08:30:00 UTC``; naive times are taken to be UTC already (the records' contract)."""
    if t is None:
        return "—"
    return f"{_as_utc(t):%Y-%m-%d %H:%M:%S} UTC"


def clock(t: dt.datetime) -> str:
    """Time of day with milliseconds, for log lines under a dated header."""
    t = _as_utc(t)
    return f"{t:%H:%M:%S}.{t.microsecond // 1000:03d}"


def iso(t: dt.datetime | None) -> str:
    return "" if t is None else _as_utc(t).isoformat()


def _as_utc(t: dt.datetime) -> dt.datetime:
    return t.replace(tzinfo=dt.timezone.utc) if t.tzinfo is None else t.astimezone(dt.timezone.utc)


def duration(seconds: float | None) -> str:
    """``0.42 s``, ``12.3 s``, ``2 min 05 s``, ``1 h 02 min``; ``—`` for a run still open."""
    if seconds is None:
        return "—"
    if seconds < 10:
        return f"{seconds:.2f} s"
    if seconds < 60:
        return f"{seconds:.1f} s"
    if seconds < 3600:
        m, s = divmod(int(round(seconds)), 60)
        return f"{m} min {s:02d} s"
    h, rest = divmod(int(round(seconds)), 3600)
    return f"{h} h {rest // 60:02d} min"


def size(n: int) -> str:
    """Bytes in binary units: ``812 B``, ``4.0 KiB``, ``1.2 MiB``."""
    if n < 1024:
        return f"{n} B"
    x = float(n)
    for unit in ("KiB", "MiB"):
        x /= 1024
        if x < 1024:
            return f"{x:.1f} {unit}"
    return f"{x / 1024:.1f} GiB"


def percent(x: float | None, digits: int = 1) -> str:
    return "—" if x is None else f"{100 * x:.{digits}f} %"


def outcome_class(outcome: Outcome | None) -> str:
    """``o-pass``, ``o-fail``, ... or ``o-running`` for a run still open."""
    return "o-running" if outcome is None else f"o-{Outcome(outcome).value.lower()}"


def outcome_label(outcome: Outcome | None) -> str:
    return "RUNNING" if outcome is None else Outcome(outcome).value


def measurement_class(m: MeasurementRecord) -> str:
    """``m-fail``, ``m-unset``, ``m-skipped`` (kept, not judged: its phase skipped or repeated), ``m-marginal``
    (passed inside the limits but outside the band) or ``m-pass``."""
    if m.outcome is MeasurementOutcome.FAIL:
        return "m-fail"
    if m.outcome is MeasurementOutcome.UNSET:
        return "m-unset"
    if m.outcome is MeasurementOutcome.SKIPPED:
        return "m-skipped"
    return "m-marginal" if m.marginal else "m-pass"


def measurement_label(m: MeasurementRecord) -> str:
    return {"m-fail": "FAIL", "m-unset": "UNSET", "m-skipped": "SKIPPED", "m-marginal": "MARGINAL",
            "m-pass": "PASS"}[measurement_class(m)]


def level_class(level: str) -> str:
    return _LEVEL_CLASSES.get(str(level).lower(), "lvl-info")


def measurement_counts(measurements: tuple[MeasurementRecord, ...]) -> str:
    """``6 measured · 1 fail · 1 marginal``: a phase's measurements at a glance ('' when none)."""
    if not measurements:
        return ""
    classes = [measurement_class(m) for m in measurements]
    parts = [f"{len(measurements)} measured"]
    for cls, word in (("m-fail", "fail"), ("m-marginal", "marginal"), ("m-unset", "unset"), ("m-skipped", "not judged")):
        if n := classes.count(cls):
            parts.append(f"{n} {word}")
    return " · ".join(parts)


def marginal_band(m: MeasurementRecord) -> str:
    """``3.25 … 3.35`` (either side may be open); '' when the measurement has no band."""
    lim = m.limits
    if lim is None or (lim.marginal_low is None and lim.marginal_high is None):
        return ""
    lo = "" if lim.marginal_low is None else number(lim.marginal_low)
    hi = "" if lim.marginal_high is None else number(lim.marginal_high)
    return f"{lo} … {hi}".strip()


#: Identifiers up to this long (serials, phase and measurement names) are never broken across lines.
KEEP_WHOLE_CHARS = 48


def keep_whole(text: object) -> str:
    """The CSS class for a cell holding an identifier: ``nowrap`` when it is short, else ``wrap``.

    A serial split as "SN69610001 / 5" over two lines reads as another unit,
    so identifiers of a normal length stay whole and the table makes room. A
    DUT can still send garbage thousands of characters long as its serial;
    that may wrap anywhere rather than push the table off the page.
    """
    return "nowrap" if len(str(text or "")) <= KEEP_WHOLE_CHARS else "wrap"


def statistic(x: float | None) -> str:
    """A mean, sd or extreme: four significant digits, as a capability study shows them."""
    if x is None:
        return "—"
    return f"{x:.4g}"


def index(x: float | None) -> str:
    """A capability index (Cp, Cpk, Ppk) with two decimals; ``—`` where it does not exist."""
    if x is None:
        return "—"
    return f"{x:.2f}"
