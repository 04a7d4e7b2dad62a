"""Store-and-forward: drain the station's local store into MongoDB.

The SQLite store is the source of truth; MongoDB is a copy that may lag. The
shipper reads runs changed since its *watermark* (the highest store change
number ``seq`` MongoDB has acknowledged), writes them in bulk, and only then
moves the watermark. A crash anywhere in between re-ships a batch that may
already have landed, which is harmless: every write is an idempotent upsert
guarded by ``seq`` (``reports/storage/mongo.py``). So delivery is at-least-once on the
wire and exactly-once in the database.

Why the watermark is enough: the store assigns ``seq`` inside its write
transaction, one writer at a time, so changes become visible in ``seq`` order,
and a run's ``seq`` only grows. Every run whose latest state is not yet in
MongoDB therefore has ``seq`` above the watermark.

A run MongoDB refuses for good (schema validation, too large, not storable)
is *quarantined*: recorded with the reason in the station's store, skipped by
the watermark, and shown by ``sequencer sync``. It is tried again when the run
changes, or on ``sequencer sync --retry-quarantined`` (after the schema or the
data is fixed). Nothing is retried forever and nothing is dropped silently.

Never slowing a slot:

* The shipper has its own SQLite connections (the store in WAL mode lets it
  read while the station writes) and touches the station's writer only
  through the database file. It *polls* rather than being woken by the
  writer: the station's write path stays unaware of MongoDB, and a poll is
  one indexed query. ``poll_interval`` bounds the added latency.
* Every blocking call -- SQLite, building and encoding documents, pymongo --
  runs in a worker thread. A pass is handed to the thread whole and is never
  abandoned on cancellation: trio waits for it, so when the shipper reports
  a batch shipped (moves the watermark) the bulk write has finished, and when
  it is cancelled mid-pass the pass still completes or fails as a unit. Short
  server-selection and operation timeouts bound that wait, so a station shuts
  down promptly with the database gone.
* While MongoDB is unreachable the shipper backs off exponentially (capped,
  with jitter so a line of stations does not reconnect in lockstep).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import sqlite3
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import attrs
import structlog
import trio

from reports.storage.mongo import (
    MongoSchemaError,
    MongoSettings,
    MongoSink,
    MongoUnavailable,
    PreparedPhase,
    Rejection,
    StoredRun,
    WriteReport,
    prepare_phase,
)
from reports.storage.store import LocalStore, StoreError, connect_readonly, iter_change_rows
from sequencer.records import upgrade, utcnow

log = structlog.get_logger("sequencer.shipper")

_LEDGER_SCHEMA = """
CREATE TABLE IF NOT EXISTS mongo_watermark (
    target     TEXT PRIMARY KEY,
    acked_seq  INTEGER NOT NULL,
    updated_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS mongo_quarantine (
    target  TEXT NOT NULL,
    run_id  TEXT NOT NULL,
    seq     INTEGER NOT NULL,
    reason  TEXT NOT NULL,
    at      TEXT NOT NULL,
    PRIMARY KEY (target, run_id)
);
"""

#: A run (in the store's ``runs`` table) whose latest change the target (``?``) has not acknowledged.
_UNACKNOWLEDGED = "seq > COALESCE((SELECT acked_seq FROM mongo_watermark WHERE target=?), 0)"


@attrs.frozen
class Quarantined:
    run_id: str
    seq: int
    reason: str
    at: str


class ShipLedger:
    """The shipper's bookkeeping, in the station's SQLite file beside the runs.

    Keyed by destination (:attr:`MongoSettings.target`): a station pointed at
    a second database ships everything there too. Blocking; its own
    connection, so it never waits on the station's store lock.
    """

    def __init__(self, path: Path, target: str) -> None:
        self.path = path
        self.target = target
        self._lock = threading.Lock()
        self._conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=10)
        self._conn.executescript(_LEDGER_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def acked_seq(self) -> int:
        with self._lock:
            row = self._conn.execute(
                "SELECT acked_seq FROM mongo_watermark WHERE target=?", (self.target,)
            ).fetchone()
        return int(row[0]) if row else 0

    def backlog(self) -> int:
        """Runs whose latest state MongoDB has not acknowledged (quarantined ones not counted)."""
        with self._lock:
            row = self._conn.execute(f"SELECT COUNT(*) FROM runs WHERE {_UNACKNOWLEDGED}", (self.target,)).fetchone()
        return int(row[0])

    def quarantine(self) -> list[Quarantined]:
        with self._lock:
            rows = self._conn.execute(
                "SELECT run_id, seq, reason, at FROM mongo_quarantine WHERE target=? ORDER BY at, run_id",
                (self.target,),
            ).fetchall()
        return [Quarantined(*r) for r in rows]

    def forget_watermark(self) -> None:
        """Take the watermark back to the start: every run is shipped again."""
        with self._lock:
            self._conn.execute("DELETE FROM mongo_watermark WHERE target=?", (self.target,))

    def current_seq(self, run_id: str) -> int | None:
        with self._lock:
            row = self._conn.execute("SELECT seq FROM runs WHERE run_id=?", (run_id,)).fetchone()
        return int(row[0]) if row else None

    def record(self, report: WriteReport, *, upto: int | None) -> None:
        """Note what landed and what was refused, and move the watermark to ``upto``, atomically.

        The watermark never moves backwards (a concurrent ``sequencer sync``
        may have moved it further). A run that landed leaves the quarantine
        only if what landed is at least as new as what was quarantined.
        """
        now = utcnow().isoformat()
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                self._conn.executemany(
                    "DELETE FROM mongo_quarantine WHERE target=? AND run_id=? AND seq<=?",
                    [(self.target, run_id, seq) for run_id, seq in report.shipped],
                )
                self._conn.executemany(
                    "INSERT INTO mongo_quarantine VALUES (?,?,?,?,?) ON CONFLICT(target, run_id) DO UPDATE SET"
                    " seq=excluded.seq, reason=excluded.reason, at=excluded.at WHERE excluded.seq >= seq",
                    [(self.target, r.run_id, r.seq, r.reason, now) for r in report.rejected],
                )
                if upto is not None:
                    self._conn.execute(
                        "INSERT INTO mongo_watermark VALUES (?,?,?) ON CONFLICT(target) DO UPDATE SET"
                        " acked_seq=MAX(acked_seq, excluded.acked_seq), updated_at=excluded.updated_at",
                        (self.target, upto, now),
                    )
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")


class PhaseCache:
    """Converted phases of the runs still open, so re-sending a run costs only its new phases.

    A phase's stored JSON never changes once committed; a cached conversion
    is reused only while the text is identical, so a rewritten phase is
    converted again. A run leaves the cache when it is shipped finished, and
    the cache forgets everything past ``max_runs`` open runs (they are then
    converted from scratch, which is only slower). Used by the pass thread
    alone.
    """

    def __init__(self, path: Path, max_runs: int = 4096) -> None:
        self._path = path
        self._max_runs = max_runs
        self._runs: dict[str, list[tuple[str, PreparedPhase]]] = {}

    def stored_run(self, header_text: str, phase_texts: list[str]) -> StoredRun:
        header = json.loads(header_text)
        try:
            header = upgrade(header)  # a run an older sequencer recorded, still to ship
        except ValueError as exc:
            raise StoreError(f"{self._path}: run {header.get('run_id')!r}: {exc}") from None
        run_id = header["run_id"]
        cached = self._runs.pop(run_id, [])
        phases: list[tuple[str, PreparedPhase]] = []
        for i, text in enumerate(phase_texts):
            if i < len(cached) and cached[i][0] == text:
                phases.append(cached[i])
            else:
                phases.append((text, prepare_phase(json.loads(text))))
        if header.get("outcome") is None:
            if len(self._runs) >= self._max_runs:
                self._runs.clear()
            self._runs[run_id] = phases
        return StoredRun(header, tuple(p for _, p in phases))


@attrs.frozen
class ShipEvent:
    """Something the operator should hear about: ``unreachable``, ``reachable``, ``quarantined``, ``error``."""

    kind: str
    message: str


@attrs.frozen
class ShipStatus:
    target: str
    backlog: int
    quarantined: int
    shipped_runs: int
    shipped_measurements: int
    reachable: bool | None  # None until the first attempt
    last_error: str | None


@attrs.frozen
class SyncReport:
    """What a drain did and what is left."""

    shipped_runs: int
    shipped_measurements: int
    quarantined: tuple[Rejection, ...]
    backlog: int
    error: str | None


@attrs.frozen
class _Pass:
    report: WriteReport
    read: int
    backlog: int
    quarantined: int


class Shipper:
    """Ships one station store to one MongoDB. Open with :meth:`open`, then :meth:`run` or :meth:`drain`."""

    def __init__(
        self,
        store: LocalStore,
        ledger: ShipLedger,
        sink: MongoSink,
        *,
        batch_size: int = 200,
        poll_interval: float = 1.0,
        backoff_initial: float = 0.5,
        backoff_max: float = 10.0,
        on_event: Callable[[ShipEvent], object] | None = None,
    ) -> None:
        self._store = store
        self._ledger = ledger
        self._sink = sink
        self.settings = sink.settings
        self.batch_size = batch_size
        self.poll_interval = poll_interval
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self._on_event = on_event
        self._rng = random.Random(os.urandom(8))
        self._phases = PhaseCache(store.path)
        self._wakeup = trio.Event()
        self._failures = 0
        self._reachable: bool | None = None
        self._last_error: str | None = None
        self._backlog = 0
        self._quarantined = 0
        self._shipped_runs = 0
        self._shipped_measurements = 0

    @classmethod
    async def open(cls, store_path: str | Path, settings: MongoSettings, **options: object) -> Shipper:
        """Open a reader on the store, the ledger and a MongoDB client (nothing is sent yet)."""

        def opener() -> Shipper:
            store = LocalStore.open(store_path)
            try:
                ledger = ShipLedger(store.path, settings.target)
                sink = MongoSink(settings)
            except BaseException:
                store.close()
                raise
            shipper = cls(store, ledger, sink, **options)  # type: ignore[arg-type]
            shipper._backlog = ledger.backlog()
            shipper._quarantined = len(ledger.quarantine())
            return shipper

        return await trio.to_thread.run_sync(opener)

    async def aclose(self) -> None:
        def closer() -> None:
            self._sink.close()
            self._ledger.close()
            self._store.close()

        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(closer)

    # -- status --------------------------------------------------------------

    def status(self) -> ShipStatus:
        """As of the last pass (no I/O; cheap enough for a display refresh)."""
        return ShipStatus(
            target=self.settings.target, backlog=self._backlog, quarantined=self._quarantined,
            shipped_runs=self._shipped_runs, shipped_measurements=self._shipped_measurements,
            reachable=self._reachable, last_error=self._last_error,
        )

    async def quarantine(self) -> list[Quarantined]:
        return await trio.to_thread.run_sync(self._ledger.quarantine)

    async def refresh(self) -> ShipStatus:
        """Re-read the backlog and quarantine from the store."""

        def read() -> tuple[int, int]:
            return self._ledger.backlog(), len(self._ledger.quarantine())

        self._backlog, self._quarantined = await trio.to_thread.run_sync(read)
        return self.status()

    def wake(self) -> None:
        """Ship now instead of at the next poll (and retry now if backing off)."""
        self._wakeup.set()

    # -- shipping ------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Ship until cancelled: drain, wait ``poll_interval``, repeat; back off while MongoDB is away.

        Never raises for MongoDB or store trouble (a station keeps testing
        without its copy); it reports through ``on_event`` and tries again.
        """
        task_status.started()
        while True:
            try:
                step = await self._one_pass()
            except MongoUnavailable as exc:
                self._note_failure(str(exc), "unreachable")
                await self._sleep(self._next_backoff())
                continue
            except Exception as exc:  # a bug or a store error must not stop testing
                log.exception("shipper pass failed")
                self._note_failure(f"{type(exc).__name__}: {exc}", "error")
                await self._sleep(self._next_backoff())
                continue
            if step.read < self.batch_size:
                await self._sleep(self.poll_interval)

    async def drain(self, *, timeout: float = math.inf) -> SyncReport:
        """Ship until nothing is left, MongoDB fails, or ``timeout`` s pass; say what is left.

        Used by ``sequencer sync`` and at the end of a station run. A pass
        in flight when the time is up is finished, not abandoned.
        """
        shipped = measurements = 0
        rejected: list[Rejection] = []
        error = None
        with trio.move_on_after(timeout):
            while True:
                try:
                    step = await self._one_pass()
                except (MongoUnavailable, MongoSchemaError) as exc:
                    self._note_failure(str(exc), "unreachable" if isinstance(exc, MongoUnavailable) else "error")
                    error = str(exc)
                    break
                shipped += len(step.report.shipped)
                measurements += step.report.measurements
                rejected.extend(step.report.rejected)
                if step.read < self.batch_size:
                    break
        await self.refresh()  # a pass cut short by the timeout still acknowledged what it shipped
        if error is None and self._backlog and math.isfinite(timeout):
            error = f"stopped after {timeout:g} s with runs left to ship"
        return SyncReport(shipped, measurements, tuple(rejected), self._backlog, error)

    async def start_over(self) -> None:
        """Take the watermark back to the start: the next passes ship every run again (idempotently)."""
        await trio.to_thread.run_sync(self._ledger.forget_watermark)
        await self.refresh()

    async def retry_quarantined(self) -> SyncReport:
        """Ship every quarantined run again as it is now (after the schema or the data was fixed)."""

        def retry() -> WriteReport:
            changes = []
            for q in self._ledger.quarantine():
                seq = self._ledger.current_seq(q.run_id)
                run = self._store.get_run(q.run_id)
                if seq is not None and run is not None:
                    changes.append((seq, run))
            report = self._sink.write_runs(changes) if changes else WriteReport()
            self._ledger.record(report, upto=None)
            return report

        try:
            report = await trio.to_thread.run_sync(retry)
        except (MongoUnavailable, MongoSchemaError) as exc:
            self._note_failure(str(exc), "unreachable")
            await self.refresh()
            return SyncReport(0, 0, (), self._backlog, str(exc))
        self._note_success(report)
        await self.refresh()
        return SyncReport(len(report.shipped), report.measurements, report.rejected, self._backlog, None)

    async def _one_pass(self) -> _Pass:
        # Not abandon_on_cancel: the pass (bulk write *and* watermark) finishes
        # or fails as a whole before anyone is told anything about it.
        step = await trio.to_thread.run_sync(self._pass_sync)
        self._backlog, self._quarantined = step.backlog, step.quarantined
        self._note_success(step.report)
        return step

    def _pass_sync(self) -> _Pass:
        """One batch, in a worker thread: read, write, acknowledge."""
        if self._sink.found_schema is None:  # the first contact with the database
            self._sink.ensure_schema()
            if self._sink.found_schema == 0 and self._ledger.acked_seq() > 0:
                # None of our collections there, yet this station shipped to
                # this address before: the database was dropped or replaced.
                # Everything goes again (idempotently); the watermark would
                # have said it was all there.
                self._ledger.forget_watermark()
                self._emit(ShipEvent("reset", f"MongoDB {self.settings.target} holds none of this station's"
                                              " records any more (dropped or replaced): shipping them all again"))
        rows = iter_change_rows(self._store, self._ledger.acked_seq(), self.batch_size)
        changes = [(seq, self._phases.stored_run(header, phases)) for seq, header, phases in rows]
        if changes:
            report = self._sink.write_runs(changes)
            self._ledger.record(report, upto=changes[-1][0])
        else:
            report = WriteReport()
        return _Pass(report, len(changes), self._ledger.backlog(), len(self._ledger.quarantine()))

    def _note_success(self, report: WriteReport) -> None:
        if self._reachable is False and report.shipped:
            self._emit(ShipEvent("reachable", f"MongoDB {self.settings.target} reachable again; catching up"
                                              f" ({self._backlog} run(s) waiting)"))
        if report.shipped or self._reachable is None:
            self._reachable = True
            self._failures = 0
            self._last_error = None
        self._shipped_runs += len(report.shipped)
        self._shipped_measurements += report.measurements
        for r in report.rejected:
            self._emit(ShipEvent("quarantined", f"run {r.run_id} quarantined: {r.reason}"))

    def _note_failure(self, message: str, kind: str) -> None:
        # Tell the operator once per outage, not once per retry.
        announce = self._reachable is not False or (kind == "error" and message != self._last_error)
        self._reachable = False
        self._failures += 1
        self._last_error = message
        if announce and kind == "unreachable":
            self._emit(ShipEvent(kind, f"MongoDB {self.settings.target} unreachable: {message};"
                                       " records wait in the local store"))
        elif announce:
            self._emit(ShipEvent(kind, f"shipping to MongoDB {self.settings.target} failed: {message}; retrying"))

    def _emit(self, event: ShipEvent) -> None:
        log.info("shipper", kind=event.kind, message=event.message)
        if self._on_event is not None:
            self._on_event(event)

    def _next_backoff(self) -> float:
        base = min(self.backoff_max, self.backoff_initial * 2 ** max(0, self._failures - 1))
        return base * self._rng.uniform(0.75, 1.25)

    async def _sleep(self, seconds: float) -> None:
        with trio.move_on_after(seconds):
            await self._wakeup.wait()
        if self._wakeup.is_set():
            self._wakeup = trio.Event()


@asynccontextmanager
async def shipping(
    store_path: str | Path,
    settings: MongoSettings,
    *,
    final_drain: float = 0.0,
    **options: object,
) -> AsyncIterator[Shipper]:
    """Run a :class:`Shipper` in the background for the duration of the block.

    On a normal exit, one last drain of at most ``final_drain`` seconds ships
    what the block's last moments produced, so a station that ends with the
    database up ends with nothing left to ship.
    """
    shipper = await Shipper.open(store_path, settings, **options)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(shipper.run)
            yield shipper
            nursery.cancel_scope.cancel()
        if final_drain > 0:
            await shipper.drain(timeout=final_drain)
    finally:
        await shipper.aclose()


def runs_not_in_mongodb(store: Path, target: str) -> int:
    """How many of the store's runs MongoDB at ``target`` lacks in their latest state: waiting or quarantined.

    Read-only: a reading command must not write the station's store. A store
    that never shipped to ``target`` has no ledger for it, and every run counts.
    """
    conn = connect_readonly(Path(store))
    try:
        try:
            return int(conn.execute(
                f"SELECT COUNT(*) FROM runs WHERE {_UNACKNOWLEDGED}"
                " OR run_id IN (SELECT run_id FROM mongo_quarantine WHERE target=?)",
                (target, target),
            ).fetchone()[0])
        except sqlite3.OperationalError:  # no ledger: this store never shipped anywhere
            return int(conn.execute("SELECT COUNT(*) FROM runs").fetchone()[0])
    finally:
        conn.close()


def describe_backlog(status: ShipStatus) -> str:
    """One line for the operator."""
    parts = [f"MongoDB {status.target}:"]
    if status.backlog == 0:
        parts.append("nothing waiting to ship")
    else:
        parts.append(f"{status.backlog} run(s) waiting to ship")
    if status.quarantined:
        parts.append(f"; {status.quarantined} quarantined (see `sequencer sync --quarantine`)")
    if status.reachable is False and status.last_error:
        parts.append(f"; unreachable: {status.last_error}")
    return " ".join(parts).replace(" ;", ";")




# -- the station's shipper, in a process of its own ------------------------------
#
# In the station's process the shipper's Python work (parsing the stored JSON,
# building and encoding documents) runs under the same GIL as every slot: on
# a busy station that is CPU the slots lose (measured in docs/benchmarks.md).
# So `sequencer run` starts it as a child process and only supervises it from
# a trio task: the child reads the store file (WAL) and ships; the station's
# process just reads one status line now and then.
#
# The URI travels in the environment (SEQUENCER_MONGO_URI), not in argv.
# Protocol: the child writes one JSON object per line on stdout ("event":
# "status" | "unreachable" | "reachable" | "quarantined" | "error" | "final").
# It stops when its stdin reaches end of file (the station closed it, or the
# station died, SIGKILL included), and only then: it finishes the pass in
# flight, drains for at most --final-drain seconds, reports "final", exits 0.
# SIGINT, SIGTERM and SIGHUP are ignored. They are the station's (a terminal's
# Ctrl-C, a service manager stopping the station's whole control group): the
# station aborts, records its runs ABORTED, and only then closes this stdin.
# A child that drained and quit on the signal left MongoDB with those runs
# still open (`outcome: null`).


def _status_dict(status: ShipStatus) -> dict[str, object]:
    return attrs.asdict(status)


async def _follow(a: argparse.Namespace) -> int:
    import sys

    out = sys.stdout
    station_listening = True

    def emit(kind: str, **fields: object) -> None:
        # A station killed (SIGKILL) reads no more: its records still get the
        # final drain, which a BrokenPipeError here would have cut short.
        nonlocal station_listening
        if station_listening:
            try:
                out.write(json.dumps({"event": kind, **fields}) + "\n")
                out.flush()
            except OSError:
                station_listening = False
                # Nor at exit, when Python flushes stdout once more.
                os.dup2(os.open(os.devnull, os.O_WRONLY), out.fileno())

    settings = MongoSettings.parse(a.uri, a.database)
    shipper = await Shipper.open(
        a.store, settings, poll_interval=a.poll, on_event=lambda e: emit(e.kind, message=e.message),
    )
    try:
        emit("status", **_status_dict(shipper.status()))

        async def stdin_closed() -> None:
            stream = trio.lowlevel.FdStream(os.dup(0))
            try:
                while await stream.receive_some(4096):
                    pass
            finally:
                await stream.aclose()

        async def report() -> None:
            last = None
            while True:
                now = shipper.status()
                if now != last:
                    emit("status", **_status_dict(now))
                    last = now
                await trio.sleep(0.25)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(shipper.run)
            nursery.start_soon(report)
            await stdin_closed()
            nursery.cancel_scope.cancel()
        if a.final_drain > 0:
            await shipper.drain(timeout=a.final_drain)
        else:
            await shipper.refresh()
        emit("final", **_status_dict(shipper.status()))
    finally:
        await shipper.aclose()
    return 0


def follow_main(argv: list[str] | None = None) -> int:
    """``python -m reports.storage.shipper``: ship one store until told to stop (the station's child)."""
    parser = argparse.ArgumentParser(prog="python -m reports.storage.shipper", description=follow_main.__doc__)
    parser.add_argument("--store", type=Path, required=True)
    parser.add_argument("--uri", default=os.environ.get("SEQUENCER_MONGO_URI"),
                        help="MongoDB URI (default: $SEQUENCER_MONGO_URI)")
    parser.add_argument("--database", default=None)
    parser.add_argument("--poll", type=float, default=1.0)
    parser.add_argument("--final-drain", type=float, default=5.0)
    args = parser.parse_args(argv)
    if not args.uri:
        parser.error("give --uri or set SEQUENCER_MONGO_URI")
    import signal

    for stop in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(stop, signal.SIG_IGN)  # the station's, not ours: see above
    from sequencer.logs import configure_logging

    configure_logging(None)  # events go to the station on stdout
    return trio.run(_follow, args)


class ShipperProcess:
    """The station's handle on a shipper child: its last status, its events. See :func:`shipping_process`."""

    def __init__(self, target: str) -> None:
        self.target = target
        self._status = ShipStatus(target, 0, 0, 0, 0, None, None)
        self.final = False
        self.exit_message: str | None = None

    def status(self) -> ShipStatus:
        return self._status

    def _update(self, fields: dict[str, object]) -> None:
        names = {f.name for f in attrs.fields(ShipStatus)}
        self._status = ShipStatus(**{k: v for k, v in fields.items() if k in names})  # type: ignore[arg-type]


def shipper_pids(store_path: str | Path) -> list[int]:
    """Pids of shipper children (``python -m reports.storage.shipper``) shipping ``store_path``, from ``/proc``.

    For tests and drills, which must see that a killed station's child
    noticed and exited: a station knows its own child without this.
    """
    found = []
    for proc in Path("/proc").iterdir():
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"reports.storage.shipper" in argv and str(store_path).encode() in argv:
            found.append(int(proc.name))
    return found


@asynccontextmanager
async def shipping_process(
    store_path: str | Path,
    settings: MongoSettings,
    *,
    final_drain: float = 5.0,
    poll_interval: float = 1.0,
    on_event: Callable[[ShipEvent], object] | None = None,
) -> AsyncIterator[ShipperProcess]:
    """Run the shipper as a child process for the duration of the block.

    The block starts once the child reported its first status (so the
    backlog from before is known). On exit the child's stdin is closed; it
    finishes its pass, drains for at most ``final_drain`` s, and reports its
    final status, which :meth:`ShipperProcess.status` then returns. A child
    that does not finish in time is killed: nothing is lost by that, only
    left for the next shipper (everything it acknowledged is in the store).
    Cancelled, the block stops the child the same way (never by a signal,
    which would cut its last drain short).
    """
    import subprocess
    import sys
    from functools import partial

    handle = ShipperProcess(settings.target)
    argv = [sys.executable, "-m", "reports.storage.shipper", "--store", str(store_path),
            "--database", settings.database, "--poll", str(poll_interval), "--final-drain", str(final_drain)]
    root = str(Path(__file__).resolve().parents[2])  # the folder holding reports/, for a checkout not installed
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p),
        # Not on the command line, where any local user could read a password in it.
        "SEQUENCER_MONGO_URI": settings.uri,
    }

    async def read_lines(proc: trio.Process, first: trio.Event) -> None:
        assert proc.stdout is not None
        buffer = b""
        async for chunk in proc.stdout:
            buffer += chunk
            *lines, buffer = buffer.split(b"\n")
            for line in lines:
                try:
                    message = json.loads(line)
                except ValueError:
                    continue
                kind = message.pop("event", "")
                if kind in ("status", "final"):
                    handle._update(message)
                    handle.final = handle.final or kind == "final"
                    first.set()
                elif on_event is not None:
                    on_event(ShipEvent(kind, str(message.get("message", ""))))
        first.set()  # the child is gone; do not wait for a status that will not come

    closing = False
    errors: list[bytes] = []
    stderr_done = trio.Event()

    async def read_errors(proc: trio.Process) -> None:
        assert proc.stderr is not None
        async for chunk in proc.stderr:
            errors.append(chunk)
        stderr_done.set()

    def last_error_line() -> str:
        tail = b"".join(errors).decode(errors="replace").strip().splitlines()
        return f": {tail[-1]}" if tail else ""

    reported = False

    async def watch(proc: trio.Process) -> None:
        nonlocal reported
        await proc.wait()
        if not closing:
            reported = True
            with trio.move_on_after(1):
                await stderr_done.wait()
            message = (f"the MongoDB shipper stopped (exit status {proc.returncode}{last_error_line()});"
                       " records stay in the local store, `sequencer sync` ships them")
            if on_event is not None:
                on_event(ShipEvent("error", message))
            else:
                handle.exit_message = message

    async def stop_child(proc: trio.Process) -> None:
        # As at the block's end: the end of its stdin, time for its last drain, and only then a kill.
        assert proc.stdin is not None
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await proc.stdin.aclose()
        with trio.move_on_after(final_drain + 10):
            await proc.wait()
        if proc.returncode is None:
            proc.kill()
            await proc.wait()

    async with trio.open_nursery() as nursery:
        # A session of its own: the terminal's Ctrl-C (or hang-up) is for the
        # station, which aborts, records ABORTED and only then closes the
        # child's stdin; a child that got the signal too drained and quit
        # before those records existed.
        proc: trio.Process = await nursery.start(partial(
            trio.run_process, argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            env=env, check=False, start_new_session=True, deliver_cancel=stop_child,
        ))
        first = trio.Event()
        nursery.start_soon(read_lines, proc, first)
        nursery.start_soon(read_errors, proc)
        nursery.start_soon(watch, proc)
        with trio.move_on_after(30):
            await first.wait()
        try:
            yield handle
        finally:
            closing = True
            with trio.CancelScope(shield=True):
                await stop_child(proc)
                if not handle.final:
                    # No final report (the child died or was killed): say what the store says.
                    ledger = await trio.to_thread.run_sync(ShipLedger, Path(store_path), settings.target)
                    try:
                        backlog = await trio.to_thread.run_sync(ledger.backlog)
                        quarantined = len(await trio.to_thread.run_sync(ledger.quarantine))
                    finally:
                        await trio.to_thread.run_sync(ledger.close)
                    handle._status = attrs.evolve(handle._status, backlog=backlog, quarantined=quarantined)
                    if not reported and proc.returncode != 0:
                        handle.exit_message = f"the MongoDB shipper exited with status {proc.returncode}" \
                                              f"{last_error_line()}"


if __name__ == "__main__":
    raise SystemExit(follow_main())
