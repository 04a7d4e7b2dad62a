"""MongoDB documents against a real mongod: shapes, idempotence, order, hostile DUT text, schema rejection."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import attrs
import bson
import pytest
import trio
from bson.codec_options import CodecOptions
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from reports.storage.mongo import (
    DB_SCHEMA,
    MongoSettings,
    MongoSink,
    UnreadableRun,
    decode_key,
    decode_mapping,
    encode_key,
    ensure_schema,
    run_document,
    run_from_document,
)
from reports.storage.mongo_cli import device_from_runs
from reports.storage.shipper import Shipper
from reports.storage.store import LocalStore
from sequencer.records import Outcome, RunRecord
from tests import records_factory as rf
from tests.mongo_support import FAST, assert_mirrors_store, database, wait_until
from tests.store_support import rewrite_as_version_1, store_runs
from tests.strategies import runs as any_run


async def drain(path: Path, settings: MongoSettings, **options: Any) -> Any:
    shipper = await Shipper.open(path, settings, **options)
    try:
        return await shipper.drain(), await shipper.quarantine()
    finally:
        await shipper.aclose()


# -- documents -------------------------------------------------------------------


async def test_run_and_device_documents(tmp_path: Path, mongo: MongoSettings) -> None:
    ok = rf.sensor_run("SN-1", vdd=3.36, started_at=rf.T0)
    retest = rf.sensor_run("SN-1", fail_rf=True, started_at=rf.at(3600),
                           dut_extra={"imei": "356938035643809", "mac": "24:0A:C4:00:00:01"})
    crashed = rf.sensor_run("SN-2", crash=True, slot=1)
    path = tmp_path / "store.sqlite"
    await store_runs(path, [ok, retest, crashed])
    report, quarantine = await drain(path, mongo)
    assert report.shipped_runs == 3 and report.backlog == 0 and not quarantine
    assert report.shipped_measurements == sum(len(p.measurements) for r in (ok, retest, crashed) for p in r.phases)

    db = database(mongo)
    doc = db.runs.find_one({"_id": retest.run_id})
    assert doc["outcome"] == "FAIL" and doc["serial"] == "SN-1" and doc["batch"] == retest.batch
    assert doc["started_at"] == retest.started_at and doc["ended_at"] == retest.ended_at
    assert doc["product_sha256"] == retest.product_sha256 and doc["sequencer_version"] == retest.sequencer_version
    assert [p["name"] for p in doc["phases"]] == [p.name for p in retest.phases]
    flash = doc["phases"][2]
    assert [a["outcome"] for a in flash["attempts"]] == ["FAIL", "PASS"]
    assert flash["attachments"][2]["data"] == bytes(range(64)) and flash["attachments"][2]["inline"]
    rssi = next(m for m in doc["measurements"] if m["name"] == "rssi_sweep")
    assert rssi["outcome"] == "FAIL" and rssi["phase"] == "rf_sweep" and rssi["value"][5] == [2437, -28.5]
    assert doc["dut"]["imei"] == "356938035643809"
    assert db.runs.find_one({"_id": crashed.run_id})["phases"][3]["attempts"][0]["error"]["type"] == "DutProtocolError"
    # What fixtures logged: in the phase that used them, and the run's own lines (closing), dates and names kept.
    rails = doc["phases"][1]
    assert [(line["fixture"], line["message"]) for line in rails["logs"]] == [
        ("dmm", "range 10 V, NPLC 1"), (None, "rails measured")]
    assert doc["schema_version"] == 2
    assert [(line["fixture"], line["message"], line["timestamp"]) for line in doc["logs"]] == [
        ("jig", "relays opened, port closed", retest.logs[0].timestamp)]

    device = db.devices.find_one({"_id": "SN-1"})
    assert device["first_tested_at"] == ok.started_at and device["last_tested_at"] == retest.started_at
    assert device["last_outcome"] == "FAIL" and device["last_run_id"] == retest.run_id
    assert device["product"] == "esp32_sensor"
    assert device["attributes"]["imei"] == "356938035643809"
    assert device["attributes"]["mac"] == "24:0A:C4:00:00:01"  # the newest run's spelling wins
    assert [e["run_id"] for e in device["runs"]] == [ok.run_id, retest.run_id]
    assert [e["outcome"] for e in device["runs"]] == ["PASS", "FAIL"]
    # The lookups `sequencer find` makes.
    sink = MongoSink(mongo)
    try:
        assert [d["serial"] for d in sink.find_devices(mac="24:0a:c4:00:00:01")] == ["SN-1"]
        assert [d["serial"] for d in sink.find_devices(imei="356938035643809")] == ["SN-1"]
        assert [r["_id"] for r in sink.run_history("SN-1")] == [ok.run_id, retest.run_id]
    finally:
        sink.close()
    db.client.close()


async def test_a_database_made_before_an_index_gets_it_from_the_next_shipper_and_uses_it(
    mongo: MongoSettings,
) -> None:
    def check() -> None:
        db = database(mongo)
        ensure_schema(db)
        db.runs.drop_index("started")  # as a database made before the index existed
        assert "started" not in {i["name"] for i in db.runs.list_indexes()}
        assert ensure_schema(db) == DB_SCHEMA  # no migration: the version stays
        runs = {i["name"]: dict(i["key"]) for i in db.runs.list_indexes()}
        assert runs["started"] == {"started_at": 1, "_id": 1}
        since = dt.datetime(2026, 11, 23, tzinfo=dt.timezone.utc)
        for query, order in (({"started_at": {"$gte": since}}, 1), ({}, -1)):  # --since; the most recent
            plan = db.runs.find(query).sort([("started_at", order), ("_id", order)]).limit(50).explain()
            assert "'indexName': 'started'" in str(plan["queryPlanner"]["winningPlan"]), plan
        db.client.close()

    await trio.to_thread.run_sync(check)


async def test_collections_are_created_with_validators_and_indexes(mongo: MongoSettings) -> None:
    def check() -> None:
        db = database(mongo)
        assert ensure_schema(db) == 0
        assert ensure_schema(db) == DB_SCHEMA  # a second station finds it done
        info = {c["name"]: c for c in db.list_collections()}
        schema = info["devices"]["options"]["validator"]["$jsonSchema"]
        assert set(schema["required"]) == {"serial", "product", "first_tested_at", "last_outcome"}
        devices = {i["name"]: i for i in db.devices.list_indexes()}
        assert devices["serial"]["unique"] and devices["mac"]["key"] == {"attributes.mac": 1}
        assert devices["imei"]["key"] == {"attributes.imei": 1}
        runs = {i["name"]: dict(i["key"]) for i in db.runs.list_indexes()}
        assert runs["batch_started"] == {"batch": 1, "started_at": 1} and runs["outcome"] == {"outcome": 1}
        # The validator really is enforced: a device without its required keys is refused.
        with pytest.raises(Exception, match="Document failed validation"):
            db.devices.insert_one({"_id": "X", "serial": "X"})
        db.client.close()

    await trio.to_thread.run_sync(check)


# -- exactly once ------------------------------------------------------------------


async def test_the_same_batch_shipped_twice_leaves_no_duplicates(tmp_path: Path, mongo: MongoSettings) -> None:
    runs = [rf.sensor_run(f"SN-{i}", slot=i, started_at=rf.at(i)) for i in range(20)]
    runs += [rf.sensor_run("SN-3", slot=3, started_at=rf.at(900))]  # a retest
    path = tmp_path / "store.sqlite"
    await store_runs(path, runs)
    first, _ = await drain(path, mongo)
    db = database(mongo)
    before = {d["_id"]: d for d in db.runs.find({}, {"shipped_at": 0})}
    devices_before = {d["_id"]: d for d in db.devices.find({}, {"updated_at": 0})}

    # As if the acknowledgement had been lost: the watermark goes back to zero and
    # everything is sent again, through the shipper and straight through the sink.
    await trio.to_thread.run_sync(_forget_watermark, path)
    second, _ = await drain(path, mongo)
    store = LocalStore.open(path)
    changes = store.iter_changes(0, 1000)
    store.close()
    sink = MongoSink(mongo)
    await trio.to_thread.run_sync(sink.write_runs, changes)
    sink.close()

    assert first.shipped_runs == second.shipped_runs == 21
    assert {d["_id"]: d for d in db.runs.find({}, {"shipped_at": 0})} == before
    assert {d["_id"]: d for d in db.devices.find({}, {"updated_at": 0})} == devices_before
    assert db.runs.count_documents({}) == 21 and db.devices.count_documents({}) == 20
    assert [e["run_id"] for e in devices_before["SN-3"]["runs"]] == [runs[3].run_id, runs[20].run_id]
    assert_mirrors_store(path, mongo)
    db.client.close()


def _forget_watermark(path: Path) -> None:
    import sqlite3

    conn = sqlite3.connect(path)
    conn.execute("DELETE FROM mongo_watermark")
    conn.commit()
    conn.close()


def _states(run: RunRecord) -> list[RunRecord]:
    """The states a station's store goes through for ``run``: open, identified, each phase, finished."""
    serial_only = {"serial": run.serial}
    states = [attrs.evolve(run, phases=(), outcome=None, ended_at=None, dut=serial_only)]
    for i in range(1, len(run.phases) + 1):
        states.append(attrs.evolve(run, phases=run.phases[:i], outcome=None, ended_at=None,
                                   dut=run.dut if i > 1 else serial_only))
    states.append(run)
    return states


