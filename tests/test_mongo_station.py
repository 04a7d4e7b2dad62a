"""A station streaming to a real MongoDB while things go wrong: outages, failover, SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import trio

from reports.storage.mongo import MongoSettings
from reports.storage.mongod import Mongod, ReplicaSet
from reports.storage.shipper import ShipEvent, shipper_pids, shipping
from reports.storage.store import LocalStore
from sequencer import Measurement, Product, phase
from sequencer.records import Outcome
from tests.conftest import run_product
from tests.mongo_support import (
    FAST,
    assert_mirrors_store,
    database,
    fresh_settings,
    ship_all,
    store_state,
    wait_until,
    wait_until_sync,
)
from tests.store_support import finished_runs

ROOT = Path(__file__).resolve().parent.parent
WIDGET = ROOT / "tests" / "products" / "mongo_widget.py"
#: The shipper as tests run it: quick polls, quick retries.
BRISK: dict[str, Any] = {"poll_interval": 0.05, "backoff_initial": 0.05, "backoff_max": 0.4}


def never_raises(errors: list[Exception]) -> Callable[[Callable[[], Awaitable[None]]], Callable[[], Awaitable[None]]]:
    """Keep a side task's failure in ``errors`` instead of cancelling the station beside it.

    The test asserts ``errors`` is empty afterwards. (Cancelling a station from
    outside its own abort path is not how a station stops; the tests do not
    rely on what it does.)
    """

    def wrap(fn: Callable[[], Awaitable[None]]) -> Callable[[], Awaitable[None]]:
        async def task() -> None:
            try:
                await fn()
            except Exception as exc:
                errors.append(exc)

        return task

    return wrap


def paced_product(phase_s: float, steps: int = 6) -> Product:
    """identify, then ``steps`` phases of ``phase_s`` seconds each taking one measurement."""

    @phase(measurements=[Measurement("slot_index")])
    async def identify(ctx, slot):
        ctx.identify(serial=f"P{slot.index:04d}", mac=f"02:00:00:00:00:{slot.index:02x}")
        ctx.measurements.slot_index = slot.index

    def step(i: int):
        @phase(name=f"step{i}", measurements=[Measurement("v", units="V").in_range(0, 10)])
        async def run_step(ctx):
            await trio.sleep(phase_s)
            ctx.measurements.v = 3.3

        return run_step

    phases = [identify]
    for i in range(steps):
        phases.append(step(i).depends_on(phases[-1]))
    return Product("paced", phases, version="1")


async def test_records_appear_while_the_batch_is_still_running(tmp_path: Path, mongo: MongoSettings) -> None:
    release = trio.Event()

    @phase
    async def identify(ctx, slot):
        ctx.identify(serial=f"LIVE{slot.index}", imei=f"35{slot.index:013d}")

    @phase(after=[identify], measurements=[Measurement("vdd", units="V").in_range(3.0, 3.6)])
    async def rails(ctx):
        ctx.measurements.vdd = 3.31

    @phase(after=[rails])
    async def hold(ctx):
        await release.wait()

    path = tmp_path / "store.sqlite"
    db = database(mongo)

    def rails_visible_while_open() -> bool:
        docs = list(db.runs.find({}, {"phases.name": 1, "outcome": 1}))
        devices = db.devices.count_documents({"last_outcome": "RUNNING"})
        return (len(docs) == 4 and all(d["outcome"] is None and len(d["phases"]) == 2 for d in docs)
                and devices == 4)

    seen: dict[str, Any] = {}

    async def observe() -> None:
        # Never raises: a failure here must not cancel a running station (the test
        # asserts afterwards), and the station only finishes once this releases it.
        try:
            await wait_until(rails_visible_while_open, what="open runs with their first phases in MongoDB")
            seen["device"] = await trio.to_thread.run_sync(lambda: db.devices.find_one({"_id": "LIVE2"}))
            seen["run"] = await trio.to_thread.run_sync(lambda: db.runs.find_one({"serial": "LIVE1"}))
        except Exception as exc:
            seen["error"] = exc
        finally:
            release.set()

    async with shipping(path, mongo, **BRISK) as shipper:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(observe)
            await run_product(Product("live", [identify, rails, hold]), path, slots=4)
        await wait_until(lambda: db.runs.count_documents({"outcome": "PASS"}) == 4, what="finished runs")
        await wait_until(lambda: db.devices.count_documents({"last_outcome": "PASS"}) == 4, what="devices")
        # The documents are visible before the pass that wrote them has acknowledged them in the ledger.
        with trio.fail_after(20):
            while (await shipper.refresh()).backlog:
                await trio.sleep(0.05)
    assert "error" not in seen, seen.get("error")
    assert seen["device"]["last_outcome"] == "RUNNING" and seen["device"]["attributes"]["imei"] == f"35{2:013d}"
    assert seen["run"]["outcome"] is None and seen["run"]["measurements"][0]["value"] == 3.31
    assert db.devices.find_one({"_id": "LIVE2"})["last_outcome"] == "PASS"
    assert_mirrors_store(path, mongo)
    db.client.close()


async def test_mongod_down_for_part_of_a_batch_then_back(tmp_path: Path, own_mongod: Mongod) -> None:
    settings = fresh_settings(own_mongod.uri)
    path = tmp_path / "store.sqlite"
    events: list[ShipEvent] = []
    db = database(settings)
    product = paced_product(0.05)
    finished: list[int] = []

    errors: list[Exception] = []

    @never_raises(errors)
    async def outage() -> None:
        await wait_until(lambda: db.runs.count_documents({}) >= 4, what="first records shipped")
        await trio.to_thread.run_sync(own_mongod.kill)  # as a crashed host: no clean shutdown
        finished.append(await trio.to_thread.run_sync(finished_runs, path))
        # MongoDB stays away until the shipper has found it gone and a round's worth of runs more has
        # finished, however slow the machine: a station that waited for MongoDB would time out here.
        await wait_until(lambda: "unreachable" in [e.kind for e in events] and finished_runs(path) >= finished[0] + 8,
                         timeout=60, what="runs finishing while MongoDB is away")
        finished.append(await trio.to_thread.run_sync(finished_runs, path))
        await trio.to_thread.run_sync(own_mongod.restart)
        restarted.set()

    restarted = trio.Event()
    rounds = 0
    async with shipping(path, settings, on_event=events.append, **BRISK) as shipper:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(outage)
            # rounds of 8 slots, at least four, and on until MongoDB is back: testing goes on through the outage
            while rounds < 4 or not (restarted.is_set() or errors):
                await run_product(product, path, slots=8)
                rounds += 1
        report = await shipper.drain(timeout=20)
    assert not errors, errors
    assert report.error is None and report.backlog == 0
    kinds = [e.kind for e in events]
    assert "unreachable" in kinds and kinds.index("reachable") > kinds.index("unreachable")
    assert finished[1] >= finished[0] + 8  # the station kept testing while MongoDB was away
    assert db.runs.count_documents({"outcome": "PASS"}) == 8 * rounds
    assert_mirrors_store(path, settings)
    db.client.close()


async def test_mongodb_follows_a_store_put_back_to_an_older_copy_of_itself(tmp_path: Path, mongo: MongoSettings) -> None:
    # The station's disk is imaged (or a power cut will take it back to this
    # point) while a run is open and already in MongoDB. The run then passes,
    # and MongoDB has that too. Then the store goes back to the image: the
    # next station start marks the run INTERRUPTED, and that, the store's
    # truth now, must replace MongoDB's PASS, which the store no longer has.
    import attrs

    from tests import records_factory as rf
    from tests.store_support import copy_store, put_back

    path = tmp_path / "store.sqlite"
    run = rf.sensor_run("SN-IMAGED")
    db = database(mongo)
    store = LocalStore.open(path, station=True)
    async with store.writer():
        await store.begin_run(attrs.evolve(run, phases=(), outcome=None, ended_at=None, dut={"serial": run.serial}))
        for i, p in enumerate(run.phases[:2]):
            await store.commit_phase(run.run_id, i, p, run.dut)
        await wait_until(lambda: (r := store.get_run(run.run_id)) is not None and len(r.phases) == 2,
                         what="the open run in the database")
        await ship_all(path, mongo)
        assert db.runs.find_one({"_id": run.run_id})["outcome"] is None
        copy_store(path, tmp_path / "image")
        for i, p in enumerate(run.phases[2:], start=2):
            await store.commit_phase(run.run_id, i, p, run.dut)
        await store.finish_run(run)
        await wait_until(lambda: store.get_run(run.run_id).outcome is Outcome.PASS, what="the run passed")
        await ship_all(path, mongo)
    store.close()
    assert db.runs.find_one({"_id": run.run_id})["outcome"] == "PASS"

    put_back(tmp_path / "image", path)
    LocalStore.open(path, station=True).close()  # the next station start
    await ship_all(path, mongo)
    assert db.runs.find_one({"_id": run.run_id})["outcome"] == "INTERRUPTED"
    assert db.devices.find_one({"_id": "SN-IMAGED"})["last_outcome"] == "INTERRUPTED"
    assert_mirrors_store(path, mongo)
    db.client.close()


async def test_primary_stepped_down_mid_batch_loses_nothing(tmp_path: Path, replica_set: ReplicaSet) -> None:
    settings = MongoSettings.parse(replica_set.uri, "stepdown", **{**FAST, "server_selection_timeout_s": 5.0})
    path = tmp_path / "store.sqlite"
    db = database(settings)
    product = paced_product(0.05)
    primaries: list[int] = []
    rounds_done = 0
    errors: list[Exception] = []
    stepping_down = trio.Event()

    @never_raises(errors)
    async def step_down() -> None:
        await wait_until(lambda: db.runs.count_documents({}) >= 8, what="first records shipped")
        primaries.append(rounds_done)  # mid-batch: most of it still to test and ship
        stepping_down.set()
        old = await trio.to_thread.run_sync(replica_set.step_down)
        new = await trio.to_thread.run_sync(lambda: replica_set.wait_for_primary(30, other_than=old))
        primaries.extend([old.port, new.port])

    async with shipping(path, settings, **BRISK) as shipper:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(step_down)
            for _ in range(3):
                await run_product(product, path, slots=16)
                rounds_done += 1
                if rounds_done == 1:
                    # On a loaded machine shipping may lag testing; hold the
                    # batch until the step-down starts, so it lands mid-batch.
                    with trio.fail_after(60):
                        await stepping_down.wait()
        report = await shipper.drain(timeout=30)
    assert not errors, errors
    assert report.error is None and report.backlog == 0
    rounds_before, old, new = primaries
    assert rounds_before < 2 and old != new
    assert db.runs.count_documents({"outcome": "PASS"}) == 48
    assert_mirrors_store(path, settings)
    db.client.close()


# -- the real command, killed --------------------------------------------------------


def sequencer(*args: str, phase_s: float = 0.0, own_session: bool = False, quick_slots: str = "") -> subprocess.Popen[str]:
    """``sequencer ...`` in a child; ``own_session``: its own process group, as a terminal's foreground job."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "MONGO_WIDGET_PHASE_S": str(phase_s),
           "MONGO_WIDGET_QUICK_SLOTS": quick_slots}
    return subprocess.Popen(
        [sys.executable, "-m", "sequencer.cli", *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT, start_new_session=own_session,
    )




@pytest.mark.slow
def test_station_killed_mid_batch_then_restarted_drains_the_backlog(tmp_path: Path, mongo: MongoSettings) -> None:
    store_path = tmp_path / "store.sqlite"
    common = ["--store", str(store_path), "--reports", str(tmp_path / "reports"), "--plain",
              "--mongo", mongo.uri, "--mongo-db", mongo.database]
    db = database(mongo)
    proc = sequencer("run", str(WIDGET), "--sim", "8", "--batch", "KILLED", *common, phase_s=0.5)
    try:
        # Mid-batch: every run is in MongoDB and open, some phases in.
        wait_until_sync(lambda: db.runs.count_documents({"outcome": None, "phases.1": {"$exists": True}}) == 8,
                        what="eight open runs streamed")
        assert len(shipper_pids(store_path)) == 1  # the station ships from a child process
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=10)
    finally:
        proc.kill()
    assert db.runs.count_documents({"outcome": {"$ne": None}}) == 0
    killed_state = store_state(store_path)
    # The station's shipper child noticed its parent die (end of file on its
    # stdin) and exited: no orphan keeps a connection to the store.
    wait_until_sync(lambda: not shipper_pids(store_path), timeout=20, what="the orphaned shipper exits")

    again = sequencer("run", str(WIDGET), "--sim", "2", "--batch", "AFTER", *common)
    out, err = again.communicate(timeout=60)
    assert again.returncode == 0, err
    assert "8 run(s) left open by a previous station were marked INTERRUPTED" in out
    assert "nothing waiting to ship" in out

    assert_mirrors_store(store_path, mongo)
    killed = list(db.runs.find({"batch": "KILLED"}))
    assert len(killed) == 8 and {d["_id"] for d in killed} == set(killed_state)
    assert all(d["outcome"] == Outcome.INTERRUPTED.value for d in killed)
    # Slots 0 and 1 were tested again: one device each, two runs, the retest's outcome.
    retested = db.devices.find_one({"_id": "MW00000"})
    assert [e["outcome"] for e in retested["runs"]] == ["INTERRUPTED", "PASS"]
    assert retested["last_outcome"] == "PASS" and retested["attributes"]["imei"] == "350000000000000"
    assert db.devices.count_documents({}) == 8
    db.client.close()


