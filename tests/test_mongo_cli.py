"""`sequencer sync`, `sequencer find`, and where the MongoDB settings come from."""

from __future__ import annotations

import argparse
import csv
import io
import json
import textwrap
from pathlib import Path
from typing import Any

import attrs
import openpyxl
import pymongo
import pytest
import trio

from reports.storage.mongo import MongoSettings
from reports.storage.mongo_cli import apply_mongo_options, reading_runs
from reports.storage.mongod import free_port
from sequencer.cli import build_parser, main
from sequencer.config import ConfigError, StationConfig, load_station_config
from sequencer.records import Outcome, run_from_json
from tests import records_factory as rf
from tests.mongo_support import assert_mirrors_store, database
from tests.store_support import store_runs

ROOT = Path(__file__).resolve().parent.parent


def one_line_error(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0, f"expected one line, got:\n{err}"
    assert err.startswith("sequencer: error: ")
    return err


def station_file(tmp_path: Path, mongo_table: str) -> Path:
    path = tmp_path / "station.toml"
    path.write_text(textwrap.dedent(f"""\
        station = "st1"
        sim = 1
        store = "store.sqlite"
        {mongo_table}
    """))
    return path


def args(**given: str | None) -> argparse.Namespace:
    return argparse.Namespace(mongo=given.get("mongo"), mongo_db=given.get("mongo_db"))


# -- configuration ---------------------------------------------------------------


def test_option_beats_environment_beats_station_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = load_station_config(station_file(tmp_path, '[mongo]\nuri = "mongodb://file-host"\ndatabase = "fdb"'))
    assert (config.mongo_uri, config.mongo_db) == ("mongodb://file-host", "fdb")
    assert apply_mongo_options(config, args()).mongo_uri == "mongodb://file-host"
    monkeypatch.setenv("SEQUENCER_MONGO_URI", "mongodb://env-host")
    monkeypatch.setenv("SEQUENCER_MONGO_DB", "edb")
    resolved = apply_mongo_options(config, args())
    assert (resolved.mongo_uri, resolved.mongo_db) == ("mongodb://env-host", "edb")
    resolved = apply_mongo_options(config, args(mongo="mongodb://cli-host", mongo_db="cdb"))
    assert (resolved.mongo_uri, resolved.mongo_db) == ("mongodb://cli-host", "cdb")


def test_without_any_setting_the_station_stays_local(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert apply_mongo_options(StationConfig(), args()).mongo_uri == ""
    product = ROOT / "tests" / "products" / "mongo_widget.py"
    code = main(["run", str(product), "--sim", "1", "--store", str(tmp_path / "s.sqlite"),
                 "--reports", str(tmp_path / "r"), "--plain"])
    assert code == 0
    assert "MongoDB" not in capsys.readouterr().out


@pytest.mark.parametrize("where, expect", [
    ("option", "--mongo: not a usable MongoDB URI"),
    ("env", "SEQUENCER_MONGO_URI: not a usable MongoDB URI"),
    ("file", "station.toml: mongo.uri: not a usable MongoDB URI"),
])
def test_a_bad_uri_is_one_line_naming_where_it_came_from(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, where: str, expect: str
) -> None:
    bad = "http://db.example"
    argv = ["sync", "--station", str(station_file(tmp_path, f'[mongo]\nuri = "{bad}"' if where == "file" else ""))]
    if where == "option":
        argv += ["--mongo", bad]
    if where == "env":
        monkeypatch.setenv("SEQUENCER_MONGO_URI", bad)
    assert main(argv) == 2
    assert expect in one_line_error(capsys)


def test_mongo_table_rejects_unknown_keys_and_non_text(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"mongo: unknown key 'url' \(known: database, uri\)"):
        load_station_config(station_file(tmp_path, '[mongo]\nurl = "mongodb://h"'))
    with pytest.raises(ConfigError, match="mongo.database must be text"):
        load_station_config(station_file(tmp_path, '[mongo]\ndatabase = 3'))


# -- sync --------------------------------------------------------------------------


def test_sync_ships_the_backlog_shows_status_and_quarantine(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], mongo: MongoSettings
) -> None:
    store = tmp_path / "store.sqlite"
    trio.run(store_runs, store, [rf.sensor_run("SN-1"), rf.sensor_run("Q" * 300, slot=1)])
    target = ["--store", str(store), "--mongo", mongo.uri, "--mongo-db", mongo.database]

    assert main(["sync", "--status", *target]) == 0
    assert f"MongoDB {mongo.target}: 2 run(s) waiting to ship" in capsys.readouterr().out

    assert main(["sync", *target]) == 1  # one run is quarantined: not everything is in MongoDB
    out = capsys.readouterr().out
    assert "shipped 1 run(s)" in out and "nothing waiting to ship; 1 quarantined" in out
    assert "quarantined run" in out and "devices: document failed schema validation (serial:" in out

    assert main(["sync", "--quarantine", *target]) == 0
    out = capsys.readouterr().out
    assert "1 quarantined run(s)" in out and "sequencer sync --retry-quarantined" in out

    assert main(["sync", "--retry-quarantined", *target]) == 1
    assert "0 shipped, 1 still refused" in capsys.readouterr().out
    db = database(mongo)
    assert db.runs.count_documents({}) == 2 and db.devices.count_documents({}) == 1
    db.client.close()


def one_run_waiting(tmp_path: Path) -> Path:
    """A store holding one finished run that no database has yet."""
    store = tmp_path / "store.sqlite"
    trio.run(store_runs, store, [rf.sensor_run("SN-1")])
    return store


def test_sync_against_an_unreachable_database_keeps_the_backlog(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = one_run_waiting(tmp_path)
    unreachable = f"mongodb://127.0.0.1:{free_port()}/?serverSelectionTimeoutMS=300"
    assert main(["sync", "--store", str(store), "--mongo", unreachable]) == 1
    out = capsys.readouterr().out.strip()
    assert out.count("\n") == 0
    assert "shipped 0 run(s)" in out and "1 run(s) waiting to ship; unreachable:" in out


def test_sync_all_ships_every_run_again_after_a_restore(
    tmp_path: Path, mongo: MongoSettings, capsys: pytest.CaptureFixture[str]
) -> None:
    store = tmp_path / "store.sqlite"
    trio.run(store_runs, store, [rf.sensor_run("SN-1"), rf.sensor_run("SN-2", slot=1)])
    common = ["--store", str(store), "--mongo", mongo.uri, "--mongo-db", mongo.database]
    assert main(["sync", *common]) == 0
    db = database(mongo)
    db.runs.delete_many({})  # restored from a backup older than both runs: the collections stay
    db.devices.delete_many({})
    assert main(["sync", *common]) == 0 and db.runs.count_documents({}) == 0  # not noticed
    capsys.readouterr()
    assert main(["sync", "--all", *common]) == 0
    assert "shipped 2 run(s)" in capsys.readouterr().out
    assert_mirrors_store(store, mongo)
    db.client.close()


def test_a_cluster_whose_dns_records_cannot_be_found_is_unreachable_not_a_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # mongodb+srv:// is resolved when a client is made; DNS failing is MongoDB being away.
    store = one_run_waiting(tmp_path)
    srv = "mongodb+srv://station:s3cret@cluster.example.invalid/?connectTimeoutMS=2000"
    assert main(["sync", "--store", str(store), "--mongo", srv, "--status"]) == 0  # the store alone
    assert main(["sync", "--store", str(store), "--mongo", srv]) == 1
    captured = capsys.readouterr()
    out = captured.out.strip().splitlines()
    assert captured.err == "" and "s3cret" not in captured.out
    assert "1 run(s) waiting to ship; unreachable: ConfigurationError:" in out[-1]


def test_sync_without_mongodb_configured_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = tmp_path / "store.sqlite"
    trio.run(store_runs, store, [rf.sensor_run("SN-1")])
    assert main(["sync", "--store", str(store)]) == 2
    assert "no MongoDB configured: give --mongo URI, set SEQUENCER_MONGO_URI" in one_line_error(capsys)


# -- find ----------------------------------------------------------------------------


def _retested_unit(tmp_path: Path) -> Path:
    store = tmp_path / "store.sqlite"
    first = rf.sensor_run("SN-7", fail_rf=True, dut_extra={"imei": "356938035643809", "mac": "24:0a:c4:00:00:07"})
    second = rf.sensor_run("SN-7", started_at=rf.at(7200), dut_extra={"mac": "24:0A:C4:00:00:07"})
    other = rf.sensor_run("SN-8", slot=1, dut_extra={"mac": "24:0a:c4:00:00:08"})
    trio.run(store_runs, store, [first, second, other])
    return store


@pytest.mark.parametrize("source", ["mongodb", "local"])
def test_find_by_serial_mac_and_imei(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], mongo: MongoSettings, source: str
) -> None:
    store = _retested_unit(tmp_path)
    target = ["--store", str(store), "--mongo", mongo.uri, "--mongo-db", mongo.database]
    assert main(["sync", *target]) == 0
    capsys.readouterr()
    if source == "local":
        target.append("--local")
    for key in (["--serial", "SN-7"], ["--mac", "24:0a:c4:00:00:07"], ["--imei", "356938035643809"]):
        assert main(["find", *key, *target, "--json"]) == 0
        found = json.loads(capsys.readouterr().out)
        assert found["source"].startswith("MongoDB" if source == "mongodb" else "local store")
        [device] = found["devices"]
        assert device["serial"] == "SN-7" and device["last_outcome"] == "PASS"
        assert device["attributes"]["imei"] == "356938035643809"  # known from the first run only
        assert device["attributes"]["mac"] == "24:0A:C4:00:00:07"  # the retest's wins
        assert [r["outcome"] for r in device["history"]] == ["FAIL", "PASS"]
    assert main(["find", "--serial", "SN-7", *target]) == 0
    out = capsys.readouterr().out
    assert "device SN-7" in out and "last outcome  PASS" in out and "2 run(s)" in out

    assert main(["find", "--serial", "NOPE", *target]) == 1
    assert "no device with serial 'NOPE'" in capsys.readouterr().err


@pytest.mark.parametrize("source", ["mongodb", "local"])
def test_find_a_mac_seen_only_in_a_run_that_failed_before_identify(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], mongo: MongoSettings, source: str
) -> None:
    store = tmp_path / "store.sqlite"
    mac = "24:0A:C4:00:00:09"
    flash = rf.phase("flash_firmware", Outcome.FAIL, reason="verify failed at 0x12000 (MD5 mismatch)")
    failed = rf.run(serial=None, dut={"mac": mac, "chip": "ESP32"}, phases=[flash], started_at=rf.at(0))
    trio.run(store_runs, store, [failed])
    target = ["--store", str(store), "--mongo", mongo.uri, "--mongo-db", mongo.database]
    assert main(["sync", *target]) == 0
    if source == "local":
        target.append("--local")
    capsys.readouterr()
    assert main(["find", "--mac", mac.lower().replace(":", "-"), *target, "--json"]) == 0
    [device] = json.loads(capsys.readouterr().out)["devices"]
    assert device["serial"] is None and device["identity"] == {"mac": mac}
    assert [h["failure"] for h in device["history"]] == [
        "FAIL at flash_firmware: verify failed at 0x12000 (MD5 mismatch)"]

    # the clean retest knows its serial: one device, two runs, found by either
    retest = rf.run(serial="SN-9", dut={"serial": "SN-9", "mac": mac.lower()}, started_at=rf.at(3600))
    trio.run(store_runs, store, [retest])
    assert main(["sync", *target[:6]]) == 0
    capsys.readouterr()
    for key in (["--mac", mac], ["--serial", "SN-9"]):
        assert main(["find", *key, *target]) == 0
        out = capsys.readouterr().out
        assert "device SN-9" in out and "2 run(s)" in out
        assert "flash_firmware: verify failed at 0x12000 (MD5 mismatch)" in out.replace("\n", "")


