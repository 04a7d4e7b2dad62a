"""MongoDB documents and collections: what a station's records look like centrally.

Two collections (``docs/mongodb.md`` has the full shapes)::

    runs     one document per run, _id = run_id. Written when the run starts
             and rewritten whole each time the station's store records a change
             (a phase, the identity, the outcome), guarded by the store's change
             number ``seq``: a document is only replaced by a *newer* state.
    devices  one document per unit, _id = its serial (a run that knew only
             the unit's MAC is in it too: MongoSink._devices_by_identity).
             ``runs`` holds one entry per run (its newest state: outcome, identity attributes),
             and everything else is recomputed from those entries: the newest
             run by (started_at, run_id) gives last_outcome and product, the
             attributes are merged oldest to newest, first_tested_at is the
             earliest start.

Both writes are idempotent and order-independent, which is what lets the
shipper (``reports/storage/shipper.py``) be at-least-once underneath and exactly-once
in the database: shipping the same change twice, two changes out of order, or
a retry of a batch that may or may not have landed all converge on the same
documents. (One exception: the runs without a serial whose MAC two serials of a
product claim join neither device when the claims arrive together, or the
first when they do not; the reports flag such units either way.)

DUT-supplied text is untrusted. Keys of the ``dut`` mapping (and of any mapping
inside a measurement value) are escaped so that ``$``, ``.``, NUL and the empty
string are stored as ordinary field names (:func:`encode_key`); every literal
in an update pipeline is wrapped in ``$literal`` so a value like ``"$where"``
is data, never an expression; text MongoDB cannot store (lone surrogates) is
backslash-escaped; integers beyond 64 bits become decimal text.

Everything here is blocking pymongo. Station code calls it only through
``trio.to_thread.run_sync`` (see the shipper).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any
from urllib.parse import quote

import attrs
import bson
import pymongo
import pymongo.errors
from bson.raw_bson import RawBSONDocument
from pymongo import DeleteMany, IndexModel, UpdateMany, UpdateOne
from pymongo.uri_parser import parse_uri

from sequencer.base85 import b85decode, b85encode
from sequencer.records import DEFAULT_IDENTITY, Outcome, RunRecord, from_dict, to_dict, upgrade

#: Version of the collections' validators and indexes (``meta`` document ``_id: "schema"``).
DB_SCHEMA = 1
DEFAULT_DATABASE = "sequencer"
#: What ``devices.last_outcome`` says while the device's newest run is still open.
RUNNING = "RUNNING"
#: Attachments larger than this are described (name, size, sha256) but their
#: bytes stay in the station's local store, so one firmware dump cannot push a
#: run over MongoDB's 16 MiB document limit.
INLINE_ATTACHMENT_MAX = 1024 * 1024
#: MongoDB's document limit, less room for the update command around it.
MAX_DOCUMENT = 16 * 1024 * 1024 - 64 * 1024
#: Longest serial the devices validator accepts: a DUT that answers a serial
#: query with a kilobyte of garbage is quarantined, not made a device.
MAX_SERIAL = 128


class MongoConfigError(Exception):
    """The MongoDB settings are unusable (bad URI, database name); one line naming the option."""


class MongoUnavailable(Exception):
    """MongoDB could not be reached or did not confirm a write; try again later. One line."""


class MongoSchemaError(Exception):
    """The database was migrated by a newer sequencer than this one; shipping waits for an upgrade."""


# -- settings -----------------------------------------------------------------


@attrs.frozen
class MongoSettings:
    """Where records go and how long to wait for the database.

    Timeouts are short on purpose: the shipper must notice an outage quickly
    and a station must shut down promptly even with the database gone.
    ``server_selection_timeout_s`` is how long a write waits for a (new)
    primary; ``timeout_s`` bounds a reply on an open connection and the
    majority's confirmation of a write.
    """

    uri: str
    database: str = ""
    server_selection_timeout_s: float = 2.0
    connect_timeout_s: float = 2.0
    timeout_s: float = 15.0
    app_name: str = "sequencer"

    @classmethod
    def parse(cls, uri: str, database: str | None = None, *, where: str = "--mongo", **kw: Any) -> MongoSettings:
        """Check ``uri`` and pick the database: ``database``, else the URI's path, else ``sequencer``."""
        try:
            parsed = _parse(uri)
        except (pymongo.errors.InvalidURI, pymongo.errors.ConfigurationError, ValueError) as exc:
            raise MongoConfigError(f"{where}: not a usable MongoDB URI: {exc}") from None
        name = database or parsed.get("database") or DEFAULT_DATABASE
        bad = set('/\\. "$\x00') & set(name)
        if bad or len(name) > 63:
            raise MongoConfigError(f"{where}: {name!r} is not a valid MongoDB database name")
        return cls(uri=uri, database=name, **kw)

    @property
    def target(self) -> str:
        """A credential-free name of the destination, which keys the shipper's watermark.

        Pointing a station at another database starts its shipping from the
        beginning, since nothing has been acknowledged *there*.
        """
        nodes = _parse(self.uri)["nodelist"]
        hosts = ",".join(sorted(f"{h}:{p}" for h, p in nodes))
        if self.uri.startswith("mongodb+srv://"):
            hosts = "srv:" + hosts.rsplit(":", 1)[0]
        return f"{hosts}/{self.database}"

    def client(self) -> pymongo.MongoClient[dict[str, Any]]:
        """A new client (blocking for ``mongodb+srv`` URIs, which resolve DNS here).

        Timeouts written in the URI win over these defaults; the write
        guarantees the shipper's exactly-once rests on do not.
        """
        given = {k.lower() for k in _parse(self.uri).get("options", {})}
        timeouts = {
            "serverSelectionTimeoutMS": int(self.server_selection_timeout_s * 1000),
            "connectTimeoutMS": int(self.connect_timeout_s * 1000),
            # Not pymongo's timeoutMS: under it a retryable operation is retried
            # until the whole timeout is spent, so an unreachable database would
            # hold each pass (and a station's shutdown) for timeout_s instead of
            # failing after server selection. These bound each step instead.
            "socketTimeoutMS": int(self.timeout_s * 1000),
            "wTimeoutMS": int(self.timeout_s * 1000),
        }
        return pymongo.MongoClient(
            self.uri,
            **{k: v for k, v in timeouts.items() if k.lower() not in given},
            retryWrites=True,
            retryReads=True,
            # A write the primary acknowledged alone can be rolled back by a
            # failover, and one not yet in the journal is lost if the server
            # dies: the watermark only moves past majority-committed,
            # journaled writes.
            w="majority",
            journal=True,
            tz_aware=True,
            appname=self.app_name,
        )


def _parse(uri: str) -> dict[str, Any]:
    """Validate a URI without network access (an SRV URI is checked as if its name were a host)."""
    if uri.startswith("mongodb+srv://"):
        plain = "mongodb://" + uri[len("mongodb+srv://"):]
        for option in ("srvServiceName", "srvMaxHosts"):
            plain = plain.replace(option + "=", "x" + option + "=")  # not plain-URI options
        return parse_uri(plain, validate=False, warn=False)
    return parse_uri(uri, validate=True, warn=False)


# -- documents ----------------------------------------------------------------


