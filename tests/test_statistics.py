"""Measurement statistics: moments, Cp/Cpk/Pp/Ppk, histograms, I-MR control limits, worst first."""

from __future__ import annotations

import math
import statistics as stdlib_statistics

import pytest
from hypothesis import given
from hypothesis import strategies as st

from reports.quality.statistics import (
    D2,
    Bins,
    capability,
    control_limits,
    histogram,
    histogram_bins,
    measurement_statistics,
    moments,
    statistics_of,
    worst_first,
)
from sequencer.records import Limits, MeasurementOutcome, Outcome
from tests.records_factory import at, measurement, phase, run


def test_capability_of_five_values_worked_by_hand() -> None:
    m = moments([1.0, 2.0, 3.0, 4.0, 5.0])
    assert (m.n, m.mean, m.minimum, m.maximum, m.mr_mean) == (5, 3.0, 1.0, 5.0, 1.0)
    assert m.sd == pytest.approx(math.sqrt(2.5))
    sigma_within = 1.0 / 1.128
    c = capability(m, Limits(0.0, 6.0))
    assert c.cp == pytest.approx(6.0 / (6 * sigma_within))  # 1.128
    assert c.cpk == pytest.approx(3.0 / (3 * sigma_within))
    assert c.pp == pytest.approx(6.0 / (6 * math.sqrt(2.5)))  # 0.632
    assert c.ppk == pytest.approx(3.0 / (3 * math.sqrt(2.5)))
    # off centre: Cpk is the nearer limit's
    off = capability(m, Limits(2.0, 6.0))
    assert off.cpk == pytest.approx(1.0 / (3 * sigma_within)) and off.cp == pytest.approx(4.0 / (6 * sigma_within))


def test_one_limit_gives_a_one_sided_cpk_and_no_cp() -> None:
    m = moments([40.0, 42.0, 41.0, 43.0])  # idle current, mA, only a maximum
    upper = capability(m, Limits(None, 60.0))
    assert upper.cp is None and upper.pp is None
    mr = (2 + 1 + 2) / 3  # moving ranges 2, 1, 2
    assert upper.cpk == pytest.approx((60.0 - 41.5) / (3 * (mr / D2)))
    assert upper.ppk == pytest.approx((60.0 - 41.5) / (3 * stdlib_statistics.stdev([40, 42, 41, 43])))
    lower = capability(m, Limits(30.0, None))
    assert lower.cpk == pytest.approx((41.5 - 30.0) / (3 * (mr / D2)))


@pytest.mark.parametrize("values, limits", [
    ([], Limits(0.0, 1.0)),             # nothing measured
    ([0.5], Limits(0.0, 1.0)),          # one value has no spread
    ([0.5, 0.5, 0.5], Limits(0.0, 1.0)),  # zero spread: capability is not a number
    ([0.1, 0.9], None),                 # no limits: nothing to be capable of
])
def test_capability_does_not_exist_without_spread_or_limits(values: list[float], limits: Limits | None) -> None:
    c = capability(moments(values), limits)
    assert (c.cp, c.cpk, c.pp, c.ppk) == (None, None, None, None)


def test_control_limits_are_three_within_sigmas_and_mr_upper_is_d4_times_mr() -> None:
    lines = control_limits(moments([1.0, 2.0, 3.0, 4.0, 5.0]))
    assert lines is not None
    assert lines.centre == 3.0
    assert lines.upper == pytest.approx(3.0 + 2.66 * 1.0, abs=0.01)
    assert lines.lower == pytest.approx(3.0 - 3.0 / 1.128)
    assert (lines.mr_centre, lines.mr_upper) == (1.0, pytest.approx(3.267))
    assert control_limits(moments([1.0])) is None


def test_histogram_spans_values_and_limits_and_counts_every_value() -> None:
    values = [3.29, 3.30, 3.30, 3.31, 3.36]
    m = moments(values)
    bins = histogram_bins(m, Limits(3.2, 3.4, 3.25, 3.35))
    assert bins is not None and bins.start < 3.2 and bins.edges[-1] > 3.4
    h = histogram(values, bins)
    assert sum(h.counts) == 5 and len(h.counts) == bins.count
    assert h.counts[bins.index(3.36)] == 1
    assert Bins(0.0, 1.0, 4).index(4.0) == 3 and Bins(0.0, 1.0, 4).index(-1.0) == 0
    assert histogram_bins(moments([-1.7e308, 1.7e308]), None) is None  # a span no double holds: no histogram
    same = histogram_bins(moments([5.0, 5.0]), None)
    assert same is not None and same.start < 5.0 < same.edges[-1]