@pytest.mark.slow
def test_ctrl_c_at_a_shipping_station_ships_the_aborted_runs(tmp_path: Path, mongo: MongoSettings) -> None:
    store_path = tmp_path / "store.sqlite"
    db = database(mongo)
    proc = sequencer("run", str(WIDGET), "--sim", "4", "--batch", "CTRLC", "--store", str(store_path),
                     "--reports", str(tmp_path / "reports"), "--plain", "--mongo", mongo.uri,
                     "--mongo-db", mongo.database, phase_s=0.5, own_session=True)
    try:
        wait_until_sync(lambda: db.runs.count_documents({"batch": "CTRLC", "outcome": None}) == 4,
                        what="four open runs streamed")
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C: the terminal signals its whole foreground job
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, out + err
    assert "nothing waiting to ship" in out, out
    # The shipper outlived the abort: every run is in MongoDB as the store has it, ABORTED.
    assert_mirrors_store(store_path, mongo)
    assert [d["outcome"] for d in db.runs.find({"batch": "CTRLC"})] == [Outcome.ABORTED.value] * 4
    db.client.close()


def store_outcomes(store_path: Path) -> dict[str, str | None]:
    """Each run's outcome as the store's database has it now (read-only: the station is writing)."""
    import sqlite3

    conn = sqlite3.connect(f"file:{store_path}?mode=ro", uri=True, timeout=5)
    try:
        return dict(conn.execute("SELECT run_id, outcome FROM runs").fetchall())
    except sqlite3.Error:
        return {}
    finally:
        conn.close()


