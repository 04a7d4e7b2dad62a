"""Rendezvous: every active slot reaches the phase before any starts it; failed or aborted slots hold nobody."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from sequencer import Measurement, Product, phase
from sequencer.engine import SlotControl
from sequencer.product import ProductError, validate_product
from sequencer.records import Outcome
from sequencer.rendezvous import Rendezvous
from tests.conftest import outcomes, run_product


def chamber_product(delays: dict[int, float], *, fail: frozenset[int] = frozenset(), hang: frozenset[int] = frozenset(),
                    timeout: float = 30.0) -> tuple[Product, dict[int, float]]:
    """prepare (slot-dependent time; may fail or hang) -> chamber (the rendezvous): when each slot entered it."""
    entered: dict[int, float] = {}

    @phase(measurements=[Measurement("ok").equals(True)], timeout=600)
    async def prepare(ctx, slot) -> None:
        if slot.index in hang:
            await trio.sleep_forever()
        await trio.sleep(delays.get(slot.index, 0.0))
        ctx.measurements.ok = slot.index not in fail

    @phase(after=[prepare], rendezvous="chamber", rendezvous_timeout=timeout)
    async def chamber(slot) -> None:
        entered[slot.index] = trio.current_time()

    return Product("p", [prepare, chamber]), entered


async def test_every_slot_reaches_the_rendezvous_before_any_starts_it(store_path: Path, autojump_clock) -> None:
    product, entered = chamber_product({0: 0.0, 1: 3.0, 2: 7.0})
    runs = await run_product(product, store_path, slots=3)
    assert all(r.outcome is Outcome.PASS for r in runs)
    assert set(entered) == {0, 1, 2}
    assert max(entered.values()) - min(entered.values()) < 0.01  # together, when the last arrived
    assert min(entered.values()) >= 7.0
    waited = {r.slot: r.phase("chamber").resource_wait_s for r in runs}
    assert waited[0] == pytest.approx(7.0, abs=0.01) and waited[2] == pytest.approx(0.0, abs=0.01)
    log = " ".join(line.message for line in runs[0].phase("chamber").logs)
    assert "met slots 0, 1, 2 at rendezvous 'chamber' after 7 s" in log


async def test_a_slot_that_failed_before_it_never_holds_the_others(store_path: Path, autojump_clock) -> None:
    # Slot 2 fails its preparation late (at 20 s): the others go in when it fails, not at a timeout.
    product, entered = chamber_product({0: 0.0, 1: 1.0, 2: 20.0}, fail=frozenset({2}), timeout=600)
    runs = await run_product(product, store_path, slots=3)
    assert outcomes(runs[2]) == {"prepare": "FAIL", "chamber": "SKIPPED"}
    assert set(entered) == {0, 1} and entered[0] == pytest.approx(20.0, abs=0.01)


async def test_a_slot_on_its_way_too_long_is_left_behind_at_the_timeout(store_path: Path, autojump_clock) -> None:
    product, entered = chamber_product({0: 0.0, 1: 100.0}, timeout=30)
    runs = await run_product(product, store_path, slots=2)
    assert all(r.outcome is Outcome.PASS for r in runs)
    assert entered[0] == pytest.approx(30.0, abs=0.01)  # went in at the timeout, without slot 1
    assert entered[1] == pytest.approx(100.0, abs=0.01)  # then slot 1 on its own, nobody left to wait for
    log = " ".join(line.message for line in runs[0].phase("chamber").logs)
    assert "went on without slot 1 (not there after 30 s)" in log


async def test_a_slot_cancelled_while_it_waits_leaves_the_meeting(autojump_clock) -> None:
    point = Rendezvous("chamber")
    for slot in (0, 1, 2):
        point.expect(slot)
    results: dict[int, object] = {}

    async def arrive(slot: int) -> None:
        results[slot] = await point.arrive(slot, timeout=600)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(arrive, 0)
        async with trio.open_nursery() as aborting:
            aborting.start_soon(arrive, 1)
            await trio.sleep(1)
            aborting.cancel_scope.cancel()
        assert point.waiting == (0,) and point.owing == (2,)
        await trio.sleep(5)
        point.leave(2)
    assert list(results) == [0] and results[0].slots == (0,)  # type: ignore[attr-defined]


def test_a_rendezvous_is_declared_once_per_name_and_never_on_a_teardown() -> None:
    async def a() -> None:
        pass

    async def b() -> None:
        pass

    with pytest.raises(ValueError, match=r"phase 'a': rendezvous must be a name"):
        phase(a, rendezvous="the chamber!")
    with pytest.raises(ValueError, match=r"phase 'a': a teardown cannot be a rendezvous"):
        phase(a, rendezvous="chamber", teardown=True)
    with pytest.raises(ValueError, match=r"phase 'a': rendezvous_timeout must be a positive number"):
        phase(a, rendezvous="chamber", rendezvous_timeout=0)
    with pytest.raises(ProductError, match=r"phase 'b': rendezvous 'chamber' is phase 'a''s already"):
        validate_product(Product("p", [phase(a, rendezvous="chamber"), phase(b, rendezvous="chamber")]))
    assert Product("p", [phase(a)]).rendezvous == {}


async def test_a_stop_while_waiting_at_a_rendezvous_records_the_phase_and_frees_the_others(
    store_path: Path, autojump_clock
) -> None:
    # Slot 0 arrives, slot 1 has not; slot 0's own run is then stopped by an operator's abort of slot 0.
    product, entered = chamber_product({0: 0.0, 1: 50.0})
    control = SlotControl()

    async def abort_slot_0_later() -> None:
        await trio.sleep(10)
        control.abort()

    from reports.storage.store import LocalStore
    from sequencer.engine import RunSettings, run_dut
    from sequencer.events import EventBus
    from sequencer.fixtures import SlotInfo
    from sequencer.product import LoadedProduct

    loaded = LoadedProduct(product, Path("<t>"))
    point = {"chamber": Rendezvous("chamber")}
    store = LocalStore.open(store_path, station=True)
    runs = {}
    try:
        async with store.writer(), trio.open_nursery() as nursery:
            async def run(slot: int, control: SlotControl) -> None:
                runs[slot] = await run_dut(loaded, SlotInfo(slot, f"/dev/sim{slot}", "st"), settings=RunSettings("st"),
                                           store=store, bus=EventBus(), control=control, rendezvous=point)

            nursery.start_soon(run, 0, control)
            nursery.start_soon(run, 1, SlotControl())
            nursery.start_soon(abort_slot_0_later)
    finally:
        store.close()
    assert runs[0].outcome is Outcome.ABORTED and runs[0].phase("chamber").outcome is Outcome.ABORTED
    assert entered == {1: pytest.approx(50.0, abs=0.01)}  # slot 1 went in on arrival: slot 0 was gone


def test_the_display_says_a_slot_waits_at_the_rendezvous_and_for_whom() -> None:
    from sequencer.display import StationDisplay
    from sequencer.events import PhaseWaiting

    display = StationDisplay(["/dev/a", "/dev/b"], phases_per_run=2)
    display.apply(PhaseWaiting("r", 0, "cold_soak", "at 'chamber' for slot(s) 1"))
    assert (display.slots[0].phase, display.slots[0].detail) == ("cold_soak (waiting)", "at 'chamber' for slot(s) 1")