_T = dt.datetime(2025, 1, 1, tzinfo=dt.timezone.utc)
_DEVICE_RUNS = [
    # (run_id, started_at offset s, outcome, attributes): later runs upgrade firmware;
    # only the oldest knows the board revision, only the newest the IMEI.
    ("r-b", 0, Outcome.FAIL, {"firmware": "1.0", "board": "rev-A", "mac": "aa"}),
    ("r-a", 0, Outcome.ERROR, {"firmware": "1.1", "mac": "aa"}),  # same start: run id orders it
    ("r-c", 50, Outcome.PASS, {"firmware": "2.0"}),
    ("r-d", 100, Outcome.ABORTED, {"firmware": "2.1", "imei": "35"}),
]


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_arrival_order_converges_on_the_same_documents(mongo: MongoSettings, data: st.DataObject) -> None:
    """Shipping states out of order, repeated, in any batches: the newest state of each run wins."""
    serial = f"SN-{data.draw(st.integers(0, 10**9))}"
    changes: list[tuple[int, RunRecord]] = []
    finals: list[RunRecord] = []
    seq = 0
    for rid, offset, outcome, extra in _DEVICE_RUNS:
        run = rf.run(serial=serial, run_id=f"{serial}-{rid}", started_at=_T + dt.timedelta(seconds=offset),
                     phases=[rf.phase("p1"), rf.phase("p2")], outcome=outcome, dut={"serial": serial, **extra})
        finals.append(run)
        for state in _states(run):
            seq += 1
            changes.append((seq, state))
    order = data.draw(st.permutations(changes + data.draw(st.lists(st.sampled_from(changes), max_size=6))))
    cuts = sorted(data.draw(st.sets(st.integers(1, len(order) - 1), max_size=5)))
    sink = MongoSink(mongo)
    try:
        for lo, hi in zip([0, *cuts], [*cuts, len(order)], strict=True):
            report = sink.write_runs(order[lo:hi])
            assert not report.rejected
        device = sink.find_devices(serial=serial)[0]
        want = device_from_runs(finals)
        for key in ("product", "first_tested_at", "last_tested_at", "last_outcome", "last_run_id", "attributes"):
            assert device[key] == want[key], key
        assert device["attributes"] == {"firmware": "2.1", "board": "rev-A", "mac": "aa", "imei": "35"}
        assert [e["run_id"] for e in device["runs"]] == [f"{serial}-r-a", f"{serial}-r-b", f"{serial}-r-c",
                                                           f"{serial}-r-d"]
        newest = {r.run_id: s for s, r in changes}
        docs = {d["_id"]: d for d in sink.runs.find({"serial": serial})}
        assert {k: d["seq"] for k, d in docs.items()} == newest
        assert all(d["outcome"] == r.outcome.value and len(d["phases"]) == 2 for r in finals
                   for d in [docs[r.run_id]])
    finally:
        sink.close()


