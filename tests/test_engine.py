"""Engine semantics on one and many slots, against the real local store."""

from __future__ import annotations

import time
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

from reports.storage.store import LocalStore, _journal_segments, _read_journal
from sequencer import Measurement, PhaseResult, Product, phase
from sequencer.events import EventBus, MeasurementTaken, RunFinished
from sequencer.records import MeasurementOutcome, Outcome
from sequencer.resources import SharedResource
from tests.conftest import outcomes, run_product


async def test_independent_phases_run_concurrently(store_path: Path) -> None:
    # Each phase waits for the other to have started: this only finishes if
    # they really run at the same time.
    a_started, b_started = trio.Event(), trio.Event()

    @phase(timeout=2)
    async def a() -> None:
        a_started.set()
        await b_started.wait()

    @phase(timeout=2)
    async def b() -> None:
        b_started.set()
        await a_started.wait()

    [run] = await run_product(Product("p", [a, b]), store_path)
    assert outcomes(run) == {"a": "PASS", "b": "PASS"}
    assert run.outcome is Outcome.PASS


async def test_dependent_waits_and_is_skipped_when_dependency_fails(store_path: Path) -> None:
    order: list[str] = []

    @phase(measurements=[Measurement("x").in_range(0, 1)])
    async def first(ctx) -> None:
        order.append("first")
        ctx.measurements.x = 5

    @phase(after=[first])
    async def second() -> None:
        order.append("second")

    @phase(after=[second])
    async def third() -> None:
        order.append("third")

    @phase
    async def unrelated() -> None:
        order.append("unrelated")

    [run] = await run_product(Product("p", [first, second, third, unrelated]), store_path)
    assert outcomes(run) == {"first": "FAIL", "second": "SKIPPED", "third": "SKIPPED", "unrelated": "PASS"}
    assert run.phase("second").reason == "dependency 'first' ended FAIL"
    assert run.phase("third").reason == "dependency 'second' ended SKIPPED"
    assert "second" not in order and "third" not in order
    assert run.outcome is Outcome.FAIL
    assert run.phase("first").measurements[0].reason == "5 is above 1"


async def test_a_fan_out_runs_concurrently_and_its_join_runs_once_after_both(store_path: Path) -> None:
    # root -> (left, right) -> join: one commit makes two phases ready, and
    # the join is made ready by whichever of its two dependencies commits last.
    left_started, right_started = trio.Event(), trio.Event()
    ran: list[object] = []

    @phase
    async def root() -> None:
        ran.append("root")

    @phase(after=[root], timeout=2)
    async def left() -> None:
        left_started.set()
        await right_started.wait()  # only finishes if right runs at the same time
        await trio.sleep(0.02)  # and commits after right
        ran.append("left")

    @phase(after=[root], timeout=2)
    async def right() -> None:
        right_started.set()
        await left_started.wait()
        ran.append("right")

    @phase(after=[left, right])
    async def join(ctx) -> None:
        ran.append(("join", sorted(p.name for p in ctx.record.phases)))

    [run] = await run_product(Product("p", [root, left, right, join]), store_path)
    assert outcomes(run) == {"root": "PASS", "left": "PASS", "right": "PASS", "join": "PASS"}
    assert ran == ["root", "right", "left", ("join", ["left", "right", "root"])]


async def test_retries_record_every_attempt(store_path: Path) -> None:
    calls = 0

    @phase(retries=2, measurements=[Measurement("attempt_value").equals(3)])
    async def flaky(ctx) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise OSError("port glitch")
        ctx.measurements.attempt_value = calls

    [run] = await run_product(Product("p", [flaky]), store_path)
    rec = run.phase("flaky")
    assert [a.outcome.value for a in rec.attempts] == ["ERROR", "FAIL", "PASS"]
    assert rec.attempts[0].error.type == "OSError"
    assert "port glitch" in rec.attempts[0].error.traceback
    assert rec.outcome is Outcome.PASS


async def test_retries_are_bounded(store_path: Path) -> None:
    @phase(retries=1)
    async def always_fails() -> PhaseResult:
        return PhaseResult.FAIL

    [run] = await run_product(Product("p", [always_fails]), store_path)
    assert [a.outcome for a in run.phase("always_fails").attempts] == [Outcome.FAIL, Outcome.FAIL]