def encode_key(key: str) -> str:
    """A DUT-supplied field name made safe for MongoDB, reversibly.

    ``%``, ``$``, ``.`` and NUL are percent-escaped (``%25 %24 %2E %00``); the
    empty name becomes a lone ``%``, which no escaped name can be.
    """
    if key == "":
        return "%"
    if not any(c in key for c in "%$.\x00"):
        return key
    return key.replace("%", "%25").replace("$", "%24").replace(".", "%2E").replace("\x00", "%00")


def decode_key(key: str) -> str:
    if key == "%":
        return ""
    if "%" not in key:
        return key
    return key.replace("%00", "\x00").replace("%2E", ".").replace("%24", "$").replace("%25", "%")


def encode_mapping(data: Mapping[str, Any]) -> dict[str, Any]:
    return {encode_key(str(k)): _value(v) for k, v in data.items()}


def decode_mapping(data: Mapping[str, Any]) -> dict[str, Any]:
    return {decode_key(k): decode_mapping(v) if isinstance(v, Mapping) else v for k, v in data.items()}


_INT64 = 2**63


#: A run in its JSON-ready form: ``to_dict(run)``, which is also how the store
#: keeps it (header and phases). Documents are built from this form.
RunData = Mapping[str, Any]


_INT64 = 2**63
_PLAIN = (type(None), bool, float, str)


def _value(v: Any) -> Any:
    """A measurement value (any JSON value) as BSON can hold it."""
    if isinstance(v, _PLAIN):
        return v
    if isinstance(v, int):
        return v if -_INT64 <= v < _INT64 else str(v)
    if isinstance(v, (list, tuple)):
        return [_value(x) for x in v]
    if isinstance(v, Mapping):
        return encode_mapping(v)
    if isinstance(v, (bytes, bytearray)):
        return bson.Binary(bytes(v))
    return str(v)


def _when(text: str | None) -> dt.datetime | None:
    return None if text is None else dt.datetime.fromisoformat(text)


def _seconds(start: dt.datetime | None, end: dt.datetime | None) -> float | None:
    return None if start is None or end is None else (end - start).total_seconds()


def _measurement(m: Mapping[str, Any]) -> dict[str, Any]:
    return {**m, "value": _value(m.get("value"))}


def _attempt(a: Mapping[str, Any]) -> dict[str, Any]:
    started, ended = _when(a["started_at"]), _when(a["ended_at"])
    return {**a, "started_at": started, "ended_at": ended, "duration_s": _seconds(started, ended),
            "measurements": [_measurement(m) for m in a.get("measurements", ())]}


def _attachment(att: Mapping[str, Any]) -> dict[str, Any]:
    data = b85decode(att["data"]) if att.get("data") else b""
    inline = len(data) <= INLINE_ATTACHMENT_MAX
    return {"name": att["name"], "mimetype": att["mimetype"], "size": len(data),
            "sha256": hashlib.sha256(data).hexdigest(), "data": bson.Binary(data) if inline else None,
            "inline": inline}


@attrs.frozen
class PreparedPhase:
    """One phase converted and BSON-encoded for MongoDB, with its final measurements, flat.

    Phases never change once committed, so the shipper prepares each once and
    reuses the encoded bytes every time its run is re-sent
    (``reports/storage/shipper.py``); a run document is then mostly a copy of them.
    ``error`` says why the phase cannot be stored at all (its run is
    quarantined with that reason).
    """

    doc: RawBSONDocument | None
    flat: tuple[RawBSONDocument, ...]
    marginal: bool
    error: str | None = None


def prepare_phase(p: Mapping[str, Any]) -> PreparedPhase:
    attempts = p.get("attempts") or ()
    final = attempts[-1].get("measurements", ()) if attempts else ()
    flat = [
        {"phase": p["name"], "name": m["name"], "outcome": m["outcome"], "value": _value(m.get("value")),
         "units": m.get("units"), "marginal": m.get("marginal", False)}
        for m in final
    ]
    marginal = any(m["marginal"] for m in flat)
    started, ended = _when(p["started_at"]), _when(p["ended_at"])
    doc = {
        **p,
        "started_at": started, "ended_at": ended, "duration_s": _seconds(started, ended),
        "marginal": marginal,
        "attempts": [_attempt(a) for a in attempts],
        "logs": _log_lines(p.get("logs", ())),
        "attachments": [_attachment(a) for a in p.get("attachments", ())],
    }
    try:
        return PreparedPhase(_encode(doc), tuple(_encode(m) for m in flat), marginal)
    except bson.errors.InvalidDocument as exc:
        return PreparedPhase(None, (), marginal, f"phase {p.get('name')!r}: {exc}")


