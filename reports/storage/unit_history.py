"""Which stored runs tested the same units: a unit's earlier runs, and every run of the units a value names.

The engine asks as soon as a phase identifies the unit (its MAC at
``detect``, its serial at ``identify``; :mod:`sequencer.verdicts`). Which
stored runs are the same unit is the quality reports' own rule
(:mod:`reports.quality.units`): runs of the same product that share a value
of any of its identity keys (serial, then MAC) and contradict none.

:func:`gather_units` finds every run of the units an identity value names,
following the values those runs add (the failed run that knew only its MAC,
the retest that knew its serial too), in the station's store or in MongoDB:
what ``sequencer find``, MongoDB's ``devices`` and the portal's yield alert
group into units.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import attrs
import trio

from reports.quality.units import group_units, identity_of, normal_value
from reports.quality.yields import chronological
from sequencer.records import RunRecord, utcnow
from sequencer.verdicts import UnitHistory

__all__ = ["MAX_RUNS_GATHERED", "Gathered", "StoreUnitHistory", "earlier_runs", "gather_units"]

#: Beyond this many earlier runs of one unit, the oldest are not looked at: the count is "at least".
MAX_RUNS_LOOKED_AT = 1000
#: Most runs one gathering reads: a MAC every board reports (a fault) links them all, and is not a unit.
MAX_RUNS_GATHERED = 2000


#: A store's or MongoDB's ``find_runs_by_identities``: the runs whose ``dut[key]`` is a value of ``pairs`` (a MAC
#: in any usual spelling), at most ``limit``.
IdentityLookup = Callable[..., Iterable[RunRecord]]


@attrs.frozen
class Gathered:
    """The runs found, oldest first; ``complete`` unless the gathering stopped at its limit."""

    runs: tuple[RunRecord, ...]
    complete: bool


def gather_units(lookup: IdentityLookup, pairs: Iterable[tuple[str, str]], *, known: Iterable[RunRecord] = (),
                 limit: int = MAX_RUNS_GATHERED) -> Gathered:
    """Every run that shares an identity value with ``pairs`` (key, value), and with the runs found, and so on.

    ``known`` are runs the caller holds already (their values are followed
    too). Values are compared as :func:`~reports.quality.units.normal_value`
    compares them. The result holds whole units: group it with
    :func:`~reports.quality.units.group_units`.
    """
    runs: dict[str, RunRecord] = {}
    asked: set[tuple[str, str]] = set()
    wanted: dict[tuple[str, str], str] = {}  # normal pair -> a spelling to ask with

    def follow(pairs: Iterable[tuple[str, str]]) -> None:
        for k, v in pairs:
            pair = (k, normal_value(k, v))
            if pair not in asked and pair not in wanted:
                wanted[pair] = v

    follow(pairs)
    for r in known:
        runs[r.run_id] = r
        follow(identity_of(r))
    complete = True
    while wanted:
        if len(runs) >= limit:
            complete = False
            break
        asking = [(k, v) for (k, _), v in wanted.items()]
        asked.update(wanted)
        wanted.clear()
        for r in lookup(asking, limit=limit):
            if r.run_id not in runs:
                runs[r.run_id] = r
                follow(identity_of(r))
    return Gathered(tuple(chronological(runs.values())), complete)


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