async def test_a_phase_that_says_a_retry_cannot_help_is_not_retried(store_path: Path) -> None:
    calls = 0

    @phase(retries=2, measurements=[Measurement("verdict").reported("pass")])
    async def gate(ctx) -> None:
        nonlocal calls
        calls += 1
        ctx.measurements.verdict = "the build needs chip revision v3.1 or higher (this chip is revision v3.0)"
        ctx.no_retry("a fact about the board")

    @phase(retries=2)
    async def port_gone(ctx) -> None:
        ctx.no_retry("the port is gone")
        raise OSError("/dev/ttyUSB0: port lost")

    @phase(retries=1)
    async def passes_after_all(ctx) -> None:
        ctx.no_retry("said, but the attempt passed")

    [run] = await run_product(Product("p", [gate, port_gone, passes_after_all]), store_path)
    assert calls == 1 and [a.outcome for a in run.phase("gate").attempts] == [Outcome.FAIL]
    assert "not retried: a retry cannot change this reason='a fact about the board'" in [
        line.message for line in run.phase("gate").logs
    ]
    assert [a.outcome for a in run.phase("port_gone").attempts] == [Outcome.ERROR]
    assert run.phase("passes_after_all").outcome is Outcome.PASS


async def test_timeout_is_enforced_for_a_phase_blocked_in_a_thread(store_path: Path) -> None:
    @phase(timeout=0.3)
    async def stuck() -> None:
        # A blocking driver call that never returns in time. Abandoning the
        # thread on cancel is what lets the engine move on promptly.
        await trio.to_thread.run_sync(time.sleep, 5, abandon_on_cancel=True)

    @phase(teardown=True)
    async def cleanup() -> None:
        pass

    start = trio.current_time()
    [run] = await run_product(Product("p", [stuck, cleanup]), store_path)
    assert trio.current_time() - start < 2.5
    assert run.phase("stuck").outcome is Outcome.TIMEOUT
    assert run.phase("stuck").reason == "timed out after 0.3 s"
    assert run.phase("cleanup").outcome is Outcome.PASS
    assert run.outcome is Outcome.TIMEOUT


async def test_timeout_then_retry_passes(store_path: Path) -> None:
    attempts = 0

    @phase(timeout=0.1, retries=1)
    async def slow_once() -> None:
        nonlocal attempts
        attempts += 1
        if attempts == 1:
            await trio.sleep(10)

    [run] = await run_product(Product("p", [slow_once]), store_path)
    assert [a.outcome for a in run.phase("slow_once").attempts] == [Outcome.TIMEOUT, Outcome.PASS]


async def test_teardown_runs_after_failure_and_sees_the_record(store_path: Path) -> None:
    seen: list[str] = []

    @phase
    async def broken() -> None:
        raise RuntimeError("DUT on fire")

    @phase(teardown=True)
    async def power_off(ctx) -> None:
        seen.append(ctx.record.phase("broken").outcome.value)

    [run] = await run_product(Product("p", [broken, power_off]), store_path)
    assert seen == ["ERROR"]
    assert run.phase("power_off").outcome is Outcome.PASS
    assert run.phase("power_off").teardown


async def test_unset_and_undeclared_measurements(store_path: Path) -> None:
    @phase(measurements=[Measurement("a"), Measurement("b")])
    async def forgets_b(ctx) -> None:
        ctx.measurements.a = 1

    @phase(measurements=[Measurement("a")])
    async def sets_undeclared(ctx) -> None:
        ctx.measurements.typo = 1

    [run] = await run_product(Product("p", [forgets_b, sets_undeclared]), store_path)
    rec = run.phase("forgets_b")
    assert rec.outcome is Outcome.FAIL
    assert rec.reason == "measurement 'b' was never set"
    assert [m.outcome for m in rec.measurements] == [MeasurementOutcome.PASS, MeasurementOutcome.UNSET]
    bad = run.phase("sets_undeclared")
    assert bad.outcome is Outcome.ERROR
    assert "measurement 'typo' is not declared" in bad.reason


async def test_phase_results_repeat_skip_fail_stop(store_path: Path) -> None:
    count = 0

    @phase(repeat_limit=5)
    async def repeats() -> PhaseResult | None:
        nonlocal count
        count += 1
        return PhaseResult.REPEAT if count < 3 else None

    @phase(after=[repeats])
    async def skips() -> PhaseResult:
        return PhaseResult.SKIP

    @phase(after=[repeats])
    async def stops() -> PhaseResult:
        return PhaseResult.STOP

    @phase(after=[stops])
    async def never() -> None:
        raise AssertionError("must not run after STOP")

    @phase(teardown=True)
    async def td() -> None:
        pass

    [run] = await run_product(Product("p", [repeats, skips, stops, never, td]), store_path)
    assert len(run.phase("repeats").attempts) == 3
    assert run.phase("skips").outcome is Outcome.SKIPPED
    assert run.phase("stops").outcome is Outcome.FAIL  # a stopped run is not a pass (tests/test_phase_results.py)
    assert run.phase("never").outcome is Outcome.SKIPPED
    assert run.phase("never").reason == "run stopped by phase 'stops'"
    assert run.phase("td").outcome is Outcome.PASS


