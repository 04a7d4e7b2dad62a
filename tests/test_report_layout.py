"""The report pages as a person sees them, in Debian's headless chromium (selenium + chromium-driver).

At 400 px (a phone) and 1400 px (a desk) no table header overlaps another,
no header's text runs out of its cell, and nothing is wider than the page;
printed to PDF, a FAIL run's first page shows its serial on one line. And the
drill-down links work where a person opens them: in a copied report folder
and served over HTTP.
"""

from __future__ import annotations

import base64
import functools
import http.server
import io
import shutil
import threading
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import urljoin
from urllib.request import urlopen

import pypdf
import pytest
from selenium.webdriver.common.print_page_options import PrintOptions

from reports.render.html import render_batch, render_period, render_run, unit_histories, write_html
from reports.quality.period import period_from_runs
from tests.browser import selenium_chromium
from tests.htmltree import parse
from tests.records_factory import at, measurement, phase, run, sensor_run

#: Every problem a person would see: the page wider than the window, an element past its edge,
#: two visible headers of one table on top of each other, a header's text wider than its cell.
LAYOUT_PROBLEMS = """
const width = document.documentElement.clientWidth;
const problems = [];
if (document.documentElement.scrollWidth > width + 1) {
  problems.push(`page is ${document.documentElement.scrollWidth} px wide in a ${width} px window`);
}
const name = (el) => el.tagName.toLowerCase() + (el.className && el.className.baseVal === undefined ? '.' + String(el.className).replace(/ +/g, '.') : '');
for (const el of document.querySelectorAll('main *')) {
  const r = el.getBoundingClientRect();
  if (r.width === 0 || r.height === 0) continue;
  if (el.closest('pre, details:not([open])')) continue;
  if (r.right > width + 1 || r.left < -1) problems.push(`${name(el)} spans ${Math.round(r.left)}..${Math.round(r.right)} px`);
}
for (const table of document.querySelectorAll('table')) {
  const heads = [...table.querySelectorAll('thead th')].filter((th) => th.getClientRects().length);
  heads.forEach((th, i) => {
    if (th.scrollWidth > th.clientWidth + 1) problems.push(`header "${th.textContent}" of table.${table.className} overflows its cell`);
    const a = th.getBoundingClientRect();
    for (const other of heads.slice(i + 1)) {
      const b = other.getBoundingClientRect();
      if (a.left < b.right - 1 && b.left < a.right - 1 && a.top < b.bottom - 1 && b.top < a.bottom - 1) {
        problems.push(`headers "${th.textContent}" and "${other.textContent}" of table.${table.className} overlap`);
      }
    }
  });
}
return problems.slice(0, 20);
"""


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    driver = selenium_chromium(tmp_path_factory.mktemp("chromium-profile"))
    try:
        yield driver
    finally:
        driver.quit()


def failing_run() -> Any:
    """A FAIL run with a long serial and a long cause: what broke the printed header."""
    serial = "SN-ESP32S3-2026-W47-000123456"
    long_reason = ("measurement 'vdd_3v3': 3.59 is above 3.4 (the LDO output at full load, measured after the "
                   "radio calibration burst, twice)")
    rails = phase("power_rails", measurements=[measurement("vdd_3v3", 3.59, units="V", low=3.2, high=3.4,
                                                           marginal=(3.25, 3.35), reason=long_reason)])
    base = sensor_run(serial, vdd=3.59)
    return run(serial=serial, dut={**base.dut, "serial": serial}, phases=[rails, *base.phases[2:]],
               started_at=base.started_at)


def pages(folder: Path) -> dict[str, Path]:
    runs = [failing_run(), *(sensor_run(f"SN-{i:04d}", vdd=3.28 + 0.01 * (i % 5), slot=i % 8, started_at=at(60 * i))
                            for i in range(1, 40))]
    runs.append(sensor_run("SN-0001", started_at=at(9000)))  # a retest
    histories = unit_histories(runs)
    for r in runs:
        write_html(folder / f"{r.run_id}.html", render_run(r, unit_runs=histories[r.run_id]))
    write_html(folder / "index.html", render_batch(runs, title="esp32_sensor — batch B2024-05-14"))
    ordered = sorted(runs, key=lambda r: (r.started_at, r.run_id))
    write_html(folder / "period.html", render_period(period_from_runs(ordered, product="esp32_sensor"),
                                                     title="esp32_sensor — a week", period="a week", source="a store"))
    return {"run": folder / f"{runs[0].run_id}.html", "retest": folder / f"{runs[-1].run_id}.html",
            "batch": folder / "index.html", "period": folder / "period.html"}


