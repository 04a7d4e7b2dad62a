"""The local store: SQLite in WAL mode, the station's source of truth.

Durability rule: a phase's record is durable before its slot moves on. It is
made so by appending it to the store's *journal* (segment files beside the
database, ``<store>.journal-NNNNNN``) with one ``write`` on the trio thread;
a copier thread moves journalled records into SQLite every 10 ms, all of
them in one transaction, and deletes each segment once all of it is in the
database. A slot never waits for a transaction, a thread hand-off or another
slot's records: only for its own append, a few microseconds into the page
cache.

An append that has returned survives the station process being killed at any
point, exactly as a WAL commit with ``synchronous=NORMAL`` does (the data is
in the OS, not yet on the platter); only a power loss can drop the last few
records. When the store is next opened by a station (or by anyone while no
station holds it), journal segments left behind are replayed into the
database, then runs left open are marked ``INTERRUPTED``.

Reads are synchronous and meant for the CLI and reports (the station itself
never reads back during a run); they see a record once the copier thread has
copied it, about 10 ms after its append.

Every change to a run gets a change number (``runs.seq``), increasing across
the store, by which the shipper copies the store elsewhere (MongoDB keeps a
run's state with the highest number). A power cut can roll the store back
past changes already copied, and so can restoring an older copy of it; the
numbers the store then hands out again would sort below the copies' and
leave them stale. So the number is (epoch, change) in one integer, the
*epoch* above bit 32 (:func:`seq_epoch`): a recovery (which follows every
station that did not close the store) starts a new epoch, later than any
before it even if the file forgot them, and every change from then on sorts
after anything the store handed out before.
"""

from __future__ import annotations

import collections
import datetime as dt
import fcntl
import glob
import json
import os
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import attrs
import orjson
import trio

from reports.quality.units import normal_value
from sequencer.records import (
    Outcome,
    PhaseRecord,
    RunRecord,
    from_dict,
    json_loads,
    phase_to_json,
    run_from_json,
    run_header_json,
    utcnow,
)