async def test_repeat_limit_fails_the_phase(store_path: Path) -> None:
    @phase(repeat_limit=3)
    async def forever() -> PhaseResult:
        return PhaseResult.REPEAT

    [run] = await run_product(Product("p", [forever]), store_path)
    rec = run.phase("forever")
    assert rec.outcome is Outcome.FAIL and len(rec.attempts) == 3
    assert rec.reason == "repeat limit 3 reached: the phase asked to repeat on its last allowed run"


async def test_stop_on_failure_aborts_in_flight_and_skips_pending(store_path: Path) -> None:
    @phase
    async def fails() -> PhaseResult:
        await trio.sleep(0.05)
        return PhaseResult.FAIL

    @phase
    async def long_running() -> None:
        await trio.sleep(10)

    @phase(after=[long_running])
    async def later() -> None:
        pass

    @phase(teardown=True)
    async def td() -> None:
        pass

    product = Product("p", [fails, long_running, later, td], stop_on_failure=True)
    start = trio.current_time()
    [run] = await run_product(product, store_path)
    assert trio.current_time() - start < 5
    assert outcomes(run) == {"fails": "FAIL", "long_running": "ABORTED", "later": "SKIPPED", "td": "PASS"}
    assert run.phase("long_running").reason == "run stopped: phase 'fails' ended FAIL"
    # Nobody aborted it: the run failed, and what the stop cut short is a consequence, not its verdict.
    assert run.outcome is Outcome.FAIL


async def test_a_stopped_phase_whose_nursery_raises_while_cancelled_is_aborted_with_the_error_and_then_retried_never(
    store_path: Path,
) -> None:
    cleaned: list[str] = []

    @phase
    async def fails() -> PhaseResult:
        await trio.sleep(0.05)
        return PhaseResult.FAIL

    @phase(retries=2)
    async def busy(ctx) -> None:
        ctx.measurements.seen = 1.0

        async def worker() -> None:
            try:
                await trio.sleep(10)
            except trio.Cancelled:
                cleaned.append("worker")
                raise ValueError("cleanup failed") from None

        async with trio.open_nursery() as nursery:
            nursery.start_soon(worker)
            await trio.sleep(10)  # the stop cancels this too: Cancelled and the worker's error come out together

    busy = busy.with_measurements([Measurement("seen").in_range(0, 2)])

    @phase(after=[busy])
    async def later() -> None:
        pass

    @phase(teardown=True)
    async def td() -> None:
        pass

    product = Product("p", [fails, busy, later, td], stop_on_failure=True)
    [run] = await run_product(product, store_path)
    assert outcomes(run) == {"fails": "FAIL", "busy": "ABORTED", "later": "SKIPPED", "td": "PASS"}
    rec = run.phase("busy")
    assert len(rec.attempts) == 1 and cleaned == ["worker"]
    assert rec.reason == "run stopped: phase 'fails' ended FAIL"
    assert rec.error is not None and "ValueError: cleanup failed" in rec.error.traceback
    assert [(m.name, m.value) for m in rec.measurements] == [("seen", 1.0)]  # what it measured before the stop
    assert run.outcome is Outcome.FAIL


async def test_a_phase_that_swallows_the_stop_ends_as_it_returned_and_the_run_still_stops(store_path: Path) -> None:
    @phase
    async def fails() -> PhaseResult:
        await trio.sleep(0.05)
        return PhaseResult.FAIL

    @phase
    async def stubborn(ctx) -> None:
        try:
            await trio.sleep(10)
        except trio.Cancelled:
            ctx.log.info("ignoring the stop")  # wrong, but it is the phase's to answer for

    @phase(after=[stubborn])
    async def later() -> None:
        pass

    @phase(teardown=True)
    async def td() -> None:
        pass

    product = Product("p", [fails, stubborn, later, td], stop_on_failure=True)
    start = trio.current_time()
    [run] = await run_product(product, store_path)
    assert trio.current_time() - start < 5
    assert outcomes(run) == {"fails": "FAIL", "stubborn": "PASS", "later": "SKIPPED", "td": "PASS"}
    assert [line.message for line in run.phase("stubborn").logs] == ["ignoring the stop"]
    assert run.phase("later").reason == "run stopped: phase 'fails' ended FAIL"
    assert run.outcome is Outcome.FAIL


