"""The portal over a real mongod: logging in, search, device and run pages, the JSON API, notes, and attacks on them."""

from __future__ import annotations

import datetime as dt
import html
import re

import httpx
import pytest
import trio

from reports.render.html import render_run
from tests.records_factory import T0, measurement, phase, run, sensor_run
from sequencer.records import Outcome
from tests.mongo_support import database
from tests.portal_support import Portal, csrf_of


def tracker_run(serial: str, *, outcome: str = "PASS", minutes: float = 0, station: str = "line1-st01",
                slot: int = 0, batch: str = "B1", imei: str = "356938035643809") -> object:
    phases = [phase("identify", Outcome.PASS if outcome != "FAIL" else Outcome.FAIL,
                    measurements=[measurement("vdd", 3.3 if outcome != "FAIL" else 3.6, units="V", low=3.2, high=3.4)])]
    return run(serial=serial, phases=phases, started_at=T0 + dt.timedelta(minutes=minutes), station=station,
               slot=slot, batch=batch, product="lte_tracker",
               dut={"serial": serial, "mac": "24:0A:C4:00:00:%02X" % (hash(serial) % 256), "imei": imei,
                    "imsi": "901700000012345", "iccid": "8988211000000123456", "claim_code": f"CLM-{serial}"})


# -- logging in ------------------------------------------------------------------


async def test_a_page_needs_a_login_and_the_right_password_gives_one(portal: Portal) -> None:
    async with portal.client() as http:
        r = await http.get("/search")
        assert r.status_code == 303 and r.headers["location"].startswith("/login?next=/search")
        r = await http.get("/api/v1/runs")
        assert r.status_code == 401 and r.json() == {"error": "log in first"}
        page = await http.get("/login")
        assert page.status_code == 200
        cookie = page.headers["set-cookie"].lower()
        assert "httponly" in cookie and "samesite=lax" in cookie
        assert "frame-ancestors 'self'" in page.headers["content-security-policy"]
        wrong = await http.post("/login", data={"name": "viewer", "password": "nope", "csrf": csrf_of(page.text)})
        assert wrong.status_code == 401 and "wrong name or password" in wrong.text
        right = await http.post("/login", data={"name": "viewer", "password": "pw-viewer", "csrf": csrf_of(page.text),
                                                "next": "/search"})
        assert right.status_code == 303 and right.headers["location"] == "/search"
        r = await http.get("/search")
        assert r.status_code == 200 and "viewer" in r.text


async def test_a_login_form_without_its_csrf_token_is_refused(portal: Portal) -> None:
    async with portal.client() as http:
        await http.get("/login")
        r = await http.post("/login", data={"name": "viewer", "password": "pw-viewer"})
        assert r.status_code == 403 and "CSRF" in r.text
        assert "set-cookie" not in r.headers or "sequencer_session" not in r.headers.get("set-cookie", "") \
            or (await http.get("/search")).status_code == 303


async def test_failed_logins_are_slowed_then_refused_for_a_while_even_with_the_right_password(portal: Portal) -> None:
    async with portal.client() as http:
        page = await http.get("/login")
        token = csrf_of(page.text)
        started = trio.current_time()
        for _ in range(5):
            r = await http.post("/login", data={"name": "admin", "password": "guess", "csrf": token})
            assert r.status_code == 401
        assert trio.current_time() - started >= 5 * 1.0  # each failure answers no sooner than a second
        r = await http.post("/login", data={"name": "admin", "password": "pw-admin", "csrf": token})
        assert r.status_code == 429 and int(r.headers["retry-after"]) > 0
        assert "too many failed logins" in r.text
        assert (await http.get("/search")).status_code == 303  # still not logged in


async def test_a_redirect_after_login_stays_on_the_portal(portal: Portal) -> None:
    async with portal.client() as http:
        page = await http.get("/login")
        r = await http.post("/login", data={"name": "viewer", "password": "pw-viewer", "csrf": csrf_of(page.text),
                                            "next": "//evil.example/x"})
        assert r.status_code == 303 and r.headers["location"] == "/"


