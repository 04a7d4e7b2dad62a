"""Batch arithmetic: units, retests, first-pass and final yield, Paretos."""

from __future__ import annotations

import random

import attrs

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from reports.quality.units import group_units
from reports.quality.yields import RUNNING, batch_summary, code_versions, pareto
from sequencer.records import MeasurementOutcome, Outcome
from tests.records_factory import at, attempt, measurement, phase, run


def r(serial: str | None, outcome: Outcome | None, t: float, *, phases=(), run_id: str | None = None, **kw):
    """A run of ``serial`` started ``t`` seconds after T0 with the given outcome."""
    return run(serial=serial, outcome=outcome, started_at=at(t), phases=phases, run_id=run_id, duration=10.0, **kw)


def failing(name: str, *measurement_names: str, outcome: Outcome = Outcome.FAIL):
    ms = [measurement(m, 5.0, low=0.0, high=1.0) for m in measurement_names]
    return phase(name, outcome, measurements=ms)


def test_empty_batch_has_no_yield() -> None:
    s = batch_summary([])
    assert (s.runs, s.units, s.passed, s.failed, s.other, s.marginal) == (0, 0, 0, 0, 0, 0)
    assert s.first_pass_yield is None and s.final_yield is None
    assert s.median_duration_s is None
    assert s.phase_pareto == () and s.measurement_pareto == ()


def test_a_retested_unit_counts_once_and_only_final_yield_forgives_it() -> None:
    runs = [
        r("SN-1", Outcome.FAIL, 0),
        r("SN-1", Outcome.PASS, 100),  # retest passes
        r("SN-2", Outcome.PASS, 10),
        r("SN-3", Outcome.FAIL, 20),
        r("SN-3", Outcome.FAIL, 120),  # retest fails again
        r("SN-4", Outcome.PASS, 30),
    ]
    s = batch_summary(runs)
    assert s.runs == 6
    assert s.units == 4
    assert (s.passed, s.failed, s.other) == (3, 3, 0)
    assert (s.first_pass_units, s.final_pass_units, s.yield_units) == (2, 3, 4)
    assert s.first_pass_yield == pytest.approx(0.5)
    assert s.final_yield == pytest.approx(0.75)
    sn1 = next(u for u in s.unit_summaries if u.serial == "SN-1")
    assert sn1.retested and sn1.first_outcome is Outcome.FAIL and sn1.final_outcome is Outcome.PASS


def test_first_and_last_are_by_start_time_not_input_order() -> None:
    runs = [r("SN-1", Outcome.PASS, 500), r("SN-1", Outcome.FAIL, 0)]
    s = batch_summary(runs)
    assert s.first_pass_yield == 0.0
    assert s.final_yield == 1.0
    assert batch_summary(list(reversed(runs))) == s


def test_a_unit_that_passed_then_failed_a_retest_is_not_a_final_pass() -> None:
    s = batch_summary([r("SN-1", Outcome.PASS, 0), r("SN-1", Outcome.FAIL, 60)])
    assert (s.first_pass_yield, s.final_yield) == (1.0, 0.0)


def test_runs_without_a_serial_are_units_of_their_own() -> None:
    runs = [r(None, Outcome.FAIL, 0, run_id="aaa"), r(None, Outcome.PASS, 10, run_id="bbb"),
            r("", Outcome.PASS, 20, run_id="ccc")]
    s = batch_summary(runs)
    assert s.units == 3
    assert (s.first_pass_units, s.final_pass_units) == (2, 2)
    assert len({u.key for u in s.unit_summaries}) == 3
    assert all(u.serial is None for u in s.unit_summaries)


def test_a_serial_equal_to_a_run_id_is_still_a_different_unit() -> None:
    runs = [r("abc", Outcome.PASS, 0, run_id="x1"), r(None, Outcome.FAIL, 10, run_id="abc")]
    assert batch_summary(runs).units == 2
    units = group_units(runs)
    assert units.of(runs[0]).key != units.of(runs[1]).key