def ctrl_c_twice(proc: subprocess.Popen[str], store_path: Path, outcomes: list[str]) -> tuple[str, str]:
    """Ctrl-C to the station's process group, and again once the store has ``outcomes``: what it printed.

    The second comes after the slots have stopped, while the records are
    flushed and the shipper drains them: the moment issue 16 found unguarded.
    """
    try:
        os.killpg(proc.pid, signal.SIGINT)
        wait_until_sync(lambda: sorted(map(str, store_outcomes(store_path).values())) == sorted(outcomes),
                        what="the store has the aborted runs")
        os.killpg(proc.pid, signal.SIGINT)
        return proc.communicate(timeout=90)
    finally:
        proc.kill()


@pytest.mark.slow
def test_ctrl_c_twice_at_a_shipping_station_leaves_every_run_in_mongodb_with_its_outcome(
    tmp_path: Path, mongo: MongoSettings
) -> None:
    # The second Ctrl-C comes while the station flushes its records and the
    # shipper drains them: MongoDB must still end with the runs as the store
    # has them (ABORTED, and the one that had passed, PASS), never open.
    store_path = tmp_path / "store.sqlite"
    db = database(mongo)
    proc = sequencer("run", str(WIDGET), "--sim", "4", "--batch", "TWICE", "--store", str(store_path),
                     "--reports", str(tmp_path / "reports"), "--plain", "--mongo", mongo.uri,
                     "--mongo-db", mongo.database, phase_s=0.5, own_session=True, quick_slots="0")
    wait_until_sync(lambda: db.runs.count_documents({"batch": "TWICE"}) == 4
                    and db.runs.count_documents({"outcome": "PASS"}) == 1, what="four runs streamed, one passed")
    out, err = ctrl_c_twice(proc, store_path, ["ABORTED"] * 3 + ["PASS"])
    assert proc.returncode == 130, out + err
    assert "aborted by the operator; 3 unfinished run(s) recorded ABORTED" in out, out
    assert "nothing waiting to ship" in out, out
    assert_mirrors_store(store_path, mongo)
    assert sorted(d["outcome"] for d in db.runs.find({"batch": "TWICE"})) == ["ABORTED"] * 3 + ["PASS"]
    db.client.close()


