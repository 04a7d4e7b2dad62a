"""Period and trend reports: `sequencer report --product P --since D`, from the store and from MongoDB alike."""

from __future__ import annotations

import datetime as dt
import math
import random
from pathlib import Path
from typing import Any

import pytest
import trio

from reports.quality.period import period_from_runs, period_yields
from reports.quality.pipeline import statistics_in_database
from reports.quality.statistics import measurement_statistics
from reports.storage.mongo import MongoSettings, MongoSink
from sequencer.cli import main
from sequencer.records import MeasurementOutcome
from tests import records_factory as rf
from tests.htmltree import parse
from tests.store_support import store_runs

DAY = dt.timedelta(days=1)


def week_of_runs() -> list:
    """Three days on two stations: board SN-k fails its 3V3 rail on day 0 and passes its retest on day 1."""
    rnd = random.Random(7)
    runs = []
    for day in range(3):
        for i in range(6):
            serial = f"SN-{day}{i}"
            vdd = 3.30 + rnd.gauss(0, 0.02)
            if (day, i) == (0, 2):
                vdd = 3.45
            run = rf.sensor_run(serial, vdd=vdd, slot=i % 2, started_at=rf.at(day * 86400 + i * 60))
            runs.append(run if i < 3 else attrs_evolve(run, station="line1-st04", operator="bob"))
    retest = rf.sensor_run("SN-02", slot=1, started_at=rf.at(86400 + 3000))
    return [*runs, retest]


def attrs_evolve(run, **kw):
    import attrs

    return attrs.evolve(run, **kw)


def test_yields_by_day_station_slot_and_operator_count_a_unit_where_it_was_first_tested() -> None:
    runs = sorted(week_of_runs(), key=lambda r: (r.started_at, r.run_id))
    y = period_yields(runs, since=rf.T0, until=rf.T0 + 7 * DAY)
    assert not y.hourly
    days = {r.bucket: r for r in y.by_time}
    assert list(days) == ["2024-05-14", "2024-05-15", "2024-05-16"]
    first = days["2024-05-14"]
    assert (first.units, first.first_pass_units, first.final_pass_units) == (6, 5, 6)  # SN-02's retest forgives it
    assert (days["2024-05-15"].runs, days["2024-05-15"].units) == (7, 6)  # the retest ran on day 2: a run, not a unit
    stations = {r.bucket: r for r in y.by_station}
    assert stations["line1-st03"].units == 9 and stations["line1-st04"].units == 9
    assert {r.bucket for r in y.by_operator} == {"alice", "bob"}
    assert period_yields(runs, since=rf.T0, until=rf.T0 + dt.timedelta(hours=12)).hourly


def test_slots_and_stations_are_listed_in_number_order_not_as_text() -> None:
    import attrs

    runs = [attrs.evolve(rf.sensor_run(f"SN-{i}", slot=slot, started_at=rf.at(i)), station=station)
            for i, (station, slot) in enumerate([("st10", 10), ("st2", 2), ("st10", 1), ("st2", 11)])]
    y = period_yields(runs)
    assert [r.bucket for r in y.by_slot] == ["st2 slot 2", "st2 slot 11", "st10 slot 1", "st10 slot 10"]
    assert [r.bucket for r in y.by_station] == ["st2", "st10"]