STORE_SCHEMA = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS runs (
    run_id      TEXT PRIMARY KEY,
    batch       TEXT NOT NULL,
    serial      TEXT,
    product     TEXT NOT NULL,
    station     TEXT NOT NULL,
    slot        INTEGER NOT NULL,
    outcome     TEXT,
    started_at  TEXT NOT NULL,
    ended_at    TEXT,
    header      TEXT NOT NULL,
    seq         INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS phases (
    run_id  TEXT NOT NULL REFERENCES runs(run_id),
    idx     INTEGER NOT NULL,
    name    TEXT NOT NULL,
    outcome TEXT NOT NULL,
    record  TEXT NOT NULL,
    PRIMARY KEY (run_id, idx)
);
CREATE INDEX IF NOT EXISTS runs_batch ON runs (batch, started_at);
CREATE INDEX IF NOT EXISTS runs_serial ON runs (serial, started_at);
CREATE INDEX IF NOT EXISTS runs_outcome ON runs (outcome);
CREATE INDEX IF NOT EXISTS runs_seq ON runs (seq);
-- `sequencer runs` lists the most recent runs: without this, a year's store
-- (hundreds of thousands of runs) was scanned and sorted whole every time.
CREATE INDEX IF NOT EXISTS runs_started ON runs (started_at, run_id);
-- A unit is recognised by its MAC before its serial is read (retest awareness, at every run's detect).
-- The expression is find_runs_by_identity's, character for character: SQLite uses the index only then.
CREATE INDEX IF NOT EXISTS runs_dut_mac ON runs (
    lower(replace(replace(replace(json_extract(header, '$.dut.mac'), ':', ''), '-', ''), '.', '')));
"""


#: How often a station's WAL is copied back into the database (see :class:`_Checkpointer`).
CHECKPOINT_INTERVAL_S = 1.0
#: SQLite's own default, restored for readers when the writer stops.
SQLITE_AUTOCHECKPOINT_PAGES = 1000
#: How often journalled records are copied into SQLite: readers see a record at most about this late.
COPY_INTERVAL_S = 0.01
#: Past this size the journal starts a new segment, so copied ones can be deleted (see :class:`_Journal`).
JOURNAL_SEGMENT_BYTES = 4 << 20
#: How long a station waits for the store's lock that a reader (a report, a listing) holds for a moment.
STATION_LOCK_WAIT_S = 5.0
#: A change number (``runs.seq``) is ``epoch << EPOCH_SHIFT | change``: (epoch, change), in the order of integers.
EPOCH_SHIFT = 32
#: Epochs are seconds since 2024-01-01 UTC when they start, so that a new one is later than every epoch
#: this store had, including those a power cut or a restored copy made it forget (31 bits: until 2092).
EPOCH_ORIGIN_S = 1_704_067_200


def seq_epoch(seq: int) -> int:
    """The epoch of a change number."""
    return seq >> EPOCH_SHIFT


def _next_epoch(current: int) -> int:
    """An epoch later than ``current`` and than any this store may have started and lost: the clock's second.

    Why the clock: an epoch kept only in the store is rolled back with it,
    and would be handed out a second time. Blocking: it returns once its
    second is over (half a second on average, only after a station did not
    close the store), so that no later recovery, of this file or of a copy
    of it put back, can start the same epoch. This assumes the station's
    clock does not go back. Called only from :meth:`LocalStore.open`, which
    no event loop's thread calls: ``sequencer run`` and the portal open
    their store before ``trio.run``, the shipper in a worker thread.
    """
    now = time.time() - EPOCH_ORIGIN_S
    if int(now) <= current:  # a clock behind the store's: the epochs still grow
        return current + 1
    time.sleep(max(0.0, int(now) + 1 - now))
    return int(now)


class StoreError(Exception):
    """The store cannot be opened or used; the message names the file."""


@attrs.frozen
class _Write:
    """One write, as the copier thread applies it and as the journal keeps it (one line each)."""

    kind: str  # "begin" | "phase" | "finish"
    run_id: str
    #: begin/finish: the run without its phases, as JSON (``to_dict`` form)
    header: str = ""
    #: begin/finish: batch, serial, product, station, slot, outcome, started_at, ended_at
    columns: tuple[Any, ...] = ()
    index: int = 0
    #: phase: its name and outcome (indexed columns) and the whole record as JSON
    name: str = ""
    outcome: str = ""
    record: str = ""
    dut: dict[str, str] = attrs.field(factory=dict)

    @classmethod
    def begin(cls, run: RunRecord) -> _Write:
        return cls("begin", run.run_id, header=run_header_json(run), columns=_record_columns(run), dut=dict(run.dut))

    @classmethod
    def finish(cls, run: RunRecord) -> _Write:
        return cls("finish", run.run_id, header=run_header_json(run), columns=_record_columns(run))

    @classmethod
    def phase(cls, run_id: str, index: int, phase: PhaseRecord, dut: dict[str, str]) -> _Write:
        return cls("phase", run_id, index=index, name=phase.name, outcome=phase.outcome.value,
                   record=phase_to_json(phase), dut=dut)

    def line(self) -> bytes:
        """The journal line: tab-separated fields, JSON where a field is structured (JSON never holds a raw tab)."""
        if self.kind == "phase":
            return b"P\t%s\t%d\t%s\t%s\n" % (
                _json_bytes(self.run_id), self.index, _json_bytes(self.dut), self.record.encode())
        return b"%s\t%s\n" % (b"B" if self.kind == "begin" else b"F", self.header.encode())

    @classmethod
    def from_line(cls, text: str) -> _Write:
        """Parse a journal line (without its newline); raises (``ValueError``, ``KeyError``, ...) if it is damaged."""
        kind, rest = text.split("\t", 1)
        if kind == "P":
            run_id, index, dut, record = rest.split("\t", 3)
            data = json.loads(record)
            return cls("phase", json.loads(run_id), index=int(index), name=data["name"], outcome=data["outcome"],
                       record=record, dut={str(k): str(v) for k, v in json.loads(dut).items()})
        if kind in ("B", "F"):
            data = json.loads(rest)
            return cls("begin" if kind == "B" else "finish", data["run_id"], header=rest,
                       columns=_header_columns(data), dut={str(k): str(v) for k, v in data["dut"].items()})
        raise ValueError(f"unknown journal entry {kind!r}")

    def check_record(self) -> None:
        """Raise if the record would not read back as a record (a line damaged into other valid JSON)."""
        if self.kind == "phase":
            from_dict(json.loads(self.record), PhaseRecord)
        else:
            run_from_json(self.header)


class _Checkpointer:
    """Copies the WAL back into the database from a thread and connection of its own.

    SQLite's automatic checkpoint runs inside whichever commit takes the WAL
    past 1000 pages, and it fsyncs: every few hundred phases one commit took
    milliseconds instead of a tenth of one, and every slot whose record was
    in that transaction waited for it. While a station writes, its writer's
    connection has automatic checkpoints off, and this thread runs a
    PASSIVE checkpoint every ``interval`` seconds: WAL mode lets it run
    beside the writer, so a commit never waits for a checkpoint. A
    checkpoint that cannot finish now (a reader holds an old snapshot) is
    simply continued at the next tick; the WAL keeps every commit meanwhile.
    """

    def __init__(self, path: Path, interval: float) -> None:
        self._path = path
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"store checkpoints {path.name}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Stop after the checkpoint in progress, if any (blocking: call from a worker thread)."""
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        try:
            conn = sqlite3.connect(self._path, isolation_level=None, timeout=1)
        except sqlite3.Error:
            return  # the WAL is then checkpointed when the store closes; commits go on either way
        try:
            # The first right away: it opens this connection's files now, so a
            # station's open descriptors are the same from its first run to its last.
            while True:
                try:
                    conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
                except sqlite3.Error:
                    pass  # busy or failing now: the next tick tries again, and no commit depends on it
                if self._stop.wait(self._interval):
                    break
        finally:
            conn.close()


def _json_bytes(value: Any) -> bytes:
    try:
        return orjson.dumps(value)
    except TypeError:  # a DUT's text with a lone surrogate: the json module escapes it (as phase_to_json does)
        return json.dumps(value, separators=(",", ":")).encode()


def _record_columns(r: RunRecord) -> tuple[Any, ...]:
    return (r.batch, r.serial, r.product, r.station, r.slot, r.outcome.value if r.outcome else None,
            r.started_at.isoformat(), r.ended_at.isoformat() if r.ended_at else None)


def _header_columns(data: dict[str, Any]) -> tuple[Any, ...]:
    """:func:`_record_columns` of a header as stored (the ``to_dict`` form keeps the same texts)."""
    return (data["batch"], data["dut"].get("serial"), data["product"], data["station"], data["slot"],
            data["outcome"], data["started_at"], data["ended_at"])


class _Journal:
    """The store's intake while a station writes: append-only segment files beside the database.

    Appended to by the trio thread only (one ``os.write`` per record, so a
    killed process leaves whole lines and at most one torn last line);
    segments are deleted by the copier thread once everything in them is in
    SQLite. A new segment starts past ``segment_bytes``, so a station that
    runs for weeks keeps a journal of about one segment, not one that grows.

    Why append on the trio thread, when every other blocking call goes to a
    worker thread: the append is on every phase's critical path (dependents
    wait for it), it is a copy of a few kilobytes into the page cache (the
    station log's lines are written the same way), and handing it to a
    thread and waking the slot again cost more than the write itself, at
    least twice per phase.
    """

    def __init__(self, db_path: Path, segment_bytes: int) -> None:
        self._db_path = db_path
        self._segment_bytes = segment_bytes
        existing = _journal_segments(db_path)
        #: the segment being appended to, numbered on from any already there (normally none: a station's
        #: open replays them); this journal never deletes one it did not write
        self.segment = existing[-1][0] if existing else 0
        self._fd: int | None = None
        self._size = 0
        self._open_next()
        #: segments below this one are deleted (copier thread only)
        self._released = self.segment

    def _open_next(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None  # forgotten first: a close that fails is never tried again
            os.close(fd)
        self.segment += 1
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC
        self._fd = os.open(_segment_path(self._db_path, self.segment), flags, 0o644)
        self._size = 0

    def append(self, line: bytes) -> int:
        """Append one record; return the segment it went into. ``OSError`` if the disk refuses it."""
        if self._size >= self._segment_bytes:
            self._open_next()
        assert self._fd is not None
        view = memoryview(line)
        while view:  # a regular file takes it all at once unless the disk is full, which then raises
            written = os.write(self._fd, view)
            view = view[written:]
        self._size += len(line)
        return self.segment

    def release_before(self, segment: int) -> None:
        """Delete every segment below ``segment``: all of their records are in the database (copier thread).

        A segment that cannot be deleted is left, and so is every later one,
        for the next open, which replays them harmlessly (replaying is
        idempotent).
        """
        while self._released < segment:
            try:
                _segment_path(self._db_path, self._released).unlink(missing_ok=True)
            except OSError:
                return
            self._released += 1

    def close(self, *, applied: bool) -> None:
        """Stop appending; with ``applied``, every record is in the database and the journal is deleted."""
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)
        if applied:
            self.release_before(self.segment + 1)


def _try_lock(fd: int, wait_s: float) -> bool:
    """Take the exclusive lock on ``fd``, trying for up to ``wait_s`` seconds (before any event loop runs)."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)


def _segment_path(db_path: Path, segment: int) -> Path:
    return db_path.with_name(f"{db_path.name}.journal-{segment:06d}")


def _journal_segments(db_path: Path) -> list[tuple[int, Path]]:
    """The journal segments beside ``db_path``, oldest first."""
    prefix = f"{db_path.name}.journal-"
    found = []
    for entry in db_path.parent.glob(f"{glob.escape(prefix)}*"):
        number = entry.name[len(prefix):]
        if number.isdigit():
            found.append((int(number), entry))
    return sorted(found)


def _raise_as_store_error(exc: BaseException, what: str) -> None:
    """A database or file error while opening, as the one line the CLI prints; anything else is left to raise."""
    if isinstance(exc, sqlite3.DatabaseError):
        raise StoreError(f"{what}: {exc}") from None
    if isinstance(exc, OSError):
        raise StoreError(f"{what}: {exc.strerror or exc}") from None


def connect_readonly(db_path: Path) -> sqlite3.Connection:
    """A connection that reads the store and can write nothing, working on a full disk too.

    SQLite reads a WAL database beside its shared-memory file, which a
    reader must create when no connection left one; on a full disk (or in a
    folder the reader cannot write) it cannot. With nothing in the WAL, the
    database file alone is the whole store, and it is read as an immutable
    file instead. The first query is made here, so that choice is.
    """
    uri = db_path.resolve().as_uri()
    conn = sqlite3.connect(f"{uri}?mode=ro", uri=True, check_same_thread=False, isolation_level=None, timeout=10)
    try:
        conn.execute("SELECT COUNT(*) FROM sqlite_schema").fetchone()
        return conn
    except sqlite3.OperationalError:
        conn.close()
        wal = db_path.with_name(f"{db_path.name}-wal")
        if wal.exists() and wal.stat().st_size > 0:
            raise  # committed pages there: the database file alone is not the store
    conn = sqlite3.connect(f"{uri}?mode=ro&immutable=1", uri=True, check_same_thread=False, isolation_level=None)
    conn.execute("SELECT COUNT(*) FROM sqlite_schema").fetchone()
    return conn


def _station_holds(db_path: Path) -> bool:
    """Whether a station process has the store open now (it holds the lock beside it)."""
    try:
        lock_fd = os.open(f"{db_path}.lock", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False  # no station ever opened it (or the lock cannot be read: then nothing can be said)
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        os.close(lock_fd)  # releases the shared lock, if it was taken
    return False


#: What the database says of a record it will not take (as opposed to a full disk or a locked file).
_REFUSED_RECORD = (sqlite3.IntegrityError, sqlite3.InterfaceError, sqlite3.ProgrammingError, sqlite3.DataError,
                   OverflowError, UnicodeEncodeError)


def _read_journal(paths: list[Path]) -> tuple[list[_Write], int]:
    """Every record in these segments, in order, and how many lines could not be read."""
    writes: list[_Write] = []
    damaged = 0
    for path in paths:
        data = path.read_bytes()
        for raw in data.split(b"\n")[:-1]:  # the last piece is empty, or a line whose write never finished
            try:
                write = _Write.from_line(raw.decode())
                write.check_record()
            except Exception:  # noqa: BLE001 - whatever a damaged line makes the parsers raise, it is damaged
                damaged += 1
            else:
                writes.append(write)
        if data and not data.endswith(b"\n"):
            damaged += 1
    return writes, damaged


#: ``UPDATE ... FROM`` (SQLite 3.33): the runs of a transaction get their change numbers in a few statements.
_UPDATE_FROM = sqlite3.sqlite_version_info >= (3, 33)
#: Parameters per statement: SQLite's limit before 3.32.
_MAX_PARAMETERS = 999
_INSERT_RUN = ("INSERT INTO runs (run_id, batch, serial, product, station, slot, outcome, started_at, ended_at, header,"
               " seq) VALUES")
_RUN_ROW = "(?,?,?,?,?,?,?,?,?,?,?)"


def _execute_rows(conn: sqlite3.Connection, head: str, row: str, tail: str, rows: list[tuple[Any, ...]]) -> None:
    """``head (row),(row),... tail`` for every row in ``rows``, in order, as a few multi-row statements.

    What ``executemany`` does, in a few steps instead of one per row: each
    step lets go of the GIL and takes it back, and each time it takes it
    back while a slot holds it, that slot, on its next release (its journal
    append), waits for this thread to be woken and done. Chunks are of a
    power of two rows, the largest whose parameters SQLite takes, then
    smaller powers of two: few distinct statements are ever prepared
    (sqlite3 caches them by their text).
    """
    most = 1 << ((_MAX_PARAMETERS // row.count("?")).bit_length() - 1)
    start = 0
    while start < len(rows):
        left = len(rows) - start
        size = most if left >= most else 1 << (left.bit_length() - 1)
        chunk = rows[start:start + size]
        conn.execute(f"{head} {','.join([row] * size)}{tail}", [value for r in chunk for value in r])
        start += size


class LocalStore:
    """A station's SQLite store. Open with :meth:`open`; write through :meth:`writer`."""

    def __init__(self, path: Path, conn: sqlite3.Connection, lock_fd: int | None, *, station: bool = False) -> None:
        self.path = path
        self._conn = conn
        self._lock_fd = lock_fd
        #: holds the station lock: the only kind of store that takes writes
        self.station = station
        self._lock = threading.Lock()  # the connection is shared by the copier thread and readers
        #: runs found open (and marked INTERRUPTED) when the store was opened
        self.interrupted_on_open = 0
        #: records a dead station had journalled but not yet copied, replayed into the database on open
        self.replayed_on_open = 0
        #: journal lines that could not be restored on open (a torn write; a record whose run's beginning was lost)
        self.damaged_on_open = 0
        #: opened read-only while no station holds the store: records the last one left in its journal, and
        #: runs it left open (restored, and marked INTERRUPTED, at the next station start)
        self.unrestored = 0
        self.left_open = 0
        #: how often the WAL is checkpointed while a writer runs (see :class:`_Checkpointer`)
        self.checkpoint_interval_s = CHECKPOINT_INTERVAL_S
        #: journal segment size (see :class:`_Journal`)
        self.journal_segment_bytes = JOURNAL_SEGMENT_BYTES
        #: how often the copier thread moves journalled records into SQLite
        self.copy_interval_s = COPY_INTERVAL_S
        #: journalled and not yet copied, oldest first (appended on the trio thread, taken by the copier)
        self._pending: collections.deque[tuple[int, _Write]] | None = None
        self._journal: _Journal | None = None
        #: runs begun and not finished by this writer (trio thread): a write for any other run is refused
        self._open_runs: set[str] = set()
        #: why the database refused a transaction (set by the copier thread); every later write is refused
        self._failure: BaseException | None = None
        self._failure_told = False
        #: the writer's block has ended and its last copy is under way: writes are refused (trio thread)
        self._closing = False
        #: identity last written for each run this process has open (copier thread only)
        self._open_duts: dict[str, dict[str, str]] = {}
        #: the last change number written (copier thread only; read once, then kept: one writer per store)
        self._seq: int | None = None
        #: the epoch this store's changes are numbered in (see the module docstring); 0 until its first recovery
        self.epoch = 0

    @classmethod
    def open(cls, path: str | Path, *, station: bool = False) -> LocalStore:
        """Open (creating if needed) and recover what a dead station left behind.

        A station (``station=True``) holds an exclusive lock beside the
        database for as long as the store is open, so a second station on the
        same store is refused. Blocking: a station's open waits up to
        :data:`STATION_LOCK_WAIT_S` for a reader's moment on the lock, so call
        it before the event loop starts (as ``sequencer run`` does) or from a
        worker thread. Recovery happens only when no station holds
        that lock: records left in the journal are replayed into the
        database, then runs left open become INTERRUPTED. A report opened
        while a station is testing must not declare its runs dead, nor copy
        its journal behind its back.
        """
        p = Path(path)
        lock_fd = None
        conn = None
        try:
            p.parent.mkdir(parents=True, exist_ok=True)
            lock_fd = os.open(f"{p}.lock", os.O_RDWR | os.O_CREAT, 0o644)
            # A reader holds the lock too, for a moment (longer while it
            # replays a dead station's journal): a station waits that out.
            locked = _try_lock(lock_fd, STATION_LOCK_WAIT_S if station else 0.0)
            if station and not locked:
                raise StoreError(f"{p}: the store is in use by another station process")
            conn = sqlite3.connect(p, check_same_thread=False, isolation_level=None, timeout=10)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA foreign_keys=ON")
            conn.executescript(_SCHEMA)
            row = conn.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
            if row is None:
                conn.execute("INSERT INTO meta VALUES ('schema', ?)", (str(STORE_SCHEMA),))
            elif int(row[0]) != STORE_SCHEMA:
                raise StoreError(f"{p}: store schema {row[0]} is not supported (expected {STORE_SCHEMA})")
            store = cls(p, conn, lock_fd, station=station)
            row = conn.execute("SELECT value FROM meta WHERE key='epoch'").fetchone()
            store.epoch = int(row[0]) if row else 0
            if locked:
                store._recover()
            if not station and locked:
                fcntl.flock(lock_fd, fcntl.LOCK_UN)
        except BaseException as exc:
            if conn is not None:
                conn.close()
            if lock_fd is not None:
                os.close(lock_fd)
            _raise_as_store_error(exc, f"{p}: cannot open the local store")
            raise
        return store

    @classmethod
    def open_readonly(cls, path: str | Path) -> LocalStore:
        """Open an existing store to read it, writing nothing: what ``runs``, ``report``, ``export`` and ``find`` use.

        Why not :meth:`open`: it may write (the schema, a dead station's
        journal replayed, its open runs marked INTERRUPTED), so on a full
        disk even listing the runs failed. Here nothing is written, not even
        the lock file. A dead station's journal stays for the next station
        start to restore, and its open runs show as still running until then
        (:attr:`unrestored` and :attr:`left_open` say how many).

        See :func:`connect_readonly` for how SQLite is made to read a full disk.
        """
        p = Path(path)
        if not p.is_file():
            raise StoreError(f"{p}: no local store here")
        conn = None
        try:
            conn = connect_readonly(p)
            row = conn.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
            if row is None or int(row[0]) != STORE_SCHEMA:
                raise StoreError(f"{p}: store schema {row[0] if row else None} is not supported "
                                 f"(expected {STORE_SCHEMA})")
            store = cls(p, conn, None)
            if not _station_holds(p):
                store.unrestored = sum(path.read_bytes().count(b"\n") for _, path in _journal_segments(p))
                store.left_open = conn.execute("SELECT COUNT(*) FROM runs WHERE outcome IS NULL").fetchone()[0]
        except BaseException as exc:
            if conn is not None:
                conn.close()
            _raise_as_store_error(exc, f"{p}: cannot read the local store")
            raise
        return store

    def _recover(self) -> None:
        """Replay a dead station's journal, then mark its open runs INTERRUPTED, in a new epoch (lock held).

        A station that did not close the store left a journal or open runs.
        What it wrote last may be lost (a power cut), or the whole file may
        be an older copy put back: either way changes it numbered may
        already be in MongoDB under numbers the store would hand out again.
        A new epoch makes everything from here on sort after them.
        """
        segments = _journal_segments(self.path)
        left_open = self._conn.execute("SELECT EXISTS (SELECT 1 FROM runs WHERE outcome IS NULL)").fetchone()[0]
        if segments or left_open:
            self.epoch = _next_epoch(self.epoch)
            self._conn.execute("INSERT OR REPLACE INTO meta VALUES ('epoch', ?)", (str(self.epoch),))
            self._seq = None
        if segments:
            writes, damaged = _read_journal([path for _, path in segments])
            refused = 0
            # Replaying is idempotent: a record already copied before the
            # station died is written again with the same content.
            try:
                self._write_batch(writes)
            except _REFUSED_RECORD:
                # A record the database refuses (its run's beginning was in a
                # line that was lost): keep every other one. A second pass
                # takes the phases of a run that only a later line restored.
                # Any other error (a full disk, a locked database) ends the
                # open with the journal kept.
                left = writes
                for _ in range(2):
                    refused_now = []
                    for w in left:
                        try:
                            self._write_batch([w])
                        except _REFUSED_RECORD:
                            refused_now.append(w)
                    left = refused_now
                refused = len(left)
            for _, path in segments:
                path.unlink(missing_ok=True)
            self.replayed_on_open = len(writes) - refused
            self.damaged_on_open = damaged + refused
            self._open_duts.clear()
        self.interrupted_on_open = _mark_interrupted(self._conn, self.epoch)
        self._seq = None  # marking took change numbers of its own

    def close(self) -> None:
        with self._lock:
            self._conn.close()
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the station lock
            self._lock_fd = None

    # -- writing ---------------------------------------------------------

    @asynccontextmanager
    async def writer(self) -> AsyncIterator[LocalStore]:
        """Journal writes, and run the thread that copies them into SQLite, for the duration of the block.

        Why a thread of its own rather than ``trio.to_thread.run_sync`` per
        transaction: nobody waits for a transaction, so there is nothing for
        a task to await; the thread takes whatever was journalled since its
        last transaction into the next one, in the order it was journalled.
        While it runs, the WAL is copied back into the database by a
        :class:`_Checkpointer` of its own, not by the commits.

        On exit, including cancellation and an abort, everything journalled
        is still copied before the block ends: the wait is shielded, because
        a station's records are what it must never lose. Writes made after
        the block has ended (by a task that outlived it) are refused. If the
        database refused a transaction that nobody has been told of yet, the
        exit raises :class:`StoreError` (when the block itself raised, its
        own exception goes on); either way the journal keeps every record
        for the next open to replay, and this store takes no more writes.
        """
        if self._pending is not None:
            raise RuntimeError(f"{self.path}: the store already has a writer")
        if self._failure is not None:
            # What was refused is still in the journal, for the next open to
            # replay; a new writer on this store would copy around it.
            raise self._refusal()
        if not self.station:
            # Its journal would sit beside a live station's, and nobody would replay it.
            raise RuntimeError(f"{self.path}: only a station's store takes writes (LocalStore.open(..., station=True))")
        try:
            journal = _Journal(self.path, self.journal_segment_bytes)
        except OSError as exc:
            raise StoreError(f"{self.path}: cannot start the store's journal: {exc.strerror or exc}") from None
        with self._lock:
            self._conn.execute("PRAGMA wal_autocheckpoint=0")
        checkpointer = _Checkpointer(self.path, self.checkpoint_interval_s)
        checkpointer.start()
        pending: collections.deque[tuple[int, _Write]] = collections.deque()
        stop = threading.Event()
        thread = threading.Thread(
            target=self._copy_thread, args=(pending, stop, journal), name=f"store copier {self.path.name}",
            daemon=True,
        )
        thread.start()
        self._pending, self._journal = pending, journal
        try:
            yield self
        finally:
            # From here on every write is refused: one journalled after the
            # copier's last round would be deleted with the journal.
            self._closing = True
            # Asked to stop after every journalled write, the copier takes
            # them all in its last round: when it ends each has been copied
            # (or refused).
            with trio.CancelScope(shield=True):
                stop.set()

                def join_threads() -> None:
                    thread.join()
                    checkpointer.stop()  # after the checkpoint in progress, if any

                await trio.to_thread.run_sync(join_threads)
            self._pending, self._journal, self._closing = None, None, False
            self._open_runs.clear()
            journal.close(applied=self._failure is None)
            with self._lock:
                self._conn.execute(f"PRAGMA wal_autocheckpoint={SQLITE_AUTOCHECKPOINT_PAGES}")
        if self._failure is not None and not self._failure_told:
            raise self._refusal()

    # The three writes are async for the engine's RecordWriter protocol, but
    # they never yield: see commit_phase.

    async def begin_run(self, run: RunRecord) -> None:
        self._append(_Write.begin(run))
        self._open_runs.add(run.run_id)

    async def commit_phase(self, run_id: str, index: int, phase: PhaseRecord, dut: dict[str, str]) -> None:
        """Make a phase's record durable; on return it survives the station being killed.

        Not a schedule point, so never ``Cancelled``: a record written is
        never reported as lost, and an abort lands at the caller's next
        checkpoint (the engine has one after every commit). Not yielding
        also lets a slot go straight on to its next phase: when a yield
        here put each slot behind every other slot's commit, sixteen slots
        woken together took most of a millisecond more per phase.
        """
        self._check_open(run_id)
        self._append(_Write.phase(run_id, index, phase, dut))

    async def finish_run(self, run: RunRecord) -> None:
        self._check_open(run.run_id)
        self._append(_Write.finish(run))
        self._open_runs.discard(run.run_id)

    def _check_open(self, run_id: str) -> None:
        if self._pending is not None and run_id not in self._open_runs:
            raise StoreError(f"{self.path}: write failed: run {run_id!r} is not open (never begun, or finished)")

    def _append(self, write: _Write) -> None:
        """Journal ``write`` and queue it for the database (trio thread)."""
        if self._pending is None or self._journal is None:
            raise RuntimeError(f"{self.path}: writing needs `async with store.writer():`")
        if self._closing:
            raise StoreError(f"{self.path}: write refused: the store's writer is closing")
        if self._failure is not None:
            raise self._refusal()
        try:
            segment = self._journal.append(write.line())
        except OSError as exc:
            # A line the disk took only part of would run into the next
            # one: after a refused append, nothing more is appended.
            self._failure = exc
            raise self._refusal() from None
        self._pending.append((segment, write))

    def _refusal(self) -> StoreError:
        self._failure_told = True
        exc = self._failure
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        return StoreError(f"{self.path}: write failed: {reason}")

    def _copy_thread(self, pending: collections.deque[tuple[int, _Write]], stop: threading.Event,
                     journal: _Journal) -> None:
        """The copier: every ``copy_interval_s``, one transaction with everything journalled since the last.

        On a timer rather than woken by each record: a thread woken per
        record competes with the slots for the GIL at every record (each
        hand-over costs more than the append it follows), and nobody waits
        for the copy.
        """
        try:
            self._copy_rounds(pending, stop, journal)
        except BaseException as exc:  # noqa: BLE001
            # A copier that died quietly would leave records uncopied, and the
            # writer's exit would then delete the journal that holds them.
            if self._failure is None:
                self._failure = exc

    def _copy_rounds(self, pending: collections.deque[tuple[int, _Write]], stop: threading.Event,
                     journal: _Journal) -> None:
        while True:
            stopping = stop.wait(self.copy_interval_s)  # set after the last append, so this round takes it
            queued = [pending.popleft() for _ in range(len(pending))]
            if queued and self._failure is None:
                try:
                    self._write_batch([w for _, w in queued])
                except BaseException as exc:  # noqa: BLE001 - told to the next writer, and at the writer's exit
                    # Nothing more is copied (the records after a missing one
                    # could not all be written); the journal keeps them all.
                    # A refused append may have come first: that one is what
                    # the slots were told.
                    if self._failure is None:
                        self._failure = exc
                else:
                    # Writes are copied in journal order: every segment
                    # before the newest one seen here is in the database.
                    journal.release_before(queued[-1][0])
            if stopping:
                return

    def _write_batch(self, writes: list[_Write]) -> None:
        """Copy ``writes`` (in journal order) into the database in one transaction.

        A run's row changes with every write (its change number, and its
        header when the identity changed), but only its state at the end of
        the transaction matters: the phases go in with a few multi-row
        statements (see :func:`_execute_rows`), and each run still open is
        updated once. This keeps the copier's Python work, and so its share
        of the GIL the slots run under, small.
        """
        # Identity as this transaction leaves it; kept only once it commits,
        # so a rolled-back batch cannot make the cache claim a header that
        # was never written (the next phase would then skip rewriting it).
        duts: dict[str, dict[str, str] | None] = {}
        phase_rows: list[tuple[str, int, str, str, str]] = []
        #: runs whose last write here was a phase: their last change number and identity
        touched: dict[str, tuple[int, dict[str, str]]] = {}
        begun: list[tuple[Any, ...]] = []
        finished: list[tuple[Any, ...]] = []
        with self._lock, self._transaction() as conn:
            if self._seq is None:
                self._seq = _last_seq(conn, self.epoch)
            seq = self._seq
            for w in writes:
                seq += 1
                if w.kind == "phase":
                    phase_rows.append((w.run_id, w.index, w.name, w.outcome, w.record))
                    touched[w.run_id] = (seq, w.dut)
                elif w.kind == "begin":
                    batch, serial, product, station, slot, _, started_at, _ = w.columns
                    begun.append((w.run_id, batch, serial, product, station, slot, None, started_at, None, w.header,
                                  seq))
                    duts[w.run_id] = dict(w.dut)
                else:
                    finished.append((w.run_id, *w.columns, w.header, seq))
                    touched.pop(w.run_id, None)  # the finished header has the final identity
                    duts[w.run_id] = None  # finished: no longer open
            # A run's beginning comes before its end in the journal, and both
            # before its phases need its row: begun, then finished, then phases.
            # A replayed journal may hold the beginning of a run the database
            # already has: what follows it brings it up to date.
            _execute_rows(conn, _INSERT_RUN, _RUN_ROW, " ON CONFLICT (run_id) DO NOTHING", begun)
            # An insert only when replaying a journal that lost the run's
            # beginning: the finish carries the whole header.
            _execute_rows(conn, _INSERT_RUN, _RUN_ROW,
                          " ON CONFLICT (run_id) DO UPDATE SET outcome=excluded.outcome, ended_at=excluded.ended_at,"
                          " serial=excluded.serial, header=excluded.header, seq=excluded.seq", finished)
            _execute_rows(conn, "INSERT OR REPLACE INTO phases (run_id, idx, name, outcome, record) VALUES",
                          "(?,?,?,?,?)", "", phase_rows)
            unchanged = []
            for run_id, (run_seq, dut) in touched.items():
                last = duts[run_id] if run_id in duts else self._open_duts.get(run_id)
                if last == dut:
                    unchanged.append((run_seq, run_id))
                    continue
                # Identity changes a few times per run: rewrite the header only then.
                header = conn.execute("SELECT header FROM runs WHERE run_id=?", (run_id,)).fetchone()
                data = json.loads(header[0])
                data["dut"] = dut
                conn.execute(
                    "UPDATE runs SET header=?, serial=?, seq=? WHERE run_id=?",
                    (json.dumps(data, separators=(",", ":")), dut.get("serial"), run_seq, run_id),
                )
                duts[run_id] = dict(dut)
            if _UPDATE_FROM:
                _execute_rows(conn, "UPDATE runs SET seq=v.column1 FROM (VALUES", "(?,?)",
                              ") AS v WHERE runs.run_id=v.column2", unchanged)
            else:
                conn.executemany("UPDATE runs SET seq=? WHERE run_id=?", unchanged)
        # Committed: the change numbers are taken, the identities written.
        self._seq = seq
        for run_id, dut in duts.items():
            if dut is None:
                self._open_duts.pop(run_id, None)
            else:
                self._open_duts[run_id] = dut

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            yield self._conn
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise
        self._conn.execute("COMMIT")

    # -- reading ---------------------------------------------------------

    def get_run(self, run_id: str) -> RunRecord | None:
        with self._lock:
            row = self._conn.execute("SELECT header FROM runs WHERE run_id=?", (run_id,)).fetchone()
            if row is None:
                return None
            return self._assemble(row[0], run_id)

    def find_runs(
        self,
        *,
        batch: str | None = None,
        serial: str | None = None,
        outcome: Outcome | str | None = None,
        run_id_prefix: str | None = None,
        since: dt.datetime | None = None,
        until: dt.datetime | None = None,
        limit: int | None = None,
        last: int | None = None,
        product: str | None = None,
        station: str | None = None,
    ) -> list[RunRecord]:
        """Runs matching every given filter, oldest first.

        ``since``/``until`` bound the start time (at or after, before).
        ``limit`` keeps the oldest ``limit`` of them, ``last`` the most recent
        ``last`` (still listed oldest first).
        """
        where, args = self._where(batch=batch, serial=serial, outcome=outcome, run_id_prefix=run_id_prefix,
                                  since=since, until=until, product=product, station=station)
        sql = f"SELECT run_id, header FROM runs {where} ORDER BY started_at, run_id"
        if last is not None:
            sql = (f"SELECT * FROM (SELECT run_id, header, started_at FROM runs {where}"
                   f" ORDER BY started_at DESC, run_id DESC LIMIT {int(last)}) ORDER BY started_at, run_id")
        elif limit is not None:
            sql += f" LIMIT {int(limit)}"
        with self._lock:
            rows = self._conn.execute(sql, args).fetchall()
            return [self._assemble(row[1], row[0]) for row in rows]

    def iter_runs(
        self,
        *,
        batch: str | None = None,
        serial: str | None = None,
        outcome: Outcome | str | None = None,
        since: dt.datetime | None = None,
        until: dt.datetime | None = None,
        product: str | None = None,
        station: str | None = None,
        phases: bool = True,
        page: int = 200,
    ) -> Iterator[RunRecord]:
        """:meth:`find_runs`'s runs, oldest first, read ``page`` runs at a time.

        What a report reads a batch or a period with, however many runs it
        has: only a page of runs is in memory, and the store's lock is held
        for one page at a time (a station goes on writing in between). Without
        ``phases`` each run is its header (identity, outcome, where and when).
        """
        where, args = self._where(batch=batch, serial=serial, outcome=outcome, run_id_prefix=None, since=since,
                                  until=until, product=product, station=station)
        after: tuple[str, str] | None = None
        while True:
            clause = where
            if after is not None:
                clause = f"{where} AND (started_at, run_id) > (?, ?)" if where else "WHERE (started_at, run_id) > (?, ?)"
            sql = f"SELECT run_id, header, started_at FROM runs {clause} ORDER BY started_at, run_id LIMIT {int(page)}"
            with self._lock:
                rows = self._conn.execute(sql, [*args, *(after or ())]).fetchall()
                runs = (self._assemble_page([(run_id, header) for run_id, header, _ in rows]) if phases
                        else [run_from_json(header) for _, header, _ in rows])
            if len(rows) < page:
                yield from runs
                return
            after = (rows[-1][2], rows[-1][0])
            yield from runs
            # dropped before the next page is read, so no more than a page of runs is ever held
            del runs, rows

    def find_runs_by_identity(self, key: str, value: str, *, limit: int = 1000) -> list[RunRecord]:
        """The runs whose ``dut[key]`` is ``value`` (a MAC in any spelling), oldest first, at most ``limit``.

        What ``find`` starts from: a MAC seen only in runs that never learnt
        their serial still finds them.
        """
        if key == "serial":
            clause, args = "serial = ?", [value]
        elif key.replace("_", "").isalnum() and key.isascii():
            column = f"json_extract(header, '$.dut.{key}')"
            if key.endswith("mac"):
                column = f"lower(replace(replace(replace({column}, ':', ''), '-', ''), '.', ''))"
            clause, args = f"{column} = ?", [normal_value(key, value)]
        else:
            return []
        sql = f"SELECT run_id, header FROM runs WHERE {clause} ORDER BY started_at, run_id LIMIT {int(limit)}"
        with self._lock:
            rows = self._conn.execute(sql, args).fetchall()
            return [self._assemble(row[1], row[0]) for row in rows]

    def find_runs_by_identities(self, pairs: Sequence[tuple[str, str]], *, limit: int = 1000) -> list[RunRecord]:
        """The runs whose ``dut[key]`` is ``value`` for any of ``pairs``, oldest first, at most ``limit``."""
        found: dict[str, RunRecord] = {}
        for key, value in pairs:
            for r in self.find_runs_by_identity(key, value, limit=limit):
                found.setdefault(r.run_id, r)
        return sorted(found.values(), key=lambda r: (r.started_at, r.run_id))[:limit]

    def outcome_counts(
        self,
        *,
        batch: str | None = None,
        serial: str | None = None,
        outcome: Outcome | str | None = None,
        since: dt.datetime | None = None,
        until: dt.datetime | None = None,
    ) -> dict[str, int]:
        """How many runs matching every given filter ended each way (``RUNNING``: not ended), most first."""
        where, args = self._where(batch=batch, serial=serial, outcome=outcome, run_id_prefix=None, since=since,
                                  until=until)
        with self._lock:
            rows = self._conn.execute(
                f"SELECT COALESCE(outcome, 'RUNNING'), COUNT(*) FROM runs {where} GROUP BY 1 ORDER BY 2 DESC, 1",
                args,
            ).fetchall()
        return {name: int(n) for name, n in rows}

    @staticmethod
    def _where(
        *,
        batch: str | None,
        serial: str | None,
        outcome: Outcome | str | None,
        run_id_prefix: str | None,
        since: dt.datetime | None = None,
        until: dt.datetime | None = None,
        product: str | None = None,
        station: str | None = None,
    ) -> tuple[str, list[str]]:
        # Start times are stored as UTC ISO text, which sorts as the times do.
        given = (("product = ?", product), ("station = ?", station),
                 ("started_at >= ?", None if since is None else _utc_text(since)),
                 ("started_at < ?", None if until is None else _utc_text(until)),
                 ("batch = ?", batch), ("serial = ?", serial),
                 ("outcome = ?", None if outcome is None else Outcome(outcome).value))
        clauses = [clause for clause, value in given if value is not None]
        args = [value for _, value in given if value is not None]
        if run_id_prefix is not None:
            clauses.append("run_id LIKE ? ESCAPE '\\'")
            args.append(run_id_prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%")
        return (f"WHERE {' AND '.join(clauses)}" if clauses else ""), args

    def batches(self) -> list[tuple[str, int]]:
        """Each batch with its number of runs, most recent first."""
        with self._lock:
            return self._conn.execute(
                "SELECT batch, COUNT(*) FROM runs GROUP BY batch ORDER BY MAX(started_at) DESC"
            ).fetchall()

    def _assemble_page(self, rows: Sequence[tuple[str, str]]) -> list[RunRecord]:
        """:meth:`_assemble` for each of ``rows`` (run id, header), their phases read in one query."""
        if not rows:
            return []
        marks = ",".join("?" * len(rows))
        records: dict[str, list[str]] = {run_id: [] for run_id, _ in rows}
        for run_id, record in self._conn.execute(
                f"SELECT run_id, record FROM phases WHERE run_id IN ({marks}) ORDER BY run_id, idx",
                [run_id for run_id, _ in rows]):
            records[run_id].append(record)
        return [attrs.evolve(run_from_json(header),
                             phases=tuple(from_dict(json_loads(r), PhaseRecord) for r in records[run_id]))
                for run_id, header in rows]

    def _assemble(self, header: str, run_id: str) -> RunRecord:
        [run] = self._assemble_page([(run_id, header)])
        return run

    def iter_changes(self, after_seq: int, limit: int = 500) -> list[tuple[int, RunRecord]]:
        """Runs changed since ``after_seq`` with their change number, for shipping elsewhere."""
        with self._lock:
            rows = self._conn.execute(
                "SELECT seq, run_id, header FROM runs WHERE seq > ? ORDER BY seq LIMIT ?", (after_seq, limit)
            ).fetchall()
            return [(seq, self._assemble(header, run_id)) for seq, run_id, header in rows]


def _utc_text(when: dt.datetime) -> str:
    """``when`` as the store writes start times (``isoformat`` in UTC), for comparing with them."""
    aware = when.replace(tzinfo=dt.timezone.utc) if when.tzinfo is None else when.astimezone(dt.timezone.utc)
    return aware.isoformat()


def _last_seq(conn: sqlite3.Connection, epoch: int) -> int:
    """The change number the next change follows: the last one taken, or the start of ``epoch`` if later."""
    last = conn.execute("SELECT COALESCE(MAX(seq), 0) FROM runs").fetchone()[0]
    return max(last, epoch << EPOCH_SHIFT)


def _mark_interrupted(conn: sqlite3.Connection, epoch: int) -> int:
    rows = conn.execute("SELECT run_id, header FROM runs WHERE outcome IS NULL").fetchall()
    if not rows:
        return 0
    now = utcnow()
    conn.execute("BEGIN IMMEDIATE")
    seq = _last_seq(conn, epoch)
    for run_id, header in rows:
        seq += 1
        data: dict[str, Any] = json.loads(header)
        data["outcome"] = Outcome.INTERRUPTED.value
        data["ended_at"] = now.isoformat()
        conn.execute(
            "UPDATE runs SET outcome=?, ended_at=?, header=?, seq=? WHERE run_id=?",
            (Outcome.INTERRUPTED.value, now.isoformat(), json.dumps(data, separators=(",", ":")), seq, run_id),
        )
    conn.execute("COMMIT")
    return len(rows)


# -- raw change feed (for the MongoDB shipper; added with reports/storage/shipper.py) ------
#
# The shipper turns each changed run into a MongoDB document, re-sending an
# open run as each phase lands. Going through RunRecord (cattrs structuring
# every measurement) and back to a mapping was about two thirds of its CPU,
# taken from the GIL the slots run under; so it reads the stored JSON text
# (the ``to_dict`` form) and converts each phase once, however often the run
# is re-sent. One statement, so one consistent snapshot of the WAL.


def iter_change_rows(store: LocalStore, after_seq: int, limit: int = 500) -> list[tuple[int, str, list[str]]]:
    """Like :meth:`LocalStore.iter_changes`, but each run as its stored JSON: (seq, header, [phase, ...])."""
    with store._lock:
        rows = store._conn.execute(
            "SELECT r.seq, r.header, p.record FROM"
            " (SELECT seq, run_id, header FROM runs WHERE seq > ? ORDER BY seq LIMIT ?) AS r"
            " LEFT JOIN phases AS p ON p.run_id = r.run_id ORDER BY r.seq, p.idx",
            (after_seq, limit),
        ).fetchall()
    out: list[tuple[int, str, list[str]]] = []
    for seq, header, record in rows:
        if not out or out[-1][0] != seq:
            out.append((seq, header, []))
        if record is not None:
            out[-1][2].append(record)
    return out