def _log_lines(lines: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    # Field by field: a line of a record of schema version 1 has no fixture, and its document gets None for it.
    return [{"timestamp": _when(line["timestamp"]), "level": line["level"], "message": line["message"],
             "fixture": line.get("fixture")} for line in lines]


def _encode(doc: Mapping[str, Any]) -> RawBSONDocument:
    """BSON bytes of ``doc``; text UTF-8 cannot carry is escaped, an int too big is an InvalidDocument."""
    try:
        return RawBSONDocument(bson.encode(doc))
    except UnicodeEncodeError:
        return RawBSONDocument(bson.encode(_clean_text(doc)))
    except OverflowError as exc:
        raise bson.errors.InvalidDocument(str(exc)) from None


@attrs.frozen
class StoredRun:
    """A run ready to ship: its header (``to_dict`` form, phases left out) and its prepared phases."""

    header: Mapping[str, Any]
    phases: tuple[PreparedPhase, ...]

    @classmethod
    def of(cls, run: RunRecord | RunData | StoredRun) -> StoredRun:
        if isinstance(run, StoredRun):
            return run
        data = to_dict(run) if isinstance(run, RunRecord) else upgrade(dict(run))
        return cls(data, tuple(prepare_phase(p) for p in data.get("phases") or ()))

    @property
    def run_id(self) -> str:
        return str(self.header["run_id"])

    @property
    def serial(self) -> str | None:
        return (self.header.get("dut") or {}).get("serial") or None

    @property
    def measurements(self) -> int:
        return sum(len(p.flat) for p in self.phases)

    @property
    def error(self) -> str | None:
        return next((p.error for p in self.phases if p.error is not None), None)


def run_document(run: RunRecord | RunData | StoredRun, seq: int) -> dict[str, Any]:
    """The ``runs`` document for ``run`` as of the store's change ``seq``.

    Field names are the record's own (``docs/mongodb.md``), with times as
    BSON dates, durations added, DUT keys escaped, attachments as binary.
    ``measurements`` repeats the final measurements of every phase, flat and
    tagged with the phase name, so "every vdd_3v3 of batch B" is one query.
    """
    stored = StoredRun.of(run)
    if stored.error is not None:
        raise bson.errors.InvalidDocument(stored.error)
    d = stored.header
    dut = d.get("dut") or {}
    started, ended = _when(d["started_at"]), _when(d.get("ended_at"))
    return {
        "_id": d["run_id"],
        "seq": seq,
        "schema_version": d["schema_version"],
        "product": d["product"],
        "product_version": d.get("product_version", ""),
        "station": d["station"],
        "slot": d["slot"],
        "port": d.get("port", ""),
        "operator": d.get("operator", ""),
        "batch": d.get("batch", ""),
        "serial": dut.get("serial") or None,
        "dut": encode_mapping(dut),
        "started_at": started,
        "ended_at": ended,
        "duration_s": _seconds(started, ended),
        "outcome": d.get("outcome"),
        "marginal": any(p.marginal for p in stored.phases),
        "limits_file": d.get("limits_file"),
        "limits_sha256": d.get("limits_sha256"),
        "product_sha256": d.get("product_sha256"),
        "sequencer_version": d.get("sequencer_version", ""),
        "product_files": d.get("product_files") or [],
        "identity": list(d.get("identity") or DEFAULT_IDENTITY),
        "disposition": d.get("disposition"),
        "instruction": d.get("instruction", ""),
        "logs": _log_lines(d.get("logs") or ()),
        "scans": [{**c, "scanned_at": _when(c["scanned_at"])} for c in d.get("scans") or ()],
        "phases": [p.doc for p in stored.phases],
        "measurements": [m for p in stored.phases for m in p.flat],
    }


class UnreadableRun(Exception):
    """A ``runs`` document this sequencer cannot turn back into a record; the message names the run."""


def run_from_document(doc: Mapping[str, Any]) -> RunRecord:
    """The record a ``runs`` document was made from: the inverse of :func:`run_document`.

    As far as MongoDB keeps it: times come back to the millisecond (BSON
    dates), an attachment larger than ``INLINE_ATTACHMENT_MAX`` comes back
    without its data, and the rare value BSON could not hold as it was (an
    integer beyond 64 bits, text UTF-8 cannot carry) comes back as stored.
    Yields, Paretos and measurements are unaffected.
    """
    run_id = doc.get("_id")
    try:
        data = {
            "run_id": run_id, "product": doc["product"], "station": doc["station"], "slot": doc["slot"],
            "port": doc.get("port", ""), "started_at": _iso(doc["started_at"]),
            "product_version": doc.get("product_version", ""), "operator": doc.get("operator", ""),
            "batch": doc.get("batch", ""), "dut": decode_mapping(doc.get("dut") or {}),
            "ended_at": _iso(doc.get("ended_at")), "outcome": doc.get("outcome"),
            "phases": [_phase_data(p) for p in doc.get("phases") or ()],
            "limits_file": doc.get("limits_file"), "limits_sha256": doc.get("limits_sha256"),
            "product_sha256": doc.get("product_sha256"), "sequencer_version": doc.get("sequencer_version", ""),
            "schema_version": doc.get("schema_version"),
            "product_files": [{"path": f["path"], "sha256": f["sha256"]} for f in doc.get("product_files") or ()],
            "identity": doc.get("identity") or DEFAULT_IDENTITY,
            "disposition": doc.get("disposition"), "instruction": doc.get("instruction", ""),
            "logs": _log_lines_back(doc.get("logs") or ()),
            "scans": [{**c, "scanned_at": _iso(c["scanned_at"])} for c in doc.get("scans") or ()],
        }
        return from_dict(upgrade(data), RunRecord)
    except Exception as exc:  # any malformed document: say which run, never a traceback
        raise UnreadableRun(f"run {run_id!r} in MongoDB cannot be read: {exc}") from None


def _phase_data(p: Mapping[str, Any]) -> dict[str, Any]:
    return {
        **p,
        "started_at": _iso(p["started_at"]), "ended_at": _iso(p["ended_at"]),
        "attempts": [
            {**a, "started_at": _iso(a["started_at"]), "ended_at": _iso(a["ended_at"]),
             "measurements": [{**m, "value": _unvalue(m.get("value"))} for m in a.get("measurements") or ()]}
            for a in p.get("attempts") or ()
        ],
        "logs": _log_lines_back(p.get("logs") or ()),
        "attachments": [
            {"name": a["name"], "mimetype": a["mimetype"],
             "data": b85encode(bytes(a["data"])).decode() if a.get("data") else ""}
            for a in p.get("attachments") or ()
        ],
    }


def _log_lines_back(lines: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    return [{**line, "timestamp": _iso(line["timestamp"])} for line in lines]


def _iso(when: dt.datetime | None) -> str | None:
    """A BSON date as the record's ISO text, in UTC (a client without ``tz_aware`` gives naive UTC)."""
    if when is None:
        return None
    aware = when.replace(tzinfo=dt.timezone.utc) if when.tzinfo is None else when.astimezone(dt.timezone.utc)
    return aware.isoformat()


def _unvalue(v: Any) -> Any:
    """A measurement value as the record held it (mapping keys unescaped)."""
    if isinstance(v, Mapping):
        return {decode_key(k): _unvalue(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_unvalue(x) for x in v]
    return v


def _lit(v: Any) -> dict[str, Any]:
    return {"$literal": v}


def run_update(run_id: str, seq: int, document: RawBSONDocument | Mapping[str, Any]) -> UpdateOne:
    """Upsert ``document`` unless the stored one is as new or newer (its ``seq``).

    A pipeline update rather than a filtered replace: a replace filtered on
    ``seq`` would try to *insert* when the stored document is newer and fail on
    the duplicate ``_id``, which is indistinguishable from a real conflict.
    """
    keep = {"$gte": [{"$ifNull": ["$seq", -1]}, seq]}
    return UpdateOne(
        {"_id": run_id},
        [{"$replaceWith": {"$cond": [keep, "$$ROOT",
                                     {"$mergeObjects": [_lit(document), {"shipped_at": "$$NOW"}]}]}}],
        upsert=True,
    )


def device_entry(run: RunRecord | RunData | StoredRun, seq: int) -> dict[str, Any]:
    """What a device document keeps of one of its runs (as of change ``seq``)."""
    d = StoredRun.of(run).header
    return {
        "run_id": d["run_id"],
        "started_at": _when(d["started_at"]),
        "seq": seq,
        "outcome": d.get("outcome") or RUNNING,
        "product": d["product"],
        "station": d["station"],
        "attributes": encode_mapping({k: v for k, v in (d.get("dut") or {}).items() if k != "serial"}),
    }


def device_update(run: RunRecord | RunData | StoredRun, seq: int, serial: str | None = None) -> UpdateOne | None:
    """Fold ``run`` (as of change ``seq``) into its device's document; ``None`` without a serial.

    ``serial``: the device's, for a run that does not know it (its identify
    phase failed; the unit is known by another of its identity values, see
    :meth:`MongoSink.write_runs`).

    The document keeps one entry per run, the newest state of each (by
    ``seq``), sorted by (started_at, run_id); every other field is recomputed
    from those entries on each update. So the result depends only on the set
    of runs and their latest states, never on the order they arrive in: the
    newest run gives product and last outcome, attributes are merged oldest
    to newest (a key only older runs know is kept), first_tested_at is the
    earliest start.
    """
    stored = StoredRun.of(run)
    serial = serial or stored.serial
    if not serial:
        return None
    # Cleaned here (not by encode_document) so the pipeline always encodes;
    # the same escaping as the run document's, so _id matches runs.serial.
    serial = _clean_text(serial)
    entry = _clean_text(device_entry(stored, seq))
    rid = entry["run_id"]
    runs = {"$ifNull": ["$runs", []]}
    same = {"$filter": {"input": runs, "cond": {"$eq": ["$$this.run_id", _lit(rid)]}}}
    others = {"$filter": {"input": runs, "cond": {"$ne": ["$$this.run_id", _lit(rid)]}}}
    have_newer = {"$gte": [{"$max": {"$map": {"input": same, "in": "$$this.seq"}}}, seq]}
    return UpdateOne(
        {"_id": serial},
        [
            {"$set": {
                "serial": _lit(serial),
                "runs": {"$cond": [have_newer, runs, {"$sortArray": {
                    "input": {"$concatArrays": [others, [_lit(entry)]]},
                    "sortBy": {"started_at": 1, "run_id": 1},
                }}]},
            }},
            *_DEVICE_SUMMARY,
        ],
        upsert=True,
    )


def device_detach(run: RunRecord | RunData | StoredRun, seq: int,
                  serial: str | None = None) -> list[UpdateMany | DeleteMany]:
    """Take ``run`` off every other serial's device (than ``serial``, or its own) that lists an older state of it.

    A run identified as one serial and later as another (a label scanned,
    then the DUT's own answer) was folded into both devices; the first then
    showed it RUNNING for good. Sent with a run's last state (once it has an
    outcome), so a run costs these lookups (on the ``runs.run_id`` index)
    once, not at every change. A device left with no run is deleted: it was
    only ever that run's mistaken serial.
    """
    stored = StoredRun.of(run)
    serial = serial or stored.serial
    serial = _clean_text(serial) if serial else None
    rid = _clean_text(stored.run_id)
    older_here = {"_id": {"$ne": serial}, "runs": {"$elemMatch": {"run_id": rid, "seq": {"$lt": seq}}}}
    return [
        DeleteMany({**older_here, "runs": {"$size": 1, **older_here["runs"]}}),
        UpdateMany(
            {**older_here, "runs.1": {"$exists": True}},
            [
                {"$set": {"runs": {"$filter": {"input": "$runs", "cond": {"$ne": ["$$this.run_id", _lit(rid)]}}}}},
                *_DEVICE_SUMMARY,
            ],
        ),
    ]


#: A device's fields, recomputed from its ``runs`` (sorted oldest first) after any change to them.
_DEVICE_SUMMARY: list[dict[str, Any]] = [
    {"$set": {"_last": {"$last": "$runs"}}},
    {"$set": {
        "first_tested_at": {"$min": "$runs.started_at"},
        "attributes": {"$reduce": {"input": "$runs", "initialValue": {},
                                   "in": {"$mergeObjects": ["$$value", "$$this.attributes"]}}},
        "product": "$_last.product",
        "last_outcome": "$_last.outcome",
        "last_tested_at": "$_last.started_at",
        "last_run_id": "$_last.run_id",
        "last_station": "$_last.station",
        "updated_at": "$$NOW",
    }},
    {"$unset": "_last"},
]


def _clean_text(v: Any) -> Any:
    """Backslash-escape lone surrogates (text UTF-8 cannot carry) anywhere in ``v``."""
    if isinstance(v, str):
        try:
            v.encode("utf-8")
            return v
        except UnicodeEncodeError:
            return v.encode("utf-8", "backslashreplace").decode("utf-8")
    if isinstance(v, list):
        return [_clean_text(x) for x in v]
    if isinstance(v, dict):
        return {_clean_text(k): _clean_text(x) for k, x in v.items()}
    return v


def encode_document(doc: dict[str, Any]) -> RawBSONDocument:
    """Encode once, here, so a document BSON cannot hold is known before anything is sent.

    Raises :class:`bson.errors.InvalidDocument` (with the reason) for a
    document that cannot be stored; the shipper quarantines that run.
    """
    raw = _encode(doc)
    if len(raw.raw) > MAX_DOCUMENT:
        raise bson.errors.InvalidDocument(
            f"document is {len(raw.raw) / 1048576:.1f} MiB, over MongoDB's 16 MiB limit"
        )
    return raw


# -- schema and migrations -------------------------------------------------------

_OUTCOMES = [o.value for o in Outcome]

RUNS_VALIDATOR: dict[str, Any] = {"$jsonSchema": {
    "bsonType": "object",
    "required": ["_id", "seq", "schema_version", "product", "station", "slot", "started_at", "phases"],
    "properties": {
        "_id": {"bsonType": "string", "minLength": 1},
        "seq": {"bsonType": ["int", "long"], "minimum": 1},
        "schema_version": {"bsonType": ["int", "long"]},
        "product": {"bsonType": "string"},
        "station": {"bsonType": "string"},
        "slot": {"bsonType": ["int", "long"]},
        "batch": {"bsonType": "string"},
        "serial": {"bsonType": ["string", "null"]},
        "dut": {"bsonType": "object"},
        "started_at": {"bsonType": "date"},
        "ended_at": {"bsonType": ["date", "null"]},
        "outcome": {"enum": [*_OUTCOMES, None]},
        "phases": {"bsonType": "array"},
        "measurements": {"bsonType": "array"},
    },
}}

DEVICES_VALIDATOR: dict[str, Any] = {"$jsonSchema": {
    "bsonType": "object",
    "required": ["serial", "product", "first_tested_at", "last_outcome"],
    "properties": {
        "_id": {"bsonType": "string"},
        "serial": {"bsonType": "string", "minLength": 1, "maxLength": MAX_SERIAL},
        "product": {"bsonType": "string", "minLength": 1},
        "first_tested_at": {"bsonType": "date"},
        "last_tested_at": {"bsonType": "date"},
        "last_outcome": {"enum": [*_OUTCOMES, RUNNING]},
        "attributes": {"bsonType": "object"},
        "runs": {"bsonType": "array", "items": {
            "bsonType": "object", "required": ["run_id", "started_at", "seq", "outcome"],
        }},
    },
}}

#: (collection, keys, options) — ensured by every shipper when it connects (see :func:`ensure_schema`).
INDEXES: tuple[tuple[str, list[tuple[str, int]], dict[str, Any]], ...] = (
    ("devices", [("serial", 1)], {"unique": True, "name": "serial"}),
    ("devices", [("attributes.mac", 1)], {"name": "mac"}),
    ("devices", [("attributes.imei", 1)], {"name": "imei"}),
    ("devices", [("last_outcome", 1)], {"name": "last_outcome"}),
    ("devices", [("runs.run_id", 1)], {"name": "run_ids"}),
    ("runs", [("serial", 1), ("started_at", 1)], {"name": "serial_started"}),
    ("runs", [("batch", 1), ("started_at", 1)], {"name": "batch_started"}),
    ("runs", [("outcome", 1)], {"name": "outcome"}),
    ("runs", [("station", 1), ("started_at", 1)], {"name": "station_started"}),
    # `find --mac`: a MAC seen only in runs that never learnt their serial
    ("runs", [("dut.mac", 1)], {"name": "dut_mac"}),
    # period reports: one product's runs over a span of time
    ("runs", [("product", 1), ("started_at", 1)], {"name": "product_started"}),
    # --since/--until across batches, and the most recent runs (`sequencer runs`): without it
    # both scanned and sorted every run ever shipped.
    ("runs", [("started_at", 1), ("_id", 1)], {"name": "started"}),
    # The portal: finding a unit by any identity, what shipped since (the line board, webhooks)
    # and when each station was last heard; its lists are newest first by (started_at, _id), which
    # these give in order, so a filter (a station's FAILs) reads a page's worth, never sorts them all.
    ("runs", [("station", 1), ("started_at", 1), ("_id", 1)], {"name": "station_started_id"}),
    ("runs", [("batch", 1), ("started_at", 1), ("_id", 1)], {"name": "batch_started_id"}),
    ("runs", [("product", 1), ("started_at", 1), ("_id", 1)], {"name": "product_started_id"}),
    ("runs", [("outcome", 1), ("started_at", 1), ("_id", 1)], {"name": "outcome_started_id"}),
    ("runs", [("serial", 1), ("started_at", 1), ("_id", 1)], {"name": "serial_started_id"}),
    ("runs", [("dut.imei", 1)], {"name": "dut_imei"}),
    ("runs", [("dut.imsi", 1)], {"name": "dut_imsi"}),
    ("runs", [("dut.iccid", 1)], {"name": "dut_iccid"}),
    ("runs", [("dut.claim_code", 1)], {"name": "dut_claim_code"}),
    ("runs", [("shipped_at", 1), ("_id", 1)], {"name": "shipped"}),
    ("runs", [("station", 1), ("shipped_at", -1)], {"name": "station_shipped"}),
)


def _migrate_to_1(db: Any) -> None:
    existing = set(db.list_collection_names())
    for name, validator in (("runs", RUNS_VALIDATOR), ("devices", DEVICES_VALIDATOR)):
        options = {"validator": validator, "validationLevel": "strict", "validationAction": "error"}
        if name in existing:
            db.command("collMod", name, **options)
        else:
            try:
                db.create_collection(name, **options)
            except pymongo.errors.CollectionInvalid:  # another station created it just now
                db.command("collMod", name, **options)


#: Migration to version N is MIGRATIONS[N]; each is idempotent (two stations may race).
MIGRATIONS = {1: _migrate_to_1}


def ensure_schema(db: Any) -> int:
    """Bring the collections to :data:`DB_SCHEMA` and ensure :data:`INDEXES`; return the version found before.

    Cheap once done (one read of ``meta``, one ``createIndexes`` per
    collection that MongoDB answers at once when the indexes exist), so
    every shipper calls it on connect. Indexes are outside the versioned
    migrations: a database made before an index was added gets it from the
    next shipper that connects, and stations still on an older sequencer
    go on writing. A database migrated by a newer sequencer is left alone.
    """
    meta = db["meta"].find_one({"_id": "schema"}) or {}
    found = int(meta.get("version", 0))
    if found > DB_SCHEMA:
        raise MongoSchemaError(
            f"database {db.name!r} has schema {found}, newer than this sequencer understands ({DB_SCHEMA}); upgrade"
        )
    for version in range(found + 1, DB_SCHEMA + 1):
        MIGRATIONS[version](db)
        db["meta"].update_one(
            {"_id": "schema"},
            {"$max": {"version": version}, "$currentDate": {"migrated_at": True}},
            upsert=True,
        )
    by_collection: dict[str, list[IndexModel]] = {}
    for coll, keys, options in INDEXES:
        by_collection.setdefault(coll, []).append(IndexModel(keys, **options))
    for coll, models in by_collection.items():
        db[coll].create_indexes(models)
    return found


# -- writing -------------------------------------------------------------------

#: Write errors about the document itself: retrying cannot help, so the run is quarantined.
PERMANENT_CODES = frozenset({
    2,      # BadValue
    14,     # TypeMismatch
    52,     # DollarPrefixedFieldName
    56,     # EmptyFieldName
    57,     # DottedFieldName
    121,    # DocumentValidationFailure
    10334,  # BSONObjectTooLarge
    17280,  # KeyTooLong
    17419,  # update result too large
})


@attrs.frozen
class Rejection:
    """A run MongoDB will not take in its current state, and why (one line)."""

    run_id: str
    seq: int
    reason: str


@attrs.frozen
class WriteReport:
    """What one batch did: runs now in MongoDB (with their seq) and runs rejected."""

    shipped: tuple[tuple[str, int], ...] = ()
    rejected: tuple[Rejection, ...] = ()
    measurements: int = 0


def describe_write_error(collection: str, err: Mapping[str, Any]) -> str:
    """One line for a write error: the collection, the rule broken, and the field."""
    code = err.get("code")
    if code == 121:
        parts = list(_schema_failures(err.get("errInfo", {}).get("details", {})))
        detail = f" ({'; '.join(parts)})" if parts else ""
        return f"{collection}: document failed schema validation{detail}"
    message = str(err.get("errmsg", "")).splitlines()[0][:300] if err.get("errmsg") else "write error"
    return f"{collection}: {message} (code {code})"


def _schema_failures(details: Mapping[str, Any]) -> Iterable[str]:
    for rule in details.get("schemaRulesNotSatisfied", []):
        op = rule.get("operatorName")
        if op == "properties":
            for prop in rule.get("propertiesNotSatisfied", []):
                reasons = [
                    d.get("reason") or d.get("operatorName", "")
                    for d in prop.get("details", [])
                ]
                specified = [d.get("specifiedAs") for d in prop.get("details", []) if d.get("specifiedAs")]
                spec = f" {specified[0]}" if specified else ""
                yield f"{prop.get('propertyName')}: {', '.join(r for r in reasons if r)}{spec}"
        elif op == "required":
            yield "missing " + ", ".join(rule.get("missingProperties", []))
        elif op:
            yield f"{op}: {rule.get('reason', 'not satisfied')}"


def describe_failure(exc: BaseException) -> str:
    """One line for a connection or server failure (no stack, no topology dump)."""
    text = str(exc).split(", Timeout:")[0].split(", Topology Description")[0].split(" (configured timeouts")[0]
    text = " ".join(text.split())
    if len(text) > 200:
        text = text[:197] + "..."
    return f"{type(exc).__name__}: {text}"


class MongoSink:
    """A station's connection to the central database. Blocking; thread-safe (pymongo's client is)."""

    def __init__(self, settings: MongoSettings) -> None:
        self.settings = settings
        self._client: pymongo.MongoClient[dict[str, Any]] | None = None
        self._schema_checked = False
        #: the schema version the database had when this sink first checked it (0: no collections of ours)
        self.found_schema: int | None = None

    @property
    def client(self) -> pymongo.MongoClient[dict[str, Any]]:
        """The client, made on first use; :class:`MongoUnavailable` while it cannot be.

        Made lazily because a ``mongodb+srv://`` URI is resolved (DNS SRV
        records) when the client is made: with DNS down, an eager client
        made every command fail with a traceback, and a station's shipper
        died at start instead of backing off until DNS came back.
        """
        if self._client is None:
            try:
                self._client = self.settings.client()
            except pymongo.errors.ConfigurationError as exc:
                raise MongoUnavailable(describe_failure(exc)) from None
        return self._client

    @property
    def db(self) -> Any:
        return self.client[self.settings.database]

    @property
    def runs(self) -> Any:
        return self.db["runs"]

    @property
    def devices(self) -> Any:
        return self.db["devices"]

    def close(self) -> None:
        if self._client is not None:
            self._client.close()

    def ensure_schema(self) -> None:
        if not self._schema_checked:
            try:
                self.found_schema = ensure_schema(self.db)
            except (pymongo.errors.ConnectionFailure, pymongo.errors.OperationFailure) as exc:
                if isinstance(exc, pymongo.errors.OperationFailure) and exc.code in (13, 18):
                    raise MongoSchemaError(f"not allowed to create or migrate the collections: {exc}") from None
                raise MongoUnavailable(describe_failure(exc)) from None
            self._schema_checked = True

    def ping(self) -> None:
        try:
            self.client.admin.command("ping")
        except pymongo.errors.PyMongoError as exc:
            raise MongoUnavailable(describe_failure(exc)) from None

    def write_runs(self, changes: Sequence[tuple[int, RunRecord | RunData | StoredRun]]) -> WriteReport:
        """Upsert each run's document and fold it into its device, in two unordered bulk writes.

        ``changes`` are (seq, run) as the store lists them. Returns what
        landed and what MongoDB (or BSON) refused for good. Raises
        :class:`MongoUnavailable` if anything may not have landed for a
        transient reason; the caller retries the whole batch, which is safe
        because every write is idempotent.
        """
        self.ensure_schema()
        runs = [(seq, StoredRun.of(run)) for seq, run in changes]
        rejected: dict[str, Rejection] = {}
        ops: list[UpdateOne] = []
        keyed: list[tuple[int, StoredRun]] = []
        for seq, r in runs:
            try:
                raw = encode_document(run_document(r, seq))
            except (bson.errors.InvalidDocument, ValueError, TypeError, KeyError) as exc:
                rejected[r.run_id] = Rejection(r.run_id, seq, f"runs: cannot be stored: {exc}")
                continue
            ops.append(run_update(_clean_text(r.run_id), seq, raw))
            keyed.append((seq, r))
        if ops:
            for index, reason in self._bulk(self.runs, ops).items():
                seq, r = keyed[index]
                rejected[r.run_id] = Rejection(r.run_id, seq, reason)
        device_ops: list[UpdateOne | UpdateMany | DeleteMany] = []
        device_keyed: list[tuple[int, StoredRun]] = []
        shipped = [(seq, r) for seq, r in keyed if r.run_id not in rejected]
        serial_of, known_only_by = self._devices_by_identity(shipped)
        for seq, r in shipped:
            serial = serial_of.get(r.run_id)
            op = device_update(r, seq, serial)
            more = device_detach(r, seq, serial) if r.header.get("outcome") else []
            # The earlier runs of this unit that never learnt its serial join its device now.
            more += [fold for d_seq, d in known_only_by.get(r.run_id, ())
                     if (fold := device_update(d, d_seq, r.serial)) is not None]
            for o in ([op] if op is not None else []) + more:
                device_ops.append(o)
                device_keyed.append((seq, r))
        if device_ops:
            for index, reason in self._bulk(self.devices, device_ops).items():
                seq, r = device_keyed[index]
                rejected[r.run_id] = Rejection(r.run_id, seq, reason)
        landed = [(seq, r) for seq, r in runs if r.run_id not in rejected]
        return WriteReport(
            tuple((r.run_id, seq) for seq, r in landed),
            tuple(rejected.values()),
            sum(r.measurements for _, r in landed),
        )

    def _devices_by_identity(
        self, shipped: Sequence[tuple[int, StoredRun]],
    ) -> tuple[dict[str, str], dict[str, list[tuple[int, StoredRun]]]]:
        """Which device each run without a serial belongs to, and which such runs each run with one brings along.

        A device is a unit of a product (``docs/mongodb.md``), named by its
        serial. A run whose identify phase failed knows the unit only by
        another of its product's identity values (``Product(identity=...)``:
        the MAC by default); it belongs to the device of the same product
        that holds that value, whichever of the two was shipped first:

        * a run without a serial joins the one device that holds one of its
          values in a run of its product;
        * a run with a serial brings along the runs of its product without a
          serial that share one of its values.

        Where two serials claim a value (two devices, or two runs of the
        batch), the runs without a serial join neither: the reports flag
        such units, and a device does not guess. Two queries a batch, on the
        ``attributes.<key>`` and ``dut.<key>`` indexes. Returns ({run id:
        device serial}, {run id: [(seq, run)]}).
        """
        lone: list[tuple[StoredRun, list[tuple[str, str]]]] = []
        named: list[tuple[StoredRun, list[tuple[str, str]]]] = []
        for _, r in shipped:
            values = _other_identity(r)
            if values:
                (named if r.serial else lone).append((r, values))
        serial_of: dict[str, str] = {}
        brings: dict[str, list[tuple[int, StoredRun]]] = {}
        if not lone and not named:
            return serial_of, brings
        everyone = [(k, v) for _, values in (*lone, *named) for k, v in values]
        try:
            devices = list(self.devices.find(
                {"$or": [{f"attributes.{encode_key(k)}": {"$in": _identity_spellings(k, v)}} for k, v in everyone]},
                {"runs.product": 1, "runs.attributes": 1}))
            lone_runs = [] if not named else list(self.runs.find(
                {"serial": None, "$or": [{f"dut.{encode_key(k)}": {"$in": _identity_spellings(k, v)}}
                                         for _, values in named for k, v in values]}, _FOLDED_FIELDS))
        except pymongo.errors.PyMongoError as exc:
            raise MongoUnavailable(describe_failure(exc)) from None

        def holders(product: str, values: Sequence[tuple[str, str]]) -> set[str]:
            """The serials whose devices hold one of ``values`` in a run of ``product``, and this batch's runs'."""
            found = {d["_id"] for d in devices if any(
                e.get("product") == product and _shares(decode_mapping(e.get("attributes") or {}), values)
                for e in d.get("runs") or ())}
            found.update(r.serial for r, theirs in named if r.header["product"] == product and r.serial
                         and _shares(dict(theirs), values))
            return found

        for r, values in lone:
            serials = holders(r.header["product"], values)
            if len(serials) == 1:
                serial_of[r.run_id] = serials.pop()
        for d in lone_runs:
            folded = _folded_run(d)
            values = _other_identity(folded)
            serials = holders(d["product"], values)
            if len(serials) != 1:
                continue  # two units claim it (a report flags them): it joins neither
            [serial] = serials
            for r, theirs in named:
                if r.serial == serial and r.header["product"] == d["product"] and _shares(dict(theirs), values):
                    brings.setdefault(r.run_id, []).append((int(d["seq"]), folded))
                    break
        return serial_of, brings

    def _bulk(self, collection: Any, ops: Sequence[UpdateOne | UpdateMany | DeleteMany]) -> dict[int, str]:
        """Run ``ops``; return {index: reason} of the permanently refused ones, raise if any may be lost."""
        try:
            collection.bulk_write(ops, ordered=False)
            return {}
        except pymongo.errors.BulkWriteError as exc:
            details = exc.details
            if details.get("writeConcernErrors"):
                first = details["writeConcernErrors"][0]
                raise MongoUnavailable(f"write not confirmed by a majority: {first.get('errmsg', first)}") from None
            refused: dict[int, str] = {}
            for err in details.get("writeErrors", []):
                if err.get("code") not in PERMANENT_CODES:
                    raise MongoUnavailable(describe_write_error(collection.name, err)) from None
                refused[int(err["index"])] = describe_write_error(collection.name, err)
            return refused
        except (pymongo.errors.PyMongoError, OSError) as exc:
            raise MongoUnavailable(describe_failure(exc)) from None

    # -- reading (the ``find`` command) --------------------------------------

    def find_devices(self, *, serial: str | None = None, mac: str | None = None,
                     imei: str | None = None) -> list[dict[str, Any]]:
        if serial is not None:
            query: dict[str, Any] = {"_id": serial}
        elif mac is not None:
            query = {"attributes.mac": {"$in": _spellings(mac)}}
        elif imei is not None:
            query = {"attributes.imei": {"$in": _spellings(imei)}}
        else:
            raise ValueError("give serial, mac or imei")
        try:
            return [_decode_device(d) for d in self.devices.find(query).sort("serial", 1).limit(100)]
        except pymongo.errors.PyMongoError as exc:
            raise MongoUnavailable(describe_failure(exc)) from None

    def find_runs(
        self,
        *,
        batch: str | None = None,
        serial: str | None = None,
        outcome: str | None = None,
        run_id_prefix: str | None = None,
        since: dt.datetime | None = None,
        until: dt.datetime | None = None,
        limit: int | None = None,
        last: int | None = None,
        product: str | None = None,
        station: str | None = None,
    ) -> list[RunRecord]:
        """Runs matching every given filter, from every station that shipped them, oldest first.

        As :meth:`reports.storage.store.LocalStore.find_runs`: ``limit`` keeps the
        oldest ``limit``, ``last`` the most recent ``last`` (still listed
        oldest first).
        """
        query = _run_query(batch=batch, serial=serial, outcome=outcome, run_id_prefix=run_id_prefix, since=since,
                           until=until, product=product, station=station)
        direction = -1 if last else 1
        # The flat copy of the measurements is for queries; the phases hold them.
        try:
            cursor = self.runs.find(query, {"measurements": 0}, limit=(last or limit or 0))
            docs = list(cursor.sort([("started_at", direction), ("_id", direction)]))
        except pymongo.errors.PyMongoError as exc:
            raise MongoUnavailable(describe_failure(exc)) from None
        if last:
            docs.reverse()
        return [run_from_document(d) for d in docs]

    def get_run(self, run_id: str) -> RunRecord | None:
        """One run, whole, or ``None``."""
        try:
            doc = self.runs.find_one({"_id": run_id}, {"measurements": 0})
        except pymongo.errors.PyMongoError as exc:
            raise MongoUnavailable(describe_failure(exc)) from None
        return None if doc is None else run_from_document(doc)

    def iter_runs(
        self,
        *,
        batch: str | None = None,
        serial: str | None = None,
        outcome: str | None = None,
        since: dt.datetime | None = None,
        until: dt.datetime | None = None,
        product: str | None = None,
        station: str | None = None,
        phases: bool = True,
        page: int = 200,
    ) -> Iterator[RunRecord]:
        """:meth:`find_runs`'s runs, oldest first, read from a cursor ``page`` documents at a time.

        As :meth:`reports.storage.store.LocalStore.iter_runs`: what a report
        reads a batch or a period with; without ``phases``, headers only.
        """
        query = _run_query(batch=batch, serial=serial, outcome=outcome, run_id_prefix=None, since=since,
                           until=until, product=product, station=station)
        try:
            cursor = self.runs.find(query, {"measurements": 0} if phases else HEADER_PROJECTION, batch_size=page)
            with cursor.sort([("started_at", 1), ("_id", 1)]) as docs:
                for d in docs:
                    yield run_from_document(d)
        except pymongo.errors.PyMongoError as exc:
            raise MongoUnavailable(describe_failure(exc)) from None

    def find_runs_by_identity(self, key: str, value: str, *, limit: int = 1000) -> list[RunRecord]:
        """The runs whose ``dut[key]`` is ``value`` (a MAC in the usual spellings), oldest first, at most ``limit``."""
        field = "serial" if key == "serial" else f"dut.{encode_key(key)}"
        values = mac_spellings(value) if key.endswith("mac") else [value]
        try:
            cursor = self.runs.find({field: {"$in": values}}, {"measurements": 0}, limit=limit)
            docs = list(cursor.sort([("started_at", 1), ("_id", 1)]))
        except pymongo.errors.PyMongoError as exc:
            raise MongoUnavailable(describe_failure(exc)) from None
        return [run_from_document(d) for d in docs]

    def find_runs_by_identities(self, pairs: Sequence[tuple[str, str]], *, limit: int = 1000,
                                phases: bool = True) -> list[RunRecord]:
        """:func:`runs_by_identities` in this database."""
        try:
            return runs_by_identities(self.runs, pairs, limit=limit, phases=phases)
        except pymongo.errors.PyMongoError as exc:
            raise MongoUnavailable(describe_failure(exc)) from None

    def period_report(self, *, product: str, since: dt.datetime | None = None, until: dt.datetime | None = None,
                      station: str | None = None) -> Any:
        """The trend report of ``product`` over a period, every station's runs (or ``station``'s).

        Computed in the database (:func:`reports.quality.pipeline.period_from_database`:
        two aggregations at once, each reading the runs once); ``headers``
        streams the runs' headers (identity, outcome, where and when: no
        phases) for the few units the database cannot group by Python's rule,
        or for all of them where it cannot group any.
        """
        from reports.quality.period import RunHeader
        from reports.quality.pipeline import period_from_database

        match = _run_query(batch=None, serial=None, outcome=None, run_id_prefix=None, since=since, until=until,
                           product=product, station=station)
        projection = {"product": 1, "started_at": 1, "outcome": 1, "station": 1, "slot": 1, "operator": 1,
                      "identity": 1, "dut": 1}

        def headers(stages: list[dict[str, Any]] | None) -> Iterable[RunHeader]:
            if stages is None:
                cursor = self.runs.find(match, projection).sort([("started_at", 1), ("_id", 1)]).batch_size(10_000)
            else:
                cursor = self.runs.aggregate([{"$match": match}, {"$sort": {"started_at": 1, "_id": 1}}, *stages,
                                              {"$project": projection}], batchSize=10_000)
            for d in cursor:
                identity = tuple(d.get("identity") or DEFAULT_IDENTITY)
                dut = d.get("dut") or {}
                yield RunHeader(
                    d["_id"], d["product"], d["started_at"], Outcome(d["outcome"]) if d.get("outcome") else None,
                    d["station"], d["slot"], d.get("operator", ""), identity,
                    {k: str(dut[encode_key(k)]) for k in identity if dut.get(encode_key(k))},
                )

        try:
            return period_from_database(self.runs, match, headers, product=product, station=station,
                                        since=since, until=until)
        except pymongo.errors.PyMongoError as exc:
            raise MongoUnavailable(describe_failure(exc)) from None

    def outcome_counts(
        self,
        *,
        batch: str | None = None,
        serial: str | None = None,
        outcome: str | None = None,
        since: dt.datetime | None = None,
        until: dt.datetime | None = None,
    ) -> dict[str, int]:
        """How many matching runs ended each way (``RUNNING``: not ended), most first, as the local store counts."""
        query = _run_query(batch=batch, serial=serial, outcome=outcome, run_id_prefix=None, since=since, until=until)
        pipeline = [
            {"$match": query},
            {"$group": {"_id": {"$ifNull": ["$outcome", "RUNNING"]}, "n": {"$sum": 1}}},
        ]
        try:
            rows = [(d["_id"], int(d["n"])) for d in self.runs.aggregate(pipeline)]
        except pymongo.errors.PyMongoError as exc:
            raise MongoUnavailable(describe_failure(exc)) from None
        return dict(sorted(rows, key=lambda kv: (-kv[1], kv[0])))

    def run_history(self, serial: str) -> list[dict[str, Any]]:
        """Summaries of ``serial``'s runs, oldest first (phases left out)."""
        projection = {"phases": 0, "measurements": 0, "logs": 0}
        try:
            docs = list(self.runs.find({"serial": serial}, projection).sort([("started_at", 1), ("_id", 1)]))
        except pymongo.errors.PyMongoError as exc:
            raise MongoUnavailable(describe_failure(exc)) from None
        for d in docs:
            d["dut"] = decode_mapping(d.get("dut") or {})
        return docs


#: What reading a run's header takes: everything but its phases and their flat measurements.
HEADER_PROJECTION = {"phases": 0, "measurements": 0}


def runs_by_identities(runs: Any, pairs: Sequence[tuple[str, str]], *, limit: int = 1000,
                       phases: bool = True) -> list[RunRecord]:
    """The runs whose ``dut[key]`` is ``value`` for any of ``pairs`` (MACs in the usual spellings), in one
    query of the ``runs`` collection, oldest first, at most ``limit``; without their phases unless ``phases``."""
    wanted: dict[str, list[str]] = {}
    for key, value in pairs:
        field = "serial" if key == "serial" else f"dut.{encode_key(key)}"
        wanted.setdefault(field, []).extend(mac_spellings(value) if key.endswith("mac") else [value])
    if not wanted:
        return []
    query = {"$or": [{field: {"$in": list(dict.fromkeys(values))}} for field, values in wanted.items()]}
    cursor = runs.find(query, {"measurements": 0} if phases else HEADER_PROJECTION, limit=limit)
    return [run_from_document(d) for d in cursor.sort([("started_at", 1), ("_id", 1)])]


#: How many of a product's newest runs :func:`newest_units` reads first, per unit asked for (doubled as needed).
_RUNS_PER_UNIT = 4


def newest_units(runs: Any, product: str, count: int) -> list[Any]:
    """The ``count`` units of ``product`` first tested most recently, among those with a verdict, oldest first.

    Units as the reports group them (:mod:`reports.quality.units`, by the
    product's identity): the product's newest runs, with every run of their
    units (:func:`~reports.storage.unit_history.gather_units`), so a unit
    whose identify phase failed and its retest are one unit, and a retest
    is not a new unit. Only units first tested among the runs read are
    complete, so the runs read double until ``count`` of them have a verdict
    or every run of the product has been read. Each is a
    :class:`~reports.quality.yields.UnitSummary`.
    """
    from functools import partial

    from reports.quality.units import group_units
    from reports.quality.yields import unit_summaries
    from reports.storage.unit_history import MAX_RUNS_GATHERED, gather_units

    lookup = partial(runs_by_identities, runs, phases=False)
    window = _RUNS_PER_UNIT * count
    while True:
        cursor = runs.find({"product": product}, HEADER_PROJECTION, limit=window)
        newest = [run_from_document(d) for d in cursor.sort([("started_at", -1), ("_id", -1)])]
        gathered = gather_units(lookup, (), known=newest)
        ordered = [r for r in gathered.runs if r.product == product]
        by_id = {r.run_id: r for r in ordered}
        every_run = len(newest) < window or window >= MAX_RUNS_GATHERED
        oldest = (newest[-1].started_at, newest[-1].run_id) if newest else None
        units = [u for u in unit_summaries(ordered, group_units(ordered)) if u.first_outcome is not None and (
            every_run or (by_id[u.run_ids[0]].started_at, u.run_ids[0]) >= oldest)]
        if len(units) >= count or every_run:
            return units[-count:]
        window *= 2


def _run_query(
    *,
    batch: str | None,
    serial: str | None,
    outcome: str | None,
    run_id_prefix: str | None,
    since: dt.datetime | None = None,
    until: dt.datetime | None = None,
    product: str | None = None,
    station: str | None = None,
) -> dict[str, Any]:
    query: dict[str, Any] = {}
    if product is not None:
        query["product"] = product
    if station is not None:
        query["station"] = station
    started: dict[str, dt.datetime] = {}
    if since is not None:
        started["$gte"] = since
    if until is not None:
        started["$lt"] = until
    if started:
        query["started_at"] = started
    if batch is not None:
        query["batch"] = batch
    if serial is not None:
        query["serial"] = serial
    if outcome is not None:
        query["outcome"] = outcome
    if run_id_prefix is not None:
        query["_id"] = {"$regex": "^" + re.escape(run_id_prefix)}
    return query


def _other_identity(run: StoredRun) -> list[tuple[str, str]]:
    """The run's identity values other than its serial (its product's keys: the MAC by default), as recorded."""
    d = run.header
    dut = d.get("dut") or {}
    return [(k, v) for k in (d.get("identity") or DEFAULT_IDENTITY)
            if k != "serial" and isinstance(v := dut.get(k), str) and v.strip()]


def _identity_spellings(key: str, value: str) -> list[str]:
    return mac_spellings(value) if key.endswith("mac") else _spellings(value.strip())


def _shares(values: Mapping[str, Any], identity: Sequence[tuple[str, str]]) -> bool:
    """Whether ``values`` (a device's attributes, a run's dut) hold one of ``identity``'s values, as units compare."""
    from reports.quality.units import normal_value

    return any(isinstance(have := values.get(k), str) and normal_value(k, have) == normal_value(k, v)
               for k, v in identity)


#: What a run's device entry needs of a ``runs`` document (:func:`device_entry`).
_FOLDED_FIELDS = {"seq": 1, "product": 1, "station": 1, "started_at": 1, "outcome": 1, "dut": 1, "identity": 1}


def _folded_run(doc: Mapping[str, Any]) -> StoredRun:
    """A run without a serial, read back from its ``runs`` document, as :func:`device_update` takes it."""
    started = doc["started_at"]
    if started.tzinfo is None:
        started = started.replace(tzinfo=dt.timezone.utc)
    header = {"run_id": doc["_id"], "product": doc["product"], "station": doc["station"],
              "started_at": started.isoformat(), "outcome": doc.get("outcome"),
              "dut": decode_mapping(doc.get("dut") or {}), "identity": doc.get("identity") or DEFAULT_IDENTITY}
    return StoredRun(header, ())


def _spellings(text: str) -> list[str]:
    """A MAC or IMEI as typed, and in lower and upper case (stations differ)."""
    return list(dict.fromkeys([text, text.lower(), text.upper()]))


def mac_spellings(text: str) -> list[str]:
    """A MAC as typed, and with colons or dashes or none, in lower and upper case (stations differ)."""
    bare = text.strip().translate(str.maketrans("", "", ":-. ")).lower()
    pairs = [bare[i:i + 2] for i in range(0, len(bare), 2)]
    forms = [bare, ":".join(pairs), "-".join(pairs)]
    return list(dict.fromkeys([text, *forms, *(f.upper() for f in forms)]))


def _decode_device(doc: dict[str, Any]) -> dict[str, Any]:
    doc["attributes"] = decode_mapping(doc.get("attributes") or {})
    for entry in doc.get("runs") or []:
        entry["attributes"] = decode_mapping(entry.get("attributes") or {})
    return doc


def redact(uri: str) -> str:
    """``uri`` without its password, for messages."""
    if "@" not in uri:
        return uri
    scheme, rest = uri.split("://", 1) if "://" in uri else ("mongodb", uri)
    creds, host = rest.rsplit("@", 1)
    user = creds.split(":", 1)[0]
    return f"{scheme}://{quote(user, safe='%')}:***@{host}"
