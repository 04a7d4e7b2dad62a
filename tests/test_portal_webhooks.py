"""Webhooks over a real mongod to receivers on loopback: signed, filtered, retried, and never lost or doubled."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import attrs
import httpx
import pymongo
import trio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from reports.storage.mongo import MongoSettings
from tests import records_factory as rf
from tests.mongo_support import database
from tests.portal_support import FAST_WEBHOOKS, Portal, csrf_of
from web.portal.webhooks import Webhooks, sign, verify_signature
from web.server import serve_app

FAST = FAST_WEBHOOKS


@attrs.define
class Receiver:
    """A customer's system on loopback: records what arrives; answers 500 to the first ``fail_first``."""

    url: str = ""
    fail_first: int = 0
    received: list[tuple[dict[str, str], bytes]] = attrs.Factory(list)

    def events(self, kind: str | None = None) -> list[dict[str, Any]]:
        out = [json.loads(body) for _, body in self.received]
        return [e for e in out if kind is None or e["type"] == kind]


@asynccontextmanager
async def receiver(fail_first: int = 0) -> AsyncIterator[Receiver]:
    r = Receiver(fail_first=fail_first)

    async def hook(request: Request) -> PlainTextResponse:
        body = await request.body()
        r.received.append((dict(request.headers), body))
        if len(r.received) <= r.fail_first:
            return PlainTextResponse("down for maintenance", status_code=500)
        return PlainTextResponse("thanks")

    import logging

    async with serve_app(Starlette(routes=[Route("/hook", hook, methods=["POST"])]), graceful_timeout=1,
                         error_log=logging.getLogger("test.receiver")) as url:
        r.url = url + "/hook"
        yield r


async def wait_until(condition: Any, what: str, timeout: float = 20.0) -> None:
    with trio.move_on_after(timeout):
        while not condition():
            await trio.sleep(0.05)
        return
    raise AssertionError(f"timed out waiting for {what}")


def hooks(settings: MongoSettings, **kw: Any) -> Webhooks:
    w = Webhooks(database(settings), FAST, **kw)
    w.ensure()
    return w


def failing(serial: str, *, minutes: float = 0, slot: int = 0, **kw: Any) -> Any:
    return rf.run(serial=serial, slot=slot, started_at=rf.T0 + dt.timedelta(minutes=minutes),
                  phases=[rf.phase("rails", rf.Outcome.FAIL, reason="vdd_3v3 3.6 V > 3.4 V")], **kw)


def passing(serial: str, *, minutes: float = 0, slot: int = 0, **kw: Any) -> Any:
    return rf.run(serial=serial, slot=slot, started_at=rf.T0 + dt.timedelta(minutes=minutes),
                  phases=[rf.phase("rails", rf.Outcome.PASS)], **kw)


def test_the_signature_is_hmac_sha256_over_timestamp_and_body_and_expires() -> None:
    body = b'{"id":"run.finished:1"}'
    header = sign("whsec_x", 1_700_000_000, body)
    assert header.startswith("t=1700000000,v1=") and len(header.split("v1=")[1]) == 64
    assert verify_signature("whsec_x", header, body, now=1_700_000_100)
    assert not verify_signature("whsec_y", header, body, now=1_700_000_100)
    assert not verify_signature("whsec_x", header, body + b" ", now=1_700_000_100)
    assert not verify_signature("whsec_x", header, body, now=1_700_001_000)  # a replay, too late
    assert not verify_signature("whsec_x", "v1=abc", body)


async def test_runs_become_signed_events_for_the_endpoints_that_want_them(portal: Portal) -> None:
    async with receiver() as r:
        w = hooks(portal.settings)
        _, secret = w.add_endpoint(r.url, ["run.finished", "unit.failed", "unit.passed_after_failing"])
        w.add_endpoint(r.url + "?other", ["station.silent"])
        await portal.aship([failing("SN-1"), passing("SN-1", minutes=10)])
        await wait_until(lambda: len(r.received) == 4, "four deliveries")
        types = sorted(e["type"] for e in r.events())
        assert types == ["run.finished", "run.finished", "unit.failed", "unit.passed_after_failing"]
        for headers, body in r.received:
            assert verify_signature(secret, headers["sequencer-signature"], body)
            event = json.loads(body)
            assert headers["sequencer-event-id"] == event["id"] and event["data"]["serial"] == "SN-1"
        failed = r.events("unit.failed")[0]["data"]
        assert failed["outcome"] == "FAIL" and failed["failed_phase"] == "rails"
        await trio.sleep(0.3)
        assert len(r.received) == 4  # nothing twice, though the scanner went over the runs again


