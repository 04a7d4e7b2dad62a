"""Webhooks: events of the line, delivered signed, at least once, from an outbox in MongoDB.

An admin registers endpoints (URL, events, secret, and optionally a product
and a customer group, so a customer's system receives its own devices only).
Events come from what the stations ship and what people do in the portal:

==============================  ==============================================================
``device.provisioned``          a run registered the device (identity, public key, claim code)
``run.finished``                a run ended
``unit.failed``                 a run ended FAIL, ERROR or TIMEOUT
``unit.passed_after_failing``   a unit passed after an earlier run of it had not
``yield.below_threshold``       a product's first-pass yield over its last N units fell below the threshold
``slot.failing``                a station's slot did not pass K runs in a row
``station.silent``              a station shipped nothing for T minutes
``note.added``                  a note or a disposition was added to a device
==============================  ==============================================================

Each event has an id derived from what caused it (``run.finished:<run id>``),
so the outbox entry for (endpoint, event) is written with an upsert on that
id: two portal processes that both see a run, or one that scans a run again
after a restart, enqueue it once. Deliverers claim an entry with a *lease*
(``find_one_and_update``): no other process takes it until the lease ends,
so two processes never send one entry at once, and a process that dies
mid-delivery leaves it to be taken again when the lease ends (at least once;
receivers deduplicate by the event id). A failed delivery is retried with
exponential backoff, 30 s doubling to an hour, for a day; every attempt is
in the delivery log with the status and the start of the response.

The body is JSON ``{"id", "type", "created_at", "data"}``; the header
``Sequencer-Signature: t=<unix time>,v1=<hex>`` carries HMAC-SHA256 of
``"<t>.<body>"`` under the endpoint's secret, as the large payment and
code-hosting services sign theirs (:func:`verify_signature` is the
receiver's side). Nothing secret about a device is ever in an event.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import json
import logging
import secrets
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit

import attrs
import bson
import httpx
import pymongo
import trio

from reports.storage.mongo import newest_units
from sequencer.records import Outcome

__all__ = ["EVENTS", "WebhookSettings", "Webhooks", "sign", "verify_signature"]

log = logging.getLogger("web.portal.webhooks")

EVENTS = ("device.provisioned", "run.finished", "unit.failed", "unit.passed_after_failing",
          "yield.below_threshold", "slot.failing", "station.silent", "note.added")
ENDPOINTS, OUTBOX, DELIVERIES, STATE = "webhook_endpoints", "webhook_outbox", "webhook_deliveries", "webhook_state"
SIGNATURE_HEADER = "Sequencer-Signature"
FAILED_OUTCOMES = ("FAIL", "ERROR", "TIMEOUT")
#: What a device.provisioned event tells about the device: its identity and public parts, never a secret.
PROVISIONED_FIELDS = ("serial", "mac", "imei", "imsi", "iccid", "device_id", "claim_code", "public_key",
                      "public_key_sha256", "firmware", "model", "hardware_rev")
RESPONSE_KEPT = 2000
#: Runs read per scan; a backlog takes several scans.
SCAN_BATCH = 2000
#: How often the stations' silence is checked (an aggregation over every station).
SILENCE_CHECK = dt.timedelta(seconds=30)


@attrs.frozen
class WebhookSettings:
    """How events are found and delivered; the defaults are the portal's, tests shorten the times."""

    fpy_threshold: float = 0.90
    fpy_window: int = 50  # units
    slot_failures: int = 3  # runs in a row
    silent_after: dt.timedelta = dt.timedelta(minutes=15)
    first_retry: dt.timedelta = dt.timedelta(seconds=30)
    max_retry: dt.timedelta = dt.timedelta(hours=1)
    give_up_after: dt.timedelta = dt.timedelta(days=1)
    lease: dt.timedelta = dt.timedelta(seconds=60)
    request_timeout_s: float = 10.0
    poll_interval_s: float = 1.0
    deliverers: int = 4


