"""The SQLite local store: durability, recovery, locking and queries."""

from __future__ import annotations

import fcntl
import json
import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import attrs
import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

import reports.storage.store as store_module
from reports.storage.store import LocalStore, StoreError, _journal_segments, _Write
from sequencer.records import AttemptRecord, Outcome, PhaseRecord, RunRecord, to_dict, utcnow
from tests import records_factory as rf
from tests.store_support import as_version_1, copy_store, phase_as_version_1, put_back, rewrite_as_version_1, store_runs
from tests.strategies import runs


def make_run(run_id: str, *, batch: str = "B1", slot: int = 0) -> RunRecord:
    return RunRecord(run_id, "widget", "st1", slot, f"/dev/tty{slot}", utcnow(), batch=batch)


def make_phase(name: str, outcome: Outcome = Outcome.PASS) -> PhaseRecord:
    now = utcnow()
    return PhaseRecord(name, outcome, now, now, (AttemptRecord(1, outcome, now, now),))


async def test_open_runs_become_interrupted_on_next_open(store_path: Path) -> None:
    store = LocalStore.open(store_path, station=True)
    async with store.writer():
        await store.begin_run(make_run("r1"))
        await store.commit_phase("r1", 0, make_phase("boot"), {"serial": "SN1"})
    store.close()  # as if the process died here: the run was never finished
    reopened = LocalStore.open(store_path, station=True)
    assert reopened.interrupted_on_open == 1
    run = reopened.get_run("r1")
    assert run.outcome is Outcome.INTERRUPTED
    assert [p.name for p in run.phases] == ["boot"]
    assert run.serial == "SN1"
    assert reopened.find_runs(serial="SN1") == [run]
    reopened.close()


def changes(store_path: Path) -> dict[str, int]:
    conn = sqlite3.connect(f"file:{store_path}?mode=ro", uri=True)
    try:
        return dict(conn.execute("SELECT run_id, seq FROM runs").fetchall())
    finally:
        conn.close()


async def test_a_store_put_back_to_an_older_state_numbers_every_later_change_after_all_it_had_numbered(
    store_path: Path, tmp_path: Path
) -> None:
    # The station stops with a run open; its disk is imaged. Later the run is
    # closed and more is written, and copied elsewhere by change number. Then
    # the disk goes back to the image (a power cut that lost the last writes
    # does the same to the tail). The changes the store makes from there on
    # must sort after every change it had numbered, or a copy keeping each
    # run's highest-numbered state would keep the lost one.
    store = LocalStore.open(store_path, station=True)
    async with store.writer():
        await store.begin_run(make_run("r1"))
        await store.commit_phase("r1", 0, make_phase("boot"), {"serial": "SN1"})
    store.close()  # as if killed: r1 is open
    copy_store(store_path, tmp_path / "image")
    lost = LocalStore.open(store_path, station=True)  # the next start: r1 INTERRUPTED
    async with lost.writer():
        for n in range(50):  # a busy afternoon
            await lost.begin_run(make_run(f"later{n}"))
            await lost.finish_run(attrs.evolve(make_run(f"later{n}"), outcome=Outcome.PASS, ended_at=utcnow()))
    lost.close()
    handed_out = max(changes(store_path).values())
    put_back(tmp_path / "image", store_path)
    again = LocalStore.open(store_path, station=True)
    assert again.interrupted_on_open == 1
    again.close()
    assert changes(store_path)["r1"] > handed_out
    assert again.epoch > lost.epoch > 0  # every recovery starts a later epoch

    clean = LocalStore.open(store_path, station=True)  # a store closed properly starts no epoch
    assert clean.epoch == again.epoch
    async with clean.writer():
        await clean.begin_run(make_run("r2"))
        await clean.finish_run(attrs.evolve(make_run("r2"), outcome=Outcome.PASS, ended_at=utcnow()))
    clean.close()
    assert store_module.seq_epoch(changes(store_path)["r2"]) == again.epoch
    assert changes(store_path)["r2"] > changes(store_path)["r1"]


