"""What the portal reads and writes: runs, devices, notes and the line's state, over MongoDB or a station's store.

:class:`MongoData` reads the central database the stations ship to (every
station of the factory). :class:`StoreData` reads one station's local store,
read-only, for a single bench: the same pages, no notes, no webhooks.

Both are blocking (pymongo, SQLite); the routes call them through
``trio.to_thread.run_sync``. A run is shown on lists as a *row*: a plain
dict (:func:`run_row`) with its identity, outcome and where its phases got to.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs

from reports.storage.mongo import MongoSettings, MongoSink, decode_mapping, run_from_document
from reports.storage.notes import Note, add_note, disposition, ensure_notes, notes_for
from sequencer.records import RunRecord, to_dict
from web.portal.query import RunQuery, matches, mongo_filter

__all__ = ["MongoData", "StoreData", "run_row"]

#: What a list of runs needs of each document: no phase bodies, no measurements.
ROW_FIELDS = {"_id": 1, "serial": 1, "product": 1, "product_version": 1, "station": 1, "slot": 1, "batch": 1,
              "operator": 1, "outcome": 1, "marginal": 1, "started_at": 1, "ended_at": 1, "duration_s": 1,
              "dut": 1, "phases.name": 1, "phases.outcome": 1, "shipped_at": 1}
#: The identity attributes a row carries (a DUT's other attributes are on its run page).
ROW_IDENTITY = ("mac", "imei", "imsi", "iccid", "claim_code", "device_id")
EXPORT_BATCH = 200


def _utc(when: dt.datetime | None) -> dt.datetime | None:
    if when is None:
        return None
    return when.replace(tzinfo=dt.timezone.utc) if when.tzinfo is None else when.astimezone(dt.timezone.utc)


def _text(outcome: Any) -> str | None:
    """An outcome as its name (a record's form holds the enum, a document the text)."""
    return getattr(outcome, "value", outcome)


def run_row(doc: Mapping[str, Any]) -> dict[str, Any]:
    """A run as lists show it, from a ``runs`` document (or a record's ``to_dict`` form)."""
    dut = decode_mapping(doc.get("dut") or {})
    phases = doc.get("phases") or []
    failed = next((p["name"] for p in phases if _text(p.get("outcome")) not in ("PASS", "SKIPPED", None)), None)
    started = doc["started_at"]
    started = dt.datetime.fromisoformat(started) if isinstance(started, str) else started
    ended = doc.get("ended_at")
    ended = dt.datetime.fromisoformat(ended) if isinstance(ended, str) else ended
    return {
        "run_id": doc.get("_id") or doc.get("run_id"),
        "serial": doc.get("serial") if "serial" in doc else dut.get("serial"),
        "product": doc.get("product", ""), "product_version": doc.get("product_version", ""),
        "station": doc.get("station", ""), "slot": doc.get("slot"), "batch": doc.get("batch", ""),
        "operator": doc.get("operator", ""), "outcome": _text(doc.get("outcome")),
        "marginal": bool(doc.get("marginal")),
        "started_at": _utc(started), "ended_at": _utc(ended),
        "dut": {k: str(dut[k]) for k in ROW_IDENTITY if dut.get(k) is not None},
        "phases_done": len(phases), "last_phase": phases[-1]["name"] if phases else None, "failed_phase": failed,
        "shipped_at": _utc(doc.get("shipped_at")),
    }


def row_json(row: Mapping[str, Any]) -> dict[str, Any]:
    return {k: (v.isoformat() if isinstance(v, dt.datetime) else v) for k, v in row.items()}


def page_marker(rows: Sequence[Mapping[str, Any]], limit: int) -> str | None:
    """The ``before`` parameter of the next (older) page, if this one was full."""
    if len(rows) < limit or not rows:
        return None
    last = rows[-1]
    return f"{last['started_at'].isoformat()}|{last['run_id']}"


class MongoData:
    """The factory's runs, devices and notes in MongoDB. Blocking; thread-safe."""

    writable = True

    def __init__(self, settings: MongoSettings) -> None:
        self.settings = settings
        self.sink = MongoSink(settings)

    @property
    def db(self) -> Any:
        return self.sink.db

    def ensure(self) -> None:
        """The records' collections and indexes (as a shipper makes them), and the notes'."""
        self.sink.ensure_schema()
        ensure_notes(self.db)

    def close(self) -> None:
        self.sink.close()

    # -- runs ---------------------------------------------------------------------

    def search_runs(self, q: RunQuery) -> list[dict[str, Any]]:
        cursor = self.db["runs"].find(mongo_filter(q), ROW_FIELDS).sort([("started_at", -1), ("_id", -1)])
        return [run_row(d) for d in cursor.limit(q.limit)]

    def run(self, run_id: str) -> RunRecord | None:
        doc = self.db["runs"].find_one({"_id": run_id}, {"measurements": 0})
        return run_from_document(doc) if doc is not None else None

    def iter_runs(self, q: RunQuery, limit: int | None = None, *, oldest_first: bool = False) -> Iterator[RunRecord]:
        """Every run matching ``q`` (newest first), read a batch at a time, so an export's memory stays flat."""
        cursor = self.db["runs"].find(mongo_filter(q), {"measurements": 0}, batch_size=EXPORT_BATCH)
        order = 1 if oldest_first else -1
        cursor = cursor.sort([("started_at", order), ("_id", order)])
        if limit:
            cursor = cursor.limit(limit)
        try:
            for doc in cursor:
                yield run_from_document(doc)
        finally:
            cursor.close()

    def export_headers(self, q: RunQuery, limit: int) -> tuple[list[RunRecord], dict[tuple[str, str], str]]:
        """What an export decides its columns and units from, oldest first: each run without its phases, and
        the measurement columns (from the flat copy of the measurements, first seen first)."""
        from reports.render.export import measured_column

        projection = {"phases": 0, "logs": 0, "measurements.outcome": 0, "measurements.marginal": 0}
        headers: list[RunRecord] = []
        measured: dict[tuple[str, str], str] = {}
        cursor = self.db["runs"].find(mongo_filter(q), projection, batch_size=1000, limit=limit)
        for doc in cursor.sort([("started_at", 1), ("_id", 1)]):
            for m in doc.pop("measurements", None) or ():
                key = (m["phase"], m["name"])
                if key not in measured and not isinstance(m.get("value"), list):  # a series has no column
                    measured[key] = measured_column(m["phase"], m["name"], m.get("units"))
            headers.append(run_from_document(doc))
        return headers, measured

    def notes_for(self, serials: Sequence[str]) -> dict[str, list[Note]]:
        return notes_for(self.db, serials)

    # -- devices ---------------------------------------------------------------------

    def device_serials(self, q: RunQuery, limit: int = 100) -> list[str]:
        """The serials of the devices ``q``'s identity parameters name (every run of theirs counts)."""
        serials: list[str] = []
        for name, value in q.identity:
            if name == "serial":
                serials.append(value)
            else:
                found = self.db["runs"].distinct("serial", mongo_filter(RunQuery(identity=((name, value),))))
                serials += [s for s in found if s]
        return sorted(set(serials))[:limit]

    def device(self, serial: str) -> dict[str, Any] | None:
        """A device: its identity, every run (newest first), its provisioning record, notes and disposition."""
        runs = [run_row(d) for d in self.db["runs"].find({"serial": serial}, ROW_FIELDS)
                .sort([("started_at", -1), ("_id", -1)]).limit(1000)]
        summary = self.db["devices"].find_one({"_id": serial}, {"runs": 0})
        if not runs and summary is None:
            return None
        attributes: dict[str, Any] = decode_mapping(summary.get("attributes") or {}) if summary else {}
        if not attributes:
            for r in reversed(runs):
                attributes.update(r["dut"])
        provisioned = self.db["provisioned_devices"].find_one(
            {"_id": serial}, {"broker_password_hash": 0, "requests": 0})
        notes = notes_for(self.db, [serial])[serial]
        return _device(serial, runs, attributes, provisioned, notes)

    def add_note(self, note: Note) -> Note:
        return add_note(self.db, note)

    def batches(self, since: dt.datetime) -> list[dict[str, Any]]:
        """Each batch (and product) with runs started since ``since``: how many, how they ended, when; newest first."""
        rows = self.db["runs"].aggregate([
            {"$match": {"started_at": {"$gte": since}}},
            {"$group": {"_id": {"batch": "$batch", "product": "$product"}, "runs": {"$sum": 1},
                        "passed": {"$sum": {"$cond": [{"$eq": ["$outcome", "PASS"]}, 1, 0]}},
                        "first": {"$min": "$started_at"}, "last": {"$max": "$started_at"}}},
            {"$sort": {"last": -1}},
            {"$limit": 500},
        ], allowDiskUse=True)
        return [{"batch": r["_id"]["batch"], "product": r["_id"]["product"], "runs": r["runs"],
                 "passed": r["passed"], "first": _utc(r["first"]), "last": _utc(r["last"])} for r in rows]

    # -- the line ------------------------------------------------------------------------

    def board_rows(self, since: dt.datetime) -> list[dict[str, Any]]:
        """The newest run of each station's slot among those started since ``since``: the line board's rows.

        Grouped in the database, so a day of a busy line (thousands of runs)
        comes back as one row per slot.
        """
        fields = {k: 1 for k in ROW_FIELDS if k != "_id"}
        docs = self.db["runs"].aggregate([
            {"$match": {"started_at": {"$gte": since}}},
            {"$project": fields},
            {"$sort": {"station": 1, "slot": 1, "started_at": -1, "_id": -1}},
            {"$group": {"_id": {"station": "$station", "slot": "$slot"}, "run": {"$first": "$$ROOT"}}},
        ], allowDiskUse=True)
        return [run_row(d["run"]) for d in docs]

    def shipped_since(self, since: dt.datetime) -> list[dict[str, Any]]:
        """Runs shipped at or after ``since``, oldest shipment first: what changed on the line board."""
        cursor = self.db["runs"].find({"shipped_at": {"$gte": since}}, ROW_FIELDS)
        return [run_row(d) for d in cursor.sort([("shipped_at", 1), ("_id", 1)]).limit(5000)]

    def last_heard(self) -> dict[str, dt.datetime]:
        """When each station last shipped anything (its newest ``shipped_at``)."""
        rows = self.db["runs"].aggregate([
            {"$sort": {"station": 1, "shipped_at": -1}},
            {"$group": {"_id": "$station", "last": {"$first": "$shipped_at"}}},
        ])
        return {r["_id"]: _utc(r["last"]) for r in rows if r.get("last") is not None}


def _device(serial: str, runs: list[dict[str, Any]], attributes: Mapping[str, Any],
            provisioned: Mapping[str, Any] | None, notes: list[Note]) -> dict[str, Any]:
    return {
        "serial": serial,
        "product": runs[0]["product"] if runs else "",
        "attributes": {k: str(v) for k, v in attributes.items()},
        "last_outcome": (runs[0]["outcome"] or "RUNNING") if runs else None,
        "first_tested_at": min(r["started_at"] for r in runs) if runs else None,
        "last_tested_at": runs[0]["started_at"] if runs else None,
        "runs": runs,
        "provisioning": {k: v for k, v in (provisioned or {}).items() if k != "_id"} or None,
        "notes": notes,
        "disposition": disposition(notes),
    }


class StoreData:
    """One station's local store, read-only: for a portal on a single bench. Blocking."""

    writable = False

    def __init__(self, path: Path) -> None:
        from reports.storage.store import LocalStore

        self.store = LocalStore.open(path)

    def ensure(self) -> None:
        pass

    def close(self) -> None:
        self.store.close()

    def _rows(self, q: RunQuery) -> list[dict[str, Any]]:
        serial = dict(q.identity).get("serial")
        runs = self.store.find_runs(batch=q.batch, serial=serial, since=q.since, until=q.until)
        rows = [run_row(to_dict(r)) for r in runs]
        rows.sort(key=lambda r: (r["started_at"], r["run_id"]), reverse=True)
        return [r for r in rows if matches(q, r)]

    def search_runs(self, q: RunQuery) -> list[dict[str, Any]]:
        return self._rows(q)[: q.limit]

    def run(self, run_id: str) -> RunRecord | None:
        return self.store.get_run(run_id)

    def iter_runs(self, q: RunQuery, limit: int | None = None, *, oldest_first: bool = False) -> Iterator[RunRecord]:
        rows = self._rows(q)[:limit]
        for row in reversed(rows) if oldest_first else rows:
            run = self.store.get_run(row["run_id"])
            if run is not None:
                yield run

    def export_headers(self, q: RunQuery, limit: int) -> tuple[list[RunRecord], dict[tuple[str, str], str]]:
        from reports.render.export import measured_columns

        runs = list(self.iter_runs(q, limit, oldest_first=True))
        return [attrs.evolve(r, phases=()) for r in runs], measured_columns(runs)

    def notes_for(self, serials: Sequence[str]) -> dict[str, list[Note]]:
        return {}

    def device_serials(self, q: RunQuery, limit: int = 100) -> list[str]:
        rows = self._rows(RunQuery(identity=q.identity, limit=10_000))
        return sorted({r["serial"] for r in rows if r["serial"]})[:limit]

    def device(self, serial: str) -> dict[str, Any] | None:
        rows = self._rows(RunQuery(identity=(("serial", serial),)))
        if not rows:
            return None
        attributes: dict[str, Any] = {}
        for run in self.store.find_runs(serial=serial):
            attributes.update({k: v for k, v in run.dut.items() if k != "serial"})
        return _device(serial, rows, attributes, None, [])

    def add_note(self, note: Note) -> Note:
        raise PermissionError("a portal on a station's store is read-only")

    def batches(self, since: dt.datetime) -> list[dict[str, Any]]:
        groups: dict[tuple[str, str], dict[str, Any]] = {}
        for r in self._rows(RunQuery(since=since, limit=100_000)):
            g = groups.setdefault((r["batch"], r["product"]), {"batch": r["batch"], "product": r["product"],
                                                               "runs": 0, "passed": 0, "first": r["started_at"],
                                                               "last": r["started_at"]})
            g["runs"] += 1
            g["passed"] += r["outcome"] == "PASS"
            g["first"], g["last"] = min(g["first"], r["started_at"]), max(g["last"], r["started_at"])
        return sorted(groups.values(), key=lambda g: g["last"], reverse=True)

    def board_rows(self, since: dt.datetime) -> list[dict[str, Any]]:
        newest: dict[tuple[str, int], dict[str, Any]] = {}
        for r in self._rows(RunQuery(since=since, limit=100_000)):
            newest.setdefault((r["station"], r["slot"]), r)
        return list(newest.values())

    def last_heard(self) -> dict[str, dt.datetime]:
        heard: dict[str, dt.datetime] = {}
        for r in self._rows(RunQuery(since=dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=7))):
            when = r["ended_at"] or r["started_at"]
            if r["station"] not in heard or when > heard[r["station"]]:
                heard[r["station"]] = when
        return heard