def sign(secret: str, timestamp: int, body: bytes) -> str:
    """The signature header's value for ``body`` sent at ``timestamp``."""
    mac = hmac.new(secret.encode(), str(timestamp).encode() + b"." + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={mac}"


def verify_signature(secret: str, header: str, body: bytes, *, tolerance_s: float = 300.0,
                     now: float | None = None) -> bool:
    """Whether ``header`` signs ``body`` with ``secret`` and is recent (a receiver's check; replays expire)."""
    parts = dict(p.split("=", 1) for p in header.split(",") if "=" in p)
    try:
        timestamp = int(parts["t"])
    except (KeyError, ValueError):
        return False
    if abs((time.time() if now is None else now) - timestamp) > tolerance_s:
        return False
    expected = sign(secret, timestamp, body).split("v1=", 1)[1]
    return hmac.compare_digest(expected, parts.get("v1", ""))


def check_endpoint_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname or len(url) > 2000:
        raise ValueError("url: an http:// or https:// address is needed")
    return url


def _now() -> dt.datetime:
    """Now, to the millisecond (what BSON keeps), so a time read back equals the time written."""
    now = dt.datetime.now(dt.timezone.utc)
    return now.replace(microsecond=now.microsecond // 1000 * 1000)


def _utc(when: dt.datetime | None) -> dt.datetime | None:
    if when is None:
        return None
    return when.replace(tzinfo=dt.timezone.utc) if when.tzinfo is None else when


@attrs.frozen
class Event:
    event_id: str
    type: str
    data: Mapping[str, Any]
    product: str | None = None
    group: str | None = None


class Webhooks:
    """The endpoints, the outbox and the delivery log in one database. Blocking methods, plus async tasks."""

    def __init__(self, db: Any, settings: WebhookSettings | None = None, *, owner: str | None = None) -> None:
        self.db = db
        self.settings = settings or WebhookSettings()
        #: who holds a lease: this process (and object), so a lease is only ever released by its holder
        self.owner = owner or f"{secrets.token_hex(6)}"
        self._wake = trio.Event()
        self._silence_checked: dt.datetime | None = None

    def ensure(self) -> None:
        self.db[OUTBOX].create_index([("state", 1), ("next_at", 1)], name="due")
        self.db[DELIVERIES].create_index([("endpoint_id", 1), ("at", -1)], name="endpoint_at")
        self.db[DELIVERIES].create_index("at", expireAfterSeconds=30 * 86400, name="expire")

    # -- endpoints ------------------------------------------------------------------

    def add_endpoint(self, url: str, events: Sequence[str], *, secret: str = "", product: str | None = None,
                     group: str | None = None, created_by: str = "") -> tuple[str, str]:
        """A new endpoint; its id and secret (made if none is given: shown to the admin once)."""
        check_endpoint_url(url)
        unknown = set(events) - set(EVENTS)
        if unknown or not events:
            raise ValueError(f"events: choose from {', '.join(EVENTS)}")
        secret = secret or "whsec_" + secrets.token_urlsafe(32)
        endpoint_id = str(bson.ObjectId())
        self.db[ENDPOINTS].insert_one({
            "_id": endpoint_id, "url": url, "events": list(events), "secret": secret, "product": product or None,
            "group": group or None, "active": True, "created_by": created_by, "created_at": _now(),
        })
        return endpoint_id, secret

    def set_active(self, endpoint_id: str, active: bool) -> bool:
        return self.db[ENDPOINTS].update_one({"_id": endpoint_id}, {"$set": {"active": active}}).matched_count == 1

    def endpoints(self) -> list[dict[str, Any]]:
        return list(self.db[ENDPOINTS].find({}, {"secret": 0}).sort("created_at", 1))

    def deliveries(self, endpoint_id: str, limit: int = 100) -> list[dict[str, Any]]:
        return list(self.db[DELIVERIES].find({"endpoint_id": endpoint_id}).sort("at", -1).limit(limit))

    def outbox(self, endpoint_id: str | None = None) -> list[dict[str, Any]]:
        query = {} if endpoint_id is None else {"endpoint_id": endpoint_id}
        return list(self.db[OUTBOX].find(query).sort("created_at", 1))

    # -- enqueueing ------------------------------------------------------------------------

    def enqueue(self, events: Iterable[Event]) -> int:
        """Put each event in the outbox once per endpoint that wants it; how many entries are new."""
        endpoints = [e for e in self.db[ENDPOINTS].find({"active": True})]
        ops = []
        now = _now()
        for event in events:
            body = json.dumps({"id": event.event_id, "type": event.type, "created_at": now.isoformat(),
                               "data": event.data}, separators=(",", ":"), default=str)
            for e in endpoints:
                if event.type not in e["events"]:
                    continue
                if e.get("product") and e["product"] != event.product:
                    continue
                if e.get("group") and e["group"] != event.group:
                    continue
                ops.append(pymongo.UpdateOne(
                    {"_id": f"{e['_id']}:{event.event_id}"},
                    {"$setOnInsert": {"endpoint_id": e["_id"], "event_id": event.event_id, "type": event.type,
                                      "body": body, "created_at": now, "next_at": now, "attempts": 0,
                                      "state": "pending", "lease_until": None, "lease_owner": None}},
                    upsert=True))
        if not ops:
            return 0
        return self.db[OUTBOX].bulk_write(ops, ordered=False).upserted_count

    def wake(self) -> None:
        """Tell the idle deliverers (from the event loop) that something was enqueued."""
        self._wake.set()

    # -- finding events in what the stations ship --------------------------------------------

    def scan(self, now: dt.datetime | None = None) -> int:
        """Enqueue the events of runs shipped since the last scan (and station silences); new entries' count.

        The watermark is kept in MongoDB; runs shipped in the same
        millisecond as it are scanned again, which the outbox's ids make
        harmless.
        """
        now = now or _now()
        state = self.db[STATE].find_one({"_id": "scan"}) or {}
        after = _utc(state.get("shipped_at")) or dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)
        after_id = state.get("run_id", "")
        # Resumes after (shipped_at, run id): many runs of one bulk write share a shipped_at.
        query = {"$or": [{"shipped_at": {"$gt": after}}, {"shipped_at": after, "_id": {"$gt": after_id}}]}
        if self.db[ENDPOINTS].count_documents({"active": True}, limit=1) == 0:
            # Nobody to tell: move past what shipped so far rather than work through it.
            newest = self.db["runs"].find_one({}, {"shipped_at": 1}, sort=[("shipped_at", -1), ("_id", -1)])
            if newest is not None and newest.get("shipped_at") is not None:
                self.db[STATE].update_one({"_id": "scan"}, {"$set": {"shipped_at": newest["shipped_at"],
                                                                     "run_id": newest["_id"]}}, upsert=True)
            return 0
        docs = list(self.db["runs"].find(query, {"phases.attempts": 0, "phases.logs": 0, "phases.attachments": 0,
                                                 "logs": 0})
                    .sort([("shipped_at", 1), ("_id", 1)]).limit(SCAN_BATCH))
        events: list[Event] = []
        products: set[str] = set()
        for doc in docs:
            if doc.get("outcome") is None:
                continue
            events += self._run_events(doc)
            products.add(doc["product"])
        for product in sorted(products):
            events += self._yield_events(product)
        if self._silence_checked is None or now - self._silence_checked >= SILENCE_CHECK:
            self._silence_checked = now
            events += self._silence_events(now)
        new = self.enqueue(events)
        if docs:
            last = docs[-1]
            self.db[STATE].update_one({"_id": "scan"}, {"$set": {"shipped_at": last["shipped_at"],
                                                                 "run_id": last["_id"]}}, upsert=True)
        return new

    def _run_events(self, doc: Mapping[str, Any]) -> list[Event]:
        run_id, serial, outcome, product = doc["_id"], doc.get("serial"), doc["outcome"], doc["product"]
        group = next((m.get("value") for m in doc.get("measurements") or ()
                      if m.get("name") == "nvs_group" and m.get("value")), None)
        summary = {"run_id": run_id, "serial": serial, "product": product, "station": doc["station"],
                   "slot": doc["slot"], "batch": doc.get("batch", ""), "outcome": outcome,
                   "started_at": _utc(doc["started_at"]).isoformat(),  # type: ignore[union-attr]
                   "failed_phase": next((p["name"] for p in doc.get("phases") or ()
                                         if p.get("outcome") not in ("PASS", "SKIPPED", None)), None)}
        out = [Event(f"run.finished:{run_id}", "run.finished", summary, product, group)]
        if outcome in FAILED_OUTCOMES:
            out.append(Event(f"unit.failed:{run_id}", "unit.failed", summary, product, group))
        if outcome == "PASS" and serial:
            earlier = self.db["runs"].find_one({"serial": serial, "started_at": {"$lt": doc["started_at"]},
                                                "outcome": {"$in": list(FAILED_OUTCOMES)}}, {"_id": 1})
            if earlier is not None:
                out.append(Event(f"unit.passed_after_failing:{run_id}", "unit.passed_after_failing", summary,
                                 product, group))
        dut = doc.get("dut") or {}
        if dut.get("device_id") and dut.get("claim_code"):
            device = {k: str(dut[k]) for k in PROVISIONED_FIELDS if dut.get(k) is not None}
            device.update(serial=serial, product=product, batch=doc.get("batch", ""), station=doc["station"],
                          group=group, run_id=run_id)
            out.append(Event(f"device.provisioned:{dut['device_id']}", "device.provisioned", device, product, group))
        streak = self._slot_streak(doc)
        if streak == self.settings.slot_failures:
            out.append(Event(f"slot.failing:{doc['station']}:{doc['slot']}:{run_id}", "slot.failing",
                             {"station": doc["station"], "slot": doc["slot"], "runs_in_a_row": streak,
                              "last_run_id": run_id, "product": product}, product, None))
        return out

    def _slot_streak(self, doc: Mapping[str, Any]) -> int:
        """How many runs in a row, ending with ``doc``, its slot did not pass (0 if ``doc`` passed)."""
        k = self.settings.slot_failures
        previous = list(self.db["runs"].find(
            {"station": doc["station"], "slot": doc["slot"], "outcome": {"$ne": None},
             "started_at": {"$lte": doc["started_at"]}}, {"outcome": 1}).sort([("started_at", -1), ("_id", -1)])
            .limit(k + 1))
        streak = 0
        for r in previous:
            if r["outcome"] in ("PASS", "ABORTED", "INTERRUPTED"):
                break
            streak += 1
        return streak

    def _yield_events(self, product: str) -> list[Event]:
        """``yield.below_threshold`` when the product's first-pass yield over its last N units crosses under.

        Units as the reports count them (``reports.storage.mongo.newest_units``): a board whose identify
        phase failed and its passing retest are one unit that failed first, not two.
        """
        window = self.settings.fpy_window
        units = newest_units(self.db["runs"], product, window)
        if len(units) < window:
            return []
        fpy = sum(u.first_outcome is Outcome.PASS for u in units) / len(units)
        key = f"fpy:{product}"
        if fpy >= self.settings.fpy_threshold:
            self.db[STATE].update_one({"_id": key}, {"$set": {"below": False}})
            return []
        # Flipped atomically: of several portal processes, only the one whose update crossed sends the event.
        try:
            crossed = self.db[STATE].find_one_and_update(
                {"_id": key, "below": {"$ne": True}}, {"$set": {"below": True}, "$inc": {"crossings": 1}},
                upsert=True, return_document=pymongo.ReturnDocument.AFTER)
        except pymongo.errors.DuplicateKeyError:  # already below: nothing new to say
            return []
        return [Event(f"yield.below_threshold:{product}:{crossed['crossings']}", "yield.below_threshold",
                      {"product": product, "first_pass_yield": round(fpy, 4), "threshold": self.settings.fpy_threshold,
                       "units": len(units)}, product, None)]

    def _silence_events(self, now: dt.datetime) -> list[Event]:
        out = []
        rows = self.db["runs"].aggregate([
            {"$match": {"shipped_at": {"$ne": None}}},
            {"$sort": {"station": 1, "shipped_at": -1}},
            {"$group": {"_id": "$station", "last": {"$first": "$shipped_at"}}},
        ])
        for r in rows:
            last = _utc(r["last"])
            assert last is not None
            if now - last < self.settings.silent_after:
                continue
            event_id = f"station.silent:{r['_id']}:{last.isoformat()}"
            out.append(Event(event_id, "station.silent",
                             {"station": r["_id"], "last_heard": last.isoformat(),
                              "silent_minutes": int((now - last).total_seconds() // 60)}))
        return out

    def note_event(self, note: Any, device: Mapping[str, Any]) -> Event:
        return Event(f"note.added:{note.note_id}", "note.added", {**note.as_json(), "product": device["product"]},
                     device["product"] or None, device.get("group"))

    # -- delivering ---------------------------------------------------------------------------

    def claim(self, now: dt.datetime | None = None) -> dict[str, Any] | None:
        """Take the next due entry for ``lease`` (nobody else may send it meanwhile), or None."""
        now = now or _now()
        return self.db[OUTBOX].find_one_and_update(
            {"state": "pending", "next_at": {"$lte": now},
             "$or": [{"lease_until": None}, {"lease_until": {"$lt": now}}]},
            {"$set": {"lease_until": now + self.settings.lease, "lease_owner": self.owner}, "$inc": {"attempts": 1}},
            sort=[("next_at", 1)], return_document=pymongo.ReturnDocument.AFTER)

    def settle(self, entry: Mapping[str, Any], status: int | None, response: str, error: str | None,
               started: dt.datetime, duration_ms: int) -> None:
        """Record one attempt, and mark the entry delivered, due again later, or given up."""
        now = _now()
        self.db[DELIVERIES].insert_one({
            "outbox_id": entry["_id"], "endpoint_id": entry["endpoint_id"], "event_id": entry["event_id"],
            "type": entry["type"], "attempt": entry["attempts"], "at": started, "status": status,
            "response": response[:RESPONSE_KEPT], "error": error, "duration_ms": duration_ms})
        mine = {"_id": entry["_id"], "lease_owner": self.owner}
        if status is not None and 200 <= status < 300:
            update = {"state": "delivered", "delivered_at": now}
        else:
            delay = min(self.settings.first_retry * 2 ** (entry["attempts"] - 1), self.settings.max_retry)
            next_at = now + delay
            gave_up = next_at > _utc(entry["created_at"]) + self.settings.give_up_after  # type: ignore[operator]
            update = {"state": "failed" if gave_up else "pending", "next_at": next_at}
        self.db[OUTBOX].update_one(mine, {"$set": {**update, "lease_until": None, "lease_owner": None,
                                                   "last_status": status, "last_error": error}})

    async def deliver_one(self, http: httpx.AsyncClient) -> bool:
        """Claim and send one due entry; False when none was due."""
        entry = await trio.to_thread.run_sync(self.claim)
        if entry is None:
            return False
        endpoint = await trio.to_thread.run_sync(self.db[ENDPOINTS].find_one, {"_id": entry["endpoint_id"]})
        started = _now()
        t0 = time.monotonic()
        status: int | None = None
        text, error = "", None
        if endpoint is None or not endpoint.get("active"):
            error = "the endpoint was removed or disabled"
        else:
            body = entry["body"].encode()
            headers = {"Content-Type": "application/json", "User-Agent": "sequencer-portal",
                       SIGNATURE_HEADER: sign(endpoint["secret"], int(time.time()), body),
                       "Sequencer-Event": entry["type"], "Sequencer-Event-Id": entry["event_id"]}
            try:
                response = await http.post(endpoint["url"], content=body, headers=headers)
                status, text = response.status_code, response.text
            except httpx.HTTPError as exc:
                error = f"{type(exc).__name__}: {exc}"[:300]
        duration_ms = int((time.monotonic() - t0) * 1000)
        with trio.CancelScope(shield=True):  # an attempt made is an attempt recorded
            await trio.to_thread.run_sync(self.settle, entry, status, text, error, started, duration_ms)
        return True

    async def run(self, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Scan for events and deliver them until cancelled (started in the portal's nursery)."""
        await trio.to_thread.run_sync(self.ensure)
        task_status.started()
        async with httpx.AsyncClient(timeout=self.settings.request_timeout_s, follow_redirects=False) as http:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._scanning)
                for _ in range(self.settings.deliverers):
                    nursery.start_soon(self._delivering, http)

    async def _scanning(self) -> None:
        while True:
            try:
                if await trio.to_thread.run_sync(self.scan):
                    self.wake()
            except Exception as exc:  # noqa: BLE001 - MongoDB away: try again, the portal stays up
                log.warning("webhooks: cannot scan for events: %s", exc)
            await trio.sleep(self.settings.poll_interval_s)

    async def _delivering(self, http: httpx.AsyncClient) -> None:
        while True:
            try:
                sent = await self.deliver_one(http)
            except Exception as exc:  # noqa: BLE001 - MongoDB away: try again later
                log.warning("webhooks: cannot deliver: %s", exc)
                sent = False
            if not sent:
                with trio.move_on_after(self.settings.poll_interval_s):
                    await self._wake.wait()
                if self._wake.is_set():
                    self._wake = trio.Event()