# -- hostile DUT text ----------------------------------------------------------------

HOSTILE_KEYS = ["$where", "$", "a.b", ".", "..", "", "%", "%24", "%2E", "x\x00y", "$set", "__proto__",
                "ключ", "名前", "k" * 300, "$gt.$lt"]
HOSTILE_VALUES = ["$gt", "{\"$ne\": null}", "$$ROOT", "$where: 1", "\x1b[2J\x1b[31mred", "a\x00b",
                  "'; db.dropDatabase(); '", "<script>", "\ud800lone", "x" * 5000, ""]


async def test_a_run_whose_serial_changed_leaves_no_trace_on_the_first_serials_device(
    tmp_path: Path, mongo: MongoSettings
) -> None:
    path = tmp_path / "store.sqlite"
    earlier_on_a = rf.sensor_run("SN-A", slot=1)  # SN-A is a real unit too, tested before
    await store_runs(path, [earlier_on_a])
    misread = {"SN-A": rf.sensor_run("SN-B"), "SN-Z": rf.sensor_run("SN-C", slot=2)}  # SN-Z: no such unit
    store = LocalStore.open(path, station=True)
    async with store.writer():
        for wrong, run in misread.items():  # a label scanned wrong first ...
            await store.begin_run(attrs.evolve(run, phases=(), outcome=None, ended_at=None, dut={}))
            await store.commit_phase(run.run_id, 0, run.phases[0], {"serial": wrong})
        # copied from the journal into the database the shipper reads
        await wait_until(lambda: all((r := store.get_run(run.run_id)) is not None and len(r.phases) == 1
                                     for run in misread.values()), what="the open runs in the database")
        await drain(path, mongo)  # ... and shipped while the runs were open
        db = database(mongo)
        for wrong, run in misread.items():
            assert run.run_id in [e["run_id"] for e in db.devices.find_one({"_id": wrong})["runs"]]
        for run in misread.values():  # then the DUTs said who they are, and the runs ended
            for i, phase in enumerate(run.phases[1:], 1):
                await store.commit_phase(run.run_id, i, phase, dict(run.dut))
            await store.finish_run(run)
    store.close()
    await drain(path, mongo)
    await drain(path, mongo)  # idempotent
    sn_a = db.devices.find_one({"_id": "SN-A"})
    assert [e["run_id"] for e in sn_a["runs"]] == [earlier_on_a.run_id]
    assert sn_a["last_outcome"] == earlier_on_a.outcome.value and sn_a["last_run_id"] == earlier_on_a.run_id
    assert db.devices.find_one({"_id": "SN-Z"}) is None  # only ever a misread
    for run in misread.values():
        device = db.devices.find_one({"_id": run.serial})
        assert [e["run_id"] for e in device["runs"]] == [run.run_id] and device["last_outcome"] == "PASS"
    assert_mirrors_store(path, mongo)
    db.client.close()