def test_period_report_from_the_local_store(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    store = tmp_path / "store.sqlite"
    trio.run(store_runs, store, week_of_runs())
    out = tmp_path / "period.html"
    assert main(["report", "--product", "esp32_sensor", "--since", "2024-05-14", "--until", "2024-05-16",
                 "--store", str(store), "-o", str(out)]) == 0
    page = parse(out.read_text(encoding="utf-8"))
    assert page.find(id="kpi-units").text == "12"  # two days: the third is outside the period
    assert page.find(id="kpi-fpy").text == "91.7 %" and page.find(id="kpi-final").text == "100.0 %"
    days = [tr.find("td").text for tr in page.find("table", "yields-time").find("tbody").find_all("tr")]
    assert days == ["2024-05-14", "2024-05-15"]
    stats = page.find("table", "stats-overview")
    assert "vdd_3v3" in stats.find("tbody").find_all("tr")[0].clean_text  # the widest spread, lowest Cpk: first
    # one station's runs
    assert main(["report", "--product", "esp32_sensor", "--since", "2024-05-14", "--station", "line1-st04",
                 "--store", str(store), "-o", str(out)]) == 0
    page = parse(out.read_text(encoding="utf-8"))
    assert [tr.find("td").text for tr in page.find("table", "yields-station").find("tbody").find_all("tr")] == [
        "line1-st04"]


@pytest.mark.parametrize("args, message", [
    (["--product", "esp32_sensor"], "--product: give the period's start with --since"),
    (["--product", "esp32_sensor", "--since", "2024-05-15", "--until", "2024-05-14"], "is not after --since"),
    (["--batch", "B", "--since", "2024-05-14"], "a period is reported per product"),
    (["--product", "nothing", "--since", "2024-05-14"], "product 'nothing': no runs"),
])
def test_bad_period_requests_are_one_line_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                 args: list[str], message: str) -> None:
    store = tmp_path / "store.sqlite"
    trio.run(store_runs, store, week_of_runs()[:2])
    assert main(["report", *args, "--store", str(store)]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err


def test_mongodb_computes_the_same_statistics_and_yields_as_python(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], mongo: MongoSettings
) -> None:
    runs = week_of_runs()
    store = tmp_path / "store.sqlite"
    trio.run(store_runs, store, runs)
    target = ["--store", str(store), "--mongo", mongo.uri, "--mongo-db", mongo.database]
    assert main(["sync", *target]) == 0
    ordered = sorted(runs, key=lambda r: (r.started_at, r.run_id))
    local = period_from_runs(ordered, product="esp32_sensor")
    sink = MongoSink(mongo)
    try:
        central = sink.period_report(product="esp32_sensor", since=rf.T0 - DAY)
        in_db = {(s.phase, s.name): s for s in statistics_in_database(sink.runs, {"product": "esp32_sensor"})}
    finally:
        sink.close()
    in_python = {(s.phase, s.name): s for s in measurement_statistics(ordered)}
    assert set(in_db) == set(in_python)
    for key, mine in in_python.items():
        theirs = in_db[key]
        for field in ("n", "fails", "marginals"):
            assert getattr(theirs.moments, field) == getattr(mine.moments, field), (key, field)
        for field in ("mean", "sd", "minimum", "maximum", "mr_mean"):
            a, b = getattr(theirs.moments, field), getattr(mine.moments, field)
            assert (a is None and b is None) or math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12), (key, field, a, b)
        assert theirs.limits == mine.limits
        assert theirs.histogram == mine.histogram, key
        for field in ("cp", "cpk", "pp", "ppk"):
            a, b = getattr(theirs.capability, field), getattr(mine.capability, field)
            assert (a is None and b is None) or math.isclose(a, b, rel_tol=1e-9), (key, field)
        assert theirs.drawn is not None and mine.drawn is not None and theirs.drawn.total == mine.drawn.total
        assert list(theirs.drawn.values.points) == pytest.approx(list(mine.drawn.values.points))
    for table in ("by_time", "by_station", "by_slot", "by_operator"):
        assert getattr(central.yields, table) == getattr(local.yields, table), table
    assert central.outcome_counts == local.outcome_counts
    assert (central.phase_pareto, central.measurement_pareto, central.trouble_pareto) == (
        local.phase_pareto, local.measurement_pareto, local.trouble_pareto)

    # and through the command: every station's runs, from MongoDB
    out = tmp_path / "central.html"
    assert main(["report", "--product", "esp32_sensor", "--since", "2024-05-14", *target, "-o", str(out)]) == 0
    page = parse(out.read_text(encoding="utf-8"))
    assert "MongoDB" in page.find("header").clean_text
    assert page.find(id="kpi-units").text == "18"
    assert page.find_all("svg", "control-chart")