@pytest.mark.parametrize("source", ["mongodb", "local"])
def test_find_keeps_products_apart_and_shows_a_public_key_as_pem(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], mongo: MongoSettings, source: str
) -> None:
    pem = ("-----BEGIN PUBLIC KEY-----\nMFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEx8qYkqgGoSV2dDlvv0c0ZRv1bWRu\n"
           "A3JfNw8oQb+q8Yb0z8sQIbRZ4Cnq6lWv4lO1h9Q6l8qZ7XJtS3wRuU8Gzw==\n-----END PUBLIC KEY-----\n")
    store = tmp_path / "store.sqlite"
    board = rf.run(serial="SN-5", product="board_test", started_at=rf.at(0), limits_sha256="aa" * 32)
    final_1 = rf.run(serial="SN-5", product="final_test", product_version="2.0", started_at=rf.at(100),
                     limits_sha256="bb" * 32, phases=[rf.phase("rf", Outcome.FAIL, reason="rssi too low")])
    final_2 = rf.run(serial="SN-5", product="final_test", product_version="2.1", started_at=rf.at(200),
                     limits_sha256="cc" * 32, dut={"serial": "SN-5", "public_key": pem})
    trio.run(store_runs, store, [board, final_1, final_2])
    target = ["--store", str(store), "--mongo", mongo.uri, "--mongo-db", mongo.database]
    assert main(["sync", *target]) == 0
    if source == "local":
        target.append("--local")
    capsys.readouterr()
    assert main(["find", "--serial", "SN-5", *target, "--json"]) == 0
    devices = json.loads(capsys.readouterr().out)["devices"]
    assert [(d["product"], len(d["history"]), d["last_outcome"]) for d in devices] == [
        ("board_test", 1, "PASS"), ("final_test", 2, "PASS")]
    assert main(["find", "--serial", "SN-5", *target]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    # the key as a block one can copy: each line whole, as the device gave it
    start = lines.index("-----BEGIN PUBLIC KEY-----")
    assert "\n".join(lines[start:start + 4]) + "\n" == pem
    # the final test's two runs differ in version and limits: both are shown
    assert "version" in out and "2.0" in out and "2.1" in out and "rssi too low" in out


def test_find_falls_back_to_the_local_store_when_mongodb_is_away(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = _retested_unit(tmp_path)
    unreachable = f"mongodb://127.0.0.1:{free_port()}/?serverSelectionTimeoutMS=300"
    assert main(["find", "--serial", "SN-8", "--store", str(store), "--mongo", unreachable]) == 0
    captured = capsys.readouterr()
    assert "unreachable" in captured.err and "showing this station's local store" in captured.err
    assert "device SN-8" in captured.out and f"local store {store}" in captured.out


def test_find_never_sends_dut_control_sequences_to_the_terminal(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], mongo: MongoSettings
) -> None:
    store = tmp_path / "store.sqlite"
    serial = "SN\x1b[2J\x1b]0;owned\x07"
    trio.run(store_runs, store, [rf.sensor_run(serial, dut_extra={"note\x1b[31m": "[bold]x[/bold]\r\n"})])
    target = ["--store", str(store), "--mongo", mongo.uri, "--mongo-db", mongo.database]
    assert main(["sync", *target]) == 0
    capsys.readouterr()
    assert main(["find", "--serial", serial, *target]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\x07" not in out and "\r" not in out
    assert "SN\\x1b[2J\\x1b]0;owned\\x07" in out and "[bold]x[/bold]\\r\\n" in out
    for where in ([], ["--local"]):  # the runs table too, from MongoDB and from the store
        assert main(["runs", "--serial", serial, *target, *where]) == 0
        out = capsys.readouterr().out
        assert "\x1b" not in out and "\x07" not in out and "SN\\x1b[2J" in out
    client = pymongo.MongoClient(mongo.uri)
    assert client[mongo.database].devices.find_one({"_id": serial}) is not None
    client.close()


# -- report and export from MongoDB ------------------------------------------------


def _two_stations_ship_one_batch(tmp_path: Path, mongo: MongoSettings) -> tuple[Path, Path]:
    """Station A tests SN-1 (fails) and SN-2; station B retests SN-1 (passes) and tests SN-3. Both ship."""
    a, b = tmp_path / "a" / "store.sqlite", tmp_path / "b" / "store.sqlite"
    trio.run(store_runs, a, [rf.sensor_run("SN-1", vdd=3.45), rf.sensor_run("SN-2", slot=1, started_at=rf.at(5))])
    trio.run(store_runs, b, [attrs.evolve(rf.sensor_run(serial, started_at=rf.at(t)), station="line1-st04")
                             for serial, t in (("SN-1", 600), ("SN-3", 700))])
    for store in (a, b):
        assert main(["sync", "--store", str(store), "--mongo", mongo.uri, "--mongo-db", mongo.database]) == 0
    return a, b


def test_report_and_export_read_every_station_from_mongodb(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], mongo: MongoSettings
) -> None:
    a, _ = _two_stations_ship_one_batch(tmp_path, mongo)
    capsys.readouterr()
    # Quality's desk: no store of its own, only the central database.
    desk = ["--store", str(tmp_path / "desk" / "none.sqlite"), "--mongo", mongo.uri, "--mongo-db", mongo.database]
    out = tmp_path / "desk" / "batch.xlsx"
    assert main(["export", "--batch", "B2024-05-14", "-o", str(out), *desk]) == 0
    runs = openpyxl.load_workbook(out)["Runs"]
    rows = list(runs.iter_rows(values_only=True))
    col = {name: i for i, name in enumerate(rows[0])}
    assert [(r[col["serial"]], r[col["outcome"]], r[col["unit_run"]]) for r in rows[1:]] == [
        ("SN-1", "FAIL", 1), ("SN-2", "PASS", 1), ("SN-1", "PASS", 2), ("SN-3", "PASS", 1)]
    assert rows[1][col["power_rails.vdd_3v3 [V]"]] == 3.45

    page = tmp_path / "desk" / "batch.html"
    assert main(["report", "--batch", "B2024-05-14", "-o", str(page), *desk]) == 0
    html = page.read_text()
    assert 'id="kpi-units">3<' in html and 'id="kpi-final">100.0 %<' in html and "SN-3" in html
    # Without -o: every station's page beside the one `sequencer run` keeps for this station.
    capsys.readouterr()
    assert main(["report", "--batch", "B2024-05-14", *desk]) == 0
    assert Path(capsys.readouterr().out.strip()).parts[-2:] == ("B2024-05-14", "every-station.html")
    assert main(["report", "--batch", "B2024-05-14", "--store", str(a), "--local"]) == 0
    assert Path(capsys.readouterr().out.strip()).parts[-2:] == ("B2024-05-14", "index.html")
    first = rf.sensor_run("SN-1", vdd=3.45).run_id
    assert main(["report", "--run", first[:10], "-o", str(tmp_path / "desk" / "run.html"), *desk]) == 0
    assert "3.45" in (tmp_path / "desk" / "run.html").read_text()

    capsys.readouterr()
    assert main(["runs", "--batch", "B2024-05-14", "--limit", "3", *desk]) == 0
    table = capsys.readouterr().out
    assert table.count("SN-1") == 1 and "SN-2" in table and "SN-3" in table  # the 3 most recent
    assert "4 run(s): 3 PASS · 1 FAIL" in table and "showing the 3 most recent" in table
    # two stations: which is which; the batch column, the same on every row, makes room
    header = table.splitlines()[0].split()
    assert "station" in header and "batch" not in header and "line1-st03" in table and "line1-st04" in table
    assert max(len(line) for line in table.splitlines()) <= 80
    assert main(["runs", "--since", "2024-05-14T08:35:00", "--json", *desk]) == 0  # station B's two
    assert [json.loads(line)["dut"]["serial"] for line in capsys.readouterr().out.splitlines()] == ["SN-1", "SN-3"]
    assert main(["runs", "--serial", "SN-1", "--json", *desk]) == 0
    records = [run_from_json(line) for line in capsys.readouterr().out.splitlines()]
    assert [r.outcome for r in records] == [Outcome.FAIL, Outcome.PASS]
    assert records[0] == rf.sensor_run("SN-1", vdd=3.45)  # whole seconds: nothing lost on the way

    # A station that configures MongoDB can still read only its own runs.
    capsys.readouterr()
    assert main(["export", "--batch", "B2024-05-14", "-o", "-", "--store", str(a), "--local",
                 "--mongo", mongo.uri, "--mongo-db", mongo.database]) == 0
    assert [r["serial"] for r in csv.DictReader(io.StringIO(capsys.readouterr().out))] == ["SN-1", "SN-2"]


def test_reading_from_an_unreachable_mongodb(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    store = tmp_path / "store.sqlite"
    trio.run(store_runs, store, [rf.sensor_run("SN-1")])
    unreachable = f"mongodb://127.0.0.1:{free_port()}/?serverSelectionTimeoutMS=300"
    # A station says so and reads its own store ...
    assert main(["export", "--batch", "B2024-05-14", "-o", "-", "--store", str(store), "--mongo", unreachable]) == 0
    captured = capsys.readouterr()
    assert "unreachable" in captured.err and "reading this station's local store" in captured.err
    assert [r["serial"] for r in csv.DictReader(io.StringIO(captured.out))] == ["SN-1"]
    # ... a desk with no store cannot, and says both.
    assert main(["report", "--batch", "B2024-05-14", "-o", str(tmp_path / "b.html"),
                 "--store", str(tmp_path / "none.sqlite"), "--mongo", unreachable]) == 2
    err = one_line_error(capsys)
    assert "unreachable" in err and f"no local store at {tmp_path / 'none.sqlite'}" in err
    assert not (tmp_path / "b.html").exists()


def test_a_malformed_run_in_mongodb_is_one_line_naming_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], mongo: MongoSettings
) -> None:
    _two_stations_ship_one_batch(tmp_path, mongo)
    db = database(mongo)
    broken = db.runs.find_one({"serial": "SN-3"})
    # as another writer might have left it: MongoDB's validator would refuse it from a station
    db.runs.update_one({"_id": broken["_id"]}, {"$unset": {"product": ""}}, bypass_document_validation=True)
    db.client.close()
    capsys.readouterr()
    assert main(["export", "--batch", "B2024-05-14", "-o", str(tmp_path / "x.xlsx"),
                 "--mongo", mongo.uri, "--mongo-db", mongo.database]) == 2
    assert one_line_error(capsys) == (
        f"sequencer: error: run {broken['_id']!r} in MongoDB cannot be read: 'product'"
    )