@pytest.fixture(scope="module")
def report_pages(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return pages(tmp_path_factory.mktemp("reports") / "B2024-05-14")


@pytest.mark.parametrize("width", [400, 1400])
@pytest.mark.parametrize("page", ["run", "batch", "period"])
def test_nothing_overlaps_or_overflows(browser: Any, report_pages: dict[str, Path], page: str, width: int) -> None:
    browser.set_window_size(width, 900)
    browser.get(report_pages[page].as_uri())
    assert browser.execute_script("return document.documentElement.clientWidth") <= width
    problems = browser.execute_script(LAYOUT_PROBLEMS)
    assert not problems, "\n".join(problems)


def test_the_check_sees_an_overflowing_table(browser: Any, tmp_path: Path) -> None:
    """The layout check is not a formality: a table too wide for a phone is reported."""
    wide = tmp_path / "wide.html"
    cells = "".join(f"<th>column{i}</th>" for i in range(30))
    wide.write_text(f"<html><body><main><table><thead><tr>{cells}</tr></thead></table></main></body></html>")
    browser.set_window_size(400, 900)
    browser.get(wide.as_uri())
    assert browser.execute_script(LAYOUT_PROBLEMS)


def test_a_printed_fail_run_shows_its_serial_on_one_line(browser: Any, report_pages: dict[str, Path]) -> None:
    browser.get(report_pages["run"].as_uri())
    options = PrintOptions()
    options.page_width, options.page_height = 21.0, 29.7  # A4, cm
    pdf = pypdf.PdfReader(io.BytesIO(base64.b64decode(browser.print_page(options))))
    first = pdf.pages[0].extract_text(extraction_mode="layout")  # as laid out: a broken line stays broken
    serial = failing_run().serial
    assert any(serial in line for line in first.splitlines()), first[:1500]
    assert "FAIL" in first[:400]
    # and as the browser laid it out for print: the serial's text is one line box
    browser.execute_cdp_cmd("Emulation.setEmulatedMedia", {"media": "print"})
    try:
        browser.set_window_size(794, 1123)  # A4 at 96 dpi
        lines = browser.execute_script(
            "const r = document.createRange(); r.selectNodeContents(document.querySelector('.banner h1'));"
            "return new Set([...r.getClientRects()].map((b) => Math.round(b.top))).size;")
    finally:
        browser.execute_cdp_cmd("Emulation.setEmulatedMedia", {"media": ""})
    assert lines == 1


def test_links_work_in_a_copied_folder_and_served(browser: Any, report_pages: dict[str, Path],
                                                  tmp_path: Path) -> None:
    copy = tmp_path / "elsewhere" / "reports"
    shutil.copytree(report_pages["batch"].parent.parent, copy)
    batch = copy / report_pages["batch"].parent.name / "index.html"
    # every link of every page in the copy leads to a page that is there
    for page in batch.parent.glob("*.html"):
        for a in parse(page.read_text(encoding="utf-8")).find_all("a"):
            href = a.attrs.get("href", "")
            if href and not href.startswith(("#", "data:")):
                assert (page.parent / href).resolve().is_file(), (page.name, href)
    # clicked in the browser: batch -> run -> its unit's other run -> back to the batch
    browser.set_window_size(1400, 900)
    browser.get(batch.as_uri())
    retest = report_pages["retest"].name
    browser.find_element("css selector", f'table.units a[href="{retest}"]').click()
    assert browser.current_url.endswith(retest)
    browser.find_element("css selector", "#unit-history a").click()
    browser.find_element("id", "batch-link").click()
    assert browser.current_url.endswith("/index.html")
    # served over HTTP from the copy
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(copy))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        base = f"http://127.0.0.1:{server.server_port}/{batch.parent.name}/index.html"
        for a in parse(urlopen(base, timeout=10).read().decode()).find("table", "units").find_all("a")[:5]:
            assert urlopen(urljoin(base, a.attrs["href"]), timeout=10).status == 200
        browser.get(base)
        browser.find_element("css selector", f'table.units a[href="{retest}"]').click()
        assert "Test 2 of 2" in browser.find_element("id", "unit-history").text
    finally:
        server.shutdown()
        server.server_close()