async def test_run_if_branches_on_the_record(store_path: Path) -> None:
    @phase
    async def identify(ctx) -> None:
        ctx.identify(serial="SN1", hw="B")

    @phase(after=[identify], run_if=lambda r: r.dut.get("hw") == "A")
    async def rev_a_only() -> None:
        pass

    @phase(after=[identify], run_if=lambda r: r.dut.get("hw") == "B")
    async def rev_b_only() -> None:
        pass

    [run] = await run_product(Product("p", [identify, rev_a_only, rev_b_only]), store_path)
    assert outcomes(run) == {"identify": "PASS", "rev_a_only": "SKIPPED", "rev_b_only": "PASS"}
    assert run.phase("rev_a_only").reason == "run_if was false"
    assert run.dut == {"hw": "B", "serial": "SN1"}


async def test_exception_in_one_slot_does_not_touch_the_others(store_path: Path) -> None:
    @phase(measurements=[Measurement("slot_number")])
    async def work(ctx, slot) -> None:
        if slot.index == 2:
            raise ZeroDivisionError("only on slot 2")
        await trio.sleep(0.01)
        ctx.measurements.slot_number = slot.index

    runs = await run_product(Product("p", [work]), store_path, slots=5)
    assert [r.outcome for r in runs] == [Outcome.PASS] * 2 + [Outcome.ERROR] + [Outcome.PASS] * 2
    assert [r.phase("work").measurements[0].value for r in runs if r.slot != 2] == [0, 1, 3, 4]


async def test_fixtures_are_built_per_slot_on_first_use_and_closed(store_path: Path) -> None:
    opened: list[str] = []
    closed: list[str] = []

    def console(slot):
        @asynccontextmanager
        async def open_console():
            opened.append(slot.port)
            try:
                yield f"console on {slot.port}"
            finally:
                closed.append(slot.port)

        return open_console()

    @phase(measurements=[Measurement("name")])
    async def one(ctx, dut) -> None:
        ctx.measurements.name = dut

    @phase(measurements=[Measurement("name")])
    async def two(ctx, dut) -> None:
        ctx.measurements.name = dut

    runs = await run_product(Product("p", [one, two], fixtures={"dut": console}), store_path, ports=["/dev/a", "/dev/b"])
    assert sorted(opened) == ["/dev/a", "/dev/b"]  # once per slot, though two phases use it
    assert sorted(closed) == ["/dev/a", "/dev/b"]
    assert runs[1].phase("two").measurements[0].value == "console on /dev/b"


async def test_shared_resource_queues_slots_and_records_wait(store_path: Path) -> None:
    holders = 0
    peak = 0

    @phase
    async def use_dmm(resources) -> None:
        nonlocal holders, peak
        async with resources["dmm"] as dmm:
            assert dmm == "the-dmm"
            holders += 1
            peak = max(peak, holders)
            await trio.sleep(0.05)
            holders -= 1

    dmm = SharedResource("dmm", capacity=1, instrument="the-dmm")
    runs = await run_product(Product("p", [use_dmm], resources=["dmm"]), store_path, slots=4, resources={"dmm": dmm})
    assert peak == 1
    waits = sorted(r.phase("use_dmm").resource_wait_s for r in runs)
    assert waits[0] < 0.03 and waits[-1] >= 0.12  # the last slot queued behind three others


async def test_events_stream_and_every_phase_is_committed(store_path: Path) -> None:
    bus = EventBus()
    events = bus.subscribe("test", buffer=1000)

    @phase(measurements=[Measurement("v", units="V").in_range(1, 2, marginal=(1.2, 1.8))])
    async def measure(ctx) -> None:
        ctx.measurements.v = 1.9

    [run] = await run_product(Product("p", [measure]), store_path, bus=bus)
    got = []
    while True:
        try:
            got.append(events.receive_nowait())
        except trio.WouldBlock:
            break
    kinds = [type(e).__name__ for e in got]
    assert kinds == ["RunStarted", "PhaseStarted", "MeasurementTaken", "PhaseFinished", "RunFinished"]
    taken = next(e for e in got if isinstance(e, MeasurementTaken))
    assert taken.measurement.marginal and taken.measurement.outcome is MeasurementOutcome.PASS
    assert isinstance(got[-1], RunFinished) and got[-1].run.marginal
    store = LocalStore.open(store_path)
    assert store.get_run(run.run_id) == run
    store.close()