def test_open_runs_count_as_runs_but_never_in_a_yield() -> None:
    runs = [
        r("SN-1", None, 0),  # only run still open: no verdict, no yield
        r("SN-2", Outcome.PASS, 10),
        r("SN-2", None, 20),  # a retest in progress does not undo the pass
    ]
    s = batch_summary(runs)
    assert s.runs == 3 and s.units == 2
    assert s.running == 2 and s.other == 2
    assert dict(s.outcome_counts)[RUNNING] == 2
    assert s.yield_units == 1
    assert (s.first_pass_yield, s.final_yield) == (1.0, 1.0)
    sn1 = next(u for u in s.unit_summaries if u.serial == "SN-1")
    assert sn1.first_outcome is None and sn1.final_outcome is None


@pytest.mark.parametrize("bad", [Outcome.ERROR, Outcome.TIMEOUT, Outcome.ABORTED, Outcome.INTERRUPTED])
def test_only_pass_is_a_pass(bad: Outcome) -> None:
    s = batch_summary([r("SN-1", bad, 0), r("SN-2", Outcome.PASS, 1)])
    trouble = bad in (Outcome.ERROR, Outcome.TIMEOUT)
    assert (s.passed, s.failed, s.errored, s.other) == (1, 0, int(trouble), int(not trouble))
    assert s.first_pass_yield == 0.5
    assert dict(s.outcome_counts) == {"PASS": 1, bad.value: 1}


def test_marginal_counts_runs_with_a_marginal_measurement() -> None:
    marginal_phase = phase("rails", measurements=[measurement("v", 3.38, low=3.2, high=3.4, marginal=(3.25, 3.35))])
    clean_phase = phase("rails", measurements=[measurement("v", 3.30, low=3.2, high=3.4, marginal=(3.25, 3.35))])
    assert marginal_phase.marginal and not clean_phase.marginal
    s = batch_summary([r("A", Outcome.PASS, 0, phases=[marginal_phase]), r("B", Outcome.PASS, 1, phases=[clean_phase])])
    assert s.marginal == 1


def test_median_duration_ignores_open_runs() -> None:
    runs = [run(serial="A", started_at=at(0), duration=10.0, outcome=Outcome.PASS),
            run(serial="B", started_at=at(0), duration=30.0, outcome=Outcome.PASS),
            run(serial="C", started_at=at(0), duration=20.0, outcome=Outcome.FAIL),
            run(serial="D", started_at=at(0), outcome=None)]
    assert batch_summary(runs).median_duration_s == 20.0


def test_phase_pareto_counts_causes_sorted_with_cumulative_share() -> None:
    runs = [
        r("A", Outcome.FAIL, 0, phases=[failing("rails", "vdd"), phase("rf", Outcome.SKIPPED)]),
        r("B", Outcome.FAIL, 1, phases=[failing("rails", "vdd")]),
        r("C", Outcome.ERROR, 2, phases=[phase("flash", Outcome.ERROR), phase("rf", Outcome.ABORTED)]),
        r("D", Outcome.TIMEOUT, 3, phases=[phase("rf", Outcome.TIMEOUT)]),
        r("E", Outcome.FAIL, 4, phases=[failing("rails", "vdd")]),
        r("A", Outcome.FAIL, 5, phases=[failing("rf", "rssi")]),  # retest: its failure counts too
    ]
    s = batch_summary(runs)
    rows = s.phase_pareto
    assert [(p.phase, p.count) for p in rows] == [("rails", 3), ("rf", 1)]
    assert [round(p.percent, 3) for p in rows] == [75.0, 25.0]
    assert [round(p.cumulative_percent, 3) for p in rows] == [75.0, 100.0]
    assert all(p.measurement is None for p in rows)
    # ERROR and TIMEOUT are station or communication trouble, in a Pareto of their own
    assert [(p.phase, p.count) for p in s.trouble_pareto] == [("flash", 1), ("rf", 1)]