async def test_a_database_dropped_since_the_last_sync_gets_everything_again(
    tmp_path: Path, mongo: MongoSettings
) -> None:
    path = tmp_path / "store.sqlite"
    await store_runs(path, [rf.sensor_run("SN-1"), rf.sensor_run("SN-2", slot=1)])
    (first, _) = await drain(path, mongo)
    assert first.shipped_runs == 2
    db = database(mongo)
    db.client.drop_database(mongo.database)  # a DBA resets it, or it moved to a new server at the same address
    (again, _) = await drain(path, mongo)
    assert again.shipped_runs == 2 and again.backlog == 0
    assert_mirrors_store(path, mongo)
    (third, _) = await drain(path, mongo)
    assert third.shipped_runs == 0  # and only once
    db.client.close()


@pytest.mark.parametrize("variant", ["keys", "values"])
async def test_hostile_dut_keys_and_values_are_stored_safely(tmp_path: Path, mongo: MongoSettings,
                                                             variant: str) -> None:
    if variant == "keys":
        dut = {"serial": "SN-H", **{k: f"v{i}" for i, k in enumerate(HOSTILE_KEYS)}}
    else:
        dut = {"serial": "SN-H", "mac": "$ne", **{f"k{i}": v for i, v in enumerate(HOSTILE_VALUES)}}
    value = {"$where": "1", "a.b": [2**80, -(2**70)], "ok": 1}  # a mapping as a measurement value
    run = rf.run(serial="SN-H", dut=dut, phases=[
        rf.phase("identify", measurements=[rf.measurement("blob", value, validators=[])]),
    ])
    path = tmp_path / "store.sqlite"
    await store_runs(path, [run])
    report, quarantine = await drain(path, mongo)
    assert report.shipped_runs == 1 and not quarantine

    db = database(mongo)
    doc = db.runs.find_one({"_id": run.run_id})
    want = {k: v.replace("\ud800", "\\ud800") for k, v in dut.items()}
    assert decode_mapping(doc["dut"]) == want
    for key in doc["dut"]:
        assert not key.startswith("$") and "." not in key and "\x00" not in key and key
    device = db.devices.find_one({"_id": "SN-H"})
    assert decode_mapping(device["attributes"]) == {k: v for k, v in want.items() if k != "serial"}
    stored = doc["phases"][0]["attempts"][0]["measurements"][0]["value"]
    assert decode_mapping(stored) == {"$where": "1", "a.b": [str(2**80), str(-(2**70))], "ok": 1}
    sink = MongoSink(mongo)
    try:
        # A value that looks like an operator is matched as text, nothing more.
        assert [d["serial"] for d in sink.find_devices(mac="$ne")] == (["SN-H"] if variant == "values" else [])
        assert sink.find_devices(serial="$ne") == []
    finally:
        sink.close()
    assert db.runs.count_documents({}) == 1
    db.client.close()