async def test_slow_subscriber_never_blocks_testing(store_path: Path) -> None:
    bus = EventBus()
    bus.subscribe("stalled", buffer=2)  # never read

    @phase
    async def quick() -> None:
        pass

    runs = await run_product(Product("p", [quick]), store_path, slots=10, bus=bus)
    assert all(r.outcome is Outcome.PASS for r in runs)
    assert bus.dropped["stalled"] > 0


async def test_records_are_committed_before_dependents_start(store_path: Path) -> None:
    seen_in_store: list[bool] = []

    @phase
    async def first() -> None:
        pass

    @phase(after=[first])
    async def second(ctx) -> None:
        # Durable means where the next open would find it: in the database,
        # or in the journal it replays (the copy into SQLite runs behind).
        reader = LocalStore.open(store_path)
        run = reader.get_run(ctx.record.run_id)
        reader.close()
        journalled, _ = _read_journal([path for _, path in _journal_segments(store_path)])
        seen_in_store.append(
            (run is not None and run.phase("first") is not None)
            or any(w.kind == "phase" and w.run_id == ctx.record.run_id and w.name == "first" for w in journalled)
        )

    await run_product(Product("p", [first, second]), store_path)
    assert seen_in_store == [True]


async def test_abort_records_every_phase_and_runs_teardowns(store_path: Path) -> None:
    from sequencer.engine import RunSettings, SlotControl, run_dut
    from sequencer.fixtures import SlotInfo
    from sequencer.product import LoadedProduct

    @phase
    async def long_one(ctx) -> None:
        ctx.log.info("started the long one")
        await trio.sleep(30)

    @phase(after=[long_one])
    async def after_long() -> None:
        pass

    @phase(teardown=True)
    async def td() -> None:
        await trio.sleep(0.05)  # teardowns still get to await after an abort

    product = Product("p", [long_one, after_long, td])
    store = LocalStore.open(store_path, station=True)
    control = SlotControl()
    async with store.writer():
        async with trio.open_nursery() as nursery:
            async def go() -> None:
                nonlocal run
                run = await run_dut(LoadedProduct(product, Path("x")), SlotInfo(0, "/dev/x", "st"),
                                    settings=RunSettings("st"), store=store, bus=EventBus(), control=control)
            run = None
            nursery.start_soon(go)
            await trio.sleep(0.1)
            control.abort()
    store.close()
    assert run.outcome is Outcome.ABORTED
    assert outcomes(run) == {"long_one": "ABORTED", "after_long": "SKIPPED", "td": "PASS"}
    assert run.phase("long_one").logs[0].message == "started the long one"


class _DiskFillsUp:
    """A record writer whose disk fills after ``room`` phase records: every later write fails.

    The real store's failure is tested end to end in test_cli_e2e.py; this one
    lets the engine's side be checked phase by phase.
    """

    def __init__(self, room: int, *, runs: int | None = None) -> None:
        self.room = room
        #: how many runs it can begin (None: any number)
        self.runs = runs
        self.phases: list[tuple[int, str]] = []

    async def begin_run(self, run) -> None:
        await trio.lowlevel.checkpoint()
        if self.runs is not None:
            if self.runs == 0:
                raise OSError(28, "No space left on device")
            self.runs -= 1

    async def commit_phase(self, run_id, index, phase, dut) -> None:
        await trio.lowlevel.checkpoint()
        if len(self.phases) >= self.room:
            raise OSError(28, "No space left on device")
        self.phases.append((index, phase.name))

    async def finish_run(self, run) -> None:
        await trio.lowlevel.checkpoint()
        raise OSError(28, "No space left on device")


