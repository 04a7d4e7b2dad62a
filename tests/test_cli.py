"""The `sequencer` command in-process: exit codes, one-line errors, check/runs/report output."""

from __future__ import annotations

import hashlib
import json
import textwrap
from pathlib import Path

import pytest
import serial

from fixtures.sim.pty import PtyEndpoint
from reports.storage.store import LocalStore, _Write
from sequencer.records import Outcome, RunRecord
from tests import records_factory
from sequencer.cli import main
from sequencer.version import SEQUENCER_VERSION

ROOT = Path(__file__).resolve().parent.parent
SENSOR = ROOT / "products" / "esp32_sensor.py"


def one_line_error(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0, f"expected one line, got:\n{err}"
    assert err.startswith("sequencer: error: ")
    return err


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    from importlib.metadata import version

    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out == f"sequencer {SEQUENCER_VERSION}\n"
    assert SEQUENCER_VERSION.startswith(version("sequencer"))


def test_check_prints_the_graph_in_layers(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", str(SENSOR)]) == 0
    out = capsys.readouterr().out
    assert "product esp32-sensor" in out
    assert "limits  " in out and "sha256" in out
    assert f"code    sequencer {SEQUENCER_VERSION}" in out  # what the records will name
    layer_lines = [line for line in out.splitlines() if line.strip().startswith("layer")]
    assert len(layer_lines) >= 3
    assert "(concurrent)" in out
    assert "teardown (always runs, in order)" in out
    lines = out.splitlines()
    detect = next(i for i, line in enumerate(lines) if line.strip().startswith("detect  ("))
    # the phase's docstring, its first line
    assert lines[detect + 1].strip().startswith("Put the board in its ROM loader as the station's wiring says;")


@pytest.mark.parametrize(
    "body, fragment",
    [
        ("this is not python(\n", "syntax error"),
        ("import nowhere_to_be_found\n", "does not import: ModuleNotFoundError"),
        (
            "from sequencer import Product, phase\n@phase(after=['ghost'])\nasync def a(): pass\n"
            "product = Product('p', [a])\n",
            "phase 'a': depends on unknown phase 'ghost'",
        ),
    ],
)
def test_bad_product_files_exit_2_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], body: str, fragment: str
) -> None:
    product = tmp_path / "bad.py"
    product.write_text(body)
    assert main(["check", str(product)]) == 2
    err = one_line_error(capsys)
    assert str(product) in err and fragment in err


def test_bad_limits_file_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    limits = tmp_path / "limits.toml"
    limits.write_text("[supply_rails]\nvdd_3v3 = { low = 3.5, high = 3.4 }\n")
    assert main(["check", str(SENSOR), "--limits", str(limits)]) == 2
    assert "vdd_3v3: in_range low 3.5 is greater than high 3.4" in one_line_error(capsys)


def test_unknown_option_exits_2_with_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["run", str(SENSOR), "--sim", "2", "--frobnicate"])
    assert info.value.code == 2
    err = one_line_error(capsys)
    assert "unrecognized arguments: --frobnicate" in err
    with pytest.raises(SystemExit) as info:
        main(["run", str(SENSOR), "--sim", "-3"])
    assert info.value.code == 2
    assert "argument --sim: '-3' is negative" in capsys.readouterr().err  # the option, not a station file


