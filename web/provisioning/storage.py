"""Where registered devices live: MongoDB when configured, else a local SQLite file.

Both backends offer the same few primitives, each atomic on its own and
guarded by unique constraints (serial, device id, claim code, idempotency
key). The registration rules (``web/provisioning/app.py``) are written
once on top of them, optimistically: read, decide, write; a write that a
unique constraint refuses (:class:`DuplicateKey`) means a concurrent request
got there first, and the rules are simply applied again to what is now
stored. That is what makes a retry storm - the same request arriving twice
at once because the client gave up on the first - create one device.

Every blocking call runs in a worker thread (``trio.to_thread.run_sync``),
handed over whole and never abandoned on cancellation: when a write returns,
it is durable (SQLite ``synchronous=FULL``; MongoDB ``w: majority, j: true``
as ``reports/storage/mongo.py`` configures its clients), and a cancelled request
cannot leave a half-written registration behind.

MongoDB: collection ``provisioned_devices``, one document per device
(``_id`` = device id) with its registrations (idempotency key, request
fingerprint, scrypt hash of that request's password, answer) in
``requests``; unique indexes on ``serial``, ``claim_code`` and
``requests.key``. SQLite: tables ``provisioned_devices`` (one row per
serial) and ``provisioning_requests`` (one row per idempotency key).
"""

from __future__ import annotations

import abc
import datetime as dt
import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import attrs
import trio

from web.provisioning.model import Device, Registration

if TYPE_CHECKING:
    from reports.storage.mongo import MongoSettings

__all__ = ["DuplicateKey", "MongoStorage", "ProvisioningStorage", "SqliteStorage", "StorageUnavailable"]

T = TypeVar("T")

COLLECTION = "provisioned_devices"

_DEVICE_FIELDS = tuple(f.name for f in attrs.fields(Device))
_DATES = ("first_registered_at", "last_registered_at")
#: What a retest may change (besides last_registered_at and the registration count).
_MUTABLE = ("imei", "imsi", "iccid", "firmware_version", "batch", "station", "test_outcome",
            "broker_client_id", "broker_username", "broker_password_hash")


class StorageUnavailable(Exception):
    """The database could not be reached or did not confirm a write; the client should retry (HTTP 503)."""


class DuplicateKey(Exception):
    """A unique constraint refused a write: another request registered this serial, key or claim code first."""


class ProvisioningStorage(abc.ABC):
    """The registration primitives; see the module docstring."""

    #: Where the data is, without credentials (for ``/healthz`` and the log).
    description: str = ""

    @abc.abstractmethod
    async def find_request(self, key: str) -> Registration | None:
        """The registration made under idempotency key ``key``, if any."""

    @abc.abstractmethod
    async def get_device(self, serial: str) -> Device | None:
        """The device registered with ``serial``, if any."""

    @abc.abstractmethod
    async def find_by_mac(self, mac: str) -> list[Device]:
        """The devices registered with ``mac`` (normalised, upper case with colons): one, normally."""

    @abc.abstractmethod
    async def insert_device(self, device: Device, registration: Registration) -> None:
        """Store a new device with its first registration, atomically; :class:`DuplicateKey` if taken."""

    @abc.abstractmethod
    async def add_registration(self, device: Device, registration: Registration) -> None:
        """Record a retest: update ``device``'s details and add ``registration``, atomically.

        Raises :class:`DuplicateKey` when the key was used meanwhile.
        """

    @abc.abstractmethod
    async def count_devices(self) -> int:
        """How many devices are registered."""

    @abc.abstractmethod
    async def ping(self) -> None:
        """Raise :class:`StorageUnavailable` unless the database answers."""

    @abc.abstractmethod
    async def aclose(self) -> None: ...

    async def __aenter__(self) -> ProvisioningStorage:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


# -- SQLite -------------------------------------------------------------------

