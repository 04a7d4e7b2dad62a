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