# -- search, device, run ------------------------------------------------------------


async def test_search_finds_a_device_by_every_identity_and_filters_and_pages(portal: Portal) -> None:
    await portal.aship([tracker_run("TRK-1", outcome="FAIL", minutes=0), tracker_run("TRK-1", minutes=5),
                        tracker_run("TRK-2", minutes=1, slot=1, imei="356938035643817", batch="B2")])
    async with portal.logged_in("viewer") as http:
        for params in ({"serial": "TRK-1"}, {"imei": "356938035643809"}, {"claim_code": "CLM-TRK-1"},
                       {"find": "TRK-1", "by": "serial"}):
            r = await http.get("/search", params=params)
            assert r.status_code == 200, r.text
            assert r.text.count('href="/devices/TRK-1"') == 2 and "TRK-2" not in r.text
        mac = tracker_run("TRK-2").dut["mac"].lower()  # type: ignore[attr-defined]
        assert "TRK-2" in (await http.get("/search", params={"mac": mac})).text  # either case
        r = await http.get("/search", params={"batch": "B1", "outcome": "FAIL"})
        assert r.text.count('href="/devices/TRK-1"') == 1
        r = await http.get("/api/v1/runs", params={"batch": "B1", "limit": "1"})
        first = r.json()
        assert [x["serial"] for x in first["runs"]] == ["TRK-1"] and first["runs"][0]["outcome"] == "PASS"
        r = await http.get("/api/v1/runs", params=first["next"])
        assert [x["outcome"] for x in r.json()["runs"]] == ["FAIL"]


async def test_the_device_page_shows_every_run_and_the_run_page_is_the_report_itself(portal: Portal) -> None:
    first = sensor_run("SN-7", vdd=3.45, started_at=T0)
    second = sensor_run("SN-7", started_at=T0 + dt.timedelta(hours=1))
    await portal.aship([first, second])
    async with portal.logged_in("viewer") as http:
        r = await http.get("/devices/SN-7")
        assert r.status_code == 200
        assert first.run_id[:12] in r.text and second.run_id[:12] in r.text
        assert f'src="/runs/{second.run_id}"' in r.text  # the newest run's report, framed
        report = await http.get(f"/runs/{second.run_id}")
        stored = portal.data.run(second.run_id)
        assert report.text == render_run(stored)
        a = await http.get(f"/runs/{second.run_id}/attachments/2/0")
        assert a.content == second.phases[2].attachments[0].data
        assert a.headers["content-type"] == "application/octet-stream"
        assert a.headers["content-disposition"] == 'attachment; filename="esptool.log"'
        assert (await http.get("/devices/NOPE")).status_code == 404


async def test_the_api_lists_devices_with_their_runs_by_serial_mac_or_imei(portal: Portal) -> None:
    await portal.aship([tracker_run("TRK-1", outcome="FAIL"), tracker_run("TRK-1", minutes=5)])
    token = await trio.to_thread.run_sync(portal.auth.add_token, "mes", portal.auth.user("viewer").role)
    async with portal.client(headers={"Authorization": f"Bearer {token}"}) as http:
        for params in ({"serial": "TRK-1"}, {"imei": "356938035643809"},
                       {"mac": tracker_run("TRK-1").dut["mac"]}):  # type: ignore[attr-defined]
            body = (await http.get("/api/v1/devices", params=params)).json()
            assert [d["serial"] for d in body["devices"]] == ["TRK-1"]
            assert [r["outcome"] for r in body["devices"][0]["runs"]] == ["PASS", "FAIL"]
            assert body["devices"][0]["attributes"]["claim_code"] == "CLM-TRK-1"
        run_id = body["devices"][0]["runs"][0]["run_id"]
        one = await http.get(f"/api/v1/runs/{run_id}")
        assert one.json()["run_id"] == run_id and one.json()["phases"][0]["name"] == "identify"
    async with portal.client(headers={"Authorization": "Bearer sqp_not-a-token"}) as http:
        assert (await http.get("/api/v1/runs")).status_code == 401


