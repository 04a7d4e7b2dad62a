"""What a fixture logs goes into the run's record as well as the station log (issue 18, item 11).

A fixture's factory gets ``slot.log``: its lines go to the phase in progress
that uses the fixture, or (opening beside another such phase, between
phases, closing) to the run's own ``logs``; each names the fixture, and the
station log names the phase too. Bounded, and secrets stay ``***``.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import trio

from reports.storage.store import LocalStore
from sequencer import Product, phase
from sequencer.context import MAX_LOG_LINES_PER_PHASE
from sequencer.fixture_log import MAX_RUN_LOG_LINES
from sequencer.fixtures import SlotInfo
from sequencer.logs import configure_logging
from sequencer.records import LogLine, Outcome, RunRecord
from tests.conftest import run_product


class Jig:
    """A relay board: switching logs; a reader task of its own logs when poked."""

    def __init__(self, slot: SlotInfo) -> None:
        self.log = slot.log
        self.poke = trio.Event()
        self.heard = trio.Event()
        self.arrived = 0
        self.both = trio.Event()

    def switch(self, channel: int) -> None:
        self.log.info("relay closed", channel=channel)

    async def reader(self) -> None:
        await self.poke.wait()
        self.log.warning("unsolicited line from the board", text="BOOT")
        self.heard.set()

    async def meet(self) -> None:
        """Two phases at once: the line cannot say which of them it belongs to."""
        self.arrived += 1
        if self.arrived == 2:
            self.log.info("both phases have the jig")
            self.both.set()
        await self.both.wait()


def jig_fixture(opened: dict[str, Jig]) -> Any:
    @asynccontextmanager
    async def open_jig(slot: SlotInfo) -> AsyncIterator[Jig]:
        jig = Jig(slot)
        slot.log.info("jig opening", port="/dev/ttyJIG")
        slot.log.debug("jig said: OK")  # chatter: the station log's, not the record's
        async with trio.open_nursery() as nursery:
            nursery.start_soon(jig.reader)
            opened["jig"] = jig
            try:
                yield jig
            finally:
                nursery.cancel_scope.cancel()
                slot.log.info("jig closing", relays_open=3)

    return open_jig


def messages(lines: tuple[LogLine, ...]) -> list[tuple[str | None, str, str]]:
    return [(line.fixture, line.level, line.message) for line in lines]


def stored(store_path: Path, run: RunRecord) -> RunRecord:
    reading = LocalStore.open(store_path)
    try:
        back = reading.get_run(run.run_id)
    finally:
        reading.close()
    assert back is not None
    return back


def station_lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


async def test_a_fixtures_lines_go_to_the_phase_using_it_and_outside_phases_to_the_run(tmp_path: Path) -> None:
    opened: dict[str, Jig] = {}

    @phase
    async def measure(ctx: Any, jig: Jig) -> None:
        ctx.log.info("switching")
        jig.switch(3)

    @phase(follows=["measure"])
    async def wait_for_board(ctx: Any) -> None:
        # Does not use the jig: what the jig's reader says meanwhile belongs to no phase.
        opened["jig"].poke.set()
        await opened["jig"].heard.wait()
        ctx.log.info("the board spoke")

    log = configure_logging(tmp_path / "station.log", verbose=True)
    assert log is not None
    try:
        [run] = await run_product(Product("p", [measure, wait_for_board], fixtures={"jig": jig_fixture(opened)}),
                                  tmp_path / "store.sqlite")
    finally:
        log.close()

    assert run.outcome is Outcome.PASS
    # Opening happens in the phase that asked for the jig: its lines are that phase's, named by fixture.
    assert messages(run.phase("measure").logs) == [
        ("jig", "info", "jig opening port='/dev/ttyJIG'"),
        (None, "info", "switching"),
        ("jig", "info", "relay closed channel=3"),
    ]
    assert messages(run.phase("wait_for_board").logs) == [(None, "info", "the board spoke")]
    # Between phases (the reader task, while a phase that does not use the jig runs) and closing: the run's.
    assert messages(run.logs) == [
        ("jig", "warning", "unsolicited line from the board text='BOOT'"),
        ("jig", "info", "jig closing relays_open=3"),
    ]
    assert all(line.timestamp.tzinfo is not None for line in run.logs)
    # The store (journal, then SQLite) gives back the same record.
    assert stored(tmp_path / "store.sqlite", run) == run

    # The station log has every line, debug too, with the run, the fixture and (when known) the phase.
    jig_lines = [e for e in station_lines(tmp_path / "station.log") if e.get("fixture") == "jig"]
    assert [(e["event"], e["level"], e.get("phase")) for e in jig_lines] == [
        ("jig opening", "info", "measure"),
        ("jig said: OK", "debug", "measure"),
        ("relay closed", "info", "measure"),
        ("unsolicited line from the board", "warning", None),
        ("jig closing", "info", None),
    ]
    assert {e["run_id"] for e in jig_lines} == {run.run_id} and jig_lines[2]["channel"] == 3


async def test_a_line_two_phases_in_progress_could_own_is_the_runs(store_path: Path) -> None:
    opened: dict[str, Jig] = {}

    @phase
    async def left(jig: Jig) -> None:
        await jig.meet()

    @phase
    async def right(jig: Jig) -> None:
        await jig.meet()

    [run] = await run_product(Product("p", [left, right], fixtures={"jig": jig_fixture(opened)}), store_path)
    assert run.outcome is Outcome.PASS
    assert ("jig", "info", "both phases have the jig") in messages(run.logs)
    assert all(line.message != "both phases have the jig" for p in run.phases for line in p.logs)


async def test_a_fixture_logging_in_a_loop_is_cut_with_a_line_saying_how_many_were_dropped(store_path: Path) -> None:
    @asynccontextmanager
    async def chatty(slot: SlotInfo) -> AsyncIterator[SlotInfo]:
        try:
            yield slot
        finally:
            for i in range(MAX_RUN_LOG_LINES + 500):
                slot.log.info("still closing", i=i)

    @phase
    async def flood(ctx: Any, noisy: SlotInfo) -> None:
        for i in range(MAX_LOG_LINES_PER_PHASE + 3000):
            noisy.log.info("sample", i=i)

    [run] = await run_product(Product("p", [flood], fixtures={"noisy": chatty}), store_path)
    logs = run.phase("flood").logs
    assert len(logs) == MAX_LOG_LINES_PER_PHASE + 1
    assert logs[-2].message == f"sample i={MAX_LOG_LINES_PER_PHASE - 1}"
    assert (logs[-1].level, logs[-1].fixture) == ("warning", None)
    assert logs[-1].message == (f"3000 more log lines dropped: the record keeps the first {MAX_LOG_LINES_PER_PHASE} "
                                "of a phase's log (the station log has them all)")
    assert len(run.logs) == MAX_RUN_LOG_LINES + 1
    assert run.logs[-1].message == (f"500 more log lines dropped: the record keeps the first {MAX_RUN_LOG_LINES} "
                                    "of the fixtures' log outside phases (the station log has them all)")
    assert stored(store_path, run) == run


async def test_a_phase_logging_in_a_loop_says_how_many_lines_it_lost(store_path: Path) -> None:
    @phase
    async def loud(ctx: Any) -> None:
        for i in range(MAX_LOG_LINES_PER_PHASE + 1):
            ctx.log.debug("tick", i=i)

    [run] = await run_product(Product("p", [loud]), store_path)
    assert run.phase("loud").logs[-1].message.startswith("1 more log line dropped: ")


async def test_a_secret_a_fixture_logs_is_redacted_in_the_record_the_store_and_the_station_log(
    tmp_path: Path,
) -> None:
    from fixtures.device_config import Secret

    pin = Secret("4711-0815")

    @asynccontextmanager
    async def sim_card(slot: SlotInfo) -> AsyncIterator[Secret]:
        slot.log.info("unlocking", pin=pin)
        slot.log.warning(f"PIN {pin} accepted")
        try:
            yield pin
        finally:
            slot.log.info("locking", pin=pin)

    @phase
    async def attach(sim: Secret) -> None:
        pass

    log = configure_logging(tmp_path / "station.log")
    assert log is not None
    try:
        [run] = await run_product(Product("p", [attach], fixtures={"sim": sim_card}), tmp_path / "store.sqlite")
    finally:
        log.close()
    assert messages(run.phase("attach").logs) == [("sim", "info", "unlocking pin=***"),
                                                  ("sim", "warning", "PIN *** accepted")]
    assert messages(run.logs) == [("sim", "info", "locking pin=***")]
    everything = (tmp_path / "station.log").read_text() + "".join(
        p.read_bytes().decode("latin-1") for p in tmp_path.glob("store.sqlite*"))
    assert '"pin": "***"' in everything and "unlocking pin=***" in everything
    assert "4711" not in everything


async def test_exception_names_the_error_and_a_dump_can_go_to_the_station_log_alone(tmp_path: Path) -> None:
    @asynccontextmanager
    async def flaky(slot: SlotInfo) -> AsyncIterator[None]:
        try:
            raise TimeoutError("no answer from the relay board")
        except TimeoutError:
            slot.log.exception("relay board reset")
        slot.log.station.warning("register dump", registers="00 ff 3c")
        yield

    @phase
    async def use(board: None) -> None:
        pass

    log = configure_logging(tmp_path / "station.log")
    assert log is not None
    try:
        [run] = await run_product(Product("p", [use], fixtures={"board": flaky}), tmp_path / "store.sqlite")
    finally:
        log.close()
    assert messages(run.phase("use").logs) == [
        ("board", "error", "relay board reset error='TimeoutError: no answer from the relay board'"),
    ]
    said = {e["event"]: e for e in station_lines(tmp_path / "station.log") if e.get("fixture") == "board"}
    assert "TimeoutError: no answer from the relay board" in said["relay board reset"]["exception"]
    assert said["register dump"]["registers"] == "00 ff 3c" and said["register dump"]["run_id"] == run.run_id


async def test_a_stopped_run_keeps_what_its_fixtures_said_closing(store_path: Path) -> None:
    from sequencer import PhaseResult

    @asynccontextmanager
    async def power(slot: SlotInfo) -> AsyncIterator[None]:
        yield
        slot.log.info("power off")

    @phase
    async def stop(supply: None) -> PhaseResult:
        return PhaseResult.STOP

    [run] = await run_product(Product("p", [stop], fixtures={"supply": power}), store_path)
    assert run.outcome is Outcome.FAIL
    assert messages(run.logs) == [("supply", "info", "power off")]