_SQLITE_SCHEMA = """
CREATE TABLE IF NOT EXISTS provisioned_devices (
    serial TEXT PRIMARY KEY,
    device_id TEXT NOT NULL UNIQUE,
    claim_code TEXT NOT NULL UNIQUE,
    mac TEXT NOT NULL,
    public_key TEXT NOT NULL,
    public_key_sha256 TEXT NOT NULL,
    product TEXT NOT NULL,
    imei TEXT, imsi TEXT, iccid TEXT, firmware_version TEXT, batch TEXT, station TEXT, test_outcome TEXT,
    broker_client_id TEXT, broker_username TEXT, broker_password_hash TEXT,
    first_registered_at TEXT NOT NULL,
    last_registered_at TEXT NOT NULL,
    registrations INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS provisioning_requests (
    key TEXT PRIMARY KEY,
    serial TEXT NOT NULL REFERENCES provisioned_devices(serial),
    fingerprint TEXT NOT NULL,
    password_hash TEXT,
    status INTEGER NOT NULL,
    created INTEGER NOT NULL,
    device_id TEXT NOT NULL,
    claim_code TEXT NOT NULL,
    at TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS provisioned_devices_mac ON provisioned_devices(mac);
"""


class SqliteStorage(ProvisioningStorage):
    """One SQLite file in WAL mode, for a line without MongoDB (or a developer's laptop).

    One connection, used by one worker thread at a time (a lock): the
    service's writes are small and few, and serialising them makes each
    read-decide-write of the registration rules trivially consistent here
    (the rules would cope without it, as they must with MongoDB).
    ``synchronous=FULL``: once the station is told a claim code, a power cut
    of the server must not lose it - the code is already on a label.
    """

    def __init__(self, conn: sqlite3.Connection, path: Path) -> None:
        self._conn = conn
        self._lock = threading.Lock()
        self.path = path
        self.description = f"sqlite:{path}"

    @classmethod
    def open(cls, path: str | Path) -> SqliteStorage:
        """Open (creating if needed) the file at ``path``. Blocking, but quick."""
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(p, check_same_thread=False, isolation_level=None, timeout=10)
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA foreign_keys=ON")
            conn.executescript(_SQLITE_SCHEMA)
        except sqlite3.Error:
            conn.close()
            raise
        return cls(conn, p)

    async def _run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        def locked() -> T:
            with self._lock:
                try:
                    return fn(self._conn)
                except sqlite3.IntegrityError as exc:
                    raise DuplicateKey(str(exc)) from None
                except sqlite3.OperationalError as exc:  # locked by another process, disk full, ...
                    raise StorageUnavailable(f"sqlite: {exc}") from None

        return await trio.to_thread.run_sync(locked)

    async def _transaction(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        def tx(conn: sqlite3.Connection) -> T:
            conn.execute("BEGIN IMMEDIATE")
            try:
                result = fn(conn)
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
            return result

        return await self._run(tx)

    async def find_request(self, key: str) -> Registration | None:
        def q(conn: sqlite3.Connection) -> Registration | None:
            row = conn.execute(
                "SELECT key, serial, fingerprint, password_hash, status, created, device_id, claim_code, at"
                " FROM provisioning_requests WHERE key = ?", (key,)).fetchone()
            if row is None:
                return None
            k, serial, fp, ph, status, created, device_id, claim, at = row
            return Registration(k, serial, fp, ph, status, bool(created), device_id, claim, _date(at))

        return await self._run(q)

    async def get_device(self, serial: str) -> Device | None:
        def q(conn: sqlite3.Connection) -> Device | None:
            row = conn.execute(f"SELECT {', '.join(_DEVICE_FIELDS)} FROM provisioned_devices WHERE serial = ?",
                               (serial,)).fetchone()
            if row is None:
                return None
            values = dict(zip(_DEVICE_FIELDS, row, strict=True))
            return Device(**{k: _date(v) if k in _DATES else v for k, v in values.items()})

        return await self._run(q)

    async def find_by_mac(self, mac: str) -> list[Device]:
        def q(conn: sqlite3.Connection) -> list[Device]:
            rows = conn.execute(f"SELECT {', '.join(_DEVICE_FIELDS)} FROM provisioned_devices WHERE mac = ?"
                                " ORDER BY first_registered_at", (mac,)).fetchall()
            return [Device(**{k: _date(v) if k in _DATES else v for k, v in zip(_DEVICE_FIELDS, row, strict=True)})
                    for row in rows]

        return await self._run(q)

    async def insert_device(self, device: Device, registration: Registration) -> None:
        def tx(conn: sqlite3.Connection) -> None:
            values = attrs.asdict(device)
            conn.execute(
                f"INSERT INTO provisioned_devices ({', '.join(_DEVICE_FIELDS)})"
                f" VALUES ({', '.join('?' * len(_DEVICE_FIELDS))})",
                [values[k].isoformat() if k in _DATES else values[k] for k in _DEVICE_FIELDS])
            _insert_request(conn, registration)

        await self._transaction(tx)

    async def add_registration(self, device: Device, registration: Registration) -> None:
        def tx(conn: sqlite3.Connection) -> None:
            values = attrs.asdict(device)
            _insert_request(conn, registration)  # first: a used key ends the transaction before any update
            updated = conn.execute(
                f"UPDATE provisioned_devices SET {', '.join(f'{k} = ?' for k in _MUTABLE)},"
                " last_registered_at = ?, registrations = registrations + 1 WHERE serial = ?",
                [*(values[k] for k in _MUTABLE), device.last_registered_at.isoformat(), device.serial],
            ).rowcount
            if updated != 1:
                raise DuplicateKey(f"device {device.serial!r} is not registered")

        await self._transaction(tx)

    async def count_devices(self) -> int:
        return await self._run(lambda conn: conn.execute("SELECT count(*) FROM provisioned_devices").fetchone()[0])

    async def ping(self) -> None:
        await self._run(lambda conn: conn.execute("SELECT 1").fetchone())

    async def aclose(self) -> None:
        await trio.to_thread.run_sync(self.close)

    def close(self) -> None:
        with self._lock:
            self._conn.close()


def _insert_request(conn: sqlite3.Connection, r: Registration) -> None:
    conn.execute(
        "INSERT INTO provisioning_requests (key, serial, fingerprint, password_hash, status, created, device_id,"
        " claim_code, at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (r.key, r.serial, r.fingerprint, r.password_hash, r.status, int(r.created), r.device_id, r.claim_code,
         r.at.isoformat()),
    )