# -- attacks ------------------------------------------------------------------------------


async def test_operator_injection_huge_and_malformed_parameters_are_refused(portal: Portal) -> None:
    await portal.aship([tracker_run("TRK-1")])
    async with portal.logged_in("viewer") as http:
        for query, status in (("serial[$ne]=", 400), ("serial[$gt]=&x=1", 400), ("since=yesterday", 400),
                              ("outcome=WHATEVER", 400), ("limit=100000", 400), ("serial=a&serial=b", 400),
                              ("serial=" + "A" * 300, 400), ("serial=" + "A" * 5000, 414),
                              ("before=nonsense", 400)):
            for path in ("/api/v1/runs", "/api/v1/devices", "/search"):
                r = await http.get(f"{path}?{query}")
                assert r.status_code == status, (path, query, r.status_code)
        # Operators as values are text: they match nothing.
        for value in ('{"$ne": null}', "$ne", "$where"):
            body = (await http.get("/api/v1/devices", params={"serial": value})).json()
            assert body == {"devices": []}
            assert (await http.get("/api/v1/runs", params={"batch": value})).json()["runs"] == []
        assert (await http.get("/runs/..%2F..%2Fetc%2Fpasswd")).status_code in (400, 404)
        for path in ("/runs/x/attachments/../../../../etc/passwd", "/runs/%2e%2e/attachments/0/0",
                     "/runs/abc/attachments/0/-1", "/runs/abc/attachments/9/9"):
            r = await http.get(path)
            assert r.status_code in (400, 404) and "root:" not in r.text


async def test_script_in_dut_strings_and_notes_is_shown_as_text(portal: Portal) -> None:
    evil = '<script>alert(1)</script>'
    await portal.aship([run(serial="SN-X", dut={"serial": "SN-X", "mac": evil, "model": '"><img src=x onerror=alert(1)>'},
                            phases=[phase("identify", Outcome.PASS)])])
    async with portal.logged_in("operator") as http:
        page = await http.get("/devices/SN-X")
        r = await http.post("/devices/SN-X/notes", data={"text": evil, "csrf": csrf_of(page.text)})
        assert r.status_code == 303
        page = await http.get("/devices/SN-X")
        assert evil not in page.text and "<img src=x" not in page.text
        assert page.text.count(html.escape(evil)) >= 2  # the MAC and the note, as text
        search = await http.get("/search", params={"mac": evil})
        assert evil not in search.text


async def test_notes_need_the_role_and_the_csrf_token_and_nothing_is_stored_otherwise(portal: Portal) -> None:
    await portal.aship([tracker_run("TRK-1")])
    notes = database(portal.settings)["notes"]
    async with portal.logged_in("viewer") as viewer:
        page = await viewer.get("/devices/TRK-1")
        assert 'id="add-note"' not in page.text  # no form for a viewer
        r = await viewer.post("/devices/TRK-1/notes", data={"text": "hi", "csrf": csrf_of(page.text)})
        assert r.status_code == 403
    async with portal.logged_in("operator") as operator:
        page = await operator.get("/devices/TRK-1")
        assert 'name="disposition"' not in page.text  # an operator notes, quality disposes
        r = await operator.post("/devices/TRK-1/notes", data={"text": "no token"})
        assert r.status_code == 403
        r = await operator.post("/devices/TRK-1/notes", data={"text": "forged", "csrf": "x" * 43})
        assert r.status_code == 403
        r = await operator.post("/devices/TRK-1/notes",
                                data={"text": "scrap it", "disposition": "scrap", "csrf": csrf_of(page.text)})
        assert r.status_code == 403
        assert notes.count_documents({}) == 0
        r = await operator.post("/devices/TRK-1/notes", data={"text": "reseated the antenna",
                                                              "csrf": csrf_of(page.text)})
        assert r.status_code == 303
    async with portal.logged_in("quality") as quality:
        page = await quality.get("/devices/TRK-1")
        r = await quality.post("/devices/TRK-1/notes",
                               data={"text": "", "disposition": "hold", "csrf": csrf_of(page.text)})
        assert r.status_code == 303
        r = await quality.post("/devices/TRK-1/notes",
                               data={"text": "x", "disposition": "burn", "csrf": csrf_of(page.text)})
        assert r.status_code == 400
        page = await quality.get("/devices/TRK-1")
        assert 'id="disposition">hold<' in page.text and "reseated the antenna" in page.text
    stored = list(notes.find({}, {"_id": 0, "created_at": 0}).sort("created_at", 1))
    assert stored == [
        {"serial": "TRK-1", "run_id": None, "author": "operator", "role": "operator", "text": "reseated the antenna",
         "disposition": None},
        {"serial": "TRK-1", "run_id": None, "author": "quality", "role": "quality", "text": "", "disposition": "hold"},
    ]


