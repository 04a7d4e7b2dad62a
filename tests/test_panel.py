"""The operator panel: a station's slots in a browser, live, with buttons and scans that start, stop and answer.

Served for real (hypercorn on trio) and, for the browser checks, driven in
Debian's chromium through selenium while a simulated station runs.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import attrs
import httpx
import pytest
import trio
import trio.testing

from sequencer.control import StationControl
from sequencer.engine import RunSettings
from sequencer.events import BoardArrived, BoardRemoved, EventBus, PhaseStarted, RunFinished, RunStarted
from sequencer.operator import OperatorDesk, Question
from sequencer.records import Disposition, Outcome
from sequencer.scans import ScanConfig, ScanRules
from tests import records_factory as rf
from tests.browser import selenium_chromium, wait_for
from web.panel.server import serve_panel
from web.panel.state import DRAIN_S

ROOT = Path(__file__).resolve().parent.parent
_CSRF = re.compile(r'name="csrf" value="([^"]+)"')
WAIT_S = 60.0


async def test_a_question_is_answered_by_its_number_not_only_the_oldest() -> None:
    desk = OperatorDesk()
    answers: dict[int, str] = {}

    async def ask(slot: int, text: str) -> None:
        answers[slot] = await desk.ask(Question(slot, f"p{slot}", "", text, ("yes", "no")))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(ask, 0, "LED green?")
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(ask, 1, "Buzzer?")
        await trio.testing.wait_all_tasks_blocked()
        (first, q0), (second, q1) = desk.open_questions
        assert (q0.slot, q1.slot) == (0, 1) and first != second
        desk.type("ye")  # the operator typing an answer to the oldest keeps it while a newer one is answered
        assert desk.answer("no", second)
        await trio.testing.wait_all_tasks_blocked()
        assert answers == {1: "no"} and desk.draft == "ye"
        assert not desk.answer("yes", second)  # answered already: nothing to answer
        assert not desk.answer("maybe", first) and "not one of yes, no" in desk.hint
        assert desk.answer("y", first)
    assert answers == {0: "yes", 1: "no"} and desk.open_questions == ()


def test_the_panel_hears_every_event_its_tiles_show_and_not_each_measurement() -> None:
    from typing import get_args

    from sequencer.display import SHOWN_EVENTS
    from sequencer.events import Event, MeasurementTaken

    # A kind of event added later must be shown, or said here not to be.
    assert set(get_args(Event)) - SHOWN_EVENTS == {MeasurementTaken}
    bus = EventBus()
    everything, shown = bus.subscribe("all"), bus.subscribe("panel", kinds=SHOWN_EVENTS)
    bus.publish(MeasurementTaken("r", 0, "p", rf.measurement("vdd", 3.3)))
    bus.publish(BoardRemoved(1))
    assert isinstance(everything.receive_nowait(), MeasurementTaken)
    assert shown.receive_nowait() == BoardRemoved(1)
    with pytest.raises(trio.WouldBlock):
        shown.receive_nowait()
    assert bus.dropped == {"all": 0, "panel": 0}


def _runs_finished(slot: int, serial: str, vdd: float) -> RunFinished:
    run = rf.sensor_run(serial, vdd=vdd, slot=slot)
    if run.outcome is not Outcome.PASS:
        run = attrs.evolve(run, disposition=Disposition.RETEST, instruction="Check the 3.3 V regulator (U3)")
    return RunFinished(run)


async def caught_up() -> None:
    """The panel has applied every event published so far: it takes them in batches, every DRAIN_S."""
    await trio.sleep(2 * DRAIN_S)
    await trio.testing.wait_all_tasks_blocked()


async def _events(client: httpx.AsyncClient, url: str, wanted: int) -> list[dict[str, object]]:
    """The first ``wanted`` tiles events of the panel's stream."""
    got: list[dict[str, object]] = []
    async with client.stream("GET", url) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        async for line in response.aiter_lines():
            if line.startswith("data: "):
                got.append(json.loads(line[len("data: "):]))
                if len(got) == wanted:
                    return got
    return got


