"""The portal in a real browser (Debian's chromium through selenium): log in, search, open a device, add a note,
and watch the line board change while a simulated station ships to the same MongoDB."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from reports.storage.mongo import MongoSettings
from tests import records_factory as rf
from tests.browser import selenium_chromium, wait_for
from tests.portal_support import Portal

ROOT = Path(__file__).resolve().parent.parent


def browse(portal: Portal, tmp_path: Path, mongo: MongoSettings) -> None:
    from selenium.webdriver.common.by import By

    driver = selenium_chromium(tmp_path / "profile", tmp_path / "downloads")
    try:
        driver.get(portal.url + "/search")
        assert "/login" in driver.current_url  # a page needs a login first
        driver.find_element(By.NAME, "name").send_keys("operator")
        driver.find_element(By.NAME, "password").send_keys("pw-operator")
        driver.find_element(By.CSS_SELECTOR, "form button[type=submit]").click()
        wait_for(lambda: driver.current_url.endswith("/search"), "the search page after logging in")

        driver.find_element(By.NAME, "find").send_keys("SN-42")
        driver.find_element(By.CSS_SELECTOR, "#search button").click()
        link = wait_for(lambda: driver.find_elements(By.CSS_SELECTOR, 'a[href="/devices/SN-42"]'), "SN-42 found")
        # The search's CSV export downloads (the browser saves it: an attachment).
        driver.find_element(By.CSS_SELECTOR, "a.export").click()
        downloads = tmp_path / "downloads"
        saved = wait_for(lambda: [p for p in downloads.glob("*.csv")] if downloads.exists() else [],
                         "the CSV export downloaded")
        wait_for(lambda: saved[0].read_text().count("\n") == 2, "the whole CSV (a header and SN-42's run)")
        assert saved[0].read_text().startswith("run_id,batch,serial,")
        link[0].click()
        wait_for(lambda: driver.find_elements(By.CSS_SELECTOR, "h1.mono"), "the device page")
        assert driver.find_element(By.CSS_SELECTOR, "h1.mono").text == "SN-42"
        driver.save_screenshot(str(tmp_path / "device.png"))

        driver.find_element(By.NAME, "text").send_keys("reworked the USB connector")
        driver.find_element(By.CSS_SELECTOR, "#add-note button").click()
        wait_for(lambda: "reworked the USB connector" in driver.find_element(By.CSS_SELECTOR, ".notes").text,
                 "the note on the device page")

        driver.get(portal.url + "/board")
        assert not driver.find_elements(By.CSS_SELECTOR, '[data-station="bench-7"]')
        version = driver.find_element(By.ID, "board").get_attribute("data-version")
        station = ROOT / "products" / "esp32_sensor.py"
        env = {**os.environ, "SEQUENCER_MONGO_URI": mongo.uri, "SEQUENCER_MONGO_DB": mongo.database}
        (tmp_path / "station.toml").write_text('station = "bench-7"\nstore = "store.sqlite"\n')
        station_run = subprocess.Popen(
            [sys.executable, "-m", "sequencer.cli", "run", str(station), "--sim", "2", "--plain",
             "--station", str(tmp_path / "station.toml"), "--batch", "LIVE"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env)
        try:
            # The board changes without a reload: the server pushes the station's slots as they ship.
            slots = wait_for(lambda: driver.find_elements(By.CSS_SELECTOR, '[data-station="bench-7"] .slot'),
                             "the simulated station on the board", timeout=120)
            assert station_run.wait(timeout=180) in (0, 1), station_run.stderr.read() if station_run.stderr else ""
        finally:
            if station_run.poll() is None:
                station_run.kill()
                station_run.wait()
        wait_for(lambda: all(s.text in ("PASS", "FAIL", "ERROR") for s in
                             driver.find_elements(By.CSS_SELECTOR, '[data-station="bench-7"] .slot .outcome'))
                 and len(driver.find_elements(By.CSS_SELECTOR, '[data-station="bench-7"] .slot')) == 2,
                 "both slots finished on the board")
        assert driver.find_element(By.ID, "board").get_attribute("data-version") != version
        assert slots
        driver.save_screenshot(str(tmp_path / "board.png"))
    finally:
        driver.quit()


@pytest.mark.slow
async def test_log_in_search_note_and_watch_the_line_board_in_chromium(portal: Portal, mongo: MongoSettings,
                                                                          tmp_path: Path) -> None:
    await portal.aship([rf.sensor_run("SN-42"), rf.sensor_run("SN-43", slot=1)])
    await trio.to_thread.run_sync(browse, portal, tmp_path, mongo)
    if os.environ.get("PORTAL_SCREENSHOTS"):
        for name in ("device.png", "board.png"):
            (Path(os.environ["PORTAL_SCREENSHOTS"]) / name).write_bytes((tmp_path / name).read_bytes())