async def test_a_store_failure_stops_every_slot_but_teardowns_run_and_fixtures_close() -> None:
    from sequencer.engine import RunSettings
    from sequencer.product import LoadedProduct
    from sequencer.station import run_station

    closed: list[int] = []
    torn_down: list[int] = []

    def board(slot):
        @asynccontextmanager
        async def open_board():
            try:
                yield slot.index
            finally:
                closed.append(slot.index)

        return open_board()

    @phase
    async def quick(board) -> None:
        pass

    @phase(after=[quick])
    async def long(board) -> None:
        await trio.sleep(0 if board == 0 else 30)  # slot 0 fills the disk; the others are mid-phase

    @phase(after=[long])
    async def last() -> None:
        pass

    @phase(teardown=True)
    async def power_off(board) -> None:
        torn_down.append(board)

    writer = _DiskFillsUp(room=3)  # the three slots' `quick`; slot 0's `long` finds the disk full
    product = Product("p", [quick, long, last, power_off])
    with trio.fail_after(10):  # the other slots are stopped, not left to finish their 30 s phase
        result = await run_station(
            LoadedProduct(product, Path("<test>")), ["/dev/a", "/dev/b", "/dev/c"],
            settings=RunSettings(station="st"), store=writer, bus=EventBus(), handle_signals=False,
            fixtures={"board": board},
        )
    assert result.write_error == "[Errno 28] No space left on device"
    assert not result.aborted  # not the operator
    assert sorted(torn_down) == sorted(closed) == [0, 1, 2]  # the hardware is left safe on every slot
    by_slot = {r.slot: r for r in result.runs}
    # No unit passes without its record; each says what the store will say of it once it can be written again.
    assert all(r.outcome is Outcome.INTERRUPTED for r in by_slot.values())
    assert outcomes(by_slot[0]) == {"quick": "PASS", "long": "PASS", "last": "SKIPPED", "power_off": "PASS"}
    assert by_slot[0].phase("last").reason == (
        "run stopped: records cannot be written ([Errno 28] No space left on device)"
    )
    assert outcomes(by_slot[1])["long"] == "ABORTED"
    assert by_slot[1].phase("long").reason == "aborted because records cannot be written"
    assert sorted(writer.phases) == [(0, "quick")] * 3


async def test_a_run_whose_record_cannot_be_closed_is_not_a_pass() -> None:
    from sequencer.engine import RecordsNotWritten, RunSettings, run_dut
    from sequencer.fixtures import SlotInfo
    from sequencer.product import LoadedProduct

    @phase
    async def only() -> None:
        pass

    writer = _DiskFillsUp(room=1)  # every phase is written; closing the run is not
    with pytest.raises(RecordsNotWritten) as info:
        await run_dut(LoadedProduct(Product("p", [only]), Path("x")), SlotInfo(0, "/dev/x", "st"),
                      settings=RunSettings("st"), store=writer, bus=EventBus())
    assert writer.phases == [(0, "only")]
    assert outcomes(info.value.run) == {"only": "PASS"}
    assert info.value.run.outcome is Outcome.INTERRUPTED  # the unit has no complete record, as the store will say


async def test_a_run_the_store_could_not_begin_is_no_run() -> None:
    # The store has nothing of it, so neither has the station's result: the
    # summary shows only runs the store will show.
    from sequencer.engine import RunSettings
    from sequencer.product import LoadedProduct
    from sequencer.station import run_station

    tested: list[int] = []

    @phase
    async def only(slot) -> None:
        tested.append(slot.index)

    writer = _DiskFillsUp(room=10, runs=1)
    result = await run_station(
        LoadedProduct(Product("p", [only]), Path("<test>")), ["/dev/a", "/dev/b"], settings=RunSettings("st"),
        store=writer, bus=EventBus(), handle_signals=False,
    )
    assert result.write_error == "[Errno 28] No space left on device"
    [run] = result.runs
    assert tested == [run.slot]  # the unit whose run could not begin was not tested


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
async def test_non_finite_values_fail(store_path: Path, bad: float) -> None:
    @phase(measurements=[Measurement("x")])
    async def produce(ctx) -> None:
        ctx.measurements.x = bad

    [run] = await run_product(Product("p", [produce]), store_path)
    assert run.phase("produce").outcome is Outcome.FAIL


def test_a_station_process_tunes_the_garbage_collector() -> None:
    import gc

    from sequencer.station import STATION_GC_THRESHOLDS, tune_garbage_collector

    before = gc.get_threshold()
    try:
        tune_garbage_collector()
        assert gc.get_threshold() == STATION_GC_THRESHOLDS
        assert gc.get_freeze_count() > 0  # what exists at start is out of the collector's sight
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)


# -- what a phase's or a fixture's own tasks may do -------------------------------


