"""Authoring past OpenHTF: dimensioned measurements, reading back, the record so far, monitors, parametrised phases.

Ports OpenHTF's ``examples/measurements.py`` (``multdim_measurements``: a
``(ms, V, A)`` series), ``test/core/monitors_test.py`` and
``examples/with_plugs.py`` (one phase declared once, used three times).
"""

from __future__ import annotations

from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

from sequencer import Measurement, Monitor, PhaseResult, Product, phase
from sequencer.product import ProductError, validate_product
from sequencer.records import MeasurementOutcome, Outcome
from tests.conftest import outcomes, run_product


async def test_a_series_over_several_dimensions_is_judged_per_point_and_as_a_whole(store_path: Path) -> None:
    # OpenHTF: Measurement('power_time_series').with_dimensions('ms', 'V', 'A'), set point by point.
    @phase(measurements=[
        Measurement("power_time_series", units="W").with_dimensions("ms", ("V", "V"), ("A", "A"))
        .in_range(0, 50).check_series(lambda points: len(points) == 10, "ten samples"),
        Measurement("average_voltage", units="V"),
        Measurement("resistance", units="ohm").in_range(9, 11),
    ])
    async def multidim_measurements(ctx) -> None:
        for t in range(10):
            voltage = 10 + 10.0 * t
            current = voltage / 10
            ctx.measurements.power_time_series[t, voltage, current] = voltage * current / 100
        series = ctx.measurements.power_time_series  # read back: coordinates, then value
        ctx.measurements.average_voltage = sum(point[1] for point in series) / len(series)
        ctx.measurements.resistance = ctx.measurements.average_voltage / (sum(p[2] for p in series) / len(series))

    @phase(measurements=[Measurement("curve").with_dimensions(("t", "s")).in_range(0, 1)
                         .check_series(lambda pts: pts[-1][-1] < 0.1, "settles below 0.1")])
    async def settles_too_high(ctx) -> None:
        ctx.measurements.curve = [(0, 0.9), (1, 0.5), (2, 0.3)]

    [run] = await run_product(Product("p", [multidim_measurements, settles_too_high]), store_path)
    series, average, resistance = run.phase("multidim_measurements").measurements
    assert series.outcome is MeasurementOutcome.PASS and len(series.value) == 10
    assert series.value[2] == [2, 30.0, 3.0, 0.9] and series.dimensions == (("ms", "ms"), ("V", "V"), ("A", "A"))
    assert series.validators == ("0 <= x <= 50", "series: ten samples")
    assert average.value == 55.0 and resistance.value == pytest.approx(10.0)
    curve = run.phase("settles_too_high").measurements[0]
    assert (curve.outcome, curve.reason) == (MeasurementOutcome.FAIL, "the series fails: settles below 0.1")


async def test_a_point_out_of_limits_names_its_coordinates_and_a_bad_point_is_the_phases_error(
    store_path: Path,
) -> None:
    @phase(measurements=[Measurement("iv").with_dimensions("V", "T").in_range(0, 1)])
    async def sweep(ctx) -> None:
        ctx.measurements.iv[1.0, 25] = 0.5
        ctx.measurements.iv[2.0, 25] = 1.5

    @phase(measurements=[Measurement("iv").with_dimensions("V", "T")])
    async def malformed(ctx) -> None:
        ctx.measurements.iv = [(1.0, 0.5)]  # a point needs V, T and the value

    [run] = await run_product(Product("p", [sweep, malformed]), store_path)
    assert run.phase("sweep").reason == "measurement 'iv': at (2.0, 25): 1.5 is above 1"
    assert run.phase("malformed").outcome is Outcome.ERROR
    assert run.phase("malformed").reason == ("TypeError: measurement 'iv': point 0 has 2 values, expected 3 "
                                             "(V, T, value)")


