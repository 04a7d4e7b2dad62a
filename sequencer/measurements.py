"""Measurements: what a phase declares it will measure, and how values are judged.

A :class:`Measurement` is a declaration (name, units, validators); a
:class:`~sequencer.records.MeasurementRecord` is what was taken. Declarations
are immutable and built fluently::

    Measurement("vdd_3v3", units="V").in_range(3.2, 3.4, marginal=(3.25, 3.35))

Judging rules, in order:

* a value never set is ``UNSET`` and fails its phase;
* in an attempt whose phase returns SKIP or REPEAT nothing is judged: each
  measurement is recorded ``SKIPPED``, with the value it was set to;
* NaN and infinities never pass, whatever the validators say;
* every validator must pass; a value inside its limits but outside a marginal
  band passes and is flagged ``marginal``.

A dimensioned measurement (``dimensions=[("t", "s")]``, any number of
them: OpenHTF's ``with_dimensions("ms", "V", "A")``) takes a series of
points, each its coordinates then its value (``(t, y)``, ``(ms, volts,
amps)``). Its validators are applied to every point's value, and its series
checks (``.check_series(fn, "description")``) to the whole series; it passes
only if every point and every series check does. A series with no point is
UNSET.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Protocol

import attrs

from sequencer.records import Disposition, Limits, MeasurementOutcome, MeasurementRecord, as_disposition


@attrs.frozen
class Verdict:
    passed: bool
    marginal: bool = False
    reason: str | None = None


#: The verdict of every plain pass (frozen, so one serves them all).
PASSED = Verdict(True)


class Validator(Protocol):
    """Judges one (scalar) value. ``description`` is shown in reports."""

    @property
    def description(self) -> str: ...

    @property
    def limits(self) -> Limits | None: ...

    def check(self, value: Any) -> Verdict: ...


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _fmt(x: float) -> str:
    return f"{x:g}"


@attrs.frozen
class InRange:
    """``low <= x <= high``; either bound may be open. The marginal band lies inside."""

    low: float | None = None
    high: float | None = None
    marginal_low: float | None = None
    marginal_high: float | None = None

    def __attrs_post_init__(self) -> None:
        if self.low is None and self.high is None:
            raise ValueError("in_range needs at least one of low, high")
        for name in ("low", "high", "marginal_low", "marginal_high"):
            v = getattr(self, name)
            if v is not None and (not _is_number(v) or not math.isfinite(v)):
                raise ValueError(f"in_range {name} must be a finite number, got {v!r}")
        if self.low is not None and self.high is not None and self.low > self.high:
            raise ValueError(f"in_range low {_fmt(self.low)} is greater than high {_fmt(self.high)}")
        if self.marginal_low is not None and self.marginal_high is not None and self.marginal_low > self.marginal_high:
            raise ValueError(
                f"marginal low {_fmt(self.marginal_low)} is greater than marginal high {_fmt(self.marginal_high)}"
            )
        if self.marginal_low is not None and self.low is not None and self.marginal_low < self.low:
            raise ValueError(f"marginal low {_fmt(self.marginal_low)} lies below low {_fmt(self.low)}")
        if self.marginal_high is not None and self.high is not None and self.marginal_high > self.high:
            raise ValueError(f"marginal high {_fmt(self.marginal_high)} lies above high {_fmt(self.high)}")

    @property
    def description(self) -> str:
        if self.low is not None and self.high is not None:
            text = f"{_fmt(self.low)} <= x <= {_fmt(self.high)}"
        elif self.low is not None:
            text = f"x >= {_fmt(self.low)}"
        else:
            text = f"x <= {_fmt(self.high)}"  # type: ignore[arg-type]
        if self.marginal_low is not None or self.marginal_high is not None:
            lo = "" if self.marginal_low is None else _fmt(self.marginal_low)
            hi = "" if self.marginal_high is None else _fmt(self.marginal_high)
            text += f" (marginal outside {lo}..{hi})"
        return text

    @property
    def limits(self) -> Limits:
        return Limits(self.low, self.high, self.marginal_low, self.marginal_high)

    def check(self, value: Any) -> Verdict:
        if not _is_number(value):
            return Verdict(False, reason=f"{value!r} is not a number")
        if self.low is not None and value < self.low:
            return Verdict(False, reason=f"{_fmt(value)} is below {_fmt(self.low)}")
        if self.high is not None and value > self.high:
            return Verdict(False, reason=f"{_fmt(value)} is above {_fmt(self.high)}")
        if self.marginal_low is not None and value < self.marginal_low:
            return Verdict(True, marginal=True, reason=f"{_fmt(value)} is below marginal {_fmt(self.marginal_low)}")
        if self.marginal_high is not None and value > self.marginal_high:
            return Verdict(True, marginal=True, reason=f"{_fmt(value)} is above marginal {_fmt(self.marginal_high)}")
        return PASSED


@attrs.frozen
class Equals:
    expected: Any

    @property
    def description(self) -> str:
        return f"x == {self.expected!r}"

    @property
    def limits(self) -> None:
        return None

    def check(self, value: Any) -> Verdict:
        # bool is an int in Python; True must not equal 1 in a test limit.
        if isinstance(value, bool) != isinstance(self.expected, bool) or value != self.expected:
            return Verdict(False, reason=f"{value!r} is not {self.expected!r}")
        return PASSED


@attrs.frozen
class OneOf:
    options: tuple[Any, ...] = attrs.field(converter=tuple)

    @property
    def description(self) -> str:
        return "x in {" + ", ".join(repr(o) for o in self.options) + "}"

    @property
    def limits(self) -> None:
        return None

    def check(self, value: Any) -> Verdict:
        if any(isinstance(value, bool) == isinstance(o, bool) and value == o for o in self.options):
            return PASSED
        return Verdict(False, reason=f"{value!r} is not one of {list(self.options)!r}")


@attrs.frozen
class Matches:
    pattern: str

    def __attrs_post_init__(self) -> None:
        re.compile(self.pattern)  # fail at declaration, not at the first DUT

    @property
    def description(self) -> str:
        return f"x matches /{self.pattern}/"

    @property
    def limits(self) -> None:
        return None

    def check(self, value: Any) -> Verdict:
        if not isinstance(value, str):
            return Verdict(False, reason=f"{value!r} is not text")
        if re.fullmatch(self.pattern, value) is None:
            return Verdict(False, reason=f"{value!r} does not match /{self.pattern}/")
        return PASSED


@attrs.frozen
class WithinPercent:
    """``|x - target| <= percent% of |target|``, optionally marginal beyond ``marginal_percent``."""

    target: float
    percent: float
    marginal_percent: float | None = None

    def __attrs_post_init__(self) -> None:
        if not (_is_number(self.target) and math.isfinite(self.target)):
            raise ValueError(f"within_percent target must be a finite number, got {self.target!r}")
        if not (_is_number(self.percent) and self.percent >= 0):
            raise ValueError(f"within_percent percent must be >= 0, got {self.percent!r}")
        if self.marginal_percent is not None and not 0 <= self.marginal_percent <= self.percent:
            raise ValueError("within_percent marginal_percent must lie between 0 and percent")

    @property
    def _range(self) -> InRange:
        span = abs(self.target) * self.percent / 100
        mspan = None if self.marginal_percent is None else abs(self.target) * self.marginal_percent / 100
        return InRange(
            self.target - span,
            self.target + span,
            None if mspan is None else self.target - mspan,
            None if mspan is None else self.target + mspan,
        )

    @property
    def description(self) -> str:
        text = f"x within {_fmt(self.percent)}% of {_fmt(self.target)}"
        if self.marginal_percent is not None:
            text += f" (marginal beyond {_fmt(self.marginal_percent)}%)"
        return text

    @property
    def limits(self) -> Limits:
        return self._range.limits

    def check(self, value: Any) -> Verdict:
        return self._range.check(value)


@attrs.frozen
class Custom:
    """A callable returning a truthy value for a pass, with a description for the report."""

    fn: Callable[[Any], Any] = attrs.field(eq=False)
    text: str

    @property
    def description(self) -> str:
        return self.text

    @property
    def limits(self) -> None:
        return None

    def check(self, value: Any) -> Verdict:
        if self.fn(value):
            return PASSED
        return Verdict(False, reason=f"{value!r} fails: {self.text}")


@attrs.frozen
class Reported:
    """Passes ``ok``; any other value fails with *itself* as the reason.

    For a phase that explains its own failures: the measurement holds
    ``"pass"`` (or ``""``: no problem) or the sentence an operator should
    read, such as ``SIM not inserted (+CME ERROR: 10)``. ``equals("pass")``
    would bury that sentence in ``'...' is not 'pass'``.
    """

    ok: Any = "pass"
    text: str | None = None

    @property
    def description(self) -> str:
        return self.text if self.text is not None else f"x == {self.ok!r}"

    @property
    def limits(self) -> None:
        return None

    def check(self, value: Any) -> Verdict:
        if value == self.ok:
            return PASSED
        return Verdict(False, reason=str(value))


def in_range(
    low: float | None = None, high: float | None = None, *, marginal: tuple[float | None, float | None] | None = None
) -> InRange:
    mlow, mhigh = marginal if marginal is not None else (None, None)
    return InRange(low, high, mlow, mhigh)


def equals(expected: Any) -> Equals:
    return Equals(expected)


def one_of(options: Iterable[Any]) -> OneOf:
    return OneOf(tuple(options))


def matches(pattern: str) -> Matches:
    return Matches(pattern)


def within_percent(target: float, percent: float, *, marginal_percent: float | None = None) -> WithinPercent:
    return WithinPercent(target, percent, marginal_percent)


def custom(fn: Callable[[Any], Any], description: str) -> Custom:
    return Custom(fn, description)


def _non_finite(value: Any) -> bool:
    return isinstance(value, float) and not math.isfinite(value)


def _maybe_disposition(value: Any) -> Any:
    # The validator names the measurement when this is no disposition.
    try:
        return as_disposition(value)
    except ValueError:
        return value


@attrs.frozen
class Measurement:
    """A measurement a phase declares: name, units, description and validators.

    ``on_fail`` and ``disposition`` tell the operator what to do with a unit
    this measurement failed, in the product's own words
    (``on_fail="Reseat the sensor cable and retest", disposition="retest"``);
    they take precedence over the phase's (see :mod:`sequencer.verdicts`).
    """

    name: str = attrs.field()
    units: str | None = None
    description: str = ""
    validators: tuple[Validator, ...] = ()
    dimensions: tuple[tuple[str, str], ...] = attrs.field(default=(), converter=lambda ds: tuple(
        (d, d) if isinstance(d, str) else tuple(d) for d in ds))
    #: checks of a dimensioned measurement's whole series (``check_series``)
    series_checks: tuple[SeriesCheck, ...] = attrs.field(default=(), kw_only=True)
    on_fail: str = attrs.field(default="", kw_only=True)
    disposition: Disposition | None = attrs.field(default=None, converter=_maybe_disposition, kw_only=True)

    @name.validator
    def _check_name(self, _: object, value: str) -> None:
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", value):
            raise ValueError(f"measurement name {value!r} must be an identifier (letters, digits, _)")

    # What every record of this measurement repeats, worked out once: a phase
    # judges its measurements on every attempt of every run.
    _texts: tuple[str, ...] = attrs.field(init=False, eq=False, repr=False)
    _limits: Limits | None = attrs.field(init=False, eq=False, repr=False)

    @on_fail.validator
    def _check_on_fail(self, _: object, value: Any) -> None:
        if not isinstance(value, str):
            raise TypeError(f"measurement {self.name!r}: on_fail must be text (what the operator should do), "
                            f"got {value!r}")

    @disposition.validator
    def _check_disposition(self, _: object, value: Any) -> None:
        try:
            as_disposition(value)
        except ValueError as exc:
            raise ValueError(f"measurement {self.name!r}: {exc}") from None

    @dimensions.validator
    def _check_dimensions(self, _: object, value: tuple[tuple[str, str], ...]) -> None:
        if any(len(d) != 2 or not all(isinstance(x, str) for x in d) for d in value):
            raise ValueError(f"measurement {self.name!r}: each dimension is a (name, units) pair or a name")

    def __attrs_post_init__(self) -> None:
        if self.series_checks and not self.dimensions:
            raise ValueError(f"measurement {self.name!r}: check_series needs dimensions (a series of points)")
        texts = (*(v.description for v in self.validators), *(c.description for c in self.series_checks))
        object.__setattr__(self, "_texts", texts)
        object.__setattr__(self, "_limits", next((v.limits for v in self.validators if v.limits is not None), None))

    def with_validator(self, validator: Validator) -> Measurement:
        return attrs.evolve(self, validators=(*self.validators, validator))

    def in_range(
        self,
        low: float | None = None,
        high: float | None = None,
        *,
        marginal: tuple[float | None, float | None] | None = None,
    ) -> Measurement:
        return self.with_validator(in_range(low, high, marginal=marginal))

    def equals(self, expected: Any) -> Measurement:
        return self.with_validator(equals(expected))

    def reported(self, ok: Any = "pass", description: str | None = None) -> Measurement:
        """Passes ``ok``; anything else fails with the value as the reason (see :class:`Reported`)."""
        return self.with_validator(Reported(ok, description))

    def one_of(self, options: Iterable[Any]) -> Measurement:
        return self.with_validator(one_of(options))

    def matches(self, pattern: str) -> Measurement:
        return self.with_validator(matches(pattern))

    def within_percent(self, target: float, percent: float, *, marginal_percent: float | None = None) -> Measurement:
        return self.with_validator(within_percent(target, percent, marginal_percent=marginal_percent))

    def check(self, fn: Callable[[Any], Any], description: str) -> Measurement:
        return self.with_validator(custom(fn, description))

    def with_dimensions(self, *dimensions: str | tuple[str, str]) -> Measurement:
        """This measurement as a series over ``dimensions`` (each a name, or a ``(name, units)`` pair)."""
        return attrs.evolve(self, dimensions=dimensions)

    def check_series(self, fn: Callable[[list[tuple[Any, ...]]], Any], description: str) -> Measurement:
        """Also judge the whole series: ``fn(points)`` (each point a tuple, coordinates then value) must be true.

        ``description`` is what reports show: ``.check_series(lambda pts: pts[-1][-1] < 0.1, "settles below
        0.1 A")``. Each point's value is still judged by the other validators.
        """
        return attrs.evolve(self, series_checks=(*self.series_checks, SeriesCheck(fn, description)))

    def points(self, value: Any) -> list[list[Any]]:
        """``value`` as this series' points (lists: coordinates, then value); TypeError naming what is wrong."""
        return _as_points(self.name, value, self.dimensions)

    def doc(self, description: str) -> Measurement:
        return attrs.evolve(self, description=description)

    @property
    def limits(self) -> Limits | None:
        return self._limits

    def unset(self) -> MeasurementRecord:
        return self._record(MeasurementOutcome.UNSET, None, reason="not set")

    def unjudged(self, value: Any, reason: str) -> MeasurementRecord:
        """The record of ``value`` (None if never set) kept without judging it: its phase asked to skip or repeat."""
        return self._record(MeasurementOutcome.SKIPPED, value, reason=reason)

    def judge(self, value: Any) -> MeasurementRecord:
        """Judge ``value`` against every validator and return the record."""
        if self.dimensions:
            points = self.points(value)
            if not points:
                return self._record(MeasurementOutcome.UNSET, points, reason="no point was set")
            return self._judge_series(points)
        if _non_finite(value):
            return self._record(MeasurementOutcome.FAIL, value, reason=f"{value!r} is not a finite number")
        verdicts = [v.check(value) for v in self.validators]
        return self._from_verdicts(value, verdicts)

    def _judge_series(self, points: list[list[Any]]) -> MeasurementRecord:
        verdicts: list[Verdict] = []
        for point in points:
            if any(_non_finite(c) for c in point):
                shown = ", ".join(repr(c) for c in point)
                return self._record(MeasurementOutcome.FAIL, points, reason=f"point ({shown}) is not a finite number")
            y = point[-1]
            at = point[0] if len(point) == 2 else tuple(point[:-1])
            for v in self.validators:
                verdict = v.check(y)
                if verdict.reason:
                    verdict = attrs.evolve(verdict, reason=f"at {at!r}: {verdict.reason}")
                verdicts.append(verdict)
        if self.series_checks:
            series = [tuple(p) for p in points]
            verdicts.extend(c.check(series) for c in self.series_checks)
        return self._from_verdicts(points, verdicts)

    def _from_verdicts(self, value: Any, verdicts: Sequence[Verdict]) -> MeasurementRecord:
        marginal: Verdict | None = None
        for v in verdicts:
            if not v.passed:
                return self._record(MeasurementOutcome.FAIL, value, reason=v.reason)
            if v.marginal and marginal is None:
                marginal = v
        if marginal is None:
            return self._record(MeasurementOutcome.PASS, value)
        return self._record(MeasurementOutcome.PASS, value, marginal=True, reason=marginal.reason)

    def _record(
        self, outcome: MeasurementOutcome, value: Any, *, marginal: bool = False, reason: str | None = None
    ) -> MeasurementRecord:
        return MeasurementRecord(
            name=self.name,
            outcome=outcome,
            value=value,
            units=self.units,
            description=self.description,
            validators=self._texts,
            limits=self._limits,
            marginal=marginal,
            reason=reason,
            dimensions=self.dimensions,
        )


def _as_points(name: str, value: Any, dimensions: tuple[tuple[str, str], ...]) -> list[list[Any]]:
    wanted = len(dimensions) + 1
    shape = ", ".join([*(d[0] for d in dimensions), "value"])
    try:
        points = [list(p) for p in value]
    except TypeError:
        raise TypeError(f"measurement {name!r} is dimensioned: set it to a sequence of points ({shape})") from None
    for i, p in enumerate(points):
        if len(p) != wanted:
            raise TypeError(f"measurement {name!r}: point {i} has {len(p)} values, expected {wanted} ({shape})")
    return points


@attrs.frozen
class SeriesCheck:
    """A check of a dimensioned measurement's whole series: ``fn(points)`` true passes."""

    fn: Callable[[list[tuple[Any, ...]]], Any] = attrs.field(eq=False)
    text: str

    @property
    def description(self) -> str:
        return f"series: {self.text}"

    def check(self, points: list[tuple[Any, ...]]) -> Verdict:
        if self.fn(points):
            return PASSED
        return Verdict(False, reason=f"the series fails: {self.text}")


class Series:
    """A dimensioned measurement set point by point: ``series[t] = y``, ``series[t, volts] = amps``.

    What ``ctx.measurements.NAME`` is for a dimensioned measurement (OpenHTF's
    ``test.measurements['power'][(t, v, a)] = x``): setting the same
    coordinates again replaces that point. Iterating gives the points,
    coordinates then value, in the order first set.
    """

    def __init__(self, declared: Measurement) -> None:
        self._declared = declared
        self._at: dict[tuple[Any, ...], int] = {}
        self.points: list[list[Any]] = []

    def __setitem__(self, coordinates: Any, value: Any) -> None:
        coords = coordinates if isinstance(coordinates, tuple) else (coordinates,)
        dims = self._declared.dimensions
        if len(coords) != len(dims):
            raise TypeError(f"measurement {self._declared.name!r}: {len(coords)} coordinate(s) given, it has "
                            f"{len(dims)} ({', '.join(d[0] for d in dims)})")
        index = self._at.get(coords)
        if index is None:
            self._at[coords] = len(self.points)
            self.points.append([*coords, value])
        else:
            self.points[index] = [*coords, value]

    def __getitem__(self, coordinates: Any) -> Any:
        coords = coordinates if isinstance(coordinates, tuple) else (coordinates,)
        return self.points[self._at[coords]][-1]

    def __iter__(self) -> Iterator[list[Any]]:
        return iter(self.points)

    def __len__(self) -> int:
        return len(self.points)

    def __repr__(self) -> str:
        return f"Series({self.points!r})"