async def test_a_failed_delivery_is_retried_with_backoff_and_every_attempt_is_logged(portal: Portal) -> None:
    async with receiver(fail_first=2) as r:
        w = hooks(portal.settings)
        endpoint_id, _ = w.add_endpoint(r.url, ["run.finished"])
        await portal.aship([passing("SN-2")])
        await wait_until(lambda: len(r.received) == 3, "two failures and a success")
        await wait_until(lambda: w.outbox(endpoint_id)[0]["state"] == "delivered", "the entry delivered")
        log = list(reversed(w.deliveries(endpoint_id)))
        assert [(d["attempt"], d["status"]) for d in log] == [(1, 500), (2, 500), (3, 200)]
        assert log[0]["response"] == "down for maintenance" and log[2]["response"] == "thanks"
        gaps = [(b["at"] - a["at"]).total_seconds() for a, b in zip(log, log[1:])]
        assert gaps[0] >= 0.05 and gaps[1] >= 0.1  # 50 ms, then twice that
        assert {json.loads(body)["id"] for _, body in r.received} == {f"run.finished:{passing('SN-2').run_id}"}


async def test_an_entry_past_its_day_of_retries_is_given_up_and_an_unreachable_receiver_is_an_attempt(
        mongo: MongoSettings) -> None:
    from reports.storage.mongod import free_port

    w = hooks(mongo)
    w.settings = attrs.evolve(FAST, give_up_after=dt.timedelta(milliseconds=300))
    endpoint_id, _ = w.add_endpoint(f"http://127.0.0.1:{free_port()}/nobody", ["note.added"])
    w.enqueue([w.note_event(attrs.make_class("N", ["note_id", "as_json"])("n1", lambda: {"text": "x"}),
                            {"product": "p"})])
    async with httpx.AsyncClient(timeout=2) as http:
        with trio.fail_after(20):
            while w.outbox(endpoint_id)[0]["state"] == "pending":
                if not await w.deliver_one(http):
                    await trio.sleep(0.02)
    entry = w.outbox(endpoint_id)[0]
    assert entry["state"] == "failed" and entry["last_status"] is None and "ConnectError" in entry["last_error"]
    assert len(w.deliveries(endpoint_id)) == entry["attempts"] >= 1  # each attempt is in the log


async def test_two_portal_processes_and_a_restart_neither_lose_nor_double_a_delivery(mongo: MongoSettings) -> None:
    async with receiver() as r:
        first, second = hooks(mongo, owner="portal-a"), hooks(mongo, owner="portal-b")
        endpoint_id, _ = first.add_endpoint(r.url, ["run.finished"])
        runs = [passing(f"SN-{i}", minutes=i, slot=i % 4) for i in range(40)]
        from reports.storage.mongo import MongoSink

        sink = MongoSink(mongo)
        sink.write_runs([(i + 1, run) for i, run in enumerate(runs)])
        sink.close()
        # Both processes find the same runs: each event is in the outbox once.
        assert first.scan() + second.scan() == 40
        # A process takes an entry and dies before it can send it.
        taken = first.claim()
        assert taken is not None
        async with trio.open_nursery() as nursery:
            nursery.start_soon(second.run)
            nursery.start_soon(first.run)  # the restarted process (its old lease runs out meanwhile)
            await wait_until(lambda: len(r.received) >= 40 and all(
                e["state"] == "delivered" for e in first.outbox(endpoint_id)), "every entry delivered")
            await trio.sleep(0.3)
            nursery.cancel_scope.cancel()
        ids = [json.loads(body)["id"] for _, body in r.received]
        assert sorted(ids) == sorted(f"run.finished:{run.run_id}" for run in runs)  # each once
        # The entry the dead process held went out once, on its second attempt, after the lease ran out.
        attempts = sorted(d["attempt"] for d in database(mongo)["webhook_deliveries"].find())
        assert attempts == [1] * 39 + [2]