def test_an_option_that_is_not_text_exits_2_before_anything_is_recorded(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Bytes that are not UTF-8 arrive as lone surrogates: a record holding one could never be read back.
    store = tmp_path / "store.sqlite"
    assert main(["run", str(SENSOR), "--sim", "1", "--store", str(store), "--batch", "bad\udcff"]) == 2
    assert one_line_error(capsys) == "sequencer: error: --batch: not valid UTF-8 text (bad\\udcff)"
    assert not store.exists()
    assert main(["runs", "--store", str(store), "--serial", "\udcff"]) == 2
    assert "--serial: not valid UTF-8 text" in one_line_error(capsys)


def test_a_resource_no_simulator_provides_is_one_line_from_inside_the_session(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    product = tmp_path / "nope.py"
    product.write_text(textwrap.dedent("""
        from sequencer import Product, phase

        @phase
        async def a(resources) -> None:
            pass

        product = Product("nope", [a], resources={"dmm": "nope-kind"})
    """))
    assert main(["run", str(product), "--sim", "1", "--store", str(tmp_path / "s.sqlite"), "--plain"]) == 2
    assert one_line_error(capsys) == ("sequencer: error: product 'nope': resource 'dmm': no simulated instrument of "
                                      "kind 'nope-kind' (known: scpi-dmm, zpl-printer)")


def test_an_empty_run_id_is_a_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    store = tmp_path / "store.sqlite"
    LocalStore.open(store).close()
    assert main(["report", "--run", "", "--store", str(store)]) == 2
    assert one_line_error(capsys) == "sequencer: error: --run: give a run id (or the start of one)"


def test_an_error_from_inside_the_session_is_still_one_line_and_ctrl_c_is_130(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import sequencer.cli as cli
    from sequencer.config import ConfigError

    def raises_in_a_nursery(args: object) -> int:
        raise ExceptionGroup("nursery", [ExceptionGroup("inner", [ConfigError("station.toml: resources.dmm: bad")])])

    monkeypatch.setattr(cli, "cmd_check", raises_in_a_nursery)
    assert main(["check", str(SENSOR)]) == 2
    assert one_line_error(capsys) == "sequencer: error: station.toml: resources.dmm: bad"

    def interrupted(args: object) -> int:
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "cmd_check", interrupted)
    assert main(["check", str(SENSOR)]) == 130
    assert capsys.readouterr().err == ""


def test_run_needs_to_know_where_the_duts_are(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", str(SENSOR), "--store", str(tmp_path / "s.sqlite")]) == 2
    assert "--sim N, --port PATH, --bench N, or --station FILE" in one_line_error(capsys)


def test_missing_port_exits_2_naming_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", str(SENSOR), "--port", "/dev/ttyNOPE9", "--store", str(tmp_path / "s.sqlite")]) == 2
    assert "port /dev/ttyNOPE9: does not exist" in one_line_error(capsys)
    assert main(["run", str(SENSOR), "--port", str(tmp_path), "--store", str(tmp_path / "s.sqlite")]) == 2
    assert one_line_error(capsys).endswith(f"port {tmp_path}: is a directory, not a serial port")
    (tmp_path / "file").write_text("")
    assert main(["run", str(SENSOR), "--port", str(tmp_path / "file"), "--store", str(tmp_path / "s.sqlite")]) == 2
    assert one_line_error(capsys).endswith(f"port {tmp_path / 'file'}: not a serial port (a terminal device is needed)")
    # A port served over the network is named by its URL, and checked for its form.
    assert main(["run", str(SENSOR), "--port", "rfc2217://10.0.0.7", "--store", str(tmp_path / "s.sqlite")]) == 2
    assert one_line_error(capsys).endswith("port rfc2217://10.0.0.7: 'rfc2217://10.0.0.7' has no TCP port "
                                           "(rfc2217://host:port)")
    assert main(["run", str(SENSOR), "--port", "socket://10.0.0.7:9", "--store", str(tmp_path / "s.sqlite")]) == 2
    assert one_line_error(capsys).endswith("port socket://10.0.0.7:9: the only port URLs are rfc2217://host:port")


def test_busy_port_exits_2_naming_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with PtyEndpoint() as endpoint:
        holder = serial.Serial(endpoint.path, exclusive=True)
        try:
            code = main(["run", str(SENSOR), "--port", endpoint.path, "--store", str(tmp_path / "s.sqlite")])
        finally:
            holder.close()
    assert code == 2
    assert f"port {endpoint.path}: busy or not usable" in one_line_error(capsys)


def test_too_few_ptys_for_the_simulated_farm_exits_2_before_any_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("fixtures.sim.farm.free_ptys", lambda: 3)
    store = tmp_path / "s.sqlite"
    assert main(["run", str(SENSOR), "--sim", "4", "--store", str(store)]) == 2
    assert one_line_error(capsys) == (
        "sequencer: error: sim 4: a simulated DUT needs a pty, and only 3 are free (/proc/sys/kernel/pty/max)"
    )
    assert not store.exists()  # refused before testing: no run recorded as failed for it


def test_station_file_with_unknown_key_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    station = tmp_path / "station.toml"
    station.write_text("sim = 2\nprots = ['/dev/ttyUSB0']\n")
    assert main(["run", str(SENSOR), "--station", str(station)]) == 2
    assert "unknown key 'prots'" in one_line_error(capsys)
    station.write_text('station = ""\nsim = 1\n')  # it would name every record, and start the batch id
    assert main(["run", str(SENSOR), "--station", str(station)]) == 2
    assert one_line_error(capsys).endswith("station must be a name (printable, no spaces at either end), got ''")


def test_station_file_drives_a_run_and_options_override_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    station = tmp_path / "station.toml"
    station.write_text(textwrap.dedent("""
        station = "line1-st3"
        operator = "aoife"
        batch = "FROM-FILE"
        store = "data/store.sqlite"
        reports = "data/reports"
        sim = 3
    """))
    code = main(["run", str(SENSOR), "--station", str(station), "--batch", "FROM-CLI", "--plain"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "3/3 passed" in out
    assert (tmp_path / "data" / "reports" / "FROM-CLI" / "index.html").exists()

    assert main(["runs", "--store", str(tmp_path / "data" / "store.sqlite"), "--batch", "FROM-CLI", "--json"]) == 0
    runs = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(runs) == 3
    assert {r["station"] for r in runs} == {"line1-st3"} and {r["operator"] for r in runs} == {"aoife"}
    assert all(r["outcome"] == "PASS" and r["limits_sha256"] for r in runs)
    # which test code produced each record: the product file as loaded, and the sequencer's version
    # (with its commit when it runs from a checkout, see test_version.py)
    assert {r["product_sha256"] for r in runs} == {hashlib.sha256(SENSOR.read_bytes()).hexdigest()}
    assert {r["sequencer_version"] for r in runs} == {SEQUENCER_VERSION}

    serial_no = runs[0]["dut"]["serial"]
    assert main(["runs", "--store", str(tmp_path / "data" / "store.sqlite"), "--serial", serial_no]) == 0
    assert "1 run(s)" in capsys.readouterr().out

    out_html = tmp_path / "batch.html"
    assert main(["report", "--store", str(tmp_path / "data" / "store.sqlite"), "--batch", "FROM-CLI",
                 "-o", str(out_html)]) == 0
    assert serial_no in out_html.read_text()
    one = tmp_path / "one.html"
    assert main(["report", "--store", str(tmp_path / "data" / "store.sqlite"), "--run", runs[0]["run_id"][:10],
                 "-o", str(one)]) == 0
    assert runs[0]["run_id"] in one.read_text()


def test_the_station_file_can_be_named_once_in_the_environment(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    station = tmp_path / "station.toml"
    station.write_text('station = "line2-st1"\nstore = "data/store.sqlite"\nsim = 2\nbatch = "ENV"\n')
    monkeypatch.setenv("SEQUENCER_STATION", str(station))
    assert main(["run", str(SENSOR), "--plain"]) == 0  # what an operator types
    assert "2/2 passed" in capsys.readouterr().out
    assert main(["runs", "--json"]) == 0  # its store, from the same file
    assert {json.loads(line)["station"] for line in capsys.readouterr().out.splitlines()} == {"line2-st1"}
    # an option still wins over the file it names
    assert main(["run", str(SENSOR), "--plain", "--sim", "1", "--batch", "ONE"]) == 0
    assert "1/1 passed" in capsys.readouterr().out
    monkeypatch.setenv("SEQUENCER_STATION", str(tmp_path / "gone.toml"))
    assert main(["runs"]) == 2
    gone = tmp_path / "gone.toml"
    assert one_line_error(capsys) == f"sequencer: error: SEQUENCER_STATION={gone}: no such station file"


def test_a_station_file_that_names_its_product_needs_nothing_else(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The operator command: `sequencer run --station station.toml`.
    import os

    station = tmp_path / "st" / "station.toml"
    station.parent.mkdir()
    relative = os.path.relpath(SENSOR, station.parent)  # relative to the station file, like store and reports
    station.write_text(f'product = "{relative}"\nstore = "store.sqlite"\nsim = 2\n[resources.dmm]\ncapacity = 1\n')
    assert main(["run", "--station", str(station), "--plain"]) == 0
    assert "2/2 passed" in capsys.readouterr().out
    assert main(["check", "--station", str(station)]) == 0
    assert capsys.readouterr().out.startswith("product esp32-sensor")
    # A simulated station simulates the instruments: check agrees with run without [resources.dmm] too.
    station.write_text(f'product = "{relative}"\nstore = "store.sqlite"\nsim = 2\n')
    assert main(["check", "--station", str(station)]) == 0
    assert capsys.readouterr().out.startswith("product esp32-sensor")
    # a product on the command line wins over the file's
    other = tmp_path / "other.py"
    other.write_text("from sequencer import Product, phase\n@phase()\nasync def only(): pass\n"
                     "product = Product('other', [only])\n")
    assert main(["run", str(other), "--station", str(station), "--plain"]) == 0
    assert "other on 2 slot(s)" in capsys.readouterr().out

    assert main(["run", "--sim", "1"]) == 2
    assert one_line_error(capsys) == (
        'sequencer: error: say which product: sequencer run PRODUCT, or product = "..." in the station file'
    )
    station.write_text('product = " "\nsim = 1\n')
    assert main(["run", "--station", str(station)]) == 2
    assert one_line_error(capsys) == f"sequencer: error: {station}: product must name a product file"


def test_report_for_unknown_batch_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    store = tmp_path / "s.sqlite"
    LocalStore.open(store).close()
    assert main(["report", "--store", str(store), "--batch", "NOPE", "-o", str(tmp_path / "x.html")]) == 2
    assert "batch 'NOPE': no runs" in one_line_error(capsys)


def test_runs_without_a_store_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["runs", "--store", str(tmp_path / "missing.sqlite")]) == 2
    assert "no local store here" in one_line_error(capsys)


def _store_with_runs(path: Path, count: int) -> list[RunRecord]:
    runs = [records_factory.run(serial=f"SN{i:03d}", started_at=records_factory.at(i), batch="B" if i % 2 else "A",
                                outcome=Outcome.FAIL if i % 3 == 0 else Outcome.PASS)
            for i in range(count)]
    store = LocalStore.open(path)
    store._write_batch([w for r in runs for w in (_Write.begin(r), _Write.finish(r))])
    store.close()
    return runs


def test_runs_lists_the_most_recent_and_says_how_many_match(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # A station's store keeps every run it ever took: `runs` shows the latest
    # unless asked for more, and says what it left out.
    store = str(tmp_path / "s.sqlite")
    runs = _store_with_runs(tmp_path / "s.sqlite", 7)

    def listed(*args: str) -> tuple[list[str], list[str]]:
        assert main(["runs", "--store", store, *args]) == 0
        out = capsys.readouterr().out
        shown = sorted((out.index(r.run_id[:12]), r.serial) for r in runs if r.run_id[:12] in out)
        lines = out.strip().splitlines()
        footer = lines[-2:] if lines[-1].startswith("showing") else lines[-1:]
        return [serial for _, serial in shown], footer

    # the tally covers every matching run, listed or not: SN000, SN003 and SN006 failed
    assert listed() == ([f"SN{i:03d}" for i in range(7)], ["7 run(s): 4 PASS · 3 FAIL"])
    assert listed("--limit", "3") == (
        ["SN004", "SN005", "SN006"],
        ["7 run(s): 4 PASS · 3 FAIL", "showing the 3 most recent (--limit N for more, --limit 0 for all)"],
    )
    assert listed("--limit", "0")[0] == [f"SN{i:03d}" for i in range(7)]
    assert listed("--batch", "B", "--limit", "2") == (
        ["SN003", "SN005"],
        ["3 run(s): 2 PASS · 1 FAIL", "showing the 2 most recent (--limit N for more, --limit 0 for all)"],
    )
    assert listed("--outcome", "FAIL") == (["SN000", "SN003", "SN006"], ["3 run(s): 3 FAIL"])
    assert listed("--batch", "NOPE") == ([], [f"no runs with batch 'NOPE' in {store}"])
    # JSON is for scripts: every matching run unless --limit says otherwise
    monkeypatch.setattr("sequencer.cli.RUNS_SHOWN", 2)
    assert len(listed()[0]) == 2
    assert main(["runs", "--store", store, "--json"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 7
    assert main(["runs", "--store", store, "--json", "--limit", "3"]) == 0
    assert [json.loads(line)["dut"]["serial"] for line in capsys.readouterr().out.splitlines()] == [
        "SN004", "SN005", "SN006"
    ]
    with pytest.raises(SystemExit) as info:
        main(["runs", "--store", store, "--limit", "-1"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err == "sequencer runs: error: argument --limit: '-1' is negative (see 'sequencer runs --help')\n"


def test_a_run_given_only_a_store_writes_its_reports_beside_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = tmp_path / "usb" / "store.sqlite"
    assert main(["run", str(SENSOR), "--sim", "1", "--store", str(store), "--batch", "B", "--plain"]) == 0
    report = tmp_path / "usb" / "reports" / "B" / "index.html"
    assert f"Report: {report}" in capsys.readouterr().out.replace("\n", "")
    assert report.exists()


def test_report_without_output_rewrites_the_file_the_run_wrote(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Quality regenerates a lost or stale report with the station file alone,
    # and finds it where the station put it.
    station = tmp_path / "station.toml"
    station.write_text('store = "data/store.sqlite"\nreports = "html"\nsim = 2\nbatch = "B7"\n')
    assert main(["run", str(SENSOR), "--station", str(station), "--plain"]) == 0
    capsys.readouterr()
    batch_page = tmp_path / "html" / "B7" / "index.html"
    first = batch_page.read_text()
    run_pages = sorted(p for p in batch_page.parent.iterdir() if p.name != "index.html")
    assert len(run_pages) == 2
    for page in (batch_page, *run_pages):
        page.unlink()

    assert main(["report", "--station", str(station), "--batch", "B7"]) == 0
    assert capsys.readouterr().out == f"{batch_page}\n"
    assert batch_page.read_text() == first  # same page, same title, as `sequencer run` wrote
    run_id = run_pages[0].stem
    assert main(["report", "--station", str(station), "--run", run_id[:8]]) == 0
    assert capsys.readouterr().out == f"{run_pages[0]}\n"
    assert run_id in run_pages[0].read_text()
    assert not run_pages[1].exists()
    # --store wins over the station file's store, as for every command
    assert main(["runs", "--station", str(station), "--store", str(tmp_path / "other.sqlite")]) == 2
    assert f"{tmp_path / 'other.sqlite'}: no local store here" in one_line_error(capsys)


def test_report_that_cannot_be_written_exits_2_naming_the_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    runs = _store_with_runs(tmp_path / "s.sqlite", 1)
    (tmp_path / "a-file").write_text("")
    target = tmp_path / "a-file" / "batch.html"
    assert main(["report", "--store", str(tmp_path / "s.sqlite"), "--batch", runs[0].batch, "-o", str(target)]) == 2
    assert one_line_error(capsys) == (
        f"sequencer: error: {target}: cannot write the report: not a directory: {tmp_path / 'a-file'}"
    )
    assert main(["report", "--store", str(tmp_path / "s.sqlite"), "--batch", runs[0].batch, "-o", "/proc/b.html"]) == 2
    assert one_line_error(capsys).startswith("sequencer: error: /proc/b.html: cannot write the report: ")


def test_a_batch_id_never_names_a_folder_outside_the_reports(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    reports = tmp_path / "r"
    args = ["run", str(SENSOR), "--sim", "1", "--store", str(tmp_path / "s.sqlite"), "--reports", str(reports),
            "--batch", "../../outside", "--plain"]
    assert main(args) == 0
    capsys.readouterr()
    written = sorted(p.relative_to(tmp_path).parts for p in tmp_path.rglob("*.html"))
    assert len(written) == 2
    folder = written[0][1]
    assert all(parts[:2] == ("r", folder) and len(parts) == 3 for parts in written)
    assert folder.endswith("_outside-" + hashlib.sha256(b"../../outside").hexdigest()[:8])
    assert not folder.startswith(".")
    assert "batch ../../outside" in (reports / folder / "index.html").read_text()
    # the record keeps the batch as given
    assert main(["runs", "--store", str(tmp_path / "s.sqlite"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["batch"] == "../../outside"


def test_a_batch_id_that_looks_like_markup_is_printed_as_typed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    batch = "B[/x][bold]7"
    store = str(tmp_path / "s.sqlite")
    assert main(["run", str(SENSOR), "--sim", "1", "--store", store, "--batch", batch, "--plain"]) == 0
    out = capsys.readouterr().out
    assert f"batch {batch}, station" in out
    assert main(["runs", "--store", store]) == 0
    assert batch in capsys.readouterr().out


def test_runs_table_fits_80_columns_without_splitting_identifiers(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "80")
    # an open run, found INTERRUPTED: the longest outcome
    r = records_factory.run(serial="SN6961000012345", batch="a-rather-long-batch-name-2026-47", outcome=None)
    store = LocalStore.open(tmp_path / "s.sqlite")
    store._write_batch([_Write.begin(r)])
    store.close()
    LocalStore.open(tmp_path / "s.sqlite", station=True).close()  # the next station start marks it INTERRUPTED
    assert main(["runs", "--store", str(tmp_path / "s.sqlite")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert max(len(line) for line in lines) <= 80
    row = next(line for line in lines if r.run_id[:12] in line)
    assert "SN6961000012345" in row and f"{r.started_at:%Y-%m-%d %H:%M:%S}" in row and "INTERRUPTED" in row


def test_runs_from_several_stations_never_show_a_serial_cut_short(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "80")
    runs = [records_factory.run(serial=f"SN69610000{i}", batch="B", station=f"shannon-line1-st{i}", slot=i)
            for i in range(3)]
    store = LocalStore.open(tmp_path / "s.sqlite")
    store._write_batch([_Write.begin(r) for r in runs] + [_Write.finish(r) for r in runs])
    store.close()
    assert main(["runs", "--store", str(tmp_path / "s.sqlite")]) == 0
    lines = capsys.readouterr().out.splitlines()
    for r in runs:  # rather a line wider than the terminal than SN6961000 for SN69610000
        row = next(line for line in lines if r.run_id[:12] in line)
        assert r.serial in row.split() and r.outcome.value in row.split()


def test_batch_page_covers_every_session_of_the_batch(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["run", str(SENSOR), "--sim", "2", "--store", str(tmp_path / "s.sqlite"), "--reports",
            str(tmp_path / "r"), "--batch", "B", "--plain"]
    assert main(args) == 0
    assert main(args) == 0  # a second session on the same batch (retests of the same serials)
    capsys.readouterr()
    assert main(["runs", "--store", str(tmp_path / "s.sqlite"), "--batch", "B", "--json"]) == 0
    run_ids = [json.loads(line)["run_id"] for line in capsys.readouterr().out.splitlines()]
    assert len(run_ids) == 4
    page = (tmp_path / "r" / "B" / "index.html").read_text()
    assert all(run_id in page for run_id in run_ids)


def test_reading_commands_filter_by_start_time(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # One run a day, at 08:30 UTC on 14, 15 and 16 May 2024.
    runs = [records_factory.run(serial=f"SN{day}", started_at=records_factory.at(86400 * day)) for day in range(3)]
    store = LocalStore.open(tmp_path / "s.sqlite")
    store._write_batch([w for r in runs for w in (_Write.begin(r), _Write.finish(r))])
    store.close()

    def serials(*filters: str) -> list[str]:
        assert main(["runs", "--store", str(tmp_path / "s.sqlite"), "--json", *filters]) == 0
        return [json.loads(line)["dut"]["serial"] for line in capsys.readouterr().out.splitlines()]

    assert serials("--since", "2024-05-15") == ["SN1", "SN2"]  # a date is midnight UTC
    assert serials("--until", "2024-05-15") == ["SN0"]
    assert serials("--since", "2024-05-15", "--until", "2024-05-16T08:30:00") == ["SN1"]  # until is exclusive
    assert serials("--since", "2024-05-15T10:30+02:00") == ["SN1", "SN2"]  # an offset is honoured: 08:30 UTC

    out = tmp_path / "week.csv"
    assert main(["export", "--store", str(tmp_path / "s.sqlite"), "--since", "2024-05-16", "-o", str(out)]) == 0
    assert [line.split(",")[2] for line in out.read_text().splitlines()[1:]] == ["SN2"]
    capsys.readouterr()

    assert main(["runs", "--store", str(tmp_path / "s.sqlite"), "--since", "2030-01-01"]) == 0
    assert capsys.readouterr().out.startswith("no runs with since 2030-01-01 00:00:00 UTC in ")
    with pytest.raises(SystemExit) as info:
        main(["runs", "--store", str(tmp_path / "s.sqlite"), "--since", "yesterday"])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("sequencer runs: error: argument --since: 'yesterday' is not a date (YYYY-MM-DD) or an ISO")
    assert err.count("\n") == 0


def test_sim_board_is_for_simulated_stations_and_names_a_kind(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    store = ["--store", str(tmp_path / "s.sqlite")]
    assert main(["run", str(SENSOR), "--port", "/dev/ttyUSB7", "--sim-board", "devkitc", *store]) == 2
    assert one_line_error(capsys) == "sequencer: error: --sim-board: says what the simulated boards are; give --sim N too"
    with pytest.raises(SystemExit) as info:
        main(["run", str(SENSOR), "--sim", "1", "--sim-board", "wroom", *store])
    assert info.value.code == 2
    assert "argument --sim-board: invalid choice: 'wroom' (choose from 'jig', 'devkitc', 'esp32s3-usb')" in (
        capsys.readouterr().err)