@pytest.mark.slow
def test_a_station_stopped_while_mongodb_is_away_says_what_it_leaves_to_ship(
    tmp_path: Path, own_mongod: Mongod
) -> None:
    settings = fresh_settings(own_mongod.uri)
    store_path = tmp_path / "store.sqlite"
    common = ["--store", str(store_path), "--mongo", settings.uri, "--mongo-db", settings.database]
    db = database(settings)
    proc = sequencer("run", str(WIDGET), "--sim", "4", "--batch", "AWAY", "--reports", str(tmp_path / "reports"),
                     "--plain", *common, phase_s=0.5, own_session=True)
    wait_until_sync(lambda: db.runs.count_documents({"outcome": None}) == 4, what="four open runs streamed")
    own_mongod.kill()
    out, err = ctrl_c_twice(proc, store_path, ["ABORTED"] * 4)
    assert proc.returncode == 130, out + err
    assert f"MongoDB {settings.target}: 4 run(s) waiting to ship" in out and "`sequencer sync` ships it" in out, out
    own_mongod.restart()
    sync = subprocess.run([sys.executable, "-m", "sequencer.cli", "sync", *common], capture_output=True, text=True,
                          cwd=ROOT, timeout=60)
    assert sync.returncode == 0, sync.stdout + sync.stderr
    db = database(settings)
    assert [d["outcome"] for d in db.runs.find()] == ["ABORTED"] * 4
    assert_mirrors_store(store_path, settings)
    db.client.close()