async def test_filters_send_a_customer_only_its_own_devices_and_never_a_secret(portal: Portal) -> None:
    def provisioned(serial: str, group: str) -> Any:
        return rf.run(serial=serial, phases=[rf.phase("nvs_config", rf.Outcome.PASS,
                                                      measurements=[rf.measurement("nvs_group", group)])],
                      product="lte_tracker",
                      dut={"serial": serial, "mac": "24:0a:c4:00:00:01", "imei": "356938035643809",
                           "device_id": f"dev-{serial}", "claim_code": f"CLM-{serial}",
                           "public_key": "-----BEGIN PUBLIC KEY-----\nMFkw...\n-----END PUBLIC KEY-----\n"})

    async with receiver() as acme, receiver() as everyone:
        w = hooks(portal.settings)
        w.add_endpoint(acme.url, ["device.provisioned"], group="acme")
        w.add_endpoint(everyone.url, ["device.provisioned"], product="lte_tracker")
        await portal.aship([provisioned("TRK-A", "acme"), provisioned("TRK-G", "globex"),
                            provisioned("TRK-A", "acme")])
        await wait_until(lambda: len(acme.received) == 1 and len(everyone.received) == 2, "the provisioned devices")
        [device] = [e["data"] for e in acme.events()]
        assert device["serial"] == "TRK-A" and device["claim_code"] == "CLM-TRK-A" and device["group"] == "acme"
        assert device["public_key"].startswith("-----BEGIN PUBLIC KEY-----")
        assert set(device) <= {"serial", "mac", "imei", "imsi", "iccid", "device_id", "claim_code", "public_key",
                               "public_key_sha256", "firmware", "model", "hardware_rev", "product", "batch",
                               "station", "group", "run_id"}
        assert sorted(e["data"]["serial"] for e in everyone.events()) == ["TRK-A", "TRK-G"]


async def test_line_alerts_slot_failing_yield_below_threshold_station_silent_and_notes(portal: Portal) -> None:
    async with receiver() as r:
        w = hooks(portal.settings)
        w.add_endpoint(r.url, ["slot.failing", "yield.below_threshold", "station.silent", "note.added"])
        # Slot 0 fails three in a row; four units, half passing first time: 50 % < 75 %.
        await portal.aship([passing("U1", minutes=0, slot=1), passing("U2", minutes=1, slot=1),
                            failing("U3", minutes=2), failing("U4", minutes=3), failing("U3", minutes=4)])
        await wait_until(lambda: {e["type"] for e in r.events()} >= {"slot.failing", "yield.below_threshold"},
                         "the alerts")
        assert not r.events("station.silent")  # it has just shipped
        [slot] = r.events("slot.failing")
        assert slot["data"]["slot"] == 0 and slot["data"]["runs_in_a_row"] == 3
        [fpy] = r.events("yield.below_threshold")
        assert fpy["data"]["first_pass_yield"] == 0.5 and fpy["data"]["units"] == 4
        # The stations shipped "now", but their runs are old: the silence is measured by shipped_at.
        database(portal.settings)["runs"].update_many({}, {"$set": {"shipped_at": dt.datetime(2026, 1, 1)}})
        hooks(portal.settings).scan()  # a portal process starting now sees the silence at once
        await wait_until(lambda: r.events("station.silent"), "the silence")
        assert [e["data"]["station"] for e in r.events("station.silent")] == ["line1-st03"]
        async with portal.logged_in("operator") as http:
            page = await http.get("/devices/U3")
            await http.post("/devices/U3/notes", data={"text": "scrapped the board", "csrf": csrf_of(page.text)})
        await wait_until(lambda: r.events("note.added"), "the note event")
        assert r.events("note.added")[0]["data"]["text"] == "scrapped the board"
        await trio.sleep(0.3)
        assert len(r.events("slot.failing")) == 1 and len(r.events("yield.below_threshold")) == 1