def test_the_period_shows_the_outcome_counts_apart() -> None:
    crashed = rf.sensor_run("SN-X", crash=True, started_at=rf.at(10))
    report = period_from_runs([rf.sensor_run("SN-1", vdd=3.5), crashed], product="esp32_sensor")
    assert report.count("FAIL") == 1 and report.count("ERROR", "TIMEOUT") == 1
    assert [p.phase for p in report.trouble_pareto] == ["self_test"]


def test_the_database_bins_a_value_as_python_floor_division_does(mongo: MongoSettings) -> None:
    """1.0 // 0.1 is 9 in Python, but 1.0 / 0.1 rounds to 10: the bin is the remainder's way, as Bins.index."""
    from reports.quality.pipeline import _bin_of
    from reports.quality.statistics import Bins
    from tests.mongo_support import database

    cases = [(0.0, 0.1, 1.0), (0.0, 0.1, 0.3), (0.0, 0.1, 0.7), (-1.0, 0.25, 1.9999999999999998), (3.1, 0.0125, 3.4),
             (0.0, 1 / 3, 2.0), (5.0, 0.5, 4.0), (5.0, 0.5, 99.0)]
    db = database(mongo)
    db.cases.insert_many([{"i": i, "start": s, "width": w, "v": v} for i, (s, w, v) in enumerate(cases)])
    got = [d["bin"] for d in db.cases.aggregate([{"$sort": {"i": 1}}, {"$project": {"bin": _bin_of("$v", 24)}}])]
    assert got == [Bins(s, w, 24).index(v) for s, w, v in cases]
    assert got[0] == 9  # not floor(1.0 / 0.1) = 10


def test_mongodb_statistics_at_the_edges_are_pythons(mongo: MongoSettings) -> None:
    """Constant values, one-sided limits, integers, NaN only, a measurement never judged: moments and bins alike."""
    def edge_run(i: int) -> Any:
        ms = [
            rf.measurement("constant", 2.5, low=2.0, high=3.0),
            rf.measurement("one_sided", 0.1 * (i % 7), high=1.0),
            rf.measurement("count", 10 + i % 3, units="pcs", low=9, high=13),
            rf.measurement("no_limits", 1e-9 * i),
            rf.measurement("nan", math.nan, low=0.0, high=1.0, outcome=MeasurementOutcome.FAIL),  # as judged
            rf.measurement("unset", 1.0, outcome=MeasurementOutcome.UNSET),
        ]
        return rf.run(serial=f"SN-{i}", started_at=rf.at(60 * i), phases=[rf.phase("edges", measurements=ms)])

    runs = [edge_run(i) for i in range(40)]
    sink = MongoSink(mongo)
    try:
        report = sink.write_runs([(i + 1, r) for i, r in enumerate(runs)])
        assert not report.rejected
        in_db = {s.name: s for s in statistics_in_database(sink.runs, {"product": "esp32_sensor"})}
    finally:
        sink.close()
    in_python = {s.name: s for s in measurement_statistics(runs)}
    assert set(in_db) == set(in_python) == {"constant", "one_sided", "count", "no_limits", "nan"}
    for name, mine in in_python.items():
        theirs = in_db[name]
        assert (theirs.moments.n, theirs.moments.fails, theirs.moments.marginals) == (
            mine.moments.n, mine.moments.fails, mine.moments.marginals), name
        for field in ("mean", "sd", "minimum", "maximum", "mr_mean"):
            a, b = getattr(theirs.moments, field), getattr(mine.moments, field)
            assert (a is None and b is None) or math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-18), (name, field, a, b)
        assert theirs.histogram == mine.histogram, name
    assert in_db["nan"].moments.n == 0 and in_db["nan"].moments.fails == 40 and in_db["nan"].histogram is None
    assert in_db["constant"].histogram is not None and sum(in_db["constant"].histogram.counts) == 40