async def test_reader_does_not_interrupt_a_live_station(store_path: Path) -> None:
    station = LocalStore.open(store_path, station=True)
    async with station.writer():
        await station.begin_run(make_run("live"))
        reader = LocalStore.open(store_path)
        assert reader.interrupted_on_open == 0
        with trio.fail_after(10):
            while reader.get_run("live") is None:  # readers see a record once it is copied from the journal
                await trio.sleep(0.001)
        assert reader.get_run("live").outcome is None
        assert _journal_segments(store_path) != []  # the reader did not replay the live station's journal
        reader.close()
        with pytest.MonkeyPatch.context() as patched:
            patched.setattr(store_module, "STATION_LOCK_WAIT_S", 0.2)
            with pytest.raises(StoreError, match="in use by another station process"):
                LocalStore.open(store_path, station=True)
    station.close()


async def test_many_concurrent_writers_group_commit(store_path: Path) -> None:
    store = LocalStore.open(store_path, station=True)
    async with store.writer():
        async def slot(i: int) -> None:
            await store.begin_run(make_run(f"r{i}", slot=i))
            for k in range(5):
                await store.commit_phase(f"r{i}", k, make_phase(f"p{k}"), {"serial": f"SN{i}"})
            await store.finish_run(attrs.evolve(make_run(f"r{i}", slot=i), outcome=Outcome.PASS, ended_at=utcnow(),
                                                dut={"serial": f"SN{i}"}))

        async with trio.open_nursery() as n:
            for i in range(64):
                n.start_soon(slot, i)
    runs = store.find_runs(batch="B1")
    assert len(runs) == 64
    assert all(len(r.phases) == 5 and r.outcome is Outcome.PASS for r in runs)
    # Far fewer transactions than writes: count distinct change numbers is not
    # observable, but every run's seq is unique and increasing.
    seqs = [seq for seq, _ in store.iter_changes(0, limit=1000)]
    assert seqs == sorted(seqs) and len(set(seqs)) == 64
    store.close()


async def test_queries_by_batch_serial_outcome_and_prefix(store_path: Path) -> None:
    store = LocalStore.open(store_path, station=True)
    async with store.writer():
        for i, (batch, outcome) in enumerate([("A", Outcome.PASS), ("A", Outcome.FAIL), ("B", Outcome.PASS)]):
            run = make_run(f"run{i}", batch=batch)
            await store.begin_run(run)
            await store.finish_run(attrs.evolve(run, outcome=outcome, ended_at=utcnow(), dut={"serial": f"S{i}"}))
    assert [r.run_id for r in store.find_runs(batch="A")] == ["run0", "run1"]
    assert [r.run_id for r in store.find_runs(outcome="FAIL")] == ["run1"]
    assert [r.run_id for r in store.find_runs(serial="S2")] == ["run2"]
    assert [r.run_id for r in store.find_runs(run_id_prefix="run")] == ["run0", "run1", "run2"]
    assert store.find_runs(run_id_prefix="ru_") == []  # LIKE wildcards are literal
    assert dict(store.batches()) == {"A": 2, "B": 1}
    store.close()


def test_corrupt_store_is_a_clear_error(tmp_path: Path) -> None:
    bad = tmp_path / "store.sqlite"
    bad.write_bytes(b"this is not a database" * 100)
    with pytest.raises(StoreError, match=f"{bad}: cannot open the local store"):
        LocalStore.open(bad, station=True)


def test_the_most_recent_runs_are_read_through_an_index_also_in_an_older_store(store_path: Path) -> None:
    # `sequencer runs` lists the latest runs of a store that keeps every run
    # ever taken; without an index on the start time each listing scanned and
    # sorted them all. A store made before the index gets it when opened.
    LocalStore.open(store_path).close()
    conn = sqlite3.connect(store_path)
    conn.execute("DROP INDEX runs_started")
    conn.commit()
    conn.close()
    store = LocalStore.open(store_path)
    try:
        plan = store._conn.execute(
            "EXPLAIN QUERY PLAN SELECT run_id FROM runs ORDER BY started_at DESC, run_id DESC LIMIT 50"
        ).fetchall()
    finally:
        store.close()
    assert any("INDEX runs_started" in step[-1] for step in plan), plan


def test_wal_mode_is_on(store_path: Path) -> None:
    LocalStore.open(store_path).close()
    conn = sqlite3.connect(store_path)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.close()


