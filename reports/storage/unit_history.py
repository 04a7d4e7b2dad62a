"""A unit's earlier runs, from the station's local store: how a station knows a unit is a retest.

The engine asks as soon as a phase identifies the unit (its MAC at
``detect``, its serial at ``identify``; :mod:`sequencer.verdicts`). Which
stored runs are the same unit is the quality reports' own rule
(:mod:`reports.quality.units`): runs of the same product that share a value
of any of its identity keys (serial, then MAC) and contradict none.
"""

from __future__ import annotations

from collections.abc import Sequence

import trio

from reports.quality.units import group_units
from reports.quality.yields import chronological
from sequencer.records import RunRecord, utcnow
from sequencer.verdicts import UnitHistory

__all__ = ["StoreUnitHistory", "earlier_runs"]

#: Beyond this many earlier runs of one unit, the oldest are not looked at: the count is "at least".
MAX_RUNS_LOOKED_AT = 1000


class StoreUnitHistory:
    """:class:`~sequencer.verdicts.UnitHistorySource` over a :class:`~reports.storage.store.LocalStore`.

    The store's reads block (SQLite), so each look-up runs in a worker
    thread; an indexed query per identity key (serial, MAC), a few milliseconds.
    """

    def __init__(self, store: object) -> None:
        self._store = store

    async def history(self, product: str, identity: Sequence[tuple[str, str]], *, run_id: str) -> UnitHistory:
        runs = await trio.to_thread.run_sync(earlier_runs, self._store, product, identity, run_id,
                                             abandon_on_cancel=True)
        return UnitHistory.of(runs)


def earlier_runs(store: object, product: str, identity: Sequence[tuple[str, str]], run_id: str) -> list[RunRecord]:
    """The stored runs of ``product`` that tested the unit ``identity`` names, ``run_id`` (this run) left out.

    The quality reports' notion of a unit (:mod:`reports.quality.units`):
    the runs found by any of the unit's identity values, and this run as it
    stands, grouped oldest first. A board whose identify phase failed has
    only the MAC ``detect`` read and is the board that MAC was first seen
    with; a run whose serial and MAC disagree with an earlier unit's is a unit
    of its own, never counted as this one's retest.
    """
    candidates: dict[str, RunRecord] = {}
    for key, value in identity:
        for run in store.find_runs_by_identity(key, value, limit=MAX_RUNS_LOOKED_AT):  # type: ignore[attr-defined]
            if run.product == product and run.run_id != run_id:
                candidates[run.run_id] = run
    if not candidates:
        return []
    this = RunRecord(run_id=run_id, product=product, station="", slot=0, port="", started_at=utcnow(),
                     dut=dict(identity), identity=tuple(k for k, _ in identity))
    units = group_units(chronological([*candidates.values(), this]))
    ours = units.of(this)
    if ours.conflict is not None:
        return []  # this run contradicts the unit it partly matches: a unit of its own
    return [candidates[r] for r in ours.run_ids if r != run_id]