async def test_the_panel_shows_tiles_streams_changes_and_starts_stops_and_answers() -> None:
    bus = EventBus()
    desk = OperatorDesk(bus)
    config = ScanConfig(start="scan")
    control = StationControl(ScanRules.of(config, r"SN\d{9}", "p"), config, RunSettings("st", batch="B7"), desk=desk,
                             bus=bus)
    stopped: list[tuple[int, str]] = []
    control.attach(2, lambda slot, by: bool(stopped.append((slot, by))) or True)
    async with serve_panel("line1-st3", "esp32-sensor", desk, control) as panel, trio.open_nursery() as nursery:
        nursery.start_soon(partial(panel.follow, bus.subscribe("panel"), ["/dev/a", "/dev/b"], 5, continuous=True))
        async with httpx.AsyncClient(base_url=panel.url, timeout=20) as client:
            bus.publish(BoardArrived(0, "/dev/a"))
            await caught_up()
            started: dict[int, RunSettings] = {}

            async def slot_waits(slot: int) -> None:
                started[slot] = await control.ready(slot)

            nursery.start_soon(slot_waits, 0)
            await trio.testing.wait_all_tasks_blocked()
            page = await client.get("/")
            assert page.status_code == 200
            html = page.text
            assert "line1-st3" in html and "B7" in html
            assert re.search(r'data-slot="0" data-state="ready"', html)
            assert "start it" in html and 'action="/start"' in html
            csrf = _CSRF.search(html).group(1)  # type: ignore[union-attr]
            version = re.search(r'data-version="(\d+)"', html).group(1)  # type: ignore[union-attr]

            # A POST needs the page's CSRF token.
            refused = await client.post("/start", data={"slot": "0"}, headers={"Accept": "application/json"})
            assert refused.status_code == 403 and not started
            said = await client.post("/start", data={"slot": "0", "csrf": csrf},
                                     headers={"Accept": "application/json"})
            assert said.json() == {"taken": True, "said": "slot 0: starting"}
            await trio.testing.wait_all_tasks_blocked()
            assert [(s.kind, s.value, s.source) for s in started[0].scans] == [("slot", "0", "the panel")]

            # The stream sends the tiles as they change: the run, then a question on its tile.
            run = rf.sensor_run("SN696100024", slot=0)
            stream = await _events(client, f"/events?version={version}", 1)
            assert 'data-slot="0"' in str(stream[0]["html"])
            bus.publish(RunStarted(attrs.evolve(run, outcome=None, ended_at=None, phases=())))
            bus.publish(PhaseStarted(run.run_id, 0, "identify", 1))
            answers: list[str] = []

            async def phase_asks() -> None:
                answers.append(await desk.ask(Question(0, "/dev/a", "SN696100024", "Is the LED green?",
                                                       ("yes", "no"), run_id=run.run_id, phase="led")))

            nursery.start_soon(phase_asks)
            await trio.testing.wait_all_tasks_blocked()
            seen = int(stream[0]["version"])  # type: ignore[arg-type]
            update = (await _events(client, f"/events?version={seen}", 1))[0]
            tiles = str(update["html"])
            # Rendered once for every screen: no session's CSRF token in it (the page's script adds its own).
            assert csrf not in tiles and 'name="csrf" value=""' in tiles
            assert "Is the LED green?" in tiles and 'value="yes"' in tiles and 'action="/stop"' in tiles
            number = re.search(r'name="question" value="(\d+)"', tiles).group(1)  # type: ignore[union-attr]
            wrong = await client.post("/answer", data={"question": number, "answer": "maybe", "csrf": csrf},
                                      headers={"Accept": "application/json"})
            assert wrong.json() == {"taken": False, "said": "not taken: 'maybe' is not one of yes, no"}
            right = await client.post("/answer", data={"question": number, "answer": "yes", "csrf": csrf},
                                      headers={"Accept": "application/json"})
            assert right.json()["taken"]
            await trio.testing.wait_all_tasks_blocked()
            assert answers == ["yes"]
            again = await client.post("/answer", data={"question": number, "answer": "yes", "csrf": csrf},
                                      headers={"Accept": "application/json"})
            assert again.json() == {"taken": False, "said": "not taken: that question was answered already"}

            # Stop aborts the slot's run through the station's control.
            page = (await client.get("/")).text
            assert 'action="/stop"' in page
            said = await client.post("/stop", data={"slot": "0", "csrf": csrf}, headers={"Accept": "application/json"})
            assert said.json() == {"taken": True, "said": "slot 0: stopping its test"}
            assert stopped == [(0, "at the panel")]
            # A plain form post (no script) goes back to the page.
            plain = await client.post("/stop", data={"slot": "1", "csrf": csrf}, follow_redirects=False)
            assert plain.status_code == 303 and plain.headers["location"] == "/"

            # The verdict, large, with what to do; and after the board is out, the last unit on the tile.
            bus.publish(_runs_finished(0, "SN696100024", 3.39 + 0.3))
            nursery.start_soon(control.restarted, 0)  # as a continuous slot waits, its verdict on show
            await caught_up()
            page = (await client.get("/")).text
            tile = page.split('data-slot="0"', 1)[1].split("</section>", 1)[0]
            assert re.search(r'class="headline">RETEST<', tile)
            assert "Check the 3.3 V regulator (U3)" in tile and "vdd_3v3" in tile
            assert 'action="/start"' in tile  # test it again with the board still in
            control.vacated(0)
            bus.publish(BoardRemoved(0))
            await caught_up()
            tile = (await client.get("/")).text.split('data-slot="0"', 1)[1].split("</section>", 1)[0]
            assert "put a board in" in tile and "last: SN696100024 RETEST" in tile

            # A scan typed or wedge-scanned on the panel is the station's scan.
            said = await client.post("/scan", data={"code": "OP:aoife", "csrf": csrf},
                                     headers={"Accept": "application/json"})
            assert said.json() == {"taken": True, "said": "operator: aoife"}
            assert control.settings.operator == "aoife"
            said = await client.post("/scan", data={"code": "hello", "csrf": csrf},
                                     headers={"Accept": "application/json"})
            assert not said.json()["taken"] and "not a scan this station knows" in said.json()["said"]
        bus.close()
        nursery.cancel_scope.cancel()