async def test_a_phase_reads_back_its_values_and_earlier_phases_from_the_record(store_path: Path) -> None:
    @phase(measurements=[Measurement("vdd", units="V").in_range(3.2, 3.4)])
    async def rails(ctx) -> None:
        ctx.measurements.vdd = 3.3
        ctx.attach("rails.csv", "vdd\n3.3\n", "text/csv")

    @phase(measurements=[Measurement("margin", units="V").in_range(0.05, None)], after=[rails])
    async def margin(ctx) -> None:
        ctx.measurements.margin = round(3.4 - ctx.record.value("rails", "vdd"), 3)
        assert ctx.measurements.margin == 0.1  # read back
        assert ctx.record.measurement("rails", "vdd").outcome is MeasurementOutcome.PASS
        assert ctx.record.attachment("rails", "rails.csv").data == b"vdd\n3.3\n"
        assert ctx.record.attachment("rails", "nope.csv") is None
        ctx.record.value("rails", "nope")

    [run] = await run_product(Product("p", [rails, margin]), store_path)
    assert run.phase("margin").measurements[0].value == 0.1
    assert run.phase("margin").reason == "KeyError: \"phase 'rails' ended PASS without measurement 'nope'\""


async def test_a_monitor_samples_while_the_phase_runs_into_a_series_with_limits(store_path: Path) -> None:
    readings = iter([0.10, 0.12, 0.11, 0.30, 0.12, 0.11, 0.10, 0.10, 0.10, 0.10, 0.10, 0.10])

    @asynccontextmanager
    async def meter(slot: Any) -> Any:
        yield lambda: next(readings)

    async def supply_current(dmm: Any) -> float:
        return dmm()

    @phase(monitors=[Monitor(Measurement("current", units="A").in_range(0, 0.25), supply_current, period=0.05)])
    async def stress(ctx) -> None:
        await trio.sleep(0.22)

    [run] = await run_product(Product("p", [stress], fixtures={"dmm": meter}), store_path)
    [current] = run.phase("stress").measurements
    assert current.dimensions == (("t", "s"),)
    times = [t for t, _ in current.value]
    assert 4 <= len(times) <= 6 and times[0] == pytest.approx(0, abs=0.02)
    assert all(b > a for a, b in zip(times, times[1:]))
    assert (current.outcome, run.phase("stress").outcome) == (MeasurementOutcome.FAIL, Outcome.FAIL)
    assert current.reason.startswith("at ") and current.reason.endswith(": 0.3 is above 0.25")


async def test_a_monitor_that_cannot_read_ends_the_phase_error_naming_it(store_path: Path) -> None:
    def broken() -> float:
        raise OSError("meter unplugged")

    @phase(monitors=[Monitor(Measurement("vbat", units="V"), broken, period=0.05)])
    async def soak() -> None:
        await trio.sleep(1)

    [run] = await run_product(Product("p", [soak]), store_path)
    assert run.phase("soak").outcome is Outcome.ERROR
    assert run.phase("soak").reason == "MonitorFailed: monitor 'vbat': OSError: meter unplugged"


def _pinger(host: str) -> Any:
    @asynccontextmanager
    async def open_pinger(slot: Any) -> Any:
        yield host

    return open_pinger


async def test_one_phase_declared_once_is_used_many_times_with_args_and_fixtures(store_path: Path) -> None:
    # OpenHTF's examples/with_plugs.py: test_ping.with_plugs(pinger=...).with_args(count=2, expected_retcode=0)
    @phase(name="ping_{pinger}_{count}", measurements=[Measurement("retcode").equals(0)])
    async def test_ping(ctx, pinger: str, count: int, expected_retcode: int) -> None:
        ctx.log.info("pinging", host=pinger, count=count)
        ctx.measurements.retcode = 0 if pinger != "dns_b" else 1

    hosts = ["google", "dns_a", "dns_b"]
    phases = [test_ping.with_fixtures(pinger=host).with_args(count=2, expected_retcode=0) for host in hosts]
    product = Product("with-plugs", phases, fixtures={h: _pinger(h) for h in hosts}, sequential=True)
    [run] = await run_product(product, store_path)
    assert outcomes(run) == {"ping_google_2": "PASS", "ping_dns_a_2": "PASS", "ping_dns_b_2": "FAIL"}
    assert run.phase("ping_dns_a_2").logs[0].message == "pinging host='dns_a' count=2"


