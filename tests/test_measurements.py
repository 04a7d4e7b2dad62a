"""Validators and measurement judging, with hypothesis properties."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sequencer import Measurement
from sequencer.measurements import InRange, equals, in_range, matches, one_of, within_percent
from sequencer.records import MeasurementOutcome

finite = st.floats(allow_nan=False, allow_infinity=False, min_value=-1e12, max_value=1e12)
non_finite = st.sampled_from([math.nan, math.inf, -math.inf])


@given(low=finite, high=finite, x=finite)
def test_in_range_agrees_with_comparison(low: float, high: float, x: float) -> None:
    low, high = min(low, high), max(low, high)
    rec = Measurement("x").in_range(low, high).judge(x)
    assert (rec.outcome is MeasurementOutcome.PASS) == (low <= x <= high)


@given(x=non_finite, low=finite, high=finite)
def test_non_finite_never_passes_any_validator(x: float, low: float, high: float) -> None:
    low, high = min(low, high), max(low, high)
    for m in (
        Measurement("x"),  # no validator at all
        Measurement("x").in_range(low, high),
        Measurement("x").in_range(low=low),
        Measurement("x").check(lambda v: True, "anything goes"),
        Measurement("x").one_of([x]),
    ):
        assert m.judge(x).outcome is MeasurementOutcome.FAIL


@given(x=finite, pts=st.lists(finite, min_size=1, max_size=20), bad=non_finite)
def test_series_with_any_non_finite_point_fails(x: float, pts: list[float], bad: float) -> None:
    m = Measurement("ramp", units="V", dimensions=[("t", "s")]).in_range(-1e13, 1e13)
    series = [(i, v) for i, v in enumerate(pts)]
    assert m.judge(series).outcome is MeasurementOutcome.PASS
    series.insert(len(series) // 2, (x, bad))
    assert m.judge(series).outcome is MeasurementOutcome.FAIL


@given(x=finite)
def test_marginal_band_passes_but_flags(x: float) -> None:
    m = Measurement("v").in_range(-10, 10, marginal=(-5, 5))
    rec = m.judge(x)
    if -10 <= x <= 10:
        assert rec.outcome is MeasurementOutcome.PASS
        assert rec.marginal == (x < -5 or x > 5)
    else:
        assert rec.outcome is MeasurementOutcome.FAIL and not rec.marginal


@given(target=st.floats(min_value=-1e6, max_value=1e6, allow_nan=False), pct=st.floats(0, 50), x=finite)
def test_within_percent_is_symmetric_around_target(target: float, pct: float, x: float) -> None:
    v = within_percent(target, pct)
    mirrored = 2 * target - x
    if abs(x - target) < abs(target) * pct / 100 * (1 - 1e-9):
        assert v.check(x).passed and v.check(mirrored).passed
    if abs(x - target) > abs(target) * pct / 100 * (1 + 1e-9) + 1e-9:
        assert not v.check(x).passed


def test_validator_descriptions_are_readable() -> None:
    assert in_range(3.2, 3.4, marginal=(3.25, 3.35)).description == "3.2 <= x <= 3.4 (marginal outside 3.25..3.35)"
    assert in_range(low=0).description == "x >= 0"
    assert equals("ok").description == "x == 'ok'"
    assert one_of(["a", "b"]).description == "x in {'a', 'b'}"
    assert matches(r"SN\d+").description == r"x matches /SN\d+/"
    assert within_percent(5, 2).description == "x within 2% of 5"
    m = Measurement("fw").check(lambda v: v.startswith("1."), "firmware 1.x")
    assert m.judge("2.0").reason == "'2.0' fails: firmware 1.x"


def test_equals_and_one_of_do_not_confuse_bool_and_int() -> None:
    assert not equals(1).check(True).passed
    assert not one_of([1, 2]).check(True).passed
    assert equals(True).check(True).passed


def test_matches_is_a_full_match() -> None:
    m = Measurement("serial").matches(r"SN\d{4}")
    assert m.judge("SN0042").outcome is MeasurementOutcome.PASS
    assert m.judge("xSN0042").outcome is MeasurementOutcome.FAIL
    assert m.judge(42).outcome is MeasurementOutcome.FAIL


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(low=2, high=1), "low 2 is greater than high 1"),
        (dict(low=1, high=2, marginal_low=0.5), "marginal low 0.5 lies below low 1"),
        (dict(low=1, high=2, marginal_high=3), "marginal high 3 lies above high 2"),
        (dict(low=math.nan, high=1), "low must be a finite number"),
        (dict(), "needs at least one of low, high"),
    ],
)
def test_bad_limits_are_rejected_at_declaration(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        InRange(**kwargs)


def test_measurement_names_must_be_identifiers() -> None:
    with pytest.raises(ValueError, match="must be an identifier"):
        Measurement("3v3 rail")


def test_series_validator_reports_the_failing_point() -> None:
    m = Measurement("ramp", units="V", dimensions=[("t", "s")]).in_range(0, 3.6)
    rec = m.judge([(0.0, 0.1), (0.5, 3.7), (1.0, 3.3)])
    assert rec.outcome is MeasurementOutcome.FAIL
    assert rec.reason == "at 0.5: 3.7 is above 3.6"
    with pytest.raises(TypeError, match="dimensioned"):
        m.judge(3.3)


def test_a_reported_measurement_fails_with_the_phase_own_sentence() -> None:
    m = Measurement("sim_status").reported("READY")
    assert m.judge("READY").outcome is MeasurementOutcome.PASS
    failed = m.judge("SIM not inserted (+CME ERROR: 10)")
    assert failed.outcome is MeasurementOutcome.FAIL
    assert failed.reason == "SIM not inserted (+CME ERROR: 10)"
    no_problem = Measurement("key_problem").reported("", "no problem with the key")
    assert no_problem.judge("").outcome is MeasurementOutcome.PASS
    assert no_problem.validators[0].description == "no problem with the key"