def _station(tmp_path: Path, *args: str, station_file: str = "") -> tuple[subprocess.Popen[str], str]:
    """``sequencer run`` with a panel on a free port; the process and the panel's URL, as the station prints it."""
    (tmp_path / "st.toml").write_text(f'station = "panel-st"\nstore = "store.sqlite"\n{station_file}')
    env = {**os.environ, "XDG_DATA_HOME": str(tmp_path / "xdg"), "COLUMNS": "160"}
    env.pop("SEQUENCER_MONGO_URI", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "sequencer.cli", "run", str(ROOT / "tests" / "products" / "asking_widget.py"),
         "--station", str(tmp_path / "st.toml"), "--plain", "--panel", "127.0.0.1:0", *args],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT, env=env)
    assert proc.stdout is not None
    deadline = time.monotonic() + WAIT_S
    seen = []
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        seen.append(line)
        found = re.search(r"panel: (http://127\.0\.0\.1:\d+)/", line)
        if found:
            return proc, found.group(1)
    proc.kill()
    raise AssertionError("the station never said where its panel is:\n" + "".join(seen))


def _text(driver, css: str) -> str:  # type: ignore[no-untyped-def]
    """The text of what ``css`` finds, or '' (not there, or the tiles were replaced as it was read)."""
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By

    try:
        found = driver.find_elements(By.CSS_SELECTOR, css)
        return found[0].text if found else ""
    except StaleElementReferenceException:
        return ""


def _headline(driver, slot: int) -> str:  # type: ignore[no-untyped-def]
    return _text(driver, f'.tile[data-slot="{slot}"] .headline')


def _type(driver, css: str, keys: str, what: str) -> None:  # type: ignore[no-untyped-def]
    """Type ``keys`` into the field ``css`` finds once it is there (typing into a field holds the tiles still)."""
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By

    def typed() -> bool:
        try:
            found = driver.find_elements(By.CSS_SELECTOR, css)
            if not found:
                return False
            found[0].send_keys(keys)
            return True
        except StaleElementReferenceException:
            return False

    wait_for(typed, what)


def _click(driver, css: str, what: str) -> None:  # type: ignore[no-untyped-def]
    """Click the first element ``css`` finds once it is there (the tiles are replaced as the station moves on)."""
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By

    def clicked() -> bool:
        try:
            found = driver.find_elements(By.CSS_SELECTOR, css)
            if not found:
                return False
            found[0].click()
            return True
        except StaleElementReferenceException:
            return False

    wait_for(clicked, what)