def _date(text: str) -> dt.datetime:
    return dt.datetime.fromisoformat(text)


# -- MongoDB ------------------------------------------------------------------


class MongoStorage(ProvisioningStorage):
    """The ``provisioned_devices`` collection of the line's MongoDB.

    Uses :meth:`reports.storage.mongo.MongoSettings.client`, so the same short
    timeouts and the same write guarantees as the record shipper: a
    registration the station is told about is majority-committed and
    journaled, and a failover cannot take it back.
    """

    def __init__(self, settings: MongoSettings, client: Any) -> None:
        from pymongo.read_concern import ReadConcern

        self.settings = settings
        self._client = client
        # Majority reads too: a registration a majority has not taken yet
        # (its write still waiting, or timed out after reaching the primary)
        # must not be replayed to a station, which would print its claim code
        # on a label that a failover could then orphan.
        self._devices = client[settings.database][COLLECTION].with_options(read_concern=ReadConcern("majority"))
        self.description = f"mongodb:{settings.target}/{COLLECTION}"

    @classmethod
    def open(cls, settings: MongoSettings) -> MongoStorage:
        """Connect and create the indexes (idempotent). Blocking: network round trips."""
        import pymongo

        client = settings.client()
        storage = cls(settings, client)
        try:
            storage._call(lambda: storage._devices.create_indexes([
                pymongo.IndexModel([("serial", 1)], unique=True, name="serial_unique"),
                pymongo.IndexModel([("claim_code", 1)], unique=True, name="claim_code_unique"),
                pymongo.IndexModel([("requests.key", 1)], unique=True, name="idempotency_key_unique"),
                pymongo.IndexModel([("mac", 1)], name="mac"),
            ]))
        except BaseException:
            client.close()
            raise
        return storage

    def _call(self, fn: Callable[[], T]) -> T:
        import pymongo.errors

        try:
            return fn()
        except pymongo.errors.DuplicateKeyError as exc:
            raise DuplicateKey(str(exc.details.get("keyPattern") if exc.details else exc)) from None
        except pymongo.errors.PyMongoError as exc:
            raise StorageUnavailable(f"mongodb {self.settings.target}: {type(exc).__name__}: "
                                     f"{str(exc).splitlines()[0][:300] if str(exc) else ''}") from None

    async def _run(self, fn: Callable[[], T]) -> T:
        return await trio.to_thread.run_sync(self._call, fn)

    async def find_request(self, key: str) -> Registration | None:
        doc = await self._run(lambda: self._devices.find_one(
            {"requests.key": key}, {"requests.$": 1, "serial": 1, "device_id": 1, "claim_code": 1}))
        if doc is None:
            return None
        r = doc["requests"][0]
        return Registration(r["key"], doc["serial"], r["fingerprint"], r.get("password_hash"), r["status"],
                            r["created"], doc["device_id"], doc["claim_code"], _aware(r["at"]))

    async def get_device(self, serial: str) -> Device | None:
        doc = await self._run(lambda: self._devices.find_one({"serial": serial}, {"requests": 0}))
        if doc is None:
            return None
        return Device(**{k: _aware(doc[k]) if k in _DATES else doc.get(k) for k in _DEVICE_FIELDS})

    async def find_by_mac(self, mac: str) -> list[Device]:
        docs = await self._run(lambda: list(self._devices.find({"mac": mac}, {"requests": 0})
                                            .sort("first_registered_at", 1)))
        return [Device(**{k: _aware(d[k]) if k in _DATES else d.get(k) for k in _DEVICE_FIELDS}) for d in docs]

    async def insert_device(self, device: Device, registration: Registration) -> None:
        doc = {"_id": device.device_id, **attrs.asdict(device), "requests": [_request_doc(registration)]}
        await self._run(lambda: self._devices.insert_one(doc))

    async def add_registration(self, device: Device, registration: Registration) -> None:
        values = attrs.asdict(device)
        result = await self._run(lambda: self._devices.update_one(
            # The key must not be in this document already (the unique index
            # only guards against *other* documents holding it).
            {"serial": device.serial, "requests.key": {"$ne": registration.key}},
            {"$set": {**{k: values[k] for k in _MUTABLE}, "last_registered_at": device.last_registered_at},
             "$inc": {"registrations": 1},
             "$push": {"requests": _request_doc(registration)}},
        ))
        if result.matched_count != 1:
            raise DuplicateKey("idempotency key used meanwhile")

    async def count_devices(self) -> int:
        return await self._run(lambda: self._devices.count_documents({}))

    async def ping(self) -> None:
        await self._run(lambda: self._client.admin.command("ping"))

    async def aclose(self) -> None:
        await trio.to_thread.run_sync(self.close)

    def close(self) -> None:
        self._client.close()


def _request_doc(r: Registration) -> dict[str, Any]:
    return {"key": r.key, "fingerprint": r.fingerprint, "password_hash": r.password_hash, "status": r.status,
            "created": r.created, "at": r.at}


def _aware(when: dt.datetime) -> dt.datetime:
    """Dates as written: MongoDB keeps milliseconds in UTC; a naive one (a tz-unaware client) is UTC."""
    return when if when.tzinfo is not None else when.replace(tzinfo=dt.timezone.utc)