def test_mongodb_lost_while_reading_is_one_error_naming_it(tmp_path: Path, own_mongod: Any) -> None:
    args = build_parser().parse_args(["runs", "--store", str(tmp_path / "none.sqlite"),
                                      "--mongo", f"{own_mongod.uri}&serverSelectionTimeoutMS=300"])
    with pytest.raises(ConfigError, match=r"^MongoDB 127\.0\.0\.1:\d+/sequencer: ServerSelectionTimeoutError"):
        with reading_runs(args) as reading:  # reachable when opened ...
            own_mongod.stop()  # ... gone by the time the runs are read
            reading.source.find_runs(batch="B")


def test_a_station_reading_mongodb_is_told_which_of_its_runs_are_not_there_yet(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], mongo: MongoSettings
) -> None:
    a, _ = _two_stations_ship_one_batch(tmp_path, mongo)
    target = ["--store", str(a), "--mongo", mongo.uri, "--mongo-db", mongo.database]
    capsys.readouterr()
    assert main(["runs", "--batch", "B2024-05-14", "--json", *target]) == 0
    assert "not in MongoDB" not in capsys.readouterr().err  # everything shipped: nothing to say
    # Station A tests one more unit while MongoDB is away; it has not shipped yet.
    trio.run(store_runs, a, [rf.sensor_run("SN-4", started_at=rf.at(900))])
    assert main(["runs", "--batch", "B2024-05-14", "--json", *target]) == 0
    captured = capsys.readouterr()
    assert "1 of this station's run(s) are not in MongoDB" in captured.err and "`sequencer sync`" in captured.err
    assert "SN-4" not in captured.out
    # A store that never shipped there: every run of it is missing.
    never = tmp_path / "never.sqlite"
    trio.run(store_runs, never, [rf.sensor_run("SN-9")])
    assert main(["runs", "--json", "--store", str(never), "--mongo", mongo.uri, "--mongo-db", mongo.database]) == 0
    assert "1 of this station's run(s) are not in MongoDB" in capsys.readouterr().err
    assert main(["sync", *target]) == 0
    capsys.readouterr()
    assert main(["runs", "--batch", "B2024-05-14", "--json", *target]) == 0
    captured = capsys.readouterr()
    assert "not in MongoDB" not in captured.err and "SN-4" in captured.out