async def test_cancelling_the_station_from_outside_still_writes_every_queued_record(store_path: Path) -> None:
    # Slots cancelled from outside wait (shielded) for the commits they
    # queued; the writer must keep writing for them instead of dying with the
    # cancellation, or the station hangs. fail_after turns a hang into a failure.
    store = LocalStore.open(store_path, station=True)
    committed: list[str] = []

    async def slot(index: int) -> None:
        run_id = f"r{index}"
        await store.begin_run(make_run(run_id, slot=index))
        for n in range(1000):
            await store.commit_phase(run_id, n, make_phase(f"p{n}"), {"serial": f"SN{index}"})
            committed.append(f"{run_id}/p{n}")
            await trio.sleep(0)  # the engine checkpoints between phases too

    with trio.fail_after(20):
        with trio.CancelScope() as outside:
            async with store.writer(), trio.open_nursery() as nursery:
                for index in range(8):
                    nursery.start_soon(slot, index)
                while len(committed) < 40:
                    await trio.sleep(0.001)
                outside.cancel()
    stored = {f"{r.run_id}/{p.name}" for r in store.find_runs(batch="B1") for p in r.phases}
    store.close()
    assert outside.cancelled_caught
    assert set(committed) <= stored  # nothing a slot was told is committed went missing


async def test_a_commit_in_a_cancelled_scope_still_returns_and_the_cancel_lands_after(store_path: Path) -> None:
    # The engine sets a phase "done" right after commit_phase returns, so a
    # return must mean "on disk" even when an abort has come; the
    # cancellation then lands at the task's next checkpoint.
    store = LocalStore.open(store_path, station=True)
    steps: list[str] = []
    async with store.writer():
        await store.begin_run(make_run("r1"))
        with trio.CancelScope() as scope:
            scope.cancel()  # already cancelled when the wait starts
            await store.commit_phase("r1", 0, make_phase("boot"), {"serial": "SN1"})
            steps.append("returned")
            await trio.lowlevel.checkpoint()
            steps.append("after the next checkpoint")
    assert scope.cancelled_caught
    assert steps == ["returned"]
    assert [p.name for p in store.get_run("r1").phases] == ["boot"]
    store.close()


async def test_a_write_for_a_run_that_is_not_open_is_refused_at_once_and_the_writer_goes_on(
    store_path: Path,
) -> None:
    # Refused before it reaches the journal: a record the database would
    # refuse (no such run) must not sit in the journal to be replayed.
    store = LocalStore.open(store_path, station=True)
    async with store.writer():
        with pytest.raises(StoreError, match="write failed: run 'no-such-run' is not open"):
            await store.commit_phase("no-such-run", 0, make_phase("boot"), {})
        await store.begin_run(make_run("r1"))
        await store.commit_phase("r1", 0, make_phase("boot"), {"serial": "SN1"})
        await store.finish_run(attrs.evolve(make_run("r1"), outcome=Outcome.PASS, ended_at=utcnow()))
        with pytest.raises(StoreError, match="run 'r1' is not open"):
            await store.commit_phase("r1", 1, make_phase("late"), {"serial": "SN1"})
    assert [p.name for p in store.get_run("r1").phases] == ["boot"]
    assert _journal_segments(store_path) == []  # all of it copied, so the journal is gone
    store.close()


_KILLED_BEFORE_THE_COPY = """
import os, signal, sys, threading
import trio
from reports.storage.store import LocalStore
from sequencer.records import AttemptRecord, Outcome, PhaseRecord, RunRecord, to_dict, utcnow

store = LocalStore.open(sys.argv[1], station=True)
never = threading.Event()
store._write_batch = lambda writes: never.wait()  # the copy into SQLite never gets through


async def main():
    async with store.writer():
        await store.begin_run(RunRecord("r1", "widget", "st1", 0, "/dev/tty0", utcnow(), batch="B1"))
        for k, name in enumerate(["boot", "identify", "rails"]):
            now = utcnow()
            phase = PhaseRecord(name, Outcome.PASS, now, now, (AttemptRecord(1, Outcome.PASS, now, now),))
            await store.commit_phase("r1", k, phase, {"serial": "SN1"})
        print("committed", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)

trio.run(main)
"""


