"""Fill a real local store with runs, as a station would write them."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

import attrs

from reports.storage.store import LocalStore
from sequencer.records import RunRecord


async def store_runs(path: Path, runs: list[RunRecord]) -> None:
    """Write ``runs`` through the real store as a station would: begin, phase by phase, finish."""
    store = LocalStore.open(path, station=True)
    try:
        async with store.writer():
            for run in runs:
                await store.begin_run(attrs.evolve(run, phases=(), outcome=None, ended_at=None,
                                                   dut={"serial": run.serial} if run.serial else {}))
                for i, p in enumerate(run.phases):
                    await store.commit_phase(run.run_id, i, p, run.dut)
                if run.outcome is not None:
                    await store.finish_run(run)
    finally:
        store.close()


def finished_runs(path: Path) -> int:
    """How many runs the store at ``path`` has closed (0 before the station has made it): what tests poll."""
    if not path.exists():
        return 0
    reader = LocalStore.open(path)
    try:
        return sum(n for outcome, n in reader.outcome_counts().items() if outcome != "RUNNING")
    finally:
        reader.close()


def store_files(store_path: Path) -> list[Path]:
    """The database and everything beside it that is the store (WAL, journal segments, lock)."""
    return sorted(store_path.parent.glob(f"{store_path.name}*"))


def copy_store(store_path: Path, into: Path) -> None:
    """Copy the store's files as they are now, as a disk image, a VM snapshot or a careless backup would."""
    into.mkdir(exist_ok=True)
    for f in store_files(store_path):
        (into / f.name).write_bytes(f.read_bytes())


def put_back(copy: Path, store_path: Path) -> None:
    """The store as it was when ``copy`` was made: what a power cut that lost its last writes leaves, or a restore."""
    for f in store_files(store_path):
        f.unlink()
    for f in copy.iterdir():
        (store_path.parent / f.name).write_bytes(f.read_bytes())


def as_version_1(data: dict[str, Any]) -> dict[str, Any]:
    """A run's ``to_dict`` form (its phases or not) as a sequencer of record schema 1 wrote it.

    Version 1 came before fixtures' log lines: no run ``logs``, no ``fixture`` on a phase's lines.
    """
    old = {k: v for k, v in data.items() if k != "logs"}
    old["schema_version"] = 1
    old["phases"] = [phase_as_version_1(p) for p in data.get("phases") or ()]
    return old


def phase_as_version_1(data: dict[str, Any]) -> dict[str, Any]:
    return {**data, "logs": [{k: v for k, v in line.items() if k != "fixture"} for line in data["logs"]]}


def rewrite_as_version_1(path: Path) -> None:
    """Turn every record in the store at ``path`` into what a sequencer of record schema 1 left there."""
    conn = sqlite3.connect(path)
    try:
        with conn:
            for run_id, header in conn.execute("SELECT run_id, header FROM runs").fetchall():
                conn.execute("UPDATE runs SET header=? WHERE run_id=?",
                             (json.dumps(as_version_1(json.loads(header))), run_id))
            for run_id, idx, record in conn.execute("SELECT run_id, idx, record FROM phases").fetchall():
                conn.execute("UPDATE phases SET record=? WHERE run_id=? AND idx=?",
                             (json.dumps(phase_as_version_1(json.loads(record))), run_id, idx))
    finally:
        conn.close()
