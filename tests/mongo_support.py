"""Real mongod fixtures for the MongoDB tests (no fakes).

``tests/conftest.py`` loads this module as a plugin, so its fixtures are
available to every test module, and the session-scoped ones really are one
per session. ``mongod`` is one server for the whole session (about half a second to
start); each test gets its own database from ``mongo`` and drops it after.
Tests that stop the server use :func:`own_mongod` instead, and the 3-member
replica set (five seconds to start and elect) only comes up for the test that
steps its primary down.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pymongo
import pytest
import trio

from reports.storage.mongo import MongoSettings
from reports.storage.mongod import Mongod, ReplicaSet
from reports.storage.store import LocalStore

#: Short timeouts: a test that waits on an unreachable database should fail fast, not hang.
FAST = {"server_selection_timeout_s": 1.0, "connect_timeout_s": 1.0, "timeout_s": 10.0}


@pytest.fixture(scope="session")
def mongod(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mongod]:
    node = Mongod.start(tmp_path_factory.mktemp("mongod"))
    try:
        yield node
    finally:
        node.stop()


@pytest.fixture
def own_mongod(tmp_path: Path) -> Iterator[Mongod]:
    """A server this test may stop, kill and restart."""
    node = Mongod.start(tmp_path / "mongod")
    try:
        yield node
    finally:
        node.stop()


@pytest.fixture(scope="session")
def replica_set(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ReplicaSet]:
    rs = ReplicaSet.start(tmp_path_factory.mktemp("rs"))
    try:
        yield rs
    finally:
        rs.stop()


def fresh_settings(uri: str) -> MongoSettings:
    return MongoSettings.parse(uri, f"t_{uuid.uuid4().hex[:12]}", **FAST)


@pytest.fixture
def mongo(mongod: Mongod) -> Iterator[MongoSettings]:
    """Settings for a database of this test's own on the session's server."""
    settings = fresh_settings(mongod.uri)
    yield settings
    client = direct_client(settings)
    client.drop_database(settings.database)
    client.close()


def direct_client(settings: MongoSettings) -> pymongo.MongoClient[dict[str, Any]]:
    """The test's own view of the database (not the code under test's client)."""
    return pymongo.MongoClient(settings.uri, tz_aware=True, serverSelectionTimeoutMS=10000)


def database(settings: MongoSettings) -> Any:
    return direct_client(settings)[settings.database]


async def wait_until(predicate: Callable[[], bool], timeout: float = 20.0, what: str = "condition") -> None:
    """Poll a blocking ``predicate`` in a thread until it holds."""
    deadline = trio.current_time() + timeout
    while not await trio.to_thread.run_sync(predicate):
        if trio.current_time() > deadline:
            raise AssertionError(f"{what}: not met within {timeout:g} s")
        await trio.sleep(0.05)


def wait_until_sync(predicate: Callable[[], bool], timeout: float = 20.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not met within {timeout:g} s")
        time.sleep(0.05)


def store_state(store_path: Path) -> dict[str, int]:
    """Every run in the store with its latest change number.

    Read with plain SQLite: opening a LocalStore no station holds would mark
    its open runs INTERRUPTED, which is the restarted station's job here.
    """
    import sqlite3

    conn = sqlite3.connect(f"file:{store_path}?mode=ro", uri=True)
    try:
        return dict(conn.execute("SELECT run_id, seq FROM runs").fetchall())
    finally:
        conn.close()


def assert_mirrors_store(store_path: Path, settings: MongoSettings) -> None:
    """MongoDB holds every run of the store exactly once, in its latest state, and a device per serial.

    ``_id`` is the run id, so "exactly once" is also checked where it could
    still go wrong: each device lists each of its runs once, and no run is
    in MongoDB that the store does not have.
    """
    from reports.storage.mongo_cli import device_from_runs

    db = database(settings)
    try:
        store = LocalStore.open(store_path)
        try:
            changes = store.iter_changes(0, limit=1_000_000)
        finally:
            store.close()
        expected = {run.run_id: seq for seq, run in changes}
        shipped = {d["_id"]: d["seq"] for d in db.runs.find({}, {"seq": 1})}
        assert shipped == expected
        by_serial: dict[str, list[Any]] = {}
        for _, run in changes:
            if run.serial:
                by_serial.setdefault(run.serial, []).append(run)
        devices = {d["_id"]: d for d in db.devices.find()}
        assert set(devices) == set(by_serial)
        for serial, runs in by_serial.items():
            want = device_from_runs(runs)
            got = devices[serial]
            ids = [entry["run_id"] for entry in got["runs"]]
            assert ids == [entry["run_id"] for entry in want["runs"]]
            assert [entry["seq"] for entry in got["runs"]] == [expected[i] for i in ids]
            assert got["last_outcome"] == want["last_outcome"]
            assert got["last_run_id"] == want["last_run_id"]
    finally:
        db.client.close()


async def ship_all(store_path: Path, settings: MongoSettings) -> None:
    """Ship the store's whole backlog with a shipper of the test's own, as `sequencer sync` does."""
    from reports.storage.shipper import Shipper

    shipper = await Shipper.open(store_path, settings)
    try:
        report = await shipper.drain(timeout=30)
    finally:
        await shipper.aclose()
    assert report.error is None and report.backlog == 0, report