def test_a_periods_units_are_the_batch_pages_units_without_keeping_a_run() -> None:
    """The period's tally keeps no run ids (a unit per identity); it must still count the units a batch page does:
    a board known first by its MAC, its serial and MAC retest, and a serial seen again with another board's MAC."""
    from reports.quality.yields import batch_summary

    mac = "24:0a:c4:00:00:01"
    failed = [rf.phase("identify", rf.Outcome.FAIL, reason="no answer")]
    runs = [
        rf.run(serial=None, dut={"mac": mac}, started_at=rf.at(0), phases=failed),
        rf.run(serial="SN-1", dut={"serial": "SN-1", "mac": mac.upper()}, started_at=rf.at(60)),
        rf.run(serial="SN-2", dut={"serial": "SN-2", "mac": "24:0a:c4:00:00:02"}, started_at=rf.at(120), phases=failed),
        rf.run(serial="SN-2", dut={"serial": "SN-2", "mac": "24:0a:c4:00:00:09"}, started_at=rf.at(180)),  # conflict
        rf.run(serial="SN-2", dut={"serial": "SN-2", "mac": "24:0a:c4:00:00:09"}, started_at=rf.at(240)),
        rf.run(serial="SN-3", started_at=rf.at(300)),
    ]
    summary = batch_summary(runs)
    [total] = period_yields(runs).by_operator
    assert (total.units, total.first_pass_units, total.final_pass_units, total.runs) == (
        summary.yield_units, summary.first_pass_units, summary.final_pass_units, summary.runs)
    assert summary.yield_units == 5 and len(summary.conflicts) == 2


def _same_statistics(theirs: Any, mine: Any, key: Any) -> None:
    for field in ("n", "fails", "marginals"):
        assert getattr(theirs.moments, field) == getattr(mine.moments, field), (key, field)
    for field in ("mean", "sd", "minimum", "maximum", "mr_mean"):
        a, b = getattr(theirs.moments, field), getattr(mine.moments, field)
        assert (a is None and b is None) or math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12), (key, field, a, b)
    assert theirs.units == mine.units and theirs.limits == mine.limits, key
    assert theirs.histogram == mine.histogram, key