@given(st.lists(st.floats(-1e6, 1e6, allow_nan=False), min_size=2, max_size=60))
def test_moments_agree_with_the_standard_library(values: list[float]) -> None:
    m = moments(values)
    assert m.mean == pytest.approx(stdlib_statistics.fmean(values), rel=1e-9, abs=1e-6)
    assert m.sd == pytest.approx(stdlib_statistics.stdev(values), rel=1e-6, abs=1e-6)
    assert m.mr_mean == pytest.approx(stdlib_statistics.fmean(abs(b - a) for a, b in zip(values, values[1:])),
                                      rel=1e-9, abs=1e-6)
    assert m.minimum == min(values) and m.maximum == max(values)


def test_statistics_from_runs_take_numeric_finals_in_run_order_with_fails_and_marginals() -> None:
    def rails(i: int, vdd: object, **kw: object):
        m = measurement("vdd_3v3", vdd, units="V", low=3.2, high=3.4, marginal=(3.25, 3.35), **kw)
        ok = measurement("flash_verified", True, validators=["== True"])
        return run(serial=f"SN-{i}", started_at=at(10 * i), phases=[phase("rails", measurements=[m, ok])])

    runs = [rails(0, 3.30), rails(1, 3.36), rails(2, 3.45), rails(3, float("nan"), outcome=MeasurementOutcome.FAIL),
            rails(4, None, outcome=MeasurementOutcome.UNSET),
            rails(5, 3.9, outcome=MeasurementOutcome.SKIPPED)]  # set, then its phase asked to skip: unjudged
    [s] = measurement_statistics(runs)  # the boolean is not a numeric measurement
    assert (s.product, s.phase, s.name, s.units) == ("esp32_sensor", "rails", "vdd_3v3", "V")
    assert s.drawn is not None and list(s.drawn.values.points) == [3.30, 3.36, 3.45]  # NaN is a fail, not a value;
    # unset and skipped are neither
    assert (s.moments.n, s.moments.fails, s.moments.marginals) == (3, 2, 1)
    assert s.limits == Limits(3.2, 3.4, 3.25, 3.35) and not s.limits_changed
    assert s.moments.mr_mean == pytest.approx((0.06 + 0.09) / 2)


def test_not_capable_measurements_come_first_lowest_cpk_first() -> None:
    wide = statistics_of("p", "a", "wide", [1.0, 1.1, 0.9, 1.0], limits=Limits(0.0, 2.0))
    tight = statistics_of("p", "b", "tight", [1.0, 1.3, 0.8, 1.1], limits=Limits(0.5, 1.5))
    none = statistics_of("p", "c", "text-like", [1.0, 1.0], limits=None)
    tighter = statistics_of("p", "d", "tighter", [1.0, 1.3, 0.8, 1.1], limits=Limits(0.7, 1.4))
    assert wide.capable() and not tight.capable() and none.capable() is None
    assert [s.name for s in worst_first([wide, tight, none, tighter])] == ["tighter", "tight", "wide", "text-like"]
    assert [s.name for s in worst_first([wide, tight], threshold=10.0)] == ["tight", "wide"]


def test_statistics_are_per_product_and_note_a_limit_change() -> None:
    def r(product: str, i: int, high: float):
        return run(serial=f"S{i}", product=product, started_at=at(i), outcome=Outcome.PASS,
                   phases=[phase("rails", measurements=[measurement("v", 1.0 + i / 10, low=0.0, high=high)])])

    stats = measurement_statistics([r("a", 0, 5.0), r("b", 1, 5.0), r("a", 2, 6.0)])
    assert [(s.product, s.moments.n, s.limits_changed, s.limits.high) for s in stats] == [
        ("a", 2, True, 6.0), ("b", 1, False, 5.0)]


@given(st.lists(st.floats(allow_nan=False, allow_infinity=False), min_size=1, max_size=30),
       st.none() | st.tuples(st.floats(allow_nan=False, allow_infinity=False),
                             st.floats(allow_nan=False, allow_infinity=False)))
def test_any_finite_values_and_limits_give_statistics_without_an_error(values: list[float], bounds) -> None:
    limits = Limits(min(bounds), max(bounds)) if bounds else None
    s = statistics_of("p", "a", "m", values, limits=limits)
    assert s.moments.n == len(values)
    if s.histogram is not None:
        assert sum(s.histogram.counts) == len(values)
