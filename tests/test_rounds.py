"""`sequencer run --rounds N`: set after set of boards in one session, the operator saying when to go on."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from fixtures.sim.farm import open_farm
from reports.storage.store import LocalStore
from sequencer.records import Outcome
from tests.terminal_support import open_terminal

ROOT = Path(__file__).resolve().parent.parent
WIDGET = ROOT / "tests" / "products" / "mongo_widget.py"  # no DUT protocol: any port will do


def sequencer(*args: str) -> list[str]:
    return [sys.executable, "-m", "sequencer.cli", *args]


def runs_in(store: Path) -> list:
    reader = LocalStore.open(store)
    try:
        return reader.find_runs()
    finally:
        reader.close()


def test_simulated_rounds_test_new_boards_each_round_and_report_them_all(tmp_path: Path) -> None:
    done = subprocess.run(
        sequencer("run", "products/esp32_sensor.py", "--sim", "2", "--rounds", "3", "--plain",
                  "--store", str(tmp_path / "s.sqlite"), "--batch", "R3"),
        capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "esp32-sensor on 2 slot(s), batch R3, station " in out and out.count(" (round ") == 3
    assert "round 1 of 3: 2/2 passed\n? station: round 2 of 3: put the next boards in, then press Enter " \
           "[next/stop, Enter: next]\n  station: answered 'next'\n" in out
    assert out.rstrip().splitlines()[-1].startswith("6/6 passed.  Report: ")
    runs = runs_in(tmp_path / "s.sqlite")
    assert len(runs) == 6 and all(r.outcome is Outcome.PASS for r in runs)
    assert len({r.serial for r in runs}) == 6  # new boards every round
    assert sorted(r.slot for r in runs) == [0, 0, 0, 1, 1, 1]
    page = (tmp_path / "reports" / "R3" / "index.html").read_text(encoding="utf-8")
    assert all(r.serial in page for r in runs)


async def test_enter_goes_on_stop_ends_and_the_end_of_input_ends_after_the_round(tmp_path: Path) -> None:
    async with open_farm(2) as devices:
        ports = [arg for d in devices for arg in ("--port", d.path)]

        async def session(name: str, answers: bytes, rounds: str = "3") -> tuple[int, str]:
            done = await trio.run_process(
                sequencer("run", str(WIDGET), *ports, "--rounds", rounds, "--plain", "--store",
                          str(tmp_path / f"{name}.sqlite")),
                stdin=answers, capture_stdout=True, capture_stderr=True, check=False, cwd=ROOT)
            return done.returncode, done.stdout.decode()

        code, out = await session("enter-stop", b"\nstop\n")
        assert code == 0, out
        assert "  station: answered 'next'\n" in out and "  station: answered 'stop'\n" in out
        assert len(runs_in(tmp_path / "enter-stop.sqlite")) == 4  # two rounds of two slots
        code, out = await session("until-stop", b"\n\nstop\n", rounds="0")
        assert code == 0, out
        assert "(round 3)\n" in out and "? station: round 3: put the next boards in, then press Enter " in out
        assert "round 3: 2/2 passed\n? station: round 4: put the next boards in" in out
        assert len(runs_in(tmp_path / "until-stop.sqlite")) == 6
        code, out = await session("typo", b"nope\nSTOP\n")
        assert code == 0
        assert "  station: not taken: 'nope' is not one of next, stop\n" in out
        assert len(runs_in(tmp_path / "typo.sqlite")) == 2
        code, out = await session("nobody", b"")
        assert code == 0
        assert "standard input ended: nobody is left to answer the operator's questions: stopping after round 1" in out
        assert len(runs_in(tmp_path / "nobody.sqlite")) == 2


@pytest.mark.parametrize("asked, said, kept", [
    ("? station: round 2 of 2", "stopped by the operator between rounds", 2),
    ("? station: who is testing?", "stopped by the operator before any board was tested", 0),
])
async def test_ctrl_c_at_a_station_question_stops_the_station_and_keeps_every_finished_run(
    tmp_path: Path, asked: str, said: str, kept: int
) -> None:
    store = tmp_path / "s.sqlite"
    async with open_farm(2) as devices:
        station = tmp_path / "station.toml"
        station.write_text(f"ports = {[d.path for d in devices]!r}\nask_operator = {str(not kept).lower()}\n"
                           .replace("'", '"'))
        read, write = os.pipe()  # standard input that stays open and says nothing
        try:
            async with trio.open_nursery() as nursery:
                proc = await trio.lowlevel.open_process(
                    sequencer("run", str(WIDGET), "--station", str(station), "--rounds", "2", "--plain", "--store",
                              str(store)),
                    stdin=read, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT,
                    env={**os.environ, "PYTHONUNBUFFERED": "1"})
                out = bytearray()

                async def collect() -> None:
                    async for chunk in proc.stdout:
                        out.extend(chunk)

                nursery.start_soon(collect)
                with trio.fail_after(60):
                    while asked.encode() not in out:
                        await trio.sleep(0.02)
                    proc.send_signal(signal.SIGINT)
                    await proc.wait()
        finally:
            os.close(read)
            os.close(write)
    text = out.decode()
    assert proc.returncode == 130, text
    assert text.rstrip().endswith(said)
    runs = runs_in(store) if store.exists() else []
    assert len(runs) == kept and all(r.outcome is Outcome.PASS for r in runs)


async def test_the_operator_presses_enter_under_the_live_display_for_the_next_round(tmp_path: Path) -> None:
    async with open_farm(1) as devices, open_terminal() as terminal:
        proc = await terminal.station(
            sequencer("run", str(WIDGET), "--port", devices[0].path, "--rounds", "2", "--store",
                      str(tmp_path / "s.sqlite")), ROOT)
        await terminal.shown(r"\? station: round 2 of 2: put the next boards in")
        terminal.type(b"\r")
        with trio.fail_after(60):
            await proc.wait()
        assert proc.returncode == 0, terminal.text()[-2000:]
        assert "(round 2 of 2)" in terminal.text()
    assert len(runs_in(tmp_path / "s.sqlite")) == 2


def test_a_simulated_station_needs_a_number_of_rounds(tmp_path: Path) -> None:
    done = subprocess.run(sequencer("run", str(WIDGET), "--sim", "1", "--rounds", "0", "--store",
                                    str(tmp_path / "s.sqlite")), capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 2
    assert done.stderr.strip() == (
        "sequencer: error: station: rounds = 0 goes on until the operator types stop, and the simulated operator "
        "never does: give simulated stations a number of rounds")
    assert not (tmp_path / "s.sqlite").exists()


async def test_a_station_that_asks_who_is_testing_stamps_the_answer_on_every_run(tmp_path: Path) -> None:
    async with open_farm(2) as devices:
        station = tmp_path / "station.toml"
        station.write_text(f"ports = {[d.path for d in devices]!r}\nask_operator = true\n".replace("'", '"'))

        async def session(name: str, *args: str, answers: bytes) -> tuple[int, str, str]:
            done = await trio.run_process(
                sequencer("run", str(WIDGET), "--station", str(station), "--plain", "--store",
                          str(tmp_path / f"{name}.sqlite"), *args),
                stdin=answers, capture_stdout=True, capture_stderr=True, check=False, cwd=ROOT)
            return done.returncode, done.stdout.decode(), done.stderr.decode()

        code, out, err = await session("badge", answers=b"  \naoife\n")
        assert code == 0, err
        assert "? station: who is testing? Scan your badge or type your name, then press Enter [text]\n" in out
        assert "  station: not taken: type text, then Enter\n  station: answered 'aoife'\n" in out
        assert ", operator aoife\n" in out
        assert [r.operator for r in runs_in(tmp_path / "badge.sqlite")] == ["aoife", "aoife"]
        code, out, err = await session("given", "--operator", "bob", answers=b"")
        assert code == 0, err
        assert "who is testing" not in out
        assert [r.operator for r in runs_in(tmp_path / "given.sqlite")] == ["bob", "bob"]
        code, out, err = await session("nobody", answers=b"")
        assert code == 2
        assert err.strip() == (
            "sequencer: error: the station asks who is testing (ask_operator), and nobody can answer: standard input "
            "ended: nobody is left to answer the operator's questions; give --operator NAME")
        assert runs_in(tmp_path / "nobody.sqlite") == []