@pytest.mark.parametrize("chunk_runs", [1, 3, 7, 1000])
def test_mongodb_statistics_in_chunks_are_the_same_as_in_one(mongo: MongoSettings, chunk_runs: int) -> None:
    """The values are summed a chunk of runs at a time (no array per measurement): the moving ranges across
    chunk boundaries, chunks with no finite value (NaN only, the measurement missing), several runs at the
    same instant, and the newest values drawn must all come out as Python's over the whole."""
    rnd = random.Random(3)

    def chunky_run(i: int) -> Any:
        ms = [rf.measurement("drift", 1.0 + 0.01 * i + rnd.gauss(0, 0.003), units="V", low=0.9, high=2.0),
              rf.measurement("sparse", math.nan if i % 5 in (1, 2) else rnd.uniform(4, 6), low=4.5, high=5.5,
                             outcome=MeasurementOutcome.FAIL if i % 5 in (1, 2) else None)]
        if i % 4 != 3:  # missing from every fourth run (its phase ended early)
            ms.append(rf.measurement("gappy", rnd.gauss(10, 1), units="mA" if i < 30 else "A"))
        return rf.run(serial=f"SN-{i}", started_at=rf.at(60 * (i // 3)), phases=[rf.phase("p", measurements=ms)])

    runs = [chunky_run(i) for i in range(41)]
    sink = MongoSink(mongo)
    try:
        assert not sink.write_runs([(i + 1, r) for i, r in enumerate(runs)]).rejected
        in_db = {s.name: s for s in statistics_in_database(sink.runs, {"product": "esp32_sensor"}, chart_values=5,
                                                           chunk_runs=chunk_runs)}
    finally:
        sink.close()
    ordered = sorted(runs, key=lambda r: (r.started_at, r.run_id))
    in_python = {s.name: s for s in measurement_statistics(ordered)}
    assert set(in_db) == set(in_python) == {"drift", "sparse", "gappy"}
    for name, mine in in_python.items():
        theirs = in_db[name]
        _same_statistics(theirs, mine, name)
        # the newest five values are drawn, in run order
        assert theirs.drawn is not None and list(theirs.drawn.values.points) == list(mine.drawn.values.points[-5:])
        assert theirs.drawn.total == mine.moments.n
    assert in_db["gappy"].units == "A"


def tricky_runs() -> list:
    """Runs whose units only the order-dependent rule of reports/quality/units.py groups right, on two products."""
    import attrs

    failed = [rf.phase("identify", rf.Outcome.FAIL, reason="no answer")]
    passed = [rf.phase("identify", rf.Outcome.PASS)]
    hour = 3600
    specs = [
        # (seconds, product, dut, outcome phases or None for RUNNING, station, slot, operator)
        (0, "esp32_sensor", {"mac": "24:0a:c4:00:00:01"}, failed, "line1-st03", 0, "alice"),  # MAC only, fails
        (60, "esp32_sensor", {"serial": "SN-1", "mac": "24-0A-C4-00-00-01"}, passed, "line1-st04", 1, "bob"),
        (120, "esp32_sensor", {"serial": "SN-2", "mac": "24:0a:c4:00:00:02"}, failed, "line1-st03", 2, "alice"),
        (180, "esp32_sensor", {"serial": "SN-2", "mac": "24:0a:c4:00:00:09"}, passed, "line1-st03", 2, "alice"),  # conflict
        (240, "esp32_sensor", {"serial": "SN-2", "mac": "24:0a:c4:00:00:09"}, passed, "line1-st04", 3, ""),  # again
        (300, "esp32_sensor", {"mac": "24:0a:c4:00:00:09"}, failed, "line1-st04", 3, "bob"),  # joins the flagged unit
        # a MAC alone, a serial alone, then both: two units, and the third run is flagged
        (360, "esp32_sensor", {"mac": "24:0a:c4:00:00:03"}, passed, "line1-st03", 0, "alice"),
        (420, "esp32_sensor", {"serial": "SN-3"}, failed, "line1-st03", 1, "alice"),
        (480, "esp32_sensor", {"serial": "SN-3", "mac": "24:0a:c4:00:00:03"}, passed, "line1-st03", 1, "alice"),
        # retests of plain units, across days, stations and operators; blanks around a serial are not part of it
        (600, "esp32_sensor", {"serial": "SN-4", "mac": "24:0a:c4:00:00:04"}, failed, "line1-st03", 4, "alice"),
        (23 * hour + 3000, "esp32_sensor", {"serial": " SN-4\u3000", "mac": "24:0A:C4:00:00:04"}, passed,
         "line1-st04", 5, "bob"),
        (25 * hour, "esp32_sensor", {"serial": "SN-5", "mac": "24:0a:c4:00:00:05"}, passed, "line1-st04", 5, "bob"),
        (25 * hour + 60, "esp32_sensor", {"serial": "SN-5", "mac": "24:0a:c4:00:00:05"}, failed, "line1-st03", 6,
         "alice"),
        (26 * hour, "esp32_sensor", {"serial": "SN-6", "mac": "24:0a:c4:00:00:06"}, None, "line1-st03", 7, "alice"),
        (26 * hour + 60, "esp32_sensor", {"serial": "SN-7", "mac": "24:0a:c4:00:00:07"}, None, "line1-st03", 8,
         "alice"),  # RUNNING, then finished
        (26 * hour + 120, "esp32_sensor", {"serial": "SN-7", "mac": "24:0a:c4:00:00:07"}, failed, "line1-st04", 8, "bob"),
        (26 * hour + 180, "esp32_sensor", {}, passed, "line1-st04", 9, "bob"),  # no identity: a unit of its own
        (26 * hour + 240, "esp32_sensor", {"serial": "   "}, failed, "line1-st04", 9, "bob"),  # a blank serial: none
        (49 * hour, "esp32_sensor", {"serial": "SN-8", "mac": "24:0a:c4:00:00:08"}, passed, "line1-st03", 0, "carol"),
        (49 * hour, "esp32_sensor", {"serial": "SN-9", "mac": "24:0a:c4:00:00:0a"}, failed, "line1-st04", 0, "carol"),
        # the same serials and MACs on another product: units of their own there
        (30, "sensor_final", {"serial": "SN-1", "mac": "24:0a:c4:00:00:01"}, failed, "final-st01", 0, "dora"),
        (90, "sensor_final", {"serial": "SN-1", "mac": "24:0a:c4:00:00:01"}, passed, "final-st01", 1, "dora"),
        (150, "sensor_final", {"mac": "24:0a:c4:00:00:02"}, passed, "final-st01", 1, "dora"),
    ]
    runs = []
    for i, (seconds, product, dut, phases, station, slot, operator) in enumerate(specs):
        run = rf.run(serial=dut.get("serial"), dut=dut, run_id=f"{i:04d}" + "0" * 28, started_at=rf.at(seconds),
                     phases=phases or passed, outcome=None if phases is None else "auto", product=product,
                     station=station, slot=slot, operator=operator)
        runs.append(run)
    # a product whose identity is its IMEI, then its MAC
    runs.append(attrs.evolve(rf.run(serial=None, dut={"imei": "35-000", "mac": "24:0a:c4:00:00:01"}, run_id="i" * 32,
                                    started_at=rf.at(200), phases=passed), identity=("imei", "mac")))
    # and one whose identity's name MongoDB stores escaped (dut["lot.no"] is stored as "lot%2Eno")
    for i, when in enumerate((210, 26 * hour + 300)):
        runs.append(attrs.evolve(rf.run(serial=None, dut={"lot.no": " L-1 "}, run_id=f"l{i}" * 16,
                                        started_at=rf.at(when), phases=failed if i == 0 else passed),
                                 identity=("lot.no",)))
    return runs


def _tallies(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """Whether each period read from MongoDB streamed every header (True) or only the runs of shared identities."""
    from reports.quality import period, pipeline

    made: list[bool] = []

    class Recorded(period.PeriodTally):
        def __init__(self, *, count_runs: bool = True) -> None:
            made.append(count_runs)
            super().__init__(count_runs=count_runs)

    monkeypatch.setattr(pipeline, "PeriodTally", Recorded)
    return made


def _compare_period(mongo: MongoSettings, runs: list, *, write: bool = True, **period: Any) -> None:
    """``runs`` (written to MongoDB unless ``write`` is false) reported from MongoDB and from memory alike."""
    from reports.quality.units import group_units

    sink = MongoSink(mongo)
    try:
        if write:
            assert not sink.write_runs([(i + 1, r) for i, r in enumerate(runs)]).rejected
        for product in sorted({r.product for r in runs}):
            for station in (None, "line1-st04"):
                central = sink.period_report(product=product, station=station, **period)
                since, until = period.get("since"), period.get("until")
                ordered = sorted((r for r in runs if r.product == product and station in (None, r.station)
                                  and (since is None or r.started_at >= since)
                                  and (until is None or r.started_at < until)), key=lambda r: (r.started_at, r.run_id))
                if not ordered:
                    continue
                local = period_from_runs(ordered, product=product, station=station, **period)
                assert central.yields == local.yields, (product, station)
                assert central.outcome_counts == local.outcome_counts
                assert central.total.units == len(group_units(ordered).units) - sum(
                    1 for u in group_units(ordered).units if all(r.outcome is None for r in ordered
                                                                 if r.run_id in u.run_ids))
    finally:
        sink.close()


def test_mongodb_groups_units_as_python_does(mongo: MongoSettings, monkeypatch: pytest.MonkeyPatch) -> None:
    """MAC-only runs joining their serial's unit, serial/MAC conflicts flagged, RUNNING runs, runs on several days,
    stations, slots and operators, and two products: the yields from MongoDB are Python's, table for table."""
    made = _tallies(monkeypatch)
    runs = tricky_runs()
    ordered = sorted(runs, key=lambda r: (r.started_at, r.run_id))
    mine = period_yields([r for r in ordered if r.product == "esp32_sensor"])
    assert not mine.hourly and [r.bucket for r in mine.by_time] == ["2024-05-14", "2024-05-15", "2024-05-16"]
    assert {r.bucket for r in mine.by_operator} >= {"(none)", "carol"}
    _compare_period(mongo, runs)
    _compare_period(mongo, runs, write=False, since=rf.T0, until=rf.T0 + dt.timedelta(hours=5))  # by hour
    _compare_period(mongo, runs, write=False, since=rf.T0 + dt.timedelta(minutes=31))  # SN-1 without its MAC run
    assert made and not any(made)  # never every header: only the runs of shared identity values
    # a shared value with more runs than are listed with it: its runs are found by their identity instead
    from reports.quality import pipeline

    monkeypatch.setattr(pipeline, "SHARED_RUNS", 1)
    made.clear()
    _compare_period(mongo, runs, write=False)
    assert made and not any(made)


def test_units_the_database_cannot_group_fall_back_to_every_header(mongo: MongoSettings,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """More shared identity values than the database lists, or a MAC it cannot lower-case as Python does: every
    header is streamed to Python's rule, and the yields are still Python's."""
    from reports.quality import pipeline

    runs = tricky_runs()
    monkeypatch.setattr(pipeline, "TANGLED_MAX", 2)
    made = _tallies(monkeypatch)
    _compare_period(mongo, runs)
    assert made[0] is True  # esp32_sensor: more shared values than listed
    monkeypatch.setattr(pipeline, "TANGLED_MAX", 10_000)
    made.clear()
    odd = rf.run(serial=None, dut={"mac": "24:0A:C4:00:00:0\u00c4"}, run_id="o" * 32, started_at=rf.at(400))
    odder = rf.run(serial="SN-Ä", dut={"serial": "SN-Ä", "mac": "24:0a:c4:00:00:0\u00e4"}, run_id="p" * 32,
                   started_at=rf.at(500))
    sink = MongoSink(mongo)
    try:
        assert not sink.write_runs([(len(runs) + 1, odd), (len(runs) + 2, odder)]).rejected
    finally:
        sink.close()
    _compare_period(mongo, [*runs, odd, odder], write=False)
    assert made[0] is True and made[1] is False  # esp32_sensor has the odd MACs, sensor_final not


def test_groups_spilled_to_disk_keep_the_runs_order(own_mongod: Any) -> None:
    """A period's units take their first run's place from ``$first``, and the statistics push each chunk's values
    in run order: both rely on a ``$group`` keeping its input's order, on disk too. Every group spilled (a
    1 kB memory limit), the numbers are still Python's."""
    from tests.mongo_support import direct_client, fresh_settings

    settings = fresh_settings(own_mongod.uri)
    client = direct_client(settings)
    try:
        client.admin.command("setParameter", 1, internalDocumentSourceGroupMaxMemoryBytes=1000)
    finally:
        client.close()
    _compare_period(settings, tricky_runs())
    rnd = random.Random(5)
    runs = [rf.run(serial=f"SN-{i}", started_at=rf.at(i), phases=[rf.phase("p", measurements=[
        rf.measurement("x", rnd.gauss(0, 1), low=-3, high=3)])]) for i in range(1500)]
    sink = MongoSink(fresh_settings(own_mongod.uri))
    try:
        assert not sink.write_runs([(i + 1, r) for i, r in enumerate(runs)]).rejected
        [theirs] = statistics_in_database(sink.runs, {"product": "esp32_sensor"}, chart_values=300, chunk_runs=100)
    finally:
        sink.close()
    [mine] = measurement_statistics(runs)
    _same_statistics(theirs, mine, "x")
    assert theirs.drawn is not None and theirs.drawn.total == 1500