def shipper_child(store: Path, mongo: MongoSettings, *, poll: float) -> subprocess.Popen[bytes]:
    """The station's shipper child, started as `sequencer run` starts it, with pipes for the test to hold."""
    return subprocess.Popen(
        [sys.executable, "-m", "reports.storage.shipper", "--store", str(store), "--database", mongo.database,
         "--poll", str(poll), "--final-drain", "5"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT,
        env={**os.environ, "SEQUENCER_MONGO_URI": mongo.uri},
    )


def test_the_shipper_child_follows_its_station_through_stop_signals_until_its_stdin_closes(
    tmp_path: Path, mongo: MongoSettings
) -> None:
    # The station's stop signals are the station's: a terminal's Ctrl-C, a
    # service manager's SIGTERM to the whole control group. The child keeps
    # shipping what the station records while it aborts, and stops only
    # when the station closes its stdin.
    from tests import records_factory as rf
    from tests.store_support import store_runs

    path = tmp_path / "store.sqlite"
    trio.run(store_runs, path, [rf.sensor_run("SN-1")])
    child = shipper_child(path, mongo, poll=0.05)
    assert child.stdin is not None and child.stdout is not None
    db = database(mongo)
    try:
        assert json.loads(child.stdout.readline())["event"] == "status"  # started: its signal handling is in place
        wait_until_sync(lambda: db.runs.count_documents({}) == 1, what="the first run shipped")
        for stop in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
            child.send_signal(stop)
        time.sleep(0.5)
        assert child.poll() is None
        trio.run(store_runs, path, [rf.sensor_run("SN-2", slot=1)])  # what the station records as it aborts
        wait_until_sync(lambda: db.runs.count_documents({}) == 2, what="the run recorded after the signals shipped")
        child.stdin.close()
        assert child.wait(timeout=30) == 0
    finally:
        child.kill()
    assert b"Traceback" not in child.stderr.read()
    assert_mirrors_store(path, mongo)
    db.client.close()


def test_a_shipper_whose_station_stopped_reading_still_ships_and_exits_cleanly(
    tmp_path: Path, mongo: MongoSettings
) -> None:
    # As after the station was killed: nobody reads the child's reports any more.
    from tests import records_factory as rf
    from tests.store_support import store_runs

    path = tmp_path / "store.sqlite"
    trio.run(store_runs, path, [rf.sensor_run("SN-1"), rf.sensor_run("SN-2", slot=1)])
    child = shipper_child(path, mongo, poll=0.1)
    assert child.stdout is not None and child.stdin is not None
    child.stdout.close()  # the reader is gone: every report now meets a broken pipe
    db = database(mongo)
    try:
        wait_until_sync(lambda: db.runs.count_documents({}) == 2, what="both runs shipped")
        child.stdin.close()  # end of its stdin: the final drain, then exit
        assert child.wait(timeout=30) == 0
        assert b"Traceback" not in child.stderr.read()
    finally:
        child.kill()
    db.client.close()


async def test_a_dead_shipper_process_is_reported_and_its_backlog_stays_in_the_store(
    tmp_path: Path, mongo: MongoSettings
) -> None:
    from reports.storage.shipper import shipping_process
    from tests import records_factory as rf
    from tests.store_support import store_runs

    path = tmp_path / "store.sqlite"
    await store_runs(path, [rf.sensor_run("SN-1")])
    events: list[ShipEvent] = []
    db = database(mongo)
    async with shipping_process(path, mongo, final_drain=1, poll_interval=0.05, on_event=events.append) as child:
        # Shipped *and* acknowledged in the child's ledger: killed between the
        # two, the run would rightly stay in the backlog (and be re-sent, once).
        await wait_until(lambda: db.runs.count_documents({}) == 1 and child.status().shipped_runs == 1
                         and child.status().backlog == 0, what="first run shipped and acknowledged by the child")
        [pid] = shipper_pids(path)
        os.kill(pid, signal.SIGKILL)
        await wait_until(lambda: any(e.kind == "error" for e in events), what="the operator is told")
        await store_runs(path, [rf.sensor_run("SN-2", slot=1)])  # testing goes on
    [event] = [e for e in events if e.kind == "error"]
    assert "the MongoDB shipper stopped (exit status -9)" in event.message and "sequencer sync" in event.message
    assert child.status().backlog == 1  # read from the store: the child could not say
    assert db.runs.count_documents({}) == 1
    db.client.close()