async def test_the_yield_alert_counts_units_as_the_reports_do_not_serials(portal: Portal) -> None:
    """Two boards fail identify (their runs know only the MAC) and pass their retest: two of four units failed
    first, 50 % < 75 %. Counted by serial, the failed runs had no unit and every unit passed first."""
    def board(n: int, serial: str | None, minutes: float, run: Any = passing) -> Any:
        mac = f"24:0a:c4:00:00:{n:02x}"
        dut = {"mac": mac.upper() if serial is None else mac, **({"serial": serial} if serial else {})}
        return run(serial, minutes=minutes, slot=n, dut=dut)

    async with receiver() as r:
        w = hooks(portal.settings)
        w.add_endpoint(r.url, ["yield.below_threshold"])
        await portal.aship([board(1, "U1", 0), board(2, None, 1, failing), board(3, None, 2, failing),
                            board(2, "U2", 3), board(3, "U3", 4), board(4, "U4", 5)])
        await wait_until(lambda: r.events("yield.below_threshold"), "the yield alert")
        [fpy] = r.events("yield.below_threshold")
        assert fpy["data"]["first_pass_yield"] == 0.5 and fpy["data"]["units"] == 4


def test_newest_units_are_whole_units_however_few_runs_are_read_first(mongo: MongoSettings) -> None:
    """A unit first tested long ago and retested now is not a new unit; the newest units are found whole."""
    from reports.storage.mongo import MongoSink, newest_units

    old = passing("OLD", minutes=0, dut={"serial": "OLD", "mac": "aa:00"})
    fresh = [failing(None, minutes=10 + i, dut={"mac": f"aa:{i + 1:02x}"}) for i in range(3)]
    retests = [passing(f"N{i}", minutes=20 + i, dut={"serial": f"N{i}", "mac": f"AA:{i + 1:02X}"}) for i in range(3)]
    again = passing("OLD", minutes=30, dut={"serial": "OLD", "mac": "aa:00"})
    sink = MongoSink(mongo)
    try:
        sink.write_runs(list(enumerate([old, *fresh, *retests, again], 1)))
        for count in (1, 2, 3, 4):
            units = newest_units(sink.runs, "esp32_sensor", count)
            first = ["OLD"] if count == 4 else []
            assert [u.serial for u in units] == first + ["N0", "N1", "N2"][3 - min(count, 3):]
            assert [len(u.run_ids) for u in units] == [2] * count
            assert all(u.first_outcome is rf.Outcome.FAIL for u in units if u.serial != "OLD")
    finally:
        sink.close()


async def test_only_an_admin_manages_webhooks_and_nothing_is_stored_otherwise(portal: Portal) -> None:
    endpoints = database(portal.settings)["webhook_endpoints"]
    async with portal.logged_in("quality") as http:
        assert (await http.get("/admin/webhooks")).status_code == 403
        page = await http.get("/devices/none")  # any page with the session's CSRF token
        r = await http.post("/admin/webhooks", data={"url": "http://127.0.0.1:9/x", "events": "run.finished",
                                                     "csrf": csrf_of(page.text)})
        assert r.status_code == 403 and endpoints.count_documents({}) == 0
    async with portal.logged_in("admin") as http:
        page = await http.get("/admin/webhooks")
        r = await http.post("/admin/webhooks", data={"url": "http://127.0.0.1:9/x", "events": "run.finished"})
        assert r.status_code == 403 and endpoints.count_documents({}) == 0
        r = await http.post("/admin/webhooks", data={"url": "javascript:alert(1)", "events": "run.finished",
                                                     "csrf": csrf_of(page.text)})
        assert r.status_code == 400 and endpoints.count_documents({}) == 0
        r = await http.post("/admin/webhooks", data={"url": "http://127.0.0.1:9/x", "events": ["run.finished"],
                                                     "csrf": csrf_of(page.text)})
        assert r.status_code == 201
        secret = endpoints.find_one()["secret"]
        assert secret in r.text  # shown once, at creation
        listing = await http.get("/admin/webhooks")
        assert secret not in listing.text and "http://127.0.0.1:9/x" in listing.text