async def test_the_notes_schema_refuses_what_the_portal_never_writes(portal: Portal) -> None:
    import pymongo.errors

    notes = database(portal.settings)["notes"]
    with pytest.raises(pymongo.errors.WriteError):
        notes.insert_one({"serial": "S", "author": "a", "role": "viewer", "text": "t",
                          "created_at": dt.datetime.now(dt.timezone.utc), "disposition": "burn"})
    with pytest.raises(pymongo.errors.WriteError):
        notes.insert_one({"serial": "S", "text": "anonymous", "created_at": dt.datetime.now(dt.timezone.utc)})


async def test_a_note_by_api_token_needs_json_and_the_role(portal: Portal) -> None:
    await portal.aship([tracker_run("TRK-1")])
    viewer = await trio.to_thread.run_sync(portal.auth.add_token, "dash", portal.auth.user("viewer").role)
    operator = await trio.to_thread.run_sync(portal.auth.add_token, "mes", portal.auth.user("operator").role)
    async with portal.client(headers={"Authorization": f"Bearer {viewer}"}) as http:
        assert (await http.post("/api/v1/devices/TRK-1/notes", json={"text": "hi"})).status_code == 403
    async with portal.client(headers={"Authorization": f"Bearer {operator}"}) as http:
        r = await http.post("/api/v1/devices/TRK-1/notes", json={"text": {"$set": 1}})
        assert r.status_code == 400
        r = await http.post("/api/v1/devices/TRK-1/notes", json={"text": "from the MES"})
        assert r.status_code == 201 and r.json()["author"] == "mes"
        body = (await http.get("/api/v1/devices", params={"serial": "TRK-1"})).json()
        assert [n["text"] for n in body["devices"][0]["notes"]] == ["from the MES"]


# -- exports -------------------------------------------------------------------------------