def test_a_commit_that_returned_survives_a_kill_before_it_reached_the_database(store_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-c", _KILLED_BEFORE_THE_COPY, str(store_path)], capture_output=True,
                          text=True, timeout=60, cwd=Path(__file__).resolve().parent.parent)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert proc.stdout == "committed\n"
    assert len(_journal_segments(store_path)) == 1
    reader = LocalStore.open(store_path)  # no station holds the store, so it recovers
    assert (reader.replayed_on_open, reader.damaged_on_open, reader.interrupted_on_open) == (4, 0, 1)
    run = reader.get_run("r1")
    assert run.outcome is Outcome.INTERRUPTED
    assert [p.name for p in run.phases] == ["boot", "identify", "rails"]
    assert run.serial == "SN1"
    assert _journal_segments(store_path) == []
    reader.close()
    again = LocalStore.open(store_path, station=True)  # replayed once, not again
    assert (again.replayed_on_open, again.interrupted_on_open) == (0, 0)
    assert again.get_run("r1") == run
    again.close()


async def test_a_store_an_older_sequencer_wrote_is_read_as_this_versions_records(store_path: Path) -> None:
    # What a station of record schema 1 left: runs in SQLite, and one run still in its journal (killed).
    done = [rf.sensor_run("SN-1"), rf.sensor_run("SN-2", slot=1, crash=True)]
    done = [attrs.evolve(r, logs=()) for r in done]  # version 1 had no fixtures' lines
    done = [attrs.evolve(r, phases=tuple(attrs.evolve(p, logs=tuple(attrs.evolve(line, fixture=None)
                                                                    for line in p.logs)) for p in r.phases))
            for r in done]
    await store_runs(store_path, done)
    rewrite_as_version_1(store_path)
    killed = attrs.evolve(done[0], run_id="killed", phases=done[0].phases[:2], outcome=None, ended_at=None)
    header = as_version_1(to_dict(attrs.evolve(killed, phases=())))
    lines = [b"B\t" + json.dumps(header).encode() + b"\n"] + [
        b"P\t%s\t%d\t%s\t%s\n" % (b'"killed"', i, json.dumps(killed.dut).encode(),
                                   json.dumps(phase_as_version_1(to_dict(p))).encode())
        for i, p in enumerate(killed.phases)
    ]
    store_path.with_name("store.sqlite.journal-000001").write_bytes(b"".join(lines))
    with sqlite3.connect(store_path) as conn:
        assert {json.loads(h)["schema_version"] for h, in conn.execute("SELECT header FROM runs")} == {1}

    store = LocalStore.open(store_path, station=True)
    try:
        assert (store.replayed_on_open, store.damaged_on_open, store.interrupted_on_open) == (3, 0, 1)
        assert [store.get_run(r.run_id) for r in done] == done
        back = store.get_run("killed")
        assert back.outcome is Outcome.INTERRUPTED and back.phases == killed.phases and back.logs == ()
        assert {r.run_id for r in store.find_runs(batch=done[0].batch)} == {"killed", *(r.run_id for r in done)}
    finally:
        store.close()


def test_a_damaged_journal_line_is_skipped_and_counted_and_the_rest_is_replayed(store_path: Path) -> None:
    LocalStore.open(store_path).close()
    run = make_run("r1")
    lines = [
        _Write.begin(run).line(),
        _Write.phase("r1", 0, make_phase("boot"), {"serial": "SN1"}).line(),
        b"P\t\"r1\"\t1\t{not json\n",  # damaged in the middle
        _Write.phase("r1", 2, make_phase("rails"), {"serial": "SN1"}).line(),
        _Write.phase("orphan", 0, make_phase("boot"), {}).line(),  # its run's beginning was lost
    ]
    torn = _Write.phase("r1", 3, make_phase("sensor"), {"serial": "SN1"}).line()[:40]  # the write never finished
    store_path.with_name("store.sqlite.journal-000001").write_bytes(b"".join(lines[:3]))
    store_path.with_name("store.sqlite.journal-000002").write_bytes(b"".join(lines[3:]) + torn)
    store = LocalStore.open(store_path, station=True)
    assert (store.replayed_on_open, store.damaged_on_open, store.interrupted_on_open) == (3, 3, 1)
    assert [p.name for p in store.get_run("r1").phases] == ["boot", "rails"]
    assert store.get_run("r1").serial == "SN1"
    assert store.get_run("orphan") is None
    assert _journal_segments(store_path) == []
    store.close()