def test_parametrised_phases_refuse_what_they_cannot_take() -> None:
    @phase(name="ping_{count}")
    async def ping(count: int, pinger: str) -> None:
        pass

    with pytest.raises(TypeError, match="phase 'ping_{count}': with_args: it has no parameter 'cuont'"):
        ping.with_args(cuont=2)
    with pytest.raises(TypeError, match="with_fixtures: 'count' is not one of its fixture parameters|"
                                        "with_fixtures: 'nope' is not"):
        ping.with_fixtures(nope="x")
    with pytest.raises(ProductError, match=r"phase 'ping_\{count\}': its name has fields nothing filled \(count\)"):
        validate_product(Product("p", [ping]), station_fixtures=["pinger"])
    @phase(name="ping_{pinger}")
    async def ping_host(count: int, pinger: str) -> None:
        pass

    with pytest.raises(ProductError, match=r"phase 'ping_dns': needs fixture 'count'.*or give the parameter a value "
                                           r"with \.with_args\(count=\.\.\.\)"):
        validate_product(Product("p", [ping_host.with_fixtures(pinger="dns")]), station_fixtures=["dns"])
    configured = ping.with_args(count=3).configured(timeout=5)
    assert (configured.name, configured.arguments, configured.timeout) == ("ping_3", {"count": 3}, 5)


async def test_repeat_keeps_a_monitors_points_unjudged(store_path: Path) -> None:
    attempts = 0

    @phase(monitors=[Monitor(Measurement("temp", units="degC").in_range(20, 30), lambda: 99.0, period=0.05)],
           repeat_limit=3)
    async def warming(ctx) -> PhaseResult | None:
        nonlocal attempts
        attempts += 1
        await trio.sleep(0.06)
        return PhaseResult.REPEAT if attempts < 2 else PhaseResult.SKIP

    [run] = await run_product(Product("p", [warming]), store_path)
    rec = run.phase("warming")
    assert [m.outcome for a in rec.attempts for m in a.measurements] == [MeasurementOutcome.SKIPPED] * 2
    assert all(len(a.measurements[0].value) >= 1 for a in rec.attempts)


async def test_a_fixture_that_cannot_open_is_one_error_line_naming_it(store_path: Path) -> None:
    @asynccontextmanager
    async def relay_board(slot: Any) -> Any:
        raise OSError(f"[Errno 2] could not open port /dev/ttyRELAY{slot.index}")
        yield  # pragma: no cover

    @phase
    async def switch(jig: Any) -> None:
        pass

    [run] = await run_product(Product("p", [switch], fixtures={"jig": relay_board}), store_path)
    rec = run.phase("switch")
    assert rec.outcome is Outcome.ERROR
    assert rec.reason == "fixture 'jig' cannot open: OSError: [Errno 2] could not open port /dev/ttyRELAY0"


def test_station_file_fixture_settings_are_checked_against_the_factory() -> None:
    from sequencer.fixtures import with_settings

    def relay_board(slot: Any, *, port: str, baudrate: int = 9600) -> Any:
        return (slot, port, baudrate)

    fixtures = {"jig": relay_board}
    bound = with_settings(fixtures, {"jig": {"port": "/dev/ttyUSB9"}}, "st.toml")
    assert bound["jig"]("slot") == ("slot", "/dev/ttyUSB9", 9600)
    cases = [
        ({"jig": {"port": "x", "baud": 1}}, "st.toml: fixtures.jig: unknown key 'baud' (the fixture takes: port, "
                                            "baudrate)"),
        ({}, "st.toml: fixtures.jig: needs port (the fixture's setting; give it in [fixtures.jig] of the station "
             "file)"),
        ({"jig": {"port": "x"}, "jg": {}}, "st.toml: fixtures.jg: the product has no fixture 'jg' (its fixtures: "
                                           "jig)"),
        ({"jig": {"port": "x"}, "flasher": {}}, "st.toml: fixtures.flasher: the station's 'flasher' fixture is "
                                                "configured by its own table, not [fixtures]"),
    ]
    for tables, message in cases:
        with pytest.raises(ValueError) as info:
            with_settings(fixtures, tables, "st.toml", others=["flasher"])
        assert str(info.value) == message


def test_bench_slots_exclude_ports_and_sim(tmp_path: Path) -> None:
    from sequencer.config import ConfigError, load_station_config

    station = tmp_path / "st.toml"
    station.write_text('station = "b1"\nbench = 2\nsim = 1\n')
    with pytest.raises(ConfigError, match="give one of ports, sim and bench"):
        load_station_config(station).check()
    station.write_text('station = "b1"\nbench = 2\n[fixtures]\njig = 3\n')
    with pytest.raises(ConfigError, match="fixtures.jig must be a table"):
        load_station_config(station)
