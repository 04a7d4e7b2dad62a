"""Questions for the operator: the desk's queue, the answers it takes, the engine, the display, the inputs."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest
import trio
from rich.console import Console

from fixtures.sim.farm import open_farm
from fixtures.sim.operator import simulated_operator
from reports.storage.store import LocalStore
from sequencer import Measurement, Product, phase
from sequencer.display import StationDisplay, question_lines
from sequencer.keyboard import _Keys, answer_from_lines
from sequencer.operator import NoOperator, OperatorDesk, Question
from sequencer.records import Outcome
from tests.conftest import run_product
from tests.terminal_support import open_terminal

ROOT = Path(__file__).resolve().parent.parent
ASKING = ROOT / "tests" / "products" / "asking_widget.py"


def question(slot: int = 0, text: str = "Is the LED green?", choices: tuple[str, ...] = ("yes", "no"),
             pattern: str | None = None, serial: str = "SN1") -> Question:
    return Question(slot, f"/dev/pts/{slot}", serial, text, choices, pattern)


# -- what counts as an answer --------------------------------------------------------------


def test_a_choice_is_taken_in_any_case_or_by_a_prefix_only_it_has() -> None:
    q = question(choices=("pass", "fail", "partial"))
    assert q.answer_from("FAIL") == "fail"
    assert q.answer_from(" fa ") == "fail"
    assert q.answer_from("pas") == "pass"
    with pytest.raises(ValueError, match="'pa' is not one of pass, fail, partial"):
        q.answer_from("pa")  # pass or partial: the operator must say which
    with pytest.raises(ValueError, match="type pass/fail/partial, then Enter"):
        q.answer_from("   ")


def test_free_text_must_match_the_whole_pattern() -> None:
    q = question(choices=(), pattern=r"SN\d+")
    assert q.answer_from("SN0042\r") == "SN0042"
    with pytest.raises(ValueError, match=r"'SN0042x' does not match SN\\d\+"):
        q.answer_from("SN0042x")
    with pytest.raises(ValueError, match="at most 200 characters"):
        question(choices=()).answer_from("x" * 201)


# -- the desk ---------------------------------------------------------------------------


async def test_questions_are_answered_oldest_first_and_a_refused_answer_leaves_a_hint() -> None:
    desk = OperatorDesk()
    answers: dict[int, str] = {}

    async def ask(slot: int) -> None:
        answers[slot] = await desk.ask(question(slot))

    async with trio.open_nursery() as nursery:
        for slot in (0, 1):
            nursery.start_soon(ask, slot)
            await trio.testing.wait_all_tasks_blocked()
        assert desk.current is not None and desk.current.slot == 0 and desk.waiting == 2
        desk.type("mayb")
        assert not desk.answer("maybe")
        assert desk.hint == "'maybe' is not one of yes, no" and desk.draft == "" and desk.current.slot == 0
        assert desk.answer("Y")
        assert desk.hint == "" and desk.current.slot == 1
        assert desk.answer("n")
    assert answers == {0: "yes", 1: "no"}
    assert desk.current is None and not desk.answer("yes")


async def test_a_cancelled_question_leaves_the_queue_and_the_operator_goes_on_to_the_next() -> None:
    desk = OperatorDesk()
    async with trio.open_nursery() as nursery:
        first = trio.CancelScope()

        async def ask_first() -> None:
            with first:
                await desk.ask(question(0))

        nursery.start_soon(ask_first)
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(desk.ask, question(1))
        await trio.testing.wait_all_tasks_blocked()
        desk.type("ye")
        first.cancel()  # slot 0's phase timed out while the operator was typing
        await trio.testing.wait_all_tasks_blocked()
        assert desk.current is not None and desk.current.slot == 1 and desk.waiting == 1
        assert desk.draft == ""  # what was typed for slot 0 does not answer slot 1
        desk.answer("yes")


async def test_a_closed_desk_refuses_open_and_later_questions() -> None:
    desk = OperatorDesk()
    raised: list[str] = []

    async def ask() -> None:
        with pytest.raises(NoOperator) as info:
            await desk.ask(question())
        raised.append(str(info.value))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(ask)
        await trio.testing.wait_all_tasks_blocked()
        desk.close("standard input ended")
    with pytest.raises(NoOperator, match="standard input ended"):
        await desk.ask(question())
    assert raised == ["standard input ended"]


# -- in the engine -----------------------------------------------------------------------


@phase(measurements=[Measurement("led_green").equals(True)], timeout=5)
async def status_led(ctx, operator):
    ctx.identify(serial=f"SN{ctx.record.slot}")
    ctx.measurements.led_green = await operator.confirm("Is the status LED green?")


@phase(timeout=0.3, after=[status_led])
async def nobody_answers(ctx, operator):
    await operator.choose("Which enclosure colour?", ["grey", "black"])


async def run_asking(tmp_path: Path, phases: list, slots: int, desk: OperatorDesk | None, answer=None) -> list:
    async with trio.open_nursery() as nursery:
        if answer is not None:
            nursery.start_soon(answer, desk)
        runs = await run_product(Product("asking", phases), tmp_path / "s.sqlite", slots=slots, desk=desk)
        nursery.cancel_scope.cancel()
    return runs


async def test_the_answer_is_recorded_and_judged_and_a_question_nobody_answers_times_out(tmp_path: Path) -> None:
    async def operator(desk: OperatorDesk) -> None:
        while True:
            q = await desk.wait_question()
            if q.choices == ("yes", "no"):
                desk.answer("no" if q.slot == 1 else "yes")
            else:
                await desk.wait_changed(desk.version)  # leaves the enclosure question open

    desk = OperatorDesk()
    runs = await run_asking(tmp_path, [status_led, nobody_answers], 2, desk, operator)
    ok, dark = runs
    led = ok.phase("status_led")
    assert led.outcome is Outcome.PASS and led.attempts[-1].measurements[0].value is True
    assert [line.message for line in led.logs] == [
        "asked the operator question='Is the status LED green?' expected='yes/no'",
        f"the operator answered answer='yes' after_s={float(led.logs[1].message.rsplit('=', 1)[1])}",
    ]
    assert dark.phase("status_led").outcome is Outcome.FAIL
    timed_out = ok.phase("nobody_answers")
    assert timed_out.outcome is Outcome.TIMEOUT and "answered" not in timed_out.logs[-1].message
    assert desk.current is None  # the timed-out question left the queue


async def test_a_station_without_an_operator_ends_the_asking_phase_error(tmp_path: Path) -> None:
    (run,) = await run_asking(tmp_path, [status_led], 1, None)
    p = run.phase("status_led")
    assert p.outcome is Outcome.ERROR and p.reason == "NoOperator: this station has no operator to answer questions"


async def test_a_bad_choice_list_or_pattern_is_the_phase_authors_error(tmp_path: Path) -> None:
    @phase
    async def bad_choices(ctx, operator):
        await operator.choose("colour?", ["Grey", "grey"])

    @phase
    async def bad_pattern(ctx, operator):
        await operator.ask("label?", matches="SN(")

    (run,) = await run_asking(tmp_path, [bad_choices, bad_pattern], 1, OperatorDesk())
    assert run.phase("bad_choices").reason == "ValueError: choices must differ in more than case: ('Grey', 'grey')"
    assert run.phase("bad_pattern").reason.startswith("ValueError: matches='SN(' is not a regular expression")


# -- the simulated operator ------------------------------------------------------------------


async def test_the_simulated_operator_says_no_on_its_faulty_slots_and_scans_the_serial() -> None:
    desk = OperatorDesk()
    got: dict[tuple[int, str], str] = {}

    async def ask(q: Question) -> None:
        got[q.slot, q.text] = await desk.ask(q)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(partial(simulated_operator, desk, says_no=[1], seed=1, think_s=(0.0, 0.01)))
        async with trio.open_nursery() as asking:
            for slot in (0, 1):
                asking.start_soon(ask, question(slot))
                asking.start_soon(ask, question(slot, "Scan the label", (), r"SN\d+", serial=f"SN{slot}7"))
                asking.start_soon(ask, question(slot, "Colour?", ("grey", "black")))
        # A pattern the serial does not fit: nothing sensible to type, so it stays open.
        with trio.move_on_after(0.2):
            await desk.ask(question(0, "Batch code?", (), r"B\d+"))
        nursery.cancel_scope.cancel()
    assert got == {
        (0, "Is the LED green?"): "yes", (1, "Is the LED green?"): "no",
        (0, "Scan the label"): "SN07", (1, "Scan the label"): "SN17",
        (0, "Colour?"): "grey", (1, "Colour?"): "grey",
    }


# -- typing and showing ------------------------------------------------------------------------


async def test_keys_edit_the_draft_arrow_keys_are_dropped_and_keys_without_a_question_are_ignored() -> None:
    desk = OperatorDesk()
    keys = _Keys(desk)
    for char in "y\r":  # nothing is asked yet: a stray Enter must not answer the next question
        keys.press(char)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(desk.ask, question(choices=(), pattern=None))
        await trio.testing.wait_all_tasks_blocked()
        assert desk.draft == ""
        for char in "SN1\x1b[D\x1bOA\x7f2\x1b[1;5C3":  # left arrow, F1-style, backspace, Ctrl-right
            keys.press(char)
        assert desk.draft == "SN23"
        keys.press("\x15")
        assert desk.draft == ""
        for char in "SN9\r":
            keys.press(char)
        assert desk.current is None


async def test_lines_of_input_answer_in_turn_and_the_end_of_input_closes_the_desk() -> None:
    desk = OperatorDesk()
    read, write = os.pipe()
    os.write(write, b"maybe\nyes\nSN5")  # a script writes its answers ahead; the last line has no newline
    os.close(write)
    got = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(answer_from_lines, desk, read)
        got.append(await desk.ask(question()))
        got.append(await desk.ask(question(choices=())))
        with pytest.raises(NoOperator, match="standard input ended"):
            await desk.ask(question())
    os.close(read)
    assert got == ["yes", "SN5"]


async def test_the_question_is_drawn_under_the_slots_and_the_slots_keep_their_rows() -> None:
    desk = OperatorDesk()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(desk.ask, question(3, serial="SN\x1b[2J7"))  # a serial with an escape sequence
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(desk.ask, question(4))
        await trio.testing.wait_all_tasks_blocked()
        desk.answer("may")
        desk.type("mayb")
        lines = [line.plain for line in question_lines(desk)]
        assert lines == ["? slot 3 /dev/pts/3 SN\\x1b[2J7: Is the LED green?  [yes/no]  (+1 waiting)",
                         "> mayb\u2588", "  'may' is not one of yes, no"]
        display = StationDisplay([f"/dev/ttyUSB{i}" for i in range(8)], phases_per_run=3)
        console = Console(width=80, height=14, record=True, force_terminal=False)
        console.print(display.render(80, 14, desk))
        screen = console.export_text().splitlines()
        assert len(screen) <= 13  # one row is rich's cursor line
        assert screen[-3].startswith("? slot 3") and "ttyUSB7" in "".join(screen)  # every slot still shown
        nursery.cancel_scope.cancel()


def test_the_slot_table_shows_which_boards_wait_for_the_operator_and_plain_lines_tell_the_story() -> None:
    from sequencer.events import AnswerRefused, OperatorAnswered, OperatorAsked

    display = StationDisplay(["/dev/ttyUSB0", "/dev/ttyUSB1"], phases_per_run=3)
    asked = question(1, serial="SN7")
    lines = [display.apply(OperatorAsked(asked)), display.apply(AnswerRefused(asked, "'m' is not one of yes, no"))]
    assert display.slots[1].detail == "waiting for the operator" and display.slots[0].detail == ""
    lines.append(display.apply(OperatorAnswered(asked, "yes")))
    assert display.slots[1].detail == ""
    assert lines == ["? slot 1 /dev/pts/1 SN7: Is the LED green? [yes/no]",
                     "  slot 1: not taken: 'm' is not one of yes, no", "  slot 1: answered 'yes'"]
    station = Question(-1, "", "", "next boards?", ("next", "stop"), default="next")
    assert StationDisplay([], 0).apply(OperatorAsked(station)) == "? station: next boards? [next/stop, Enter: next]"


# -- the station, end to end -----------------------------------------------------------------------


def station(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sequencer.cli", "run", str(ASKING), *args],
                          capture_output=True, text=True, cwd=ROOT, timeout=120, **kwargs)


def test_sim_operator_answers_and_a_faulty_slot_fails_its_led_check(tmp_path: Path) -> None:
    profile = tmp_path / "faults.toml"
    profile.write_text('[slots]\n1 = "operator_says_no"\n')
    done = station("--sim", "3", "--faults", str(profile), "--store", str(tmp_path / "s.sqlite"), "--plain")
    assert done.returncode == 1, done.stderr
    assert "operator: the simulated operator answers the station's questions" in done.stdout
    assert re.search(r"\? slot \d /dev/pts/\d+ SN\d+: Is the status LED green\? \[yes/no\]", done.stdout)
    runs = {r.slot: r for r in LocalStore.open(tmp_path / "s.sqlite").find_runs()}
    assert [runs[i].outcome for i in range(3)] == [Outcome.PASS, Outcome.FAIL, Outcome.PASS]
    assert runs[1].phase("status_led").outcome is Outcome.FAIL
    assert runs[0].phase("scan_label").attempts[-1].measurements[0].value == runs[0].serial


async def test_answers_on_standard_input_and_none_when_it_is_empty(tmp_path: Path) -> None:
    async with open_farm(1, seed=4) as devices:
        port, serial = devices[0].path, devices[0].profile.serial
        answered = await trio.run_process(
            [sys.executable, "-m", "sequencer.cli", "run", str(ASKING), "--port", devices[0].path,
             "--store", str(tmp_path / "a.sqlite"), "--plain"],
            stdin=b"y\nlabel\nSN77\n", capture_stdout=True, capture_stderr=True, check=False, cwd=ROOT)
        nobody = await trio.run_process(
            [sys.executable, "-m", "sequencer.cli", "run", str(ASKING), "--port", devices[0].path,
             "--store", str(tmp_path / "b.sqlite"), "--plain"],
            stdin=subprocess.DEVNULL, capture_stdout=True, capture_stderr=True, check=False, cwd=ROOT)
        closed = await trio.run_process(  # started with descriptor 0 closed: the store may open as fd 0
            [sys.executable, "-m", "sequencer.cli", "run", str(ASKING), "--port", devices[0].path,
             "--store", str(tmp_path / "c.sqlite"), "--plain"],
            preexec_fn=lambda: os.close(0), capture_stdout=True, capture_stderr=True, check=False, cwd=ROOT)
    out = answered.stdout.decode()
    assert answered.returncode == 0, answered.stderr.decode()
    assert "? slot 0 %s %s: Scan the label [text matching SN\\d+]\n" % (port, serial) in out
    assert "  slot 0: not taken: 'label' does not match SN\\d+\n  slot 0: answered 'SN77'\n" in out
    (run,) = LocalStore.open(tmp_path / "a.sqlite").find_runs()
    assert run.phase("scan_label").attempts[-1].measurements[0].value == "SN77"
    assert nobody.returncode == 1
    (run,) = LocalStore.open(tmp_path / "b.sqlite").find_runs()
    assert run.phase("status_led").outcome is Outcome.ERROR
    assert run.phase("status_led").reason == (
        "NoOperator: standard input ended: nobody is left to answer the operator's questions")
    assert closed.returncode == 1, closed.stderr.decode()
    (run,) = LocalStore.open(tmp_path / "c.sqlite").find_runs()
    assert run.phase("status_led").reason == (
        "NoOperator: the station has no standard input: nobody can answer the operator's questions")


async def test_the_operator_types_answers_under_the_live_display(tmp_path: Path) -> None:
    async with open_farm(2, seed=5) as devices, open_terminal() as terminal:
        before = terminal.modes()
        proc = await terminal.station(
            [sys.executable, "-m", "sequencer.cli", "run", str(ASKING), "--port", devices[0].path,
             "--port", devices[1].path, "--store", str(tmp_path / "s.sqlite")], ROOT)
        first = int((await terminal.shown(r"\? slot (\d) \S+ SN\d+: Is the status LED green\?  \[yes/no\]"))[1])
        await terminal.shown(r"\(\+1 waiting\)")
        assert terminal.output.count(b"\x07") == 1  # the terminal bell, once: a question came after none
        await terminal.shown(r"1/3  waiting for the operator")
        terminal.type(b"mayb")
        await terminal.shown(r"> mayb")
        await terminal.shown(r"'maybe' is not one of yes, no", terminal.type(b"e\r"))
        mark = terminal.type(b"y\r")
        second = int((await terminal.shown(r"\? slot (\d) \S+ SN\d+: Is the status LED green\?", mark))[1])
        await terminal.shown(r"Scan the label", terminal.type(b"no\r"))
        terminal.type(b"SN4242\r")
        with trio.fail_after(60):
            await proc.wait()
        assert proc.returncode == 1, terminal.text()[-3000:]
        assert terminal.modes() == before  # echo and line editing are back for the shell
    assert {first, second} == {0, 1}
    runs = {r.slot: r for r in LocalStore.open(tmp_path / "s.sqlite").find_runs()}
    assert runs[first].outcome is Outcome.PASS
    assert runs[first].phase("scan_label").attempts[-1].measurements[0].value == "SN4242"
    assert runs[second].phase("status_led").outcome is Outcome.FAIL
    assert runs[second].phase("scan_label").outcome is Outcome.SKIPPED


def test_check_names_the_phases_that_ask_the_operator(capsys: pytest.CaptureFixture[str]) -> None:
    from sequencer.cli import main

    assert main(["check", str(ASKING)]) == 0
    out = capsys.readouterr().out
    assert "status_led  (after identify; timeout 60 s; 1 measurement; asks the operator)" in out
    assert "    identify  (timeout 10 s)\n" in out


async def test_ctrl_c_at_an_open_question_aborts_and_gives_the_terminal_back(tmp_path: Path) -> None:
    async with open_farm(1, seed=6) as devices, open_terminal() as terminal:
        before = terminal.modes()
        proc = await terminal.station(
            [sys.executable, "-m", "sequencer.cli", "run", str(ASKING), "--port", devices[0].path,
             "--store", str(tmp_path / "s.sqlite")], ROOT, controlling=True)
        await terminal.shown(r"Is the status LED green\?")
        terminal.type(b"\x03")  # the terminal turns it into SIGINT: cbreak keeps signals on
        with trio.fail_after(30):
            await proc.wait()
        assert proc.returncode == 130, terminal.text()[-2000:]
        assert terminal.modes() == before
    (run,) = LocalStore.open(tmp_path / "s.sqlite").find_runs()
    assert run.outcome is Outcome.ABORTED
    led = run.phase("status_led")
    assert led.outcome is Outcome.ABORTED
    assert [line.message.split(" ")[0:3] for line in led.logs] == [["asked", "the", "operator"]]