def test_measurement_pareto_uses_the_last_attempt_and_keeps_phases_apart() -> None:
    bad = measurement("vdd", 9.0, low=0.0, high=1.0)
    good = measurement("vdd", 0.5, low=0.0, high=1.0)
    recovered = phase("rails", Outcome.PASS, attempts=[attempt(1, Outcome.FAIL, measurements=[bad]),
                                                      attempt(2, Outcome.PASS, measurements=[good])])
    runs = [
        r("A", Outcome.PASS, 0, phases=[recovered]),
        r("B", Outcome.FAIL, 1, phases=[failing("rails", "vdd", "idd")]),
        r("C", Outcome.FAIL, 2, phases=[failing("sleep", "idd")]),
        r("D", Outcome.FAIL, 3, phases=[failing("sleep", "idd")]),
    ]
    rows = batch_summary(runs).measurement_pareto
    assert [(p.phase, p.measurement, p.count) for p in rows] == [
        ("sleep", "idd", 2), ("rails", "idd", 1), ("rails", "vdd", 1)]
    assert rows[0].label == "sleep / idd"
    assert rows[-1].cumulative_percent == pytest.approx(100.0)


def test_unset_measurements_are_not_counted_as_measurement_failures() -> None:
    unset = measurement("vdd", None, low=0.0, high=1.0)
    assert unset.outcome is MeasurementOutcome.UNSET
    s = batch_summary([r("A", Outcome.FAIL, 0, phases=[phase("rails", measurements=[unset])])])
    assert s.measurement_pareto == ()
    assert [(p.phase, p.count) for p in s.phase_pareto] == [("rails", 1)]


def test_pareto_ties_are_ordered_by_name() -> None:
    from collections import Counter

    rows = pareto(Counter({("b", None): 2, ("a", None): 2, ("c", None): 5}))
    assert [p.phase for p in rows] == ["c", "a", "b"]


# -- properties --------------------------------------------------------------

outcomes = st.none() | st.sampled_from(Outcome)
run_specs = st.lists(
    st.tuples(st.sampled_from(["S1", "S2", "S3", None]), outcomes, st.integers(0, 1000),
              st.sampled_from(["ok", "rails", "rf"])),
    max_size=25,
)


def _runs(specs):
    out = []
    for i, (serial, outcome, t, failing_phase) in enumerate(specs):
        phases = [] if failing_phase == "ok" else [failing(failing_phase, "m")]
        out.append(r(serial, outcome, t, phases=phases, run_id=f"run{i:03d}"))
    return out


@settings(max_examples=150, deadline=None)
@given(run_specs, st.randoms(use_true_random=False))
def test_summary_invariants(specs, rnd: random.Random) -> None:
    runs = _runs(specs)
    s = batch_summary(runs)
    assert s.passed + s.failed + s.errored + s.other == s.runs == len(runs)
    assert sum(n for _, n in s.outcome_counts) == s.runs
    units = group_units(sorted(runs, key=lambda x: (x.started_at, x.run_id)))
    assert s.units == len({units.of(x).key for x in runs}) == len(s.unit_summaries)
    assert sum(len(u.run_ids) for u in s.unit_summaries) == s.runs
    assert s.yield_units == sum(any(x.outcome is not None for x in runs if units.of(x).key == u.key)
                                for u in s.unit_summaries)
    for y, n in ((s.first_pass_yield, s.first_pass_units), (s.final_yield, s.final_pass_units)):
        if s.yield_units == 0:
            assert y is None
        else:
            assert y == n / s.yield_units and 0.0 <= y <= 1.0
    # A unit passes first time at most once, so first-pass passes never exceed passed runs.
    assert s.first_pass_units <= s.passed and s.final_pass_units <= s.passed
    for rows in (s.phase_pareto, s.measurement_pareto, s.trouble_pareto):
        counts = [p.count for p in rows]
        assert counts == sorted(counts, reverse=True)
        if rows:
            assert rows[-1].cumulative_percent == pytest.approx(100.0)
    # Slots: every run on exactly one, their passes add up to the batch's.
    assert sum(x.runs for x in s.slots) == s.runs and sum(x.passed for x in s.slots) == s.passed
    assert sum(x.finished for x in s.slots) == s.runs - s.running
    shuffled = list(runs)
    rnd.shuffle(shuffled)
    assert batch_summary(shuffled) == s