@given(st.text())
def test_key_escaping_is_reversible_and_safe(key: str) -> None:
    encoded = encode_key(key)
    assert decode_key(encoded) == key
    assert encoded and "$" not in encoded and "." not in encoded and "\x00" not in encoded


@given(st.lists(st.text(max_size=5), unique=True, max_size=8))
def test_distinct_keys_stay_distinct(keys: list[str]) -> None:
    assert len({encode_key(k) for k in keys}) == len(keys)


def _to_the_millisecond(run: RunRecord) -> RunRecord:
    """``run`` as BSON keeps it: every time cut to whole milliseconds."""
    def ms(when: dt.datetime) -> dt.datetime:
        return when.replace(microsecond=when.microsecond // 1000 * 1000)

    return attrs.evolve(
        run,
        started_at=ms(run.started_at),
        ended_at=None if run.ended_at is None else ms(run.ended_at),
        phases=tuple(
            attrs.evolve(
                p, started_at=ms(p.started_at), ended_at=ms(p.ended_at),
                attempts=tuple(attrs.evolve(a, started_at=ms(a.started_at), ended_at=ms(a.ended_at))
                               for a in p.attempts),
                logs=tuple(attrs.evolve(line, timestamp=ms(line.timestamp)) for line in p.logs),
            )
            for p in run.phases
        ),
        logs=tuple(attrs.evolve(line, timestamp=ms(line.timestamp)) for line in run.logs),
        scans=tuple(attrs.evolve(c, scanned_at=ms(c.scanned_at)) for c in run.scans),
    )


@given(any_run)
def test_a_run_comes_back_from_its_document_as_it_was(run: RunRecord) -> None:
    # What MongoDB hands back (dates to the millisecond, time-zone aware as the station's client asks).
    stored = bson.decode(bson.encode(run_document(run, seq=1)), codec_options=CodecOptions(tz_aware=True))
    assert run_from_document(stored) == _to_the_millisecond(run)


def test_a_measurement_mapping_comes_back_with_its_own_keys() -> None:
    # Keys MongoDB cannot hold as they are are escaped in the document, nested in lists too.
    value = {"rail.3v3": {"$max": [{"at.t": 1.5}]}, "": "empty"}
    run = rf.run(phases=[rf.phase("p", measurements=[rf.measurement("m", value)])])
    stored = bson.decode(bson.encode(run_document(run, seq=1)), codec_options=CodecOptions(tz_aware=True))
    assert "rail.3v3" not in stored["phases"][0]["attempts"][0]["measurements"][0]["value"]
    assert run_from_document(stored).phases[0].measurements[0].value == value


def test_a_document_an_older_sequencer_wrote_reads_as_this_versions_record() -> None:
    # A run shipped by a station of record schema 1: no run logs, no fixture on a phase's lines.
    run = attrs.evolve(rf.sensor_run("SN-1"), logs=())
    run = attrs.evolve(run, phases=tuple(
        attrs.evolve(p, logs=tuple(attrs.evolve(line, fixture=None) for line in p.logs)) for p in run.phases))
    doc = bson.decode(bson.encode(run_document(run, seq=1)), codec_options=CodecOptions(tz_aware=True))
    del doc["logs"]
    doc["schema_version"] = 1
    for p in doc["phases"]:
        for line in p["logs"]:
            del line["fixture"]
    assert run_from_document(doc) == _to_the_millisecond(run)


async def test_runs_an_older_sequencer_left_unshipped_ship_as_this_versions_documents(
    tmp_path: Path, mongo: MongoSettings
) -> None:
    path = tmp_path / "store.sqlite"
    runs = [attrs.evolve(rf.sensor_run(f"SN-{i}", slot=i, started_at=rf.at(i)), logs=()) for i in range(3)]
    await store_runs(path, runs)
    rewrite_as_version_1(path)  # the station was upgraded with these still to ship
    report, quarantine = await drain(path, mongo)
    assert report.shipped_runs == 3 and not quarantine
    db = database(mongo)
    try:
        docs = list(db.runs.find({}).sort("slot", 1))
        assert [(d["schema_version"], d["logs"]) for d in docs] == [(2, [])] * 3
        assert {"fixture": None}.items() <= docs[0]["phases"][1]["logs"][0].items()  # the same shape as today's
        assert [run_from_document(d).phases[1].logs[0].fixture for d in docs] == [None] * 3
    finally:
        db.client.close()
    assert_mirrors_store(path, mongo)


def test_a_document_that_is_not_a_run_is_named_not_a_traceback() -> None:
    doc = run_document(rf.sensor_run("SN-1"), seq=1)
    del doc["product"]
    with pytest.raises(UnreadableRun, match=r"^run '[0-9a-f]+' in MongoDB cannot be read: 'product'$"):
        run_from_document(doc)
    with pytest.raises(UnreadableRun, match="record schema version 9 is not supported"):
        run_from_document({**run_document(rf.sensor_run("SN-1"), seq=1), "schema_version": 9})


# -- rejection -------------------------------------------------------------------------


async def test_schema_rejection_is_quarantined_visible_and_retried_on_demand(
    tmp_path: Path, mongo: MongoSettings
) -> None:
    garbage_serial = "G" * 500  # a DUT that answered the serial query with garbage
    good = [rf.sensor_run(f"SN-{i}", slot=i, started_at=rf.at(i)) for i in range(3)]
    bad_device = rf.sensor_run(garbage_serial, slot=5)
    path = tmp_path / "store.sqlite"
    await store_runs(path, [good[0], bad_device, good[1]])
    report, quarantine = await drain(path, mongo)
    assert report.shipped_runs == 2 and report.backlog == 0
    [q] = quarantine
    assert q.run_id == bad_device.run_id
    assert q.reason.startswith("devices: document failed schema validation (serial:")
    assert "maxLength" in q.reason and "\n" not in q.reason

    # A stricter validator installed by the database's owner refuses a run outright.
    db = database(mongo)
    strict = {"$jsonSchema": {"bsonType": "object", "required": ["operator"],
                              "properties": {"operator": {"bsonType": "string", "minLength": 3}}}}
    db.command("collMod", "runs", validator=strict)
    await store_runs(path, [attrs.evolve(good[2], operator="al")])
    report, quarantine = await drain(path, mongo)
    assert report.shipped_runs == 0 and report.backlog == 0  # refused once, not retried forever
    assert {q.run_id for q in quarantine} == {bad_device.run_id, good[2].run_id}
    reason = next(q.reason for q in quarantine if q.run_id == good[2].run_id)
    assert reason.startswith("runs: document failed schema validation (operator:")
    assert db.runs.find_one({"_id": good[2].run_id}) is None

    # A later pass does not send the quarantined runs again ...
    report, quarantine = await drain(path, mongo)
    assert report.shipped_runs == 0 and len(quarantine) == 2
    # ... until the owner relaxes the rule and someone asks for a retry.
    db.command("collMod", "runs", validator={})
    shipper = await Shipper.open(path, mongo)
    try:
        retried = await shipper.retry_quarantined()
        left = await shipper.quarantine()
    finally:
        await shipper.aclose()
    assert retried.shipped_runs == 1 and [q.run_id for q in left] == [bad_device.run_id]
    assert db.runs.find_one({"_id": good[2].run_id})["operator"] == "al"
    assert db.runs.count_documents({}) == 4 and db.devices.count_documents({}) == 3
    db.client.close()


async def test_a_document_too_large_for_mongodb_is_quarantined(tmp_path: Path, mongo: MongoSettings) -> None:
    huge = [rf.phase(f"p{i}", logs=[(0.0, "info", "x" * 1_000_000)] * 3) for i in range(6)]
    run = rf.run(serial="SN-BIG", phases=huge)
    small = rf.sensor_run("SN-OK", slot=1)
    path = tmp_path / "store.sqlite"
    await store_runs(path, [run, small])
    report, quarantine = await drain(path, mongo)
    assert report.shipped_runs == 1
    [q] = quarantine
    assert q.run_id == run.run_id and "over MongoDB's 16 MiB limit" in q.reason


async def test_unreachable_mongodb_leaves_the_backlog_and_says_so(tmp_path: Path) -> None:
    from reports.storage.mongod import free_port

    path = tmp_path / "store.sqlite"
    await store_runs(path, [rf.sensor_run("SN-1")])
    settings_ = MongoSettings.parse(f"mongodb://127.0.0.1:{free_port()}", "x", **{**FAST,
                                    "server_selection_timeout_s": 0.3})
    report, _ = await drain(path, settings_)
    assert report.shipped_runs == 0 and report.backlog == 1
    assert report.error is not None and "Connection refused" in report.error and "\n" not in report.error


def test_settings_pick_the_database_and_refuse_bad_uris() -> None:
    from reports.storage.mongo import MongoConfigError

    assert MongoSettings.parse("mongodb://h1:27017,h2/factory?replicaSet=rs").database == "factory"
    assert MongoSettings.parse("mongodb://h1/factory", "other").database == "other"
    assert MongoSettings.parse("mongodb://u:secret@h2,h1:27018").target == "h1:27018,h2:27017/sequencer"
    with pytest.raises(MongoConfigError, match="^--mongo: not a usable MongoDB URI"):
        MongoSettings.parse("http://example.com")
    with pytest.raises(MongoConfigError, match="not a valid MongoDB database name"):
        MongoSettings.parse("mongodb://h", "a.b")


def test_a_mongod_that_cannot_start_is_reported_with_its_reason(tmp_path: Path) -> None:
    import socket

    from reports.storage.mongod import Mongod, MongodError

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(MongodError, match=r"exited with status \d+: port already in use"):
            Mongod.start(tmp_path / "db", port=taken.getsockname()[1])


# -- devices are units: the product's identity ------------------------------------------


def _board_known_by_its_mac(product: str = "esp32_sensor") -> tuple[RunRecord, RunRecord]:
    """A board whose identify phase failed (its run knows the MAC only), then its passing retest (serial and MAC)."""
    failed = rf.run(serial=None, dut={"mac": "24:0A:C4:00:00:01"}, started_at=rf.at(0), product=product,
                    phases=[rf.phase("identify", Outcome.FAIL, reason="no answer")])
    passed = rf.run(serial="SN-1", dut={"serial": "SN-1", "mac": "24:0a:c4:00:00:01"}, started_at=rf.at(600),
                    product=product)
    return failed, passed


@pytest.mark.parametrize("order", ["mac_first", "serial_first"])
def test_a_run_that_knew_only_its_mac_is_its_units_device(mongo: MongoSettings, order: str) -> None:
    """One board, one device, whichever run was shipped first: the retest's serial names it, and the failed
    run's MAC (any spelling) puts that run in it, first_tested_at and all."""
    failed, passed = _board_known_by_its_mac()
    changes = [(1, failed), (2, passed)] if order == "mac_first" else [(2, passed), (1, failed)]
    sink = MongoSink(mongo)
    try:
        for change in changes:  # one batch each: the other run is already in the database
            assert not sink.write_runs([change]).rejected
        sink.write_runs(changes)  # and again, both at once: nothing changes
    finally:
        sink.close()
    db = database(mongo)
    [device] = list(db.devices.find({}))
    assert device["_id"] == "SN-1" and device["product"] == "esp32_sensor"
    assert [e["run_id"] for e in device["runs"]] == [failed.run_id, passed.run_id]
    assert [e["outcome"] for e in device["runs"]] == ["FAIL", "PASS"]
    assert device["first_tested_at"] == failed.started_at and device["last_outcome"] == "PASS"
    db.client.close()


def test_a_mac_two_serials_claim_or_another_products_unit_puts_no_run_in_a_device(mongo: MongoSettings) -> None:
    """A run without a serial joins a device only when one serial of its product holds its MAC."""
    failed, passed = _board_known_by_its_mac()
    other_product = attrs.evolve(passed, run_id="f" * 32, product="final_test")
    twin = rf.run(serial="SN-2", dut={"serial": "SN-2", "mac": "24-0A-C4-00-00-01"}, started_at=rf.at(700))
    lone = rf.run(serial=None, run_id="e" * 32, dut={"mac": "24:0a:c4:00:00:01"}, started_at=rf.at(800),
                  phases=[rf.phase("identify", Outcome.FAIL, reason="no answer")])
    sink = MongoSink(mongo)
    db = database(mongo)
    try:
        sink.write_runs([(1, other_product)])
        sink.write_runs([(2, failed)])  # the only serial with its MAC is of another product
        assert [e["run_id"] for e in db.devices.find_one({"_id": "SN-1"})["runs"]] == [other_product.run_id]
        sink.write_runs([(3, passed), (4, twin)])  # two serials of its product claim its MAC
        sink.write_runs([(5, lone)])
    finally:
        sink.close()
    holding = {d["_id"]: [e["run_id"] for e in d["runs"]] for d in db.devices.find({})}
    assert holding == {"SN-1": [passed.run_id, other_product.run_id], "SN-2": [twin.run_id]}
    db.client.close()