async def test_an_export_of_a_filtered_view_has_the_cli_exports_rows_and_the_notes(portal: Portal) -> None:
    import csv
    import io

    import openpyxl

    from reports.render.export import csv_cells, export_tables

    runs = [sensor_run("SN-1", vdd=3.6, started_at=T0), sensor_run("SN-1", started_at=T0 + dt.timedelta(hours=1)),
            sensor_run("SN-2", slot=1, started_at=T0 + dt.timedelta(minutes=5)),
            sensor_run("SN-3", slot=2, started_at=T0 + dt.timedelta(minutes=6))]
    await portal.aship(runs)
    async with portal.logged_in("quality") as http:
        page = await http.get("/devices/SN-1")
        await http.post("/devices/SN-1/notes", data={"text": "=cmd|' /C calc'!A0", "disposition": "rework",
                                                     "csrf": csrf_of(page.text)})
        r = await http.get("/export.csv", params={"batch": runs[0].batch, "serial": "SN-1"})
        assert r.status_code == 200 and r.headers["content-disposition"].startswith("attachment; filename=")
        got = list(csv.reader(io.StringIO(r.text)))
        stored = [portal.data.run(x.run_id) for x in runs[:2]]
        expected = export_tables(stored)["runs"]  # what `sequencer export` writes for the same runs
        assert got[0] == [*expected.columns, "disposition", "notes"]
        assert [row[:-2] for row in got[1:]] == [[str(c) if c is not None else "" for c in csv_cells(row)]
                                                for row in expected.rows]
        assert [row[-2] for row in got[1:]] == ["rework", "rework"]
        assert got[1][-1].endswith("quality: =cmd|' /C calc'!A0")  # a note inside the cell, not a formula
        m = await http.get("/export.csv", params={"serial": "SN-2", "table": "measurements"})
        assert [row[4] for row in csv.reader(io.StringIO(m.text))][1:4] == ["chip_id", "mac", "vdd_3v3"]
        x = await http.get("/export.xlsx", params={"batch": runs[0].batch})
        assert x.status_code == 200
        book = openpyxl.load_workbook(io.BytesIO(x.content), read_only=True)
        assert book.sheetnames == ["Runs", "Phases", "Measurements", "Notes"]
        rows = list(book["Runs"].values)
        assert len(rows) == 5 and rows[0][0] == "run_id" and rows[1][0] == runs[0].run_id
        assert [n[-1] for n in list(book["Notes"].values)[1:]] == ["=cmd|' /C calc'!A0"]
        for bad in ({"table": "secrets", "batch": "B"}, {}, {"serial[$ne]": ""}):
            assert (await http.get("/export.csv", params=bad)).status_code == 400
        assert (await http.get("/export.csv", params={"batch": "NOPE"})).status_code == 404


async def test_batches_link_to_their_report_with_the_batch_pages_yields(portal: Portal) -> None:
    recently = dt.datetime.now(dt.timezone.utc) - dt.timedelta(hours=2)
    runs = [sensor_run("SN-1", vdd=3.6, started_at=recently),
            sensor_run("SN-1", started_at=recently + dt.timedelta(minutes=9)),
            sensor_run("SN-2", slot=1, started_at=recently + dt.timedelta(minutes=1))]
    await portal.aship(runs)
    async with portal.logged_in("viewer") as http:
        page = await http.get("/batches")
        assert page.status_code == 200
        link = re.search(r'href="(/report\?batch=[^"]+)"', page.text)
        assert link and "<td>3</td>" in page.text
        report = await http.get(html.unescape(link.group(1)))
        assert report.status_code == 200
        # The batch report's own arithmetic: two units, half passed first time, both in the end.
        from reports.render.html import render_batch

        stored = [portal.data.run(r.run_id) for r in runs]
        expected = render_batch(stored, title=f"Runs: batch {runs[0].batch}, product esp32_sensor")
        assert report.text == expected
        assert (await http.get("/batches?days=0")).status_code == 400


# -- the line board -----------------------------------------------------------------------


async def test_on_a_replica_set_the_board_follows_a_change_stream_and_pushes_each_change(replica_set: object) -> None:
    from tests.mongo_support import fresh_settings
    from web.portal.board import BoardFeed
    from web.portal.data import MongoData

    settings = fresh_settings(replica_set.uri)  # type: ignore[attr-defined]
    data = MongoData(settings)
    await trio.to_thread.run_sync(data.ensure)
    feed = BoardFeed(data, poll_interval=60)  # a poll this slow would never show the change in time
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(feed.run)
            with trio.fail_after(10):
                while feed.mode == "starting":
                    await trio.sleep(0.01)
            assert feed.mode == "change stream"
            seen = feed.version
            now = dt.datetime.now(dt.timezone.utc)
            running = run(serial="SN-LIVE", slot=3, started_at=now, outcome=None, station="line9",
                          phases=[phase("identify", Outcome.PASS, start=0)])
            await trio.to_thread.run_sync(lambda: portal_ship(settings, running))
            with trio.fail_after(4):  # well inside the poll's minute: the stream told the feed
                version, board = await feed.next(seen)
            [station] = [s for s in board if s.name == "line9"]
            [slot] = station.slots
            assert (slot["serial"], slot["outcome"], slot["last_phase"]) == ("SN-LIVE", None, "identify")
            nursery.cancel_scope.cancel()
    finally:
        data.close()
        database(settings).client.drop_database(settings.database)