async def test_a_phase_whose_own_task_fails_as_it_times_out_is_that_slots_timeout_alone(store_path: Path) -> None:
    # The phase's nursery is cancelled by the phase's timeout while one of its
    # tasks raises in its cleanup: Cancelled and OSError come out together.
    torn_down: list[int] = []

    @phase(timeout=0.05)
    async def talk(slot) -> None:
        async def reader() -> None:
            try:
                await trio.sleep_forever()
            finally:
                if slot.index == 1:
                    raise OSError("serial port closed under us")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader)
            await trio.sleep(0.01 if slot.index == 0 else 10)
            nursery.cancel_scope.cancel()

    @phase
    async def beside() -> None:
        await trio.sleep(0.1)  # still running when talk times out

    @phase(teardown=True)
    async def power_off(slot) -> None:
        torn_down.append(slot.index)

    runs = await run_product(Product("p", [talk, beside, power_off]), store_path, slots=2)
    assert [outcomes(r) for r in runs] == [
        {"talk": "PASS", "beside": "PASS", "power_off": "PASS"},
        {"talk": "TIMEOUT", "beside": "PASS", "power_off": "PASS"},
    ]
    attempt = runs[1].phase("talk").attempts[0]
    assert attempt.reason == "timed out after 0.05 s"
    assert "OSError: serial port closed under us" in attempt.error.traceback  # what went wrong is kept too
    assert sorted(torn_down) == [0, 1]


async def test_a_fixture_may_keep_a_task_running_across_phases_and_tasks(store_path: Path) -> None:
    events: list[str] = []

    @asynccontextmanager
    async def link(slot):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.sleep_forever)  # a reader, say
            events.append("opened")
            yield f"link on {slot.port}"
            nursery.cancel_scope.cancel()
        events.append("closed")

    @phase
    async def first(link) -> None:
        await trio.sleep(0.01)

    @phase
    async def second(link) -> None:  # a root of its own: another task than first's
        await trio.sleep(0.02)

    @phase(after=[first, second])
    async def third(link) -> None:
        pass

    @phase(teardown=True)
    async def td(link) -> None:
        events.append("teardown used it")

    [run] = await run_product(Product("p", [first, second, third, td], fixtures={"link": lambda slot: link(slot)}),
                              store_path)
    assert outcomes(run) == {"first": "PASS", "second": "PASS", "third": "PASS", "td": "PASS"}
    assert events == ["opened", "teardown used it", "closed"]


