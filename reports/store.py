"""The local store: SQLite in WAL mode, the station's source of truth.

Durability rule: a phase's record is committed before its slot moves on. With
many slots that means many small transactions, so writes go through one
writer thread that *group-commits*: every record queued while the previous
transaction ran goes into the next one, and each slot waits only for the
transaction holding its own record. A slot never waits on a disk flush per
phase, and 256 slots cost a few transactions per phase boundary, not 256.

WAL with ``synchronous=NORMAL`` survives the station process being killed at
any point (the data is in the OS); only a power loss can drop the last few
transactions. Runs a killed process left open are marked ``INTERRUPTED`` when
the store is next opened.

Reads are synchronous and meant for the CLI and reports (the station itself
never reads back during a run).
"""

from __future__ import annotations

import datetime as dt
import fcntl
import json
import os
import queue
import sqlite3
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import attrs
import trio

from sequencer.records import (
    Outcome,
    PhaseRecord,
    RunRecord,
    from_dict,
    phase_to_json,
    run_from_json,
    to_dict,
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
"""


#: How often a station's WAL is copied back into the database (see :class:`_Checkpointer`).
CHECKPOINT_INTERVAL_S = 1.0
#: SQLite's own default, restored for readers when the writer stops.
SQLITE_AUTOCHECKPOINT_PAGES = 1000


class StoreError(Exception):
    """The store cannot be opened or used; the message names the file."""


@attrs.frozen
class _Write:
    kind: str  # "begin" | "phase" | "finish"
    run: RunRecord | None = None
    run_id: str = ""
    index: int = 0
    phase: PhaseRecord | None = None
    dut: dict[str, str] | None = None


@attrs.define(eq=False)
class _Pending:
    """A write handed to the writer thread, and the task waiting for its transaction."""

    write: _Write | None  # None asks the writer thread to stop
    task: trio.lowlevel.Task = attrs.field(factory=trio.lowlevel.current_task)
    error: BaseException | None = None

    async def wait(self) -> None:
        """Wait, uncancellably, until the writer thread has answered.

        A write that is queued is written even if the waiting task is
        cancelled meanwhile; refusing the abort keeps the caller's
        "committed" promise true when it returns after an abort, and the
        cancellation is delivered at the caller's next checkpoint instead.
        This is what a shielded ``Event.wait`` would do, without a cancel
        scope and an event per phase: this wait is on every phase's path.
        """
        await trio.lowlevel.wait_task_rescheduled(lambda _: trio.lowlevel.Abort.FAILED)


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
            while not self._stop.wait(self._interval):
                try:
                    conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
                except sqlite3.Error:
                    pass  # busy or failing now: the next tick tries again, and no commit depends on it
        finally:
            conn.close()


def _answer(batch: list[_Pending]) -> None:
    """Wake every task waiting on ``batch`` (on the trio thread)."""
    for p in batch:
        trio.lowlevel.reschedule(p.task)


def _header_json(run: RunRecord) -> str:
    data = to_dict(attrs.evolve(run, phases=()))
    return json.dumps(data, separators=(",", ":"))


class LocalStore:
    """A station's SQLite store. Open with :meth:`open`; write through :meth:`writer`."""

    def __init__(self, path: Path, conn: sqlite3.Connection, interrupted: int, lock_fd: int | None) -> None:
        self.path = path
        self._conn = conn
        self._lock_fd = lock_fd
        self._lock = threading.Lock()  # the connection is shared by the writer thread and readers
        #: runs found open (and marked INTERRUPTED) when the store was opened
        self.interrupted_on_open = interrupted
        self._inbox: queue.SimpleQueue[_Pending] | None = None
        #: identity last written for each run this process has open (writer thread only)
        self._open_duts: dict[str, dict[str, str]] = {}
        #: how often the WAL is checkpointed while a writer runs (see :class:`_Checkpointer`)
        self.checkpoint_interval_s = CHECKPOINT_INTERVAL_S
        #: the last change number written (writer thread only; read once, then kept: one writer per store)
        self._seq: int | None = None

    @classmethod
    def open(cls, path: str | Path, *, station: bool = False) -> LocalStore:
        """Open (creating if needed) and recover runs a dead station left open.

        A station (``station=True``) holds an exclusive lock beside the
        database for as long as the store is open, so a second station on the
        same store is refused. Recovery (open runs become INTERRUPTED) happens
        only when no station holds that lock: a report opened while a station
        is testing must not declare its runs dead.
        """
        p = Path(path)
        lock_fd = None
        try:
            p.parent.mkdir(parents=True, exist_ok=True)
            lock_fd = os.open(f"{p}.lock", os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                locked = True
            except BlockingIOError:
                locked = False
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
            interrupted = _mark_interrupted(conn) if locked else 0
            if not station and locked:
                fcntl.flock(lock_fd, fcntl.LOCK_UN)
        except BaseException as exc:
            if lock_fd is not None:
                os.close(lock_fd)
            if isinstance(exc, sqlite3.DatabaseError):
                raise StoreError(f"{p}: cannot open the local store: {exc}") from None
            if isinstance(exc, OSError):
                raise StoreError(f"{p}: cannot open the local store: {exc.strerror or exc}") from None
            raise
        return cls(p, conn, interrupted, lock_fd)

    def close(self) -> None:
        with self._lock:
            self._conn.close()
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the station lock
            self._lock_fd = None

    # -- writing ---------------------------------------------------------

    @asynccontextmanager
    async def writer(self) -> AsyncIterator[LocalStore]:
        """Run the store's writer thread for the duration of the block.

        Why a thread of its own rather than ``trio.to_thread.run_sync`` per
        transaction: a commit is on every slot's critical path (dependents
        wait for it), and handing a record to a thread already waiting on its
        queue takes about half the time of a round trip through trio's thread
        pool, with no task in between to feed the pool. One long-lived thread
        also writes the transactions in the order they were queued.

        While it runs, the WAL is copied back into the database by a
        :class:`_Checkpointer` of its own, not by the commits.

        On exit — including cancellation, and an abort — everything queued
        is still written: the wait for the writer to drain is shielded,
        because losing records on Ctrl-C is the one thing a station must
        never do.
        """
        if self._inbox is not None:
            raise RuntimeError(f"{self.path}: the store already has a writer")
        with self._lock:
            self._conn.execute("PRAGMA wal_autocheckpoint=0")
        checkpointer = _Checkpointer(self.path, self.checkpoint_interval_s)
        checkpointer.start()
        inbox: queue.SimpleQueue[_Pending] = queue.SimpleQueue()
        thread = threading.Thread(
            target=self._write_thread,
            args=(inbox, trio.lowlevel.current_trio_token()),
            name=f"store writer {self.path.name}",
            daemon=True,
        )
        thread.start()
        self._inbox = inbox
        try:
            yield self
        finally:
            # Slots cancelled by an abort still wait (uncancellably) for the
            # commits they queued; the stop request queues behind them, so
            # when it is answered every one of them has been written.
            with trio.CancelScope(shield=True):
                stop = _Pending(None)
                inbox.put(stop)
                await stop.wait()
                self._inbox = None

                def join_threads() -> None:
                    thread.join()  # returns right after answering the stop
                    checkpointer.stop()  # after the checkpoint in progress, if any

                await trio.to_thread.run_sync(join_threads)
            with self._lock:
                self._conn.execute(f"PRAGMA wal_autocheckpoint={SQLITE_AUTOCHECKPOINT_PAGES}")

    async def begin_run(self, run: RunRecord) -> None:
        await self._submit(_Write("begin", run=run))

    async def commit_phase(self, run_id: str, index: int, phase: PhaseRecord, dut: dict[str, str]) -> None:
        await self._submit(_Write("phase", run_id=run_id, index=index, phase=phase, dut=dut))

    async def finish_run(self, run: RunRecord) -> None:
        await self._submit(_Write("finish", run=run))

    async def _submit(self, write: _Write) -> None:
        if self._inbox is None:
            raise RuntimeError(f"{self.path}: writing needs `async with store.writer():`")
        pending = _Pending(write)
        self._inbox.put(pending)
        await pending.wait()
        if pending.error is not None:
            raise StoreError(f"{self.path}: write failed: {pending.error}") from pending.error

    def _write_thread(self, inbox: queue.SimpleQueue[_Pending], token: trio.lowlevel.TrioToken) -> None:
        """The writer: each transaction takes everything queued while the last one ran."""
        while True:
            batch = [inbox.get()]
            while True:
                try:
                    batch.append(inbox.get_nowait())
                except queue.Empty:
                    break
            writes = [p.write for p in batch if p.write is not None]
            error: BaseException | None = None
            if writes:
                try:
                    self._write_batch(writes)
                except BaseException as exc:  # noqa: BLE001 - every waiter must hear how its write ended
                    error = exc
            for p in batch:
                p.error = error
            # The stop request is answered last, so nothing queued is left behind.
            token.run_sync_soon(_answer, batch)
            if any(p.write is None for p in batch):
                return

    def _write_batch(self, writes: list[_Write]) -> None:
        # Identity as this transaction leaves it; kept only once it commits,
        # so a rolled-back batch cannot make the cache claim a header that
        # was never written (the next phase would then skip rewriting it).
        duts: dict[str, dict[str, str] | None] = {}

        def last_dut(run_id: str) -> dict[str, str] | None:
            return duts[run_id] if run_id in duts else self._open_duts.get(run_id)

        with self._lock, self._transaction() as conn:
            if self._seq is None:
                self._seq = conn.execute("SELECT COALESCE(MAX(seq), 0) FROM runs").fetchone()[0]
            seq = self._seq
            for w in writes:
                seq += 1
                if w.kind == "begin":
                    assert w.run is not None
                    r = w.run
                    conn.execute(
                        "INSERT INTO runs (run_id, batch, serial, product, station, slot, outcome, started_at,"
                        " ended_at, header, seq) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                        (r.run_id, r.batch, r.serial, r.product, r.station, r.slot, None,
                         r.started_at.isoformat(), None, _header_json(r), seq),
                    )
                    duts[r.run_id] = dict(r.dut)
                elif w.kind == "phase":
                    assert w.phase is not None and w.dut is not None
                    conn.execute(
                        "INSERT OR REPLACE INTO phases (run_id, idx, name, outcome, record) VALUES (?,?,?,?,?)",
                        (w.run_id, w.index, w.phase.name, w.phase.outcome.value,
                         phase_to_json(w.phase)),
                    )
                    # Identity changes a few times per run, phases commit many
                    # times: rewrite the header only when the identity changed.
                    if last_dut(w.run_id) != w.dut:
                        header = conn.execute("SELECT header FROM runs WHERE run_id=?", (w.run_id,)).fetchone()
                        data = json.loads(header[0])
                        data["dut"] = w.dut
                        conn.execute(
                            "UPDATE runs SET header=?, serial=?, seq=? WHERE run_id=?",
                            (json.dumps(data, separators=(",", ":")), w.dut.get("serial"), seq, w.run_id),
                        )
                        duts[w.run_id] = dict(w.dut)
                    else:
                        conn.execute("UPDATE runs SET seq=? WHERE run_id=?", (seq, w.run_id))
                else:
                    assert w.run is not None
                    r = w.run
                    conn.execute(
                        "UPDATE runs SET outcome=?, ended_at=?, serial=?, header=?, seq=? WHERE run_id=?",
                        (r.outcome.value if r.outcome else None,
                         r.ended_at.isoformat() if r.ended_at else None,
                         r.serial, _header_json(r), seq, r.run_id),
                    )
                    duts[r.run_id] = None  # finished: no longer open
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
    ) -> list[RunRecord]:
        """Runs matching every given filter, oldest first.

        ``since``/``until`` bound the start time (at or after, before).
        ``limit`` keeps the oldest ``limit`` of them, ``last`` the most recent
        ``last`` (still listed oldest first).
        """
        where, args = self._where(batch=batch, serial=serial, outcome=outcome, run_id_prefix=run_id_prefix,
                                  since=since, until=until)
        sql = f"SELECT run_id, header FROM runs {where} ORDER BY started_at, run_id"
        if last is not None:
            sql = (f"SELECT * FROM (SELECT run_id, header, started_at FROM runs {where}"
                   f" ORDER BY started_at DESC, run_id DESC LIMIT {int(last)}) ORDER BY started_at, run_id")
        elif limit is not None:
            sql += f" LIMIT {int(limit)}"
        with self._lock:
            rows = self._conn.execute(sql, args).fetchall()
            return [self._assemble(row[1], row[0]) for row in rows]

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
    ) -> tuple[str, list[str]]:
        clauses, args = [], []
        # Start times are stored as UTC ISO text, which sorts as the times do.
        if since is not None:
            clauses.append("started_at >= ?")
            args.append(_utc_text(since))
        if until is not None:
            clauses.append("started_at < ?")
            args.append(_utc_text(until))
        if batch is not None:
            clauses.append("batch = ?")
            args.append(batch)
        if serial is not None:
            clauses.append("serial = ?")
            args.append(serial)
        if outcome is not None:
            clauses.append("outcome = ?")
            args.append(Outcome(outcome).value)
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

    def _assemble(self, header: str, run_id: str) -> RunRecord:
        rows = self._conn.execute("SELECT record FROM phases WHERE run_id=? ORDER BY idx", (run_id,)).fetchall()
        run = run_from_json(header)
        phases = tuple(from_dict(json.loads(r[0]), PhaseRecord) for r in rows)
        return attrs.evolve(run, phases=phases)

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


def _mark_interrupted(conn: sqlite3.Connection) -> int:
    rows = conn.execute("SELECT run_id, header FROM runs WHERE outcome IS NULL").fetchall()
    if not rows:
        return 0
    now = utcnow()
    conn.execute("BEGIN IMMEDIATE")
    seq = conn.execute("SELECT COALESCE(MAX(seq), 0) FROM runs").fetchone()[0]
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


# -- raw change feed (for the MongoDB shipper; added with reports/shipper.py) ------
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
