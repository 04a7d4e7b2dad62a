"""Fill a real local store with runs, as a station would write them."""

from __future__ import annotations

from pathlib import Path

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