async def test_a_fixture_that_fails_closing_leaves_the_run_finished(
    store_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sequencer.engine as engine

    monkeypatch.setattr(engine, "FIXTURE_CLOSE_TIMEOUT_S", 0.1)

    @asynccontextmanager
    async def link(slot):
        async def stubborn() -> None:
            try:
                await trio.sleep_forever()
            finally:
                with trio.CancelScope(shield=True):
                    await trio.sleep(1)  # longer than the close may take
                raise OSError("port gone")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(stubborn)
            yield "link"
            nursery.cancel_scope.cancel()

    @phase
    async def uses(link) -> None:
        pass

    [run] = await run_product(Product("p", [uses], fixtures={"link": lambda slot: link(slot)}), store_path)
    assert run.outcome is Outcome.PASS
    store = LocalStore.open(store_path, station=True)
    assert store.interrupted_on_open == 0 and store.get_run(run.run_id).outcome is Outcome.PASS
    store.close()


# -- stopping, aborting ------------------------------------------------------------


async def test_after_a_stop_a_teardown_keeps_its_retries(store_path: Path) -> None:
    calls: list[int] = []

    @phase
    async def fails() -> PhaseResult:
        return PhaseResult.FAIL

    @phase(teardown=True, retries=1)
    async def power_off() -> PhaseResult:
        calls.append(1)
        return PhaseResult.FAIL if len(calls) == 1 else PhaseResult.CONTINUE

    [run] = await run_product(Product("p", [fails, power_off], stop_on_failure=True), store_path)
    assert [a.outcome.value for a in run.phase("power_off").attempts] == ["FAIL", "PASS"]
    assert run.phase("power_off").outcome is Outcome.PASS


async def test_a_run_if_that_raises_stops_the_run_as_any_failure_does(store_path: Path) -> None:
    @phase(run_if=lambda record: record.dut["hw"] == "B")  # no "hw": KeyError
    async def rev_b_only() -> None:
        pass

    @phase
    async def slow_independent() -> None:
        await trio.sleep(5)

    [run] = await run_product(Product("p", [rev_b_only, slow_independent], stop_on_failure=True), store_path)
    assert outcomes(run) == {"rev_b_only": "ERROR", "slow_independent": "SKIPPED"}  # not run, let alone waited for
    assert run.phase("slow_independent").reason == "run stopped: phase 'rev_b_only' ended ERROR"


async def test_an_abort_during_a_commit_starts_none_of_the_phases_it_made_ready(store_path: Path) -> None:
    from sequencer.engine import RunSettings, SlotControl, run_dut
    from sequencer.fixtures import SlotInfo
    from sequencer.product import LoadedProduct

    ran: list[str] = []
    release = trio.Event()
    control = SlotControl()

    @phase
    async def a() -> None:
        await release.wait()  # woken in the same scheduler batch as the abort

    @phase(after=[a])
    async def b() -> None:
        ran.append("b")

    @phase(after=[a])
    async def c() -> None:
        ran.append("c")

    store = LocalStore.open(store_path, station=True)
    async with store.writer():
        async def operator() -> None:
            await trio.sleep(0.05)
            release.set()
            control.abort()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(operator)
            run = await run_dut(LoadedProduct(Product("p", [a, b, c]), Path("<t>")), SlotInfo(0, "/dev/x", "st"),
                                settings=RunSettings("st"), store=store, bus=EventBus(), control=control)
    store.close()
    assert ran == []  # neither touched the DUT after Ctrl-C
    assert outcomes(run) == {"a": "PASS", "b": "SKIPPED", "c": "SKIPPED"}
    assert run.outcome is Outcome.ABORTED


async def test_a_bug_outside_any_phase_ends_that_run_in_error_and_its_teardowns_still_run(
    store_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sequencer.engine import _SlotRun

    run_ready = _SlotRun._run_ready
    torn_down: list[int] = []

    async def buggy_on_slot_1(self: _SlotRun, p) -> None:
        if self.slot.index == 1 and p.name == "second":
            raise RuntimeError("a bug in the engine")
        await run_ready(self, p)

    monkeypatch.setattr(_SlotRun, "_run_ready", buggy_on_slot_1)

    @phase
    async def first() -> None:
        pass

    @phase(after=[first])
    async def second() -> None:
        pass

    @phase(teardown=True)
    async def td(slot) -> None:
        torn_down.append(slot.index)

    runs = await run_product(Product("p", [first, second, td]), store_path, slots=2)
    assert [r.outcome for r in runs] == [Outcome.PASS, Outcome.ERROR]
    assert outcomes(runs[1]) == {"first": "PASS", "second": "SKIPPED", "td": "PASS"}
    assert runs[1].phase("second").reason == "run stopped: the engine failed (RuntimeError: a bug in the engine)"
    assert sorted(torn_down) == [0, 1]


async def test_a_slot_whose_run_escapes_the_engine_is_reported_never_taken_for_a_pass(
    store_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sequencer.station as station
    from sequencer.engine import RunSettings
    from sequencer.product import LoadedProduct

    run_dut = station.run_dut

    async def escapes_on_slot_1(product, slot, **kwargs):
        if slot.index == 1:
            raise RuntimeError("a bug past the engine's own guard")
        return await run_dut(product, slot, **kwargs)

    monkeypatch.setattr(station, "run_dut", escapes_on_slot_1)

    @phase
    async def work() -> None:
        await trio.sleep(0.01)

    store = LocalStore.open(store_path, station=True)
    async with store.writer():
        result = await station.run_station(
            LoadedProduct(Product("p", [work]), Path("<t>")), ["/dev/a", "/dev/b", "/dev/c"],
            settings=RunSettings("st"), store=store, bus=EventBus(), handle_signals=False,
        )
    store.close()
    assert [r.slot for r in result.runs] == [0, 2] and all(r.outcome is Outcome.PASS for r in result.runs)
    assert result.crashed == ("slot 1 /dev/b: RuntimeError: a bug past the engine's own guard",)
    assert not result.all_passed


async def test_a_run_records_which_dut_keys_name_its_unit(store_path: Path) -> None:
    @phase()
    async def identify(ctx) -> None:
        ctx.identify(imei="356938035643809")

    [default] = await run_product(Product("p", [identify]), store_path)
    assert default.identity == ("serial", "mac")
    [tracker] = await run_product(Product("t", [identify], identity="imei"), store_path)
    assert tracker.identity == ("imei",)
    from reports.storage.store import LocalStore

    store = LocalStore.open(store_path)
    try:  # as the store keeps it, read back
        assert [r.identity for r in store.find_runs()] == [("serial", "mac"), ("imei",)]
    finally:
        store.close()