def test_each_slot_of_each_station_has_its_pass_rate() -> None:
    runs = [
        run(serial="A", slot=0, outcome=Outcome.FAIL, started_at=at(0)),
        run(serial="A", slot=1, outcome=Outcome.PASS, started_at=at(10)),  # the retest, on another slot
        run(serial="B", slot=0, outcome=Outcome.PASS, started_at=at(20)),
        run(serial="C", slot=0, outcome=None, started_at=at(30)),  # still running: no verdict yet
        run(serial="D", slot=0, outcome=Outcome.PASS, station="st2", started_at=at(40)),
        run(serial="E", slot=5, outcome=None, started_at=at(50)),
    ]
    slots = {(x.station, x.slot): x for x in batch_summary(runs).slots}
    assert list(slots) == [("line1-st03", 0), ("line1-st03", 1), ("line1-st03", 5), ("st2", 0)]
    first = slots[("line1-st03", 0)]
    assert (first.runs, first.finished, first.passed, first.not_passed, first.pass_rate) == (3, 2, 1, 1, 0.5)
    assert slots[("line1-st03", 5)].pass_rate is None
    assert slots[("st2", 0)].pass_rate == 1.0


def test_test_code_is_one_row_per_combination_oldest_first() -> None:
    same = dict(product_sha256="aa" * 32, limits_sha256="bb" * 32, sequencer_version="0.1.0+gabc")
    widened = {**same, "limits_sha256": "cc" * 32}
    runs = [r("SN-3", Outcome.PASS, 20, **widened), r("SN-1", Outcome.FAIL, 0, **same),
            r("SN-2", Outcome.PASS, 10, **same), r("SN-1", Outcome.PASS, 30, **widened),
            r("SN-4", Outcome.PASS, 40, **{**same, "sequencer_version": "0.1.0+gabc.dirty"})]
    versions = code_versions(runs)
    assert [(v.limits_sha256, v.sequencer_version, v.runs, v.first_started_at) for v in versions] == [
        ("bb" * 32, "0.1.0+gabc", 2, at(0)),
        ("cc" * 32, "0.1.0+gabc", 2, at(20)),
        ("bb" * 32, "0.1.0+gabc.dirty", 1, at(40)),
    ]
    assert [v.uncommitted for v in versions] == [False, False, True]
    assert {v.product for v in versions} == {"esp32_sensor 1.4.2"}
    assert batch_summary(runs).code_versions == versions
    assert code_versions([]) == ()


# -- unit identity, products, failures apart from trouble (issue 19) --------


def test_a_unit_whose_identify_failed_is_recognised_by_its_mac_at_the_retest() -> None:
    """4 boards, one failed before identify (no serial, its MAC from detect) and passed its retest: 75 % / 100 %."""
    macs = [f"24:0A:C4:00:00:0{i}" for i in range(4)]
    runs = [r(f"SN{i}", Outcome.PASS, i, dut={"serial": f"SN{i}", "mac": macs[i]}) for i in (0, 2, 3)]
    runs.append(r(None, Outcome.FAIL, 1, dut={"mac": macs[1]}, phases=[failing("flash", "verified")]))
    runs.append(r("SN1", Outcome.PASS, 100, dut={"serial": "SN1", "mac": macs[1].lower()}))  # the retest
    s = batch_summary(runs)
    assert s.units == 4
    assert (s.first_pass_units, s.final_pass_units, s.yield_units) == (3, 4, 4)
    assert (s.first_pass_yield, s.final_yield) == (0.75, 1.0)
    retested = next(u for u in s.unit_summaries if u.serial == "SN1")
    assert len(retested.run_ids) == 2 and retested.first_outcome is Outcome.FAIL
    assert s.conflicts == ()