def portal_ship(settings: object, run_record: object) -> None:
    from reports.storage.mongo import MongoSink

    sink = MongoSink(settings)  # type: ignore[arg-type]
    try:
        assert not sink.write_runs([(1, run_record)]).rejected  # type: ignore[list-item]
    finally:
        sink.close()


def test_a_station_silent_longer_than_five_minutes_says_how_long_and_a_slot_shows_its_newest_run() -> None:
    from web.portal.board import line_board

    now = dt.datetime(2026, 12, 7, 12, 0, tzinfo=dt.timezone.utc)
    rows = [{"station": "a", "slot": 1, "run_id": "r1"}, {"station": "a", "slot": 0, "run_id": "r0"}]
    heard = {"a": now - dt.timedelta(minutes=2), "b": now - dt.timedelta(minutes=42)}
    a, b = line_board(rows, heard, now)
    assert (a.name, [s["run_id"] for s in a.slots], a.silent_for) == ("a", ["r0", "r1"], None)
    assert (b.name, b.slots, b.silent_for) == ("b", (), dt.timedelta(minutes=42))


async def test_the_board_keeps_up_by_what_shipped_since_even_after_a_shipment_dated_ahead(mongo: object) -> None:
    from web.portal.board import BoardFeed
    from web.portal.data import MongoData

    data = MongoData(mongo)  # type: ignore[arg-type]
    await trio.to_thread.run_sync(data.ensure)
    now = dt.datetime.now(dt.timezone.utc)
    first = run(serial="SN-A", slot=0, started_at=now, station="st", phases=[phase("identify", Outcome.PASS)])
    await trio.to_thread.run_sync(portal_ship, mongo, first)
    # A run shipped by a server whose clock was an hour ahead (then put right).
    database(mongo)["runs"].update_one({"_id": first.run_id}, {"$set": {"shipped_at": now + dt.timedelta(hours=1)}})
    feed = BoardFeed(data)
    try:
        await feed.refresh()  # the whole board, once
        second = run(serial="SN-B", slot=1, started_at=now, station="st", outcome=None,
                     phases=[phase("identify", Outcome.PASS)])
        await trio.to_thread.run_sync(portal_ship, mongo, second)
        await feed.refresh()  # only what shipped since
        [station] = feed.board
        assert [(s["slot"], s["serial"]) for s in station.slots] == [(0, "SN-A"), (1, "SN-B")]
    finally:
        data.close()


async def test_a_junit_export_streams_the_suites_sequencer_export_writes(portal: Portal) -> None:
    import xml.etree.ElementTree as ET

    import junitparser

    from reports.render.junit import junit_tree

    runs = [sensor_run("SN-1", vdd=3.6, started_at=T0), sensor_run("SN-1", started_at=T0 + dt.timedelta(hours=1)),
            sensor_run("SN-2", slot=1, crash=True, started_at=T0 + dt.timedelta(minutes=5))]
    await portal.aship(runs)
    async with portal.logged_in("viewer") as http:
        r = await http.get("/export.xml", params={"batch": runs[0].batch})
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/xml")
    streamed = ET.fromstring(r.content)
    expected = junit_tree([portal.data.run(x.run_id) for x in runs], name="x").getroot()
    def same(e: ET.Element) -> str:  # the file's indentation apart
        return ET.canonicalize(ET.tostring(e, encoding="unicode"), strip_text=True)

    assert [same(s) for s in streamed] == [same(s) for s in expected]
    suites = list(junitparser.JUnitXml.fromstring(r.content))
    assert [(s.tests, s.failures, s.errors) for s in suites] == [
        (int(s.get("tests")), int(s.get("failures")), int(s.get("errors"))) for s in expected]