def test_lines_damaged_into_other_valid_text_are_skipped_and_a_finish_restores_a_lost_beginning(
    store_path: Path,
) -> None:
    LocalStore.open(store_path).close()
    kept, lost = make_run("r1"), make_run("r2", slot=1)
    boot = _Write.phase("r1", 0, make_phase("boot"), {"serial": "SN1"}).line()
    lines = [
        _Write.begin(kept).line(),
        boot,
        # Each still splits into fields and parses as JSON:
        boot.replace(b"\t0\t", b"\t99999999999999999999\t", 1),  # an index SQLite cannot hold
        b'P\t"r1"\t2\t{}\t{"name":{"x":1},"outcome":"PASS"}\n',  # a name that is no text
        _Write.begin(make_run("r3", batch="bad\udcff")).line(),  # text SQLite cannot take (a lone surrogate)
        boot.replace(b"\t0\t", b"\t3\t", 1).replace(b'"outcome":"PASS"', b'"outcome":"PBSS"'),  # no such outcome
        # r2's beginning was lost; its finish carries the whole run.
        _Write.finish(attrs.evolve(lost, ended_at=utcnow(), outcome=Outcome.PASS)).line(),
    ]
    store_path.with_name("store.sqlite.journal-000001").write_bytes(b"".join(lines))
    store = LocalStore.open(store_path, station=True)
    assert (store.replayed_on_open, store.damaged_on_open) == (3, 4)
    assert [p.name for p in store.get_run("r1").phases] == ["boot"]
    assert store.get_run("r2").outcome is Outcome.PASS and store.get_run("r2").slot == 1
    assert _journal_segments(store_path) == []
    store.close()
    again = LocalStore.open(store_path, station=True)
    assert (again.replayed_on_open, again.damaged_on_open) == (0, 0)
    again.close()