def test_a_run_whose_serial_and_mac_disagree_with_an_earlier_unit_is_flagged_not_merged() -> None:
    runs = [
        r("SN1", Outcome.PASS, 0, dut={"serial": "SN1", "mac": "aa:aa:aa:aa:aa:01"}),
        r("SN1", Outcome.FAIL, 10, dut={"serial": "SN1", "mac": "aa:aa:aa:aa:aa:02"}),  # the label of another board
        r("SN2", Outcome.PASS, 20, dut={"serial": "SN2", "mac": "aa:aa:aa:aa:aa:03"}),
        r("SN3", Outcome.PASS, 30, dut={"serial": "SN3", "mac": "aa:aa:aa:aa:aa:03"}),  # one board, two serials
    ]
    s = batch_summary(runs)
    assert s.units == 4
    flagged = s.conflicts
    assert [u.run_ids for u in flagged] == [(runs[1].run_id,), (runs[3].run_id,)]
    assert "serial SN1 was tested before with mac aa:aa:aa:aa:aa:01" in flagged[0].conflict
    assert "aa:aa:aa:aa:aa:02" in flagged[0].conflict
    assert "mac aa:aa:aa:aa:aa:03" in flagged[1].conflict
    # SN1's own unit keeps its first pass: the conflicting FAIL is not its retest
    sn1 = next(u for u in s.unit_summaries if u.serial == "SN1" and u.conflict is None)
    assert sn1.run_ids == (runs[0].run_id,) and sn1.final_outcome is Outcome.PASS


def test_a_product_may_name_its_own_identity() -> None:
    runs = [
        r(None, Outcome.FAIL, 0, dut={"imei": "356938035643809", "mac": "aa:01"}),
        r("T-1", Outcome.PASS, 10, dut={"serial": "T-1", "imei": "356938035643809", "mac": "aa:02"}),
    ]
    assert batch_summary(runs).units == 2  # by default (serial, mac): the MAC differs, no serial to share
    tracker = [attrs.evolve(x, identity=("imei",)) for x in runs]
    s = batch_summary(tracker)
    assert s.units == 1 and s.unit_summaries[0].run_ids == tuple(x.run_id for x in tracker)


def test_units_and_yields_are_per_product() -> None:
    runs = [
        r("SN1", Outcome.PASS, 0, product="board_test"),
        r("SN1", Outcome.FAIL, 10, product="final_test", product_version="2.0", limits_sha256="ab" * 32),
        r("SN1", Outcome.PASS, 20, product="final_test", product_version="2.1", limits_sha256="cd" * 32),
        r("SN2", Outcome.FAIL, 30, product="board_test"),
    ]
    s = batch_summary(runs)
    assert s.units == 3  # SN1 is a unit of each product
    assert s.first_pass_yield is None and s.final_yield is None  # never one yield across products
    board, final = s.products
    assert (board.product, board.units, board.first_pass_yield, board.final_yield) == ("board_test", 2, 0.5, 0.5)
    assert (final.product, final.units, final.first_pass_yield, final.final_yield) == ("final_test", 1, 0.0, 1.0)
    assert final.versions == ("2.0", "2.1") and final.limits_sha256 == ("ab" * 32, "cd" * 32)


def test_fail_is_counted_apart_from_error_and_timeout() -> None:
    runs = [
        r("A", Outcome.FAIL, 0, phases=[failing("rails", "vdd")]),
        r("B", Outcome.ERROR, 1, phases=[phase("identify", Outcome.ERROR)]),
        r("C", Outcome.TIMEOUT, 2, phases=[phase("identify", Outcome.TIMEOUT)]),
        r("D", Outcome.ABORTED, 3, phases=[phase("rails", Outcome.ABORTED)]),
    ]
    s = batch_summary(runs)
    assert (s.failed, s.errored, s.other) == (1, 2, 1)
    assert [(p.phase, p.count) for p in s.phase_pareto] == [("rails", 1)]
    assert [(p.phase, p.count) for p in s.trouble_pareto] == [("identify", 2)]