def test_find_shows_the_notes_and_the_disposition_quality_gave_the_device(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], mongo: MongoSettings
) -> None:
    import datetime as dt

    from reports.storage.notes import Note, add_note, ensure_notes

    store = _retested_unit(tmp_path)
    target = ["--store", str(store), "--mongo", mongo.uri, "--mongo-db", mongo.database]
    assert main(["sync", *target]) == 0
    db = database(mongo)
    ensure_notes(db)
    when = dt.datetime(2026, 12, 1, 9, 30, tzinfo=dt.timezone.utc)
    add_note(db, Note("SN-7", "carol", "operator", "RF retested after the shield was reseated", when))
    add_note(db, Note("SN-7", "quinn", "quality", "ok to ship", when + dt.timedelta(hours=1),
                      disposition="released"))
    capsys.readouterr()
    assert main(["find", "--serial", "SN-7", *target]) == 0
    out = capsys.readouterr().out
    assert "disposition   released" in out
    assert "note 2026-12-01 09:30:00 carol (operator): RF retested after the shield was reseated" in out
    assert "note 2026-12-01 10:30:00 quinn (quality) [released]: ok to ship" in out
    assert main(["find", "--serial", "SN-7", *target, "--json"]) == 0
    [device] = json.loads(capsys.readouterr().out)["devices"]
    assert device["disposition"] == "released" and [n["author"] for n in device["notes"]] == ["carol", "quinn"]