def test_a_recovery_the_database_cannot_take_now_keeps_the_journal(
    store_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    LocalStore.open(store_path).close()
    segment = store_path.with_name("store.sqlite.journal-000001")
    segment.write_bytes(_Write.begin(make_run("r1")).line())

    def full(self: LocalStore, writes: list[_Write]) -> None:
        raise sqlite3.OperationalError("database or disk is full")

    with monkeypatch.context() as patched:
        patched.setattr(LocalStore, "_write_batch", full)
        with pytest.raises(StoreError, match="cannot open the local store: database or disk is full"):
            LocalStore.open(store_path, station=True)
    assert segment.exists()  # not counted as damaged and deleted: a full disk says nothing of the record
    store = LocalStore.open(store_path, station=True)
    assert store.replayed_on_open == 1 and store.get_run("r1").outcome is Outcome.INTERRUPTED
    store.close()


async def test_journal_segments_are_deleted_once_copied_while_the_station_writes(store_path: Path) -> None:
    store = LocalStore.open(store_path, station=True)
    store.journal_segment_bytes = 4096  # a segment every few phases
    async with store.writer():
        await store.begin_run(make_run("r1"))
        for k in range(200):
            await store.commit_phase("r1", k, make_phase(f"p{k}"), {"serial": "SN1"})
        first = store._journal.segment
        assert first >= 10
        with trio.fail_after(10):
            while len(_journal_segments(store_path)) > 1:  # the copier catches up and deletes behind itself
                await trio.sleep(0.01)
        assert [n for n, _ in _journal_segments(store_path)] == [first]
    assert _journal_segments(store_path) == []
    assert len(store.get_run("r1").phases) == 200
    store.close()


async def test_after_the_database_refuses_a_transaction_every_write_is_refused_and_the_journal_keeps_all(
    store_path: Path,
) -> None:
    store = LocalStore.open(store_path, station=True)
    copy = store._write_batch
    refusing = threading.Event()

    def write_batch(writes: list[_Write]) -> None:
        if refusing.is_set():
            raise sqlite3.OperationalError("disk I/O error")
        copy(writes)

    store._write_batch = write_batch  # type: ignore[method-assign]
    async with store.writer():
        await store.begin_run(make_run("r1"))
        await store.commit_phase("r1", 0, make_phase("boot"), {"serial": "SN1"})
        with trio.fail_after(10):
            while (run := store.get_run("r1")) is None or not run.phases:  # copied into the database
                await trio.sleep(0.001)
        refusing.set()
        await store.commit_phase("r1", 1, make_phase("rails"), {"serial": "SN1"})  # journalled: durable
        with pytest.raises(StoreError, match=f"{store_path}: write failed: disk I/O error"):
            with trio.fail_after(10):
                for k in range(2, 10_000):  # the refusal reaches the slots at their next write
                    await store.commit_phase("r1", k, make_phase(f"p{k}"), {"serial": "SN1"})
                    await trio.sleep(0.001)
        # told once; the writer's exit does not raise it again
    assert [p.name for p in store.get_run("r1").phases] == ["boot"]  # what the database had before it refused
    store.close()
    assert _journal_segments(store_path) != []
    reopened = LocalStore.open(store_path, station=True)
    run = reopened.get_run("r1")
    assert [p.name for p in run.phases][:2] == ["boot", "rails"]  # nothing the store said was written is lost
    assert run.outcome is Outcome.INTERRUPTED
    reopened.close()


def refusing_store(store_path: Path, reason: str) -> LocalStore:
    """A station's store whose database refuses every transaction with ``reason``."""
    store = LocalStore.open(store_path, station=True)

    def refuse(writes: list[_Write]) -> None:
        raise sqlite3.OperationalError(reason)

    store._write_batch = refuse  # type: ignore[method-assign]
    return store


async def test_a_refusal_nobody_heard_of_is_raised_when_the_writer_stops(store_path: Path) -> None:
    store = refusing_store(store_path, "database or disk is full")
    with pytest.raises(StoreError, match="write failed: database or disk is full"):
        async with store.writer():
            await store.begin_run(make_run("r1"))
    store.close()
    reopened = LocalStore.open(store_path, station=True)
    assert reopened.replayed_on_open == 1 and reopened.get_run("r1").outcome is Outcome.INTERRUPTED
    reopened.close()


async def test_a_write_after_the_writers_block_ended_is_refused_not_lost(store_path: Path) -> None:
    store = LocalStore.open(store_path, station=True)
    returned: list[int] = []
    refused: list[StoreError] = []

    async def slot_that_outlives_the_writer() -> None:
        for k in range(1000):
            try:
                await store.commit_phase("r1", k, make_phase(f"p{k}"), {})
            except StoreError as exc:
                refused.append(exc)
                return
            returned.append(k)
            await trio.sleep(0)

    async with trio.open_nursery() as nursery:
        async with store.writer():
            await store.begin_run(make_run("r1"))
            nursery.start_soon(slot_that_outlives_the_writer)
            await trio.sleep(0)
    assert refused and "write refused: the store's writer is closing" in str(refused[0])
    assert [p.name for p in store.get_run("r1").phases] == [f"p{k}" for k in returned]  # every commit that returned
    store.close()


async def test_a_store_that_refused_takes_no_new_writer(store_path: Path) -> None:
    store = refusing_store(store_path, "disk I/O error")
    with pytest.raises(StoreError):
        async with store.writer():
            await store.begin_run(make_run("r1"))
    with pytest.raises(StoreError, match="write failed: disk I/O error"):
        async with store.writer():
            pass  # would copy around the records the journal kept
    store.close()


def test_a_station_waits_out_a_reader_holding_the_lock_for_a_moment(store_path: Path) -> None:
    LocalStore.open(store_path).close()
    fd = os.open(f"{store_path}.lock", os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)  # as a reader does while it opens (or replays a dead station's journal)
    release = threading.Timer(0.3, os.close, (fd,))
    release.start()
    try:
        store = LocalStore.open(store_path, station=True)
    finally:
        release.join()
    assert store.station
    store.close()


async def test_only_a_stations_store_takes_writes(store_path: Path) -> None:
    reader = LocalStore.open(store_path)
    with pytest.raises(RuntimeError, match="only a station's store takes writes"):
        async with reader.writer():
            pass
    reader.close()
    assert _journal_segments(store_path) == []


async def test_writing_needs_the_writer_running(store_path: Path) -> None:
    store = LocalStore.open(store_path, station=True)
    with pytest.raises(RuntimeError, match="store.writer"):
        await store.begin_run(make_run("r1"))
    async with store.writer():
        with pytest.raises(RuntimeError, match="already has a writer"):
            async with store.writer():
                pass
        await store.begin_run(make_run("r1"))
    assert store.get_run("r1") is not None
    store.close()


async def test_the_wal_is_checkpointed_beside_the_writer_not_by_its_commits(store_path: Path) -> None:
    store = LocalStore.open(store_path, station=True)
    store.checkpoint_interval_s = 0.05
    size_before = store_path.stat().st_size
    async with store.writer():
        assert store._conn.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == 0  # commits never checkpoint
        await store.begin_run(make_run("r1"))
        for k in range(50):
            await store.commit_phase("r1", k, make_phase(f"p{k}"), {"serial": "SN1"})
        # Only a checkpoint moves pages from the WAL into the database file.
        with trio.fail_after(5):
            while store_path.stat().st_size <= size_before:
                await trio.sleep(0.02)
    # Readers get SQLite's own checkpoints back once the station stops writing.
    assert store._conn.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == 1000
    assert len(store.get_run("r1").phases) == 50
    store.close()


def test_a_rolled_back_batch_does_not_leave_the_identity_it_tried_to_write_behind(store_path: Path) -> None:
    # The writer remembers each open run's last written identity so that it
    # rewrites the header only when the identity changes. A batch that rolls
    # back must not update that memory, or the next phase with the same
    # identity would skip the header and the run would lose its serial.
    store = LocalStore.open(store_path, station=True)
    store._write_batch([_Write.begin(make_run("r1"))])
    identified = _Write.phase("r1", 0, make_phase("identify"), {"serial": "SN1"})
    orphan = _Write.phase("no-such-run", 0, make_phase("boot"), {})
    with pytest.raises(sqlite3.IntegrityError):
        store._write_batch([identified, orphan])
    assert store.get_run("r1").serial is None  # rolled back
    store._write_batch([identified])
    assert store.get_run("r1").serial == "SN1"
    store.close()


@settings(max_examples=40, deadline=None)
@given(st.lists(runs, min_size=1, max_size=3, unique_by=lambda r: r.run_id))
def test_a_replayed_journal_gives_the_same_records_as_the_live_copy(finished: list[RunRecord]) -> None:
    # Any record (tabs, newlines, quotes and backslashes in any text field,
    # infinite measurement values) survives the journal's line framing: replaying what
    # a station journalled gives exactly what the copier would have written.
    finished = [attrs.evolve(r, outcome=r.outcome or Outcome.PASS, ended_at=r.ended_at or r.started_at)
                for r in finished]
    writes = []
    for r in finished:
        writes.append(_Write.begin(attrs.evolve(r, phases=(), outcome=None, ended_at=None)))
        writes += [_Write.phase(r.run_id, i, p, dict(r.dut)) for i, p in enumerate(r.phases)]
        writes.append(_Write.finish(r))
    with tempfile.TemporaryDirectory() as tmp:
        live_path, replayed_path = Path(tmp) / "live.sqlite", Path(tmp) / "replayed.sqlite"
        live = LocalStore.open(live_path, station=True)

        async def station() -> None:
            async with live.writer():
                for r in finished:
                    await live.begin_run(attrs.evolve(r, phases=(), outcome=None, ended_at=None))
                    for i, p in enumerate(r.phases):
                        await live.commit_phase(r.run_id, i, p, dict(r.dut))
                    await live.finish_run(r)

        trio.run(station)
        LocalStore.open(replayed_path).close()
        replayed_path.with_name("replayed.sqlite.journal-000001").write_bytes(b"".join(w.line() for w in writes))
        replayed = LocalStore.open(replayed_path, station=True)
        try:
            assert (replayed.replayed_on_open, replayed.damaged_on_open) == (len(writes), 0)
            for r in finished:
                assert replayed.get_run(r.run_id) == live.get_run(r.run_id)
                assert [p.name for p in replayed.get_run(r.run_id).phases] == [p.name for p in r.phases]
        finally:
            replayed.close()
            live.close()