def _stop_station(proc: subprocess.Popen[str]) -> str:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
    try:
        out, _ = proc.communicate(timeout=WAIT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
    return out


@pytest.mark.slow
def test_in_chromium_answer_the_questions_on_the_tiles_see_the_verdicts_and_start_the_next_round(
        tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    proc, url = _station(tmp_path, "--sim", "2", "--rounds", "2", "--batch", "PANEL")
    driver = selenium_chromium(tmp_path / "profile")
    try:
        driver.get(url + "/")
        wait_for(lambda: driver.find_elements(By.CSS_SELECTOR, ".tile"), "the slots' tiles")
        assert driver.find_element(By.CSS_SELECTOR, "header .station").text == "panel-st"
        # Each slot asks on its own tile; slot 1 is answered first although slot 0 asked first.
        wait_for(lambda: len(driver.find_elements(By.CSS_SELECTOR, ".tile .question")) == 2, "both slots asking")
        _click(driver, '.tile[data-slot="1"] form[action="/answer"] input[value="no"] + button', "slot 1's question")
        _click(driver, '.tile[data-slot="0"] form[action="/answer"] input[value="yes"] + button', "slot 0's question")
        # The label, wedge-scanned: keys and Enter on the page, no field focused.
        wait_for(lambda: driver.find_elements(By.CSS_SELECTOR, '.tile[data-slot="0"] form.text-answer'),
                 "slot 0 asks for its label")
        driver.find_element(By.TAG_NAME, "body").send_keys("SN0001" + Keys.ENTER)
        wait_for(lambda: _headline(driver, 0) == "PASS", "slot 0's verdict")
        wait_for(lambda: _headline(driver, 1) == "RETEST", "slot 1's verdict")
        assert _text(driver, '.tile[data-slot="1"] .todo') == "Put it in the retest bin and test it again"
        driver.save_screenshot(str(tmp_path / "panel.png"))
        # Between rounds the station asks for the next boards: the next round starts from the panel.
        _click(driver, '.station-question input[value="next"] + button', "the next round's question")
        wait_for(lambda: _headline(driver, 0) in ("testing", ""), "round 2 started")
    finally:
        driver.quit()
        out = _stop_station(proc)
    assert "round 1 of 2: 1/2 passed" in out, out
    if os.environ.get("PANEL_SCREENSHOTS"):
        (Path(os.environ["PANEL_SCREENSHOTS"]) / "panel.png").write_bytes((tmp_path / "panel.png").read_bytes())


@pytest.mark.slow
def test_in_chromium_start_a_slot_that_waits_for_its_start_answer_it_and_see_its_verdict(tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By

    proc, url = _station(tmp_path, "--sim", "1", "--continuous", "--batch", "PANELC",
                         station_file='[scan]\nstart = "scan"\n')
    driver = selenium_chromium(tmp_path / "profile")
    try:
        driver.get(url + "/")
        _click(driver, '.tile[data-slot="0"] form[action="/start"] button', "the Start of slot 0, board in")
        _click(driver, '.tile[data-slot="0"] form[action="/answer"] input[value="yes"] + button', "the LED question")
        _type(driver, '.tile[data-slot="0"] form.text-answer input[name="answer"]', "SN0042\n", "the label question")
        # The verdict; once the simulated operator takes the board out, the tile still says how it went.
        wait_for(lambda: _headline(driver, 0) == "PASS"
                 or re.search(r"last: SN\d+ PASS", _text(driver, '.tile[data-slot="0"] .last')), "slot 0's verdict")
    finally:
        driver.quit()
        out = _stop_station(proc)
    assert "scan: slot 0: starting" in out and "slot 0: answered 'SN0042'" in out, out
    assert re.search(r"slot 0 \S+ SN\d+: PASS", out), out


def test_the_panels_address_is_checked_before_any_board_is_tested(tmp_path: Path) -> None:
    import socket

    from sequencer.config import load_station_config

    (tmp_path / "st.toml").write_text('station = "st"\nsim = 1\npanel = "0.0.0.0:8081"\n')
    assert load_station_config(tmp_path / "st.toml").panel_address == ("0.0.0.0", 8081)
    widget = str(ROOT / "tests" / "products" / "asking_widget.py")
    env = {**os.environ, "XDG_DATA_HOME": str(tmp_path / "xdg")}
    bad = subprocess.run([sys.executable, "-m", "sequencer.cli", "run", widget, "--sim", "1", "--panel", "8081"],
                         capture_output=True, text=True, cwd=ROOT, env=env, timeout=WAIT_S)
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines()[-1].endswith(
        "--panel: give the address to listen on as HOST:PORT (127.0.0.1:8081), got '8081'")
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        busy = subprocess.run([sys.executable, "-m", "sequencer.cli", "run", widget, "--sim", "1", "--panel",
                               f"127.0.0.1:{port}"], capture_output=True, text=True, cwd=ROOT, env=env, timeout=WAIT_S)
    assert busy.returncode == 2
    assert f"panel 127.0.0.1:{port}: cannot listen there: Address already in use" in busy.stderr
    assert not (tmp_path / "xdg" / "sequencer" / "store.sqlite").exists()  # nothing was tested
