"""HTML reports: content and structure, escaping of hostile device text, self-containment, a real browser."""

from __future__ import annotations

import re

import base64
import datetime as dt
import hashlib
import json
import os
import struct
import subprocess
from pathlib import Path

import attrs
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from reports.render import formatting
from reports.render.html import (
    MAX_EMBED_BYTES,
    MAX_INLINE_TEXT_CHARS,
    batch_dir,
    render_batch,
    render_run,
    write_html,
)
from sequencer.records import Attachment, ErrorInfo, MeasurementOutcome, Outcome, RunRecord
from tests.browser import chromium, chromium_args
from tests.htmltree import Element, parse
from tests.records_factory import TINY_PNG, at, measurement, phase, run, sensor_run

# Every tag our templates and SVG builder emit. Anything else in a page came from record text.
ALLOWED_TAGS = {
    "html", "head", "meta", "title", "style", "body", "main", "header", "footer", "section", "div", "span",
    "h1", "h2", "h3", "p", "small", "b", "code", "pre", "time", "a", "img", "details", "summary", "dl", "dt", "dd",
    "table", "colgroup", "col", "thead", "tbody", "tr", "th", "td", "nav", "ol", "ul", "li", "article",
    "svg", "title", "rect", "line", "polyline", "circle", "text", "path",
}

HOSTILE = [
    '<script>alert("x")</script>',
    '"><img src=x onerror=alert(1)>',
    "</td></tr></table><script>alert(1)</script>",
    "' onmouseover='alert(1)",
    "<svg/onload=alert(1)>",
    "</pre></details><iframe src=//evil.example>",
    "&lt;script&gt; already escaped",
    "{{ 7*7 }} {% raw %}",
]
HOSTILE_SVG = (b'<svg xmlns="http://www.w3.org/2000/svg" onload="alert(1)">'
               b"<script>alert(document.domain)</script></svg>")


def row_of(root: Element, table_cls: str, first_cell: str) -> Element:
    """The row of ``table.<table_cls>`` whose first cell (or its ``<code>`` name) reads ``first_cell``."""
    for table in root.find_all("table", table_cls):
        for tr in table.find_all("tr"):
            cells = tr.find_all("td")
            if cells and cells[0].find_all("code") and cells[0].find("code").text == first_cell:
                return tr
            if cells and cells[0].clean_text == first_cell:
                return tr
    raise AssertionError(f"no row {first_cell!r} in table.{table_cls}")


def cells(tr: Element) -> list[str]:
    return [td.clean_text for td in tr.find_all("td") if td.parent is tr]


def section(root: Element, name: str) -> Element:
    for s in root.find_all("section", "phase"):
        h2 = s.find("h2")
        if h2.find("span").clean_text.split(". ", 1)[1] == name:
            return s
    raise AssertionError(f"no phase section {name!r}")


def assert_no_injected_markup(html: str) -> Element:
    """Nothing from record text became markup: known tags only, no handlers, no scripts, no remote URLs."""
    assert "<script" not in html.lower()
    root = parse(html)
    for e in root.iter():
        if e is root:
            continue
        assert e.tag in ALLOWED_TAGS, f"unexpected <{e.tag}>"
        for name, val in e.attrs.items():
            assert not name.startswith("on"), f"event handler {name}={val!r} on <{e.tag}>"
            if name in ("src", "href"):
                # inline data, an anchor, or a relative link to another report page (never a host or a scheme)
                page = name == "href" and re.fullmatch(r"(\.\./[A-Za-z0-9._%-]+/)?[A-Za-z0-9._%-]+\.html", val or "")
                assert val is not None and (val.startswith("data:") or val.startswith("#") or page), f"{name}={val!r}"
    return root


# -- the run page ------------------------------------------------------------


def test_banner_shows_outcome_serial_and_the_first_failure() -> None:
    root = parse(render_run(sensor_run("SN-7", fail_rf=True)))
    banner = root.find("header", "banner")
    assert "o-fail" in banner.classes
    assert banner.find("div", "verdict").clean_text == "FAIL"
    assert banner.find("h1").clean_text == "SN-7"
    assert banner.find("div", "cause").clean_text.startswith("rf_sweep FAIL: measurement 'rssi_sweep'")
    assert root.find("title").text.startswith("FAIL · SN-7")


@pytest.mark.parametrize(
    "vdd, marginal", [(3.30, False), (3.37, True), (3.22, True)]
)
def test_marginal_runs_are_flagged_in_the_banner(vdd: float, marginal: bool) -> None:
    r = sensor_run(vdd=vdd)
    assert r.outcome is Outcome.PASS and r.marginal is marginal
    root = parse(render_run(r))
    flags = root.find("header", "banner").find_all("small", "marginal-flag")
    assert [f.text for f in flags] == (["MARGINAL"] if marginal else [])


@pytest.mark.parametrize("outcome", list(Outcome) + [None])
def test_every_outcome_has_its_own_banner_colour(outcome: Outcome | None) -> None:
    r = run(phases=[phase("p", Outcome.PASS)], outcome=outcome)
    banner = parse(render_run(r)).find("header", "banner")
    expected = "o-running" if outcome is None else f"o-{outcome.value.lower()}"
    assert expected in banner.classes
    assert banner.find("div", "verdict").clean_text == ("RUNNING" if outcome is None else outcome.value)


def _run_fact(root: Element, name: str) -> Element:
    """The cell of the run page's "Run" table whose heading is ``name``."""
    return next(tr.find("td") for tr in root.find("table", "run").find_all("tr") if tr.find("th").text == name)


def test_identity_and_run_facts_are_all_shown() -> None:
    r = sensor_run("SN-0042", dut_extra={"imei": "356938035643809", "board_rev": "C"})
    root = parse(render_run(r))
    dut = {tr.find("th").text: tr.find("td").text for tr in root.find("table", "dut").find_all("tr")}
    assert dut == r.dut
    assert dut["imei"] == "356938035643809"
    facts = {tr.find("th").text: tr.find("td").clean_text for tr in root.find("table", "run").find_all("tr")}
    product = _run_fact(root, "Product")
    assert product.find("div").text == f"sha256 {r.product_sha256}"  # which test code ran
    assert facts["Product"] == f"esp32_sensor 1.4.2{product.find('div').text}"
    assert facts["Sequencer"] == r.sequencer_version == "0.1.0"
    assert not _run_fact(root, "Sequencer").find_all("span", "uncommitted")
    dirty = parse(render_run(attrs.evolve(r, sequencer_version="0.1.0+g0ec0a22a2947.dirty")))
    assert _run_fact(dirty, "Sequencer").clean_text == "0.1.0+g0ec0a22a2947.dirty UNCOMMITTED"
    assert facts["Station"] == "line1-st03"
    assert facts["Slot / port"] == "0 · /dev/ttyUSB0"
    assert facts["Operator"] == "alice"
    assert facts["Batch"] == "B2024-05-14"
    assert facts["Started"] == "2024-05-14 08:30:00 UTC"
    assert facts["Ended"] == "2024-05-14 08:30:24 UTC"
    assert facts["Duration"] == "24.9 s"
    limits = _run_fact(root, "Limits file")
    assert limits.children[0] == "esp32_sensor.limits.toml"
    assert limits.find("div").text == f"sha256 {r.limits_sha256}"
    assert facts["Run ID"] == r.run_id


def test_times_are_shown_in_utc_whatever_zone_the_record_carries() -> None:
    cest = dt.timezone(dt.timedelta(hours=2))
    r = run(started_at=dt.datetime(2024, 5, 14, 10, 30, tzinfo=cest), duration=5.0, phases=[])
    facts = {tr.find("th").text: tr.find("td").clean_text for tr in parse(render_run(r)).find("table", "run").find_all("tr")}
    assert facts["Started"] == "2024-05-14 08:30:00 UTC"


def test_phases_table_lists_outcome_duration_attempts_and_resource_wait() -> None:
    r = sensor_run(crash=True)
    root = parse(render_run(r))
    rows = [cells(tr) for tr in root.find("table", "phases").find("tbody").find_all("tr")]
    assert [row[1].split()[0] for row in rows] == [p.name for p in r.phases]
    by_name = {row[1].split()[0]: row for row in rows}
    assert by_name["power_rails"][2:6] == ["PASS", "2.40 s", "1", "0.85 s"]
    assert by_name["power_rails"][6] == "3 measured"
    assert by_name["flash_firmware"][4] == "2"
    assert by_name["self_test"][2] == "ERROR"
    assert by_name["rf_sweep"][2:5] == ["SKIPPED", "0.00 s", "0"]
    assert by_name["rf_sweep"][7] == "dependency self_test did not pass"
    assert by_name["power_off"][1] == "power_off TEARDOWN"
    # Links go to the phase sections on the same page.
    hrefs = [a.attrs["href"] for a in root.find("table", "phases").find_all("a")]
    assert hrefs == [f"#phase-{i}" for i in range(1, 7)]
    assert all(root.find_all("section", id=h[1:]) for h in hrefs)


def test_measurement_rows_show_value_units_limits_band_criteria_and_result() -> None:
    root = parse(render_run(sensor_run(vdd=3.37)))
    rails = section(root, "power_rails")
    vdd = row_of(rails, "measurements", "vdd_3v3")
    assert "m-marginal" in vdd.classes
    value, units, low, high, band, criteria, result = [td for td in vdd.find_all("td") if td.parent is vdd][1:]
    assert value.text.startswith("3.37")
    assert value.find("div", "reason").text == "3.37 is above marginal 3.35"
    assert value.find_all("svg", "gauge"), "a number with two-sided limits gets a gauge"
    assert (units.text, low.clean_text, high.clean_text, band.clean_text) == ("V", "3.2", "3.4", "3.25 … 3.35")
    assert criteria.clean_text == "3.2 <= x <= 3.4 (marginal outside 3.25..3.35)"
    assert result.find("span", "badge").text == "MARGINAL" and "m-marginal" in result.find("span").classes

    idle = row_of(rails, "measurements", "idle_current")
    assert "m-pass" in idle.classes
    assert cells(idle)[1:7] == ["41.2", "mA", "—", "60", "", "x <= 60"]
    assert not idle.find_all("svg"), "a one-sided limit has no gauge"


def test_failed_and_unset_measurements_are_coloured_and_explained() -> None:
    ms = [
        measurement("vbat", 2.9, units="V", low=3.0, high=4.2),
        measurement("fw_version", None, validators=["== '2.7.1'"]),
        measurement("label", "ok", validators=["matches ^ok$"]),
        measurement("temperature", float("nan"), outcome=MeasurementOutcome.FAIL, units="°C", low=0.0, high=70.0,
                    reason="nan is not a finite number"),
    ]
    root = parse(render_run(run(phases=[phase("checks", measurements=ms)])))
    vbat = row_of(root, "measurements", "vbat")
    assert "m-fail" in vbat.classes
    assert vbat.find("div", "reason").text == "2.9 is below 3"
    assert vbat.find("span", "badge").text == "FAIL"
    unset = row_of(root, "measurements", "fw_version")
    assert "m-unset" in unset.classes and cells(unset)[1] == "—" and unset.find("span", "badge").text == "UNSET"
    assert "m-pass" in row_of(root, "measurements", "label").classes
    nan = row_of(root, "measurements", "temperature")
    assert cells(nan)[1].startswith("NaN") and "m-fail" in nan.classes


def test_measurement_description_is_shown_under_its_name() -> None:
    root = parse(render_run(sensor_run()))
    vdd = row_of(root, "measurements", "vdd_3v3")
    assert vdd.find("div", "desc").text == "3V3 rail at the LDO output"


def test_dimensioned_measurement_gets_a_plot_and_a_points_table() -> None:
    r = sensor_run(fail_rf=True)
    rssi = row_of(parse(render_run(r)), "measurements", "rssi_sweep")
    assert "m-fail" in rssi.classes
    summary = rssi.find("div", "series-summary").text
    assert summary == "13 points, frequency 2412–2472 MHz; min -42, max -28.5 dBm"
    plot = rssi.find("svg", "plot")
    assert len(plot.find("polyline").attrs["points"].split()) == 13
    red = [c for c in plot.find_all("circle") if c.attrs["fill"] == "#c62828"]
    assert len(red) == 1, "the one point above the limit is marked"
    assert {t.text for t in plot.find_all("text")} >= {"-30", "-60", "2412", "2472", "frequency (MHz)", "dBm"}
    points = rssi.find("details").find("table", "points").find("tbody").find_all("tr")
    assert [[td.text for td in tr.find_all("td")] for tr in points][5] == ["2437", "-28.5"]


def test_series_with_non_finite_points_lists_them_but_plots_the_rest() -> None:
    pts = [[1, 0.5], [2, float("nan")], [3, 0.7]]
    m = measurement("curve", pts, outcome=MeasurementOutcome.FAIL, units="A", dimensions=[("t", "s")],
                    reason="point (2, nan) is not a finite number")
    rssi = row_of(parse(render_run(run(phases=[phase("sweep", measurements=[m])]))), "measurements", "curve")
    assert len(rssi.find("svg", "plot").find("polyline").attrs["points"].split()) == 2
    assert [tr.find_all("td")[1].text for tr in rssi.find("tbody").find_all("tr")] == ["0.5", "NaN", "0.7"]


def test_attempts_are_listed_only_when_a_phase_ran_more_than_once() -> None:
    root = parse(render_run(sensor_run()))
    flash = section(root, "flash_firmware")
    rows = [cells(tr) for tr in flash.find("table", "attempts").find("tbody").find_all("tr")]
    assert rows[0][:2] == ["1", "FAIL"] and rows[0][4] == "flash verify mismatch at 0x10000"
    assert rows[0][5] == "flash_verified = false"
    assert rows[1][:2] == ["2", "PASS"] and rows[1][3] == "5.80 s"
    assert not section(root, "power_rails").find_all("table", "attempts")


def test_errors_show_type_message_and_traceback_in_details() -> None:
    r = sensor_run(crash=True)
    err = r.phase("self_test").error
    box = section(parse(render_run(r)), "self_test").find("div", "error")
    assert box.find("span", "etype").text == "DutProtocolError"
    assert err.message in box.text
    details = box.find("details")
    assert details.find("summary").text == "Traceback"
    assert details.find("pre").text == err.traceback


def test_log_lines_keep_time_level_and_message_with_level_colours() -> None:
    root = parse(render_run(sensor_run()))
    rows = section(root, "flash_firmware").find("table", "logs").find_all("tr")
    assert [cells(tr) for tr in rows] == [
        ["08:30:04.500", "warning", "verify failed, retrying"],
        ["08:30:15.000", "info", "firmware 2.7.1 written"],
    ]
    assert "lvl-warning" in rows[0].classes and "lvl-info" in rows[1].classes


def test_what_fixtures_logged_is_shown_in_the_phase_and_outside_phases_naming_the_fixture() -> None:
    root = parse(render_run(sensor_run()))
    rows = section(root, "power_rails").find("table", "logs").find_all("tr")
    assert [cells(tr) for tr in rows] == [
        ["08:30:01.600", "info", "dmm", "range 10 V, NPLC 1"],
        ["08:30:03.600", "info", "", "rails measured"],
    ]
    outside = root.find("section", "fixture-log")
    assert outside.find("h2").text == "Fixtures, outside any phase"
    assert [cells(tr) for tr in outside.find("table", "logs").find_all("tr")] == [
        ["08:30:25.000", "info", "jig", "relays opened, port closed"]]
    # A phase whose lines are all its own has no fixture column; a run no fixture spoke in, no section.
    assert len(cells(section(root, "flash_firmware").find("table", "logs").find_all("tr")[0])) == 3
    assert not parse(render_run(attrs.evolve(sensor_run(), logs=()))).find_all("section", "fixture-log")


def test_a_long_log_starts_folded_and_says_what_it_holds() -> None:
    from reports.render.html import LOG_LINES_SHOWN

    lines = [(0.001 * i, "info", f"sample {i}", "dmm") for i in range(LOG_LINES_SHOWN + 1)]
    lines += [(1.0, "warning", "1 more log line dropped: ...")]
    loud = phase("loud", logs=lines)
    quiet = phase("quiet", logs=lines[:LOG_LINES_SHOWN])
    root = parse(render_run(run(phases=[loud, quiet], logs=[(2.0, "error", "gone", "dmm")] * 2)))
    folded = section(root, "loud").find("details", "log")
    assert folded.find("summary").text == f"{LOG_LINES_SHOWN + 2} lines, 1 warning: show them"
    assert len(folded.find("table", "logs").find_all("tr")) == LOG_LINES_SHOWN + 2
    assert not section(root, "quiet").find_all("details")
    assert len(section(root, "quiet").find("table", "logs").find_all("tr")) == LOG_LINES_SHOWN
    assert not root.find("section", "fixture-log").find_all("details")


def test_attachments_text_inline_images_embedded_binaries_downloadable() -> None:
    root = parse(render_run(sensor_run()))
    boxes = {b.find("span", "aname").text: b for b in section(root, "flash_firmware").find_all("div", "attachment")}
    text = boxes["esptool.log"]
    assert "a-text" in text.classes
    assert text.find("pre").text == "esptool.py v4.7\nChip is ESP32-D0WD-V3\nHash of data verified.\n"
    img = boxes["label.png"].find("img")
    assert img.attrs["src"] == "data:image/png;base64," + base64.b64encode(TINY_PNG).decode()
    binary = boxes["nvs.bin"]
    assert "a-binary" in binary.classes and not binary.find_all("img") and not binary.find_all("pre")
    link = binary.find("a")
    assert link.attrs["download"] == "nvs.bin"
    assert base64.b64decode(link.attrs["href"].removeprefix("data:application/octet-stream;base64,")) == bytes(range(64))
    header = binary.find("header").clean_text
    assert "64 B" in header and hashlib.sha256(bytes(range(64))).hexdigest() in header


def test_large_attachments_are_listed_not_embedded() -> None:
    big = Attachment("dump.bin", "application/octet-stream", b"\0" * (MAX_EMBED_BYTES + 1))
    html = render_run(run(phases=[phase("dump", attachments=[big])]))
    box = parse(html).find("div", "attachment")
    assert not box.find_all("a")
    assert "not embedded" in box.clean_text and big.sha256 in box.clean_text
    assert len(html) < 100_000


def test_long_text_attachments_are_truncated_inline_but_downloadable_whole() -> None:
    data = ("x" * 99 + "\n").encode() * (MAX_INLINE_TEXT_CHARS // 100 + 50)
    box = parse(render_run(run(phases=[phase("p", attachments=[Attachment("big.log", "text/plain", data)])]))).find(
        "div", "attachment")
    assert len(box.find("pre").text) == MAX_INLINE_TEXT_CHARS
    assert "Truncated" in box.clean_text
    assert base64.b64decode(box.find("a").attrs["href"].split(",", 1)[1]) == data


def test_a_run_still_open_and_a_run_with_no_phases_render() -> None:
    root = parse(render_run(run(serial=None, dut={}, phases=[], outcome=None)))
    assert root.find("div", "verdict").clean_text == "RUNNING"
    assert root.find("header", "banner").find("h1").clean_text == "no serial"
    assert "still running" in root.find("table", "run").clean_text
    assert root.find("table", "dut").clean_text == "The run recorded no identity."
    assert root.find("p", "empty").text == "No phase has finished yet."


# -- hostile device text ------------------------------------------------------


def hostile_run() -> RunRecord:
    h = HOSTILE
    ms = [measurement(f"m{i}", s, validators=[s], description=s, reason=s, outcome=MeasurementOutcome.FAIL,
                      units=s) for i, s in enumerate(h)]
    return run(
        serial=h[0],
        dut={f"k{i}{s}": s for i, s in enumerate(h)} | {"serial": h[0]},
        product=h[1], product_version=h[2], station=h[3], operator=h[4], batch=h[5], port=h[6],
        limits_file=h[7], limits_sha256=h[0],
        phases=[
            phase(h[2], measurements=ms, reason=h[1],
                  error=ErrorInfo(h[0], h[1], h[2]),
                  logs=[(0.1, s, s) for s in h] + [(0.2, "info", s, s) for s in h],
                  attachments=[Attachment(s, s, s.encode()) for s in h] + [
                      Attachment("evil.svg", "image/svg+xml", HOSTILE_SVG),
                      Attachment('x.html" onerror="alert(1)', "text/html", b"<script>alert(1)</script>"),
                      Attachment("fake.png", 'image/png" onerror="alert(1)', b"<script>alert(1)</script>"),
                  ]),
            phase(h[3], measurements=[measurement(h[4].replace("'", "") or "x", [[1, 2], [2, 3]],
                                                  dimensions=[(h[0], h[1])], units=h[2], low=0.0, high=5.0)]),
        ],
        logs=[(9.0, s, s, s) for s in h],
    )


def test_hostile_device_text_is_escaped_everywhere_on_the_run_page() -> None:
    r = hostile_run()
    html = render_run(r)
    root = assert_no_injected_markup(html)
    assert "<iframe" not in html and "<img src=x" not in html
    # The text survives, as text: every DUT key and value reads back exactly.
    dut = {tr.find("th").text: tr.find("td").text for tr in root.find("table", "dut").find_all("tr")}
    assert dut == r.dut
    assert root.find("header", "banner").find("h1").text == HOSTILE[0]
    phase_log, run_log = root.find_all("table", "logs")
    logs = [(tr.find("td", "src").text, tr.find("td", "msg").text) for tr in phase_log.find_all("tr")]
    assert logs == [("", s) for s in HOSTILE] + [(s, s) for s in HOSTILE]
    assert [(tr.find("td", "src").text, tr.find("td", "msg").text) for tr in run_log.find_all("tr")] == [
        (s, s) for s in HOSTILE]
    # Jinja syntax in data is data, not template code.
    assert "{{ 7*7 }}" in root.find("table", "run").text


def test_hostile_svg_attachment_is_only_an_img_never_inline_markup() -> None:
    html = render_run(hostile_run())
    root = assert_no_injected_markup(html)
    boxes = {b.find("span", "aname").text: b for b in root.find_all("div", "attachment")}
    img = boxes["evil.svg"].find("img")
    assert img.attrs["src"].startswith("data:image/svg+xml;base64,")
    assert base64.b64decode(img.attrs["src"].split(",", 1)[1]) == HOSTILE_SVG
    assert b"alert(document.domain)" not in html.encode()
    # Only the report's own SVG graphics are inline, and none of them carries the attachment.
    assert all(s.classes & {"plot", "gauge"} for s in root.find_all("svg"))
    # An HTML attachment is shown as escaped source; a mimetype that tries to break out is not an image.
    assert boxes['x.html" onerror="alert(1)'].find("pre").text == "<script>alert(1)</script>"
    fake = boxes["fake.png"]
    assert not fake.find_all("img") and fake.find("a").attrs["href"].startswith("data:application/octet-stream;")


def test_hostile_text_is_escaped_on_the_batch_page() -> None:
    r = hostile_run()
    html = render_batch([r, sensor_run(HOSTILE[1], fail_rf=True)], title=HOSTILE[0])
    root = assert_no_injected_markup(html)
    assert root.find("h1").text == HOSTILE[0]
    assert root.find("title").text == HOSTILE[0]
    serials = [tr.find("td", "serial").text for tr in root.find("table", "units").find("tbody").find_all("tr")]
    assert sorted(serials) == sorted([HOSTILE[0], HOSTILE[1]])


# Arbitrary text, salted with the fragments an attacker would use, so the property
# exercises escaping on most examples instead of waiting for hypothesis to spell "<script".
FRAGMENTS = ["<script>", "<SCRIPT src=x>", "</td>", "</table>", "<svg onload=alert(1)>", '"', "'", "<", ">", "&",
             "&amp;", "</pre>", "<!--", "{{", "}}", "{%", "\x00", "\r\n"]
printable = st.lists(
    st.sampled_from(FRAGMENTS) | st.text(st.characters(blacklist_categories=("Cs",)), max_size=8), max_size=6
).map("".join)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    dut=st.dictionaries(printable, printable, max_size=4),
    logs=st.lists(st.tuples(printable, printable), max_size=4),
    names=st.lists(printable, min_size=1, max_size=3),
    title=printable,
)
def test_arbitrary_text_never_becomes_markup(dut, logs, names, title) -> None:
    ms = [measurement(n, n, units=n, validators=[n], description=n) for n in names]
    p = phase(names[0], measurements=ms, logs=[(0.0, lvl, msg) for lvl, msg in logs],
              attachments=[Attachment(n, n, n.encode()) for n in names])
    r = run(dut=dut, phases=[p])
    page = render_run(r)
    root = assert_no_injected_markup(page)
    assert {tr.find("th").text: tr.find("td").text for tr in root.find("table", "dut").find_all("tr")
            if tr.find_all("th")} == r.dut
    log_tables = root.find_all("table", "logs")
    shown = [tr.find_all("td")[2].text for tr in log_tables[0].find_all("tr")] if log_tables else []
    assert shown == [m for _, m in logs]
    names_shown = [tr.find("td", "name").find("code").text for tr in root.find("table", "measurements").find_all("tr")
                   if tr.find_all("td")]
    assert names_shown == names
    assert_no_injected_markup(render_batch([r], title=title))


# -- self-containment -----------------------------------------------------------


@pytest.mark.parametrize("which", ["run", "batch"])
def test_pages_are_self_contained(which: str) -> None:
    runs = [sensor_run("SN-1", fail_rf=True), sensor_run("SN-2", crash=True), sensor_run("SN-1", started_at=at(600))]
    html = render_run(runs[0]) if which == "run" else render_batch(runs, title="B1")
    lowered = html.lower()
    for needle in ("http://", "https://", 'src="//', "href=\"//", "<link", "<script", "@import", "url("):
        assert needle not in lowered, needle
    root = assert_no_injected_markup(html)
    assert root.find("style").text.strip(), "the stylesheet is inline"
    assert "@media print" in root.find("style").text
    csp = root.find("meta", **{"http-equiv": "Content-Security-Policy"}).attrs["content"]
    assert "default-src 'none'" in csp and "script-src" not in csp


# -- the batch page -------------------------------------------------------------


def batch_runs() -> list[RunRecord]:
    return [
        sensor_run("SN-1", fail_rf=True, slot=0, started_at=at(0)),
        sensor_run("SN-2", vdd=3.37, slot=1, started_at=at(10)),
        sensor_run("SN-3", crash=True, slot=2, started_at=at(20)),
        sensor_run("SN-1", slot=0, started_at=at(300)),  # retest passes
        run(serial=None, slot=3, started_at=at(400), duration=31.0, run_id="noserial01",
            phases=[phase("identify", Outcome.TIMEOUT, reason="timed out after 30 s", start=400, duration=30)]),
        sensor_run("SN-4", slot=1, started_at=at(500)),
    ]


def test_batch_page_counts_and_yields() -> None:
    root = parse(render_batch(batch_runs(), title="esp32_sensor — B1"))
    assert root.find("h1").text == "esp32_sensor — B1"
    kpis = ("units", "passed", "failed", "errored", "other", "fpy", "final", "marginal")
    kpi = {k: root.find(id=f"kpi-{k}").text for k in kpis}
    # Units: SN-1 (twice), SN-2, SN-3, SN-4 and one run without a serial.
    # FAIL (judged bad) apart from ERROR and TIMEOUT (station or communication trouble).
    assert kpi == {"units": "5", "passed": "3", "failed": "1", "errored": "2", "other": "0", "fpy": "40.0 %",
                   "final": "60.0 %", "marginal": "1"}
    errored = root.find(id="kpi-errored").parent.find("div", "s").text
    assert errored == "1 error, 1 timeout"
    assert "units whose first finished run passed" in root.find("dl", "definitions").clean_text


def test_batch_units_table_is_chronological_links_each_run_and_marks_retests() -> None:
    runs = batch_runs()
    root = parse(render_batch(list(reversed(runs)), title="B1"))
    table = root.find("table", "units")
    rows = table.find("tbody").find_all("tr")
    got = [cells(tr) for tr in rows]
    assert [g[1] for g in got] == ["SN-1", "SN-2", "SN-3", "SN-1", "—", "SN-4"]
    assert [g[2] for g in got] == ["0", "1", "2", "0", "3", "1"]
    assert [g[4] for g in got] == ["FAIL", "PASS MARGINAL", "ERROR", "PASS", "TIMEOUT", "PASS"]
    assert [g[6] for g in got] == ["1 of 2", "1", "1", "2 of 2", "1", "1"]
    assert got[0][0] == "2024-05-14 08:30:00" and got[0][5] == "24.9 s"
    assert got[0][7] == "rf_sweep: measurement 'rssi_sweep': -28.5 is above -30"
    assert got[4][7] == "identify: timed out after 30 s"
    assert [g[8] for g in got] == [r.run_id for r in runs]
    # drill-down: each run id links to its page, beside the batch page, relatively
    assert [a.attrs["href"] for a in table.find_all("a")] == [f"{r.run_id}.html" for r in runs]
    assert [tr.classes for tr in rows][0] == {"o-fail"}


def test_batch_pareto_tables() -> None:
    root = parse(render_batch(batch_runs(), title="B1"))
    by_phase = [cells(tr)[:4] for tr in root.find("table", "pareto-phase").find("tbody").find_all("tr")]
    assert by_phase == [["rf_sweep", "1", "100.0 %", "100.0 %"]]  # product failures: FAIL phases only
    trouble = [cells(tr)[:4] for tr in root.find("table", "pareto-trouble").find("tbody").find_all("tr")]
    assert trouble == [["identify", "1", "50.0 %", "50.0 %"], ["self_test", "1", "50.0 %", "100.0 %"]]
    by_m = [cells(tr)[:4] for tr in root.find("table", "pareto-measurement").find("tbody").find_all("tr")]
    assert by_m == [["rf_sweep / rssi_sweep", "1", "100.0 %", "100.0 %"]]
    bar = root.find("table", "pareto-measurement").find("div", "bar")
    assert bar.attrs["style"] == "width: 100.0%"


def test_batch_page_names_its_test_code_and_warns_when_it_is_mixed() -> None:
    root = parse(render_batch(batch_runs(), title="B1"))
    assert not root.find_all("p", "code-warning")  # one product file, one limits file, one sequencer
    rows = [cells(tr) for tr in root.find("table", "code-versions").find("tbody").find_all("tr")]
    assert rows == [["esp32_sensor 1.4.2", ("3c1e" * 4), ("9f2c" * 4), "0.1.0", "6", "2024-05-14 08:30:00"]]

    runs = batch_runs()
    runs[3] = attrs.evolve(runs[3], limits_sha256="77" * 32, sequencer_version="0.1.0+g1234.dirty")
    root = parse(render_batch(runs, title="B1"))
    assert "2 different combinations" in root.find("p", "code-warning").clean_text
    rows = root.find("table", "code-versions").find("tbody").find_all("tr")
    assert [cells(tr)[2:5] for tr in rows] == [["9f2c" * 4, "0.1.0", "5"], ["77" * 8, "0.1.0+g1234.dirty UNCOMMITTED", "1"]]
    assert rows[1].find("span", "uncommitted").text == "UNCOMMITTED"


def test_batch_page_shows_how_each_slot_did() -> None:
    root = parse(render_batch(batch_runs(), title="B1"))
    table = root.find("table", "slots")
    assert [th.clean_text for th in table.find("thead").find_all("th")][:7] == [
        "Slot", "Runs", "Passed", "Not passed", "Pass rate", "Marginal", ""]  # one station: no station column
    rows = [cells(tr)[:6] for tr in table.find("tbody").find_all("tr")]
    assert rows == [["0", "2", "1", "1", "50.0 %", "0"], ["1", "2", "2", "0", "100.0 %", "1"],
                    ["2", "1", "0", "1", "0.0 %", "0"], ["3", "1", "0", "1", "0.0 %", "0"]]
    bars = [tr.find_all("div", "bar") for tr in table.find("tbody").find_all("tr")]
    assert bars[0][0].attrs["style"] == "width: 50.0%" and bars[1] == []  # nothing failed: no bar


def test_batch_of_several_stations_names_the_station_of_each_slot_and_run() -> None:
    runs = batch_runs()
    runs[3] = attrs.evolve(runs[3], station="line1-st04")  # SN-1's retest, on another station's slot 0
    root = parse(render_batch(runs, title="B1"))
    slots = [cells(tr)[:4] for tr in root.find("table", "slots").find("tbody").find_all("tr")]
    assert slots[:2] == [["line1-st03", "0", "1", "0"], ["line1-st03", "1", "2", "2"]]
    assert slots[-1] == ["line1-st04", "0", "1", "1"]
    units = root.find("table", "units")
    # station and slot say where a unit was tested; the port path is on its run page
    header = [th.clean_text for th in units.find("thead").find_all("th")]
    assert "Station" in header and "Port" not in header
    assert [td.clean_text for td in units.find_all("td", "station")][3] == "line1-st04"
    # one slot in all: nothing to compare, no table
    assert not parse(render_batch([sensor_run("SN-9")], title="one")).find_all("table", "slots")


def test_batch_page_says_how_to_get_its_runs_as_a_spreadsheet() -> None:
    footer = parse(render_batch(batch_runs(), title="B1")).find("footer")
    assert footer.find("code").text == "sequencer export --batch B2024-05-14"
    # a batch id a shell would split or expand is quoted, ready to paste
    odd = [attrs.evolve(r, batch="line 2; $(rm)") for r in batch_runs()]
    footer = parse(render_batch(odd, title="B1")).find("footer")
    assert footer.find("code").text == "sequencer export --batch 'line 2; $(rm)'"
    dashed = [attrs.evolve(r, batch="-20261202") for r in batch_runs()]  # an option to the shell's argparse
    assert parse(render_batch(dashed, title="B1")).find("footer").find("code").text == \
        "sequencer export --batch=-20261202"
    mixed = [*batch_runs(), attrs.evolve(sensor_run("SN-9"), batch="B2")]
    assert not parse(render_batch(mixed, title="two")).find("footer").find_all("code")


def test_batch_without_failures_or_runs() -> None:
    root = parse(render_batch([sensor_run("SN-9")], title="clean"))
    assert [p.text for p in root.find_all("p", "empty")] == [
        "No failures.", "No failures.", "No station or communication trouble."]
    empty = parse(render_batch([], title="nothing"))
    assert empty.find(id="kpi-fpy").text == "—"
    assert [p.text for p in empty.find_all("p", "empty")][-2:] == ["No runs.", "No numeric measurements."]
    assert not empty.find_all("table", "code-versions")


# -- formatting and writing -------------------------------------------------------


@pytest.mark.parametrize(
    "x, text",
    [(3.301, "3.301"), (0.1 + 0.2, "0.3"), (41, "41"), (1e-7, "1e-07"), (float("nan"), "NaN"),
     (float("-inf"), "-inf"), (True, "true"), (1234567.0, "1234567")],
)
def test_numbers_read_like_an_engineer_wrote_them(x: float, text: str) -> None:
    assert formatting.number(x) == text


@pytest.mark.parametrize(
    "seconds, text",
    [(None, "—"), (0.4212, "0.42 s"), (12.34, "12.3 s"), (125.2, "2 min 05 s"), (3725, "1 h 02 min")],
)
def test_durations(seconds: float | None, text: str) -> None:
    assert formatting.duration(seconds) == text


@pytest.mark.parametrize("n, text", [(812, "812 B"), (4096, "4.0 KiB"), (1536 * 1024, "1.5 MiB"),
                                     (3 * 1024**3, "3.0 GiB")])
def test_sizes(n: int, text: str) -> None:
    assert formatting.size(n) == text


def test_unknown_log_levels_get_a_fixed_class() -> None:
    assert formatting.level_class("WARNING") == "lvl-warning"
    assert formatting.level_class('" onclick="x') == "lvl-info"


def test_write_html_is_atomic_utf8_and_readable(tmp_path: Path) -> None:
    target = tmp_path / "reports" / "B1" / "index.html"
    html = render_batch(batch_runs(), title="Prüfung — B1")
    assert write_html(target, html) == target
    assert target.read_text(encoding="utf-8") == html
    assert os.stat(target).st_mode & 0o777 == 0o644
    write_html(target, "<p>second</p>")
    assert target.read_text(encoding="utf-8") == "<p>second</p>"
    assert sorted(p.name for p in target.parent.iterdir()) == ["index.html"]


# -- a real browser -------------------------------------------------------------

def _png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    return struct.unpack(">II", data[16:24])


@pytest.mark.slow
def test_chromium_renders_both_pages_to_png_and_pdf_and_keeps_the_values(tmp_path: Path) -> None:
    binary = chromium()
    runs = batch_runs()
    run_page = write_html(tmp_path / "run.html", render_run(runs[0]))
    batch_page = write_html(tmp_path / "index.html", render_batch(runs, title="esp32_sensor — B1"))
    jobs = {}
    for page in (run_page, batch_page):
        url = page.resolve().as_uri()
        stem = page.stem
        for kind, flag in (("png", "--screenshot"), ("pdf", "--print-to-pdf"), ("dom", "--dump-dom")):
            out = tmp_path / f"{stem}.{kind}"
            args = chromium_args(binary, tmp_path / f"profile-{stem}-{kind}")
            if kind == "png":
                args += [f"{flag}={out}", "--window-size=1200,1600"]
            elif kind == "pdf":
                args += [f"{flag}={out}", "--no-pdf-header-footer"]
            else:
                args += [flag]
            stdout = open(out, "wb") if kind == "dom" else subprocess.DEVNULL
            jobs[(stem, kind)] = (subprocess.Popen([*args, url], stdout=stdout, stderr=subprocess.PIPE), out, stdout)
    errors = {}
    for key, (proc, out, stdout) in jobs.items():
        try:
            _, err = proc.communicate(timeout=120)
        finally:
            if stdout is not subprocess.DEVNULL:
                stdout.close()
        if proc.returncode != 0:
            errors[key] = err.decode(errors="replace")[-2000:]
    assert not errors, errors

    for stem in ("run", "index"):
        png = (tmp_path / f"{stem}.png").read_bytes()
        assert _png_size(png) == (1200, 1600)
        assert len(png) > 40_000, "a blank page compresses to a few KiB"
        pdf = (tmp_path / f"{stem}.pdf").read_bytes()
        assert pdf.startswith(b"%PDF-") and len(pdf) > 20_000

    run_dom = parse((tmp_path / "run.dom").read_text(encoding="utf-8"))
    for name, value in (("vdd_3v3", "3.301"), ("vdd_1v8", "1.797"), ("idle_current", "41.2"),
                        ("chip_id", "ESP32-D0WD-V3"), ("flash_verified", "true")):
        tr = row_of(run_dom, "measurements", name)
        assert tr.find("td", "value").clean_text.startswith(value), (name, tr.find("td", "value").clean_text)
    assert row_of(run_dom, "measurements", "rssi_sweep").find("svg", "plot").find("polyline")
    assert run_dom.find("div", "verdict").clean_text == "FAIL"

    batch_dom = parse((tmp_path / "index.dom").read_text(encoding="utf-8"))
    assert batch_dom.find(id="kpi-final").text == "60.0 %"
    serials = [td.clean_text for td in batch_dom.find("table", "units").find_all("td", "serial")]
    assert serials == ["SN-1", "SN-2", "SN-3", "SN-1", "—", "SN-4"]


# Appended to a copy of a page (the pages themselves carry no script): counts the
# lines each identifier is laid out on, and writes the counts into the DOM.
_LINE_COUNTER = """<script>
const lines = el => { const r = document.createRange(); r.selectNodeContents(el);
  return new Set([...r.getClientRects()].map(q => Math.round(q.top))).size; };
const out = {
  serials: [...document.querySelectorAll("table.units td.serial")].map(td => [td.textContent.trim(), lines(td)]),
  pareto: [...document.querySelectorAll("table.pareto td:first-child > *")].map(e => [e.textContent.trim(), lines(e)]),
  kpis: [...document.querySelectorAll(".kpi .v")].map(e => [e.textContent.trim(), lines(e), e.scrollWidth <= e.clientWidth]),
};
const pre = document.createElement("pre"); pre.id = "lines"; pre.textContent = JSON.stringify(out);
document.body.appendChild(pre);
</script>"""


def test_serials_and_failure_names_are_never_split_across_lines_in_a_browser(tmp_path: Path) -> None:
    # A serial broken as "SN69610001" / "5" reads as another unit. A batch
    # like a real one at 1100 px: 16 units, long failure reasons squeezing the
    # table, phase and measurement names of a real product.
    long_reason = ("ProtocolError: /dev/pts/8: response to 'SELFTEST' does not echo it: "
                   "'IDENT model=esp32-sensor serial=SN696100008 mac=24:6F:28:35:25:C6 fw=1.4.2 hw=B'")
    runs = []
    for i in range(16):
        failing = {
            3: phase("regulator_startup", measurements=[measurement("regulator_startup", 3.59, units="V", high=3.45)]),
            8: phase("self_test", error=ErrorInfo("ProtocolError", long_reason), reason=long_reason),
            10: phase("environment_sensor", measurements=[measurement("environment_humidity", 140.0, high=100.0)]),
        }.get(i)
        phases = [phase("identify"), *([failing] if failing else [phase("self_test")])]
        runs.append(run(serial=f"SN6961000{i:02d}", slot=i, port=f"/dev/pts/{i}", phases=phases))
        if failing:  # retested and passed: a final yield of "100.0 %", the widest figure a KPI shows
            runs.append(run(serial=f"SN6961000{i:02d}", slot=i, port=f"/dev/pts/{i}", started_at=at(600),
                            phases=[phase("identify"), phase("self_test")]))
    page = tmp_path / "index.html"
    html = render_batch(runs, title="esp32-sensor — batch VIS")
    csp = html[html.index('<meta http-equiv="Content-Security-Policy"'):]
    csp = csp[: csp.index(">") + 1]  # the page forbids scripts; this copy needs one to measure
    page.write_text(html.replace(csp, "").replace("</body>", _LINE_COUNTER + "</body>"), encoding="utf-8")
    binary = chromium()
    dom = subprocess.run(
        [*chromium_args(binary, tmp_path / "profile"), "--window-size=1100,1200", "--dump-dom", page.as_uri()],
        capture_output=True, timeout=120, check=True,
    ).stdout.decode()
    counted = json.loads(parse(dom).find(id="lines").text)
    assert sorted(set(serial for serial, _ in counted["serials"])) == [f"SN6961000{i:02d}" for i in range(16)]
    assert all(n == 1 for _, n in counted["serials"]), counted["serials"]
    names = dict(counted["pareto"])
    assert {"regulator_startup", "environment_sensor", "environment_humidity"} <= set(names)
    assert all(n == 1 for n in names.values()), names
    # a figure and its unit stay together ("100.0" over "%" is misread) and fit their box
    kpis = {figure: (n, fits) for figure, n, fits in counted["kpis"]}
    assert "100.0 %" in kpis and all(v == (1, True) for v in kpis.values()), str(kpis)


def test_only_identifiers_of_a_normal_length_are_kept_whole() -> None:
    assert formatting.keep_whole("SN696100015") == "nowrap"
    assert formatting.keep_whole("x" * formatting.KEEP_WHOLE_CHARS) == "nowrap"
    # a DUT sending garbage as its serial must not push the table off the page
    garbage = "\x1b" + "A" * 4000
    assert formatting.keep_whole(garbage) == "wrap"
    page = parse(render_batch([run(serial=garbage)], title="t"))
    assert page.find("td", "serial").classes >= {"mono", "serial", "wrap"}


@given(st.text(max_size=40) | st.sampled_from(["..", ".", "", "a/b", "a_b", "a\\b", ".hidden", "B2026-47"]))
def test_a_batch_folder_is_one_safe_folder_inside_the_reports(batch: str) -> None:
    root = Path("/srv/reports")
    folder = batch_dir(root, batch)
    assert folder.parent == root
    assert folder.name not in ("", ".", "..") and not folder.name.startswith(".")
    assert all(c.isascii() and (c.isalnum() or c in "._-") for c in folder.name)
    # a safe id is used as it is; any other gets a hash of itself, so ids never share a folder
    if batch and batch[0] != "." and all(c.isascii() and (c.isalnum() or c in "._-") for c in batch):
        assert folder.name == batch
    else:
        assert folder.name.endswith(hashlib.sha256(batch.encode()).hexdigest()[:8])


def test_batches_that_differ_only_in_unsafe_characters_get_different_folders() -> None:
    names = {batch_dir(Path("r"), b).name for b in ("a/b", "a_b", "a\\b", "a b", "a:b", "a..b", "")}
    assert len(names) == 7


# -- statistics and drill-down (issue 19) ----------------------------------------


def rail_runs(n: int, *, spread: float = 0.01, centre: float = 3.30) -> list[RunRecord]:
    import random

    rnd = random.Random(3)
    return [sensor_run(f"SN-{i}", vdd=centre + rnd.gauss(0, spread), slot=i % 4, started_at=at(60 * i))
            for i in range(n)]


def test_batch_page_has_statistics_per_numeric_measurement_low_cpk_first() -> None:
    runs = rail_runs(30, spread=0.03)  # the 3V3 rail spreads too wide for its limits: not capable
    root = parse(render_batch(runs, title="B"))
    rows = root.find("table", "stats-overview").find("tbody").find_all("tr")
    names = [tr.find("td").find("code").text for tr in rows]
    assert names[0] == "vdd_3v3" and set(names) == {"vdd_3v3", "vdd_1v8", "idle_current"}
    first = {td.attrs["data-label"]: td.clean_text for td in rows[0].find_all("td")}
    assert first["n"] == "30" and first["Fails"] == "0"
    assert float(first["Cpk"].split()[0]) < 1.33 and "LOW" in first["Cpk"]
    assert "not-capable" in rows[0].classes
    card = root.find("article", "stat")
    histogram = card.find("svg", "histogram")
    labels = [t.text for t in histogram.find_all("text")]
    assert "LSL 3.2" in labels and "USL 3.4" in labels and "mean" in labels
    chart = card.find("svg", "control-chart")
    assert chart.find("polyline") and "30 values" in chart.find("title").text
    # a settable threshold: at 0.1 everything with a Cpk is capable
    relaxed = parse(render_batch(runs, title="B", cpk_threshold=0.1))
    assert not relaxed.find("table", "stats-overview").find_all("tr", "not-capable")


def test_fifty_measurements_over_many_runs_keep_the_page_light() -> None:
    import random

    rnd = random.Random(1)
    runs = []
    for i in range(2000):
        ms = [measurement(f"m{j:02d}", 1.0 + rnd.gauss(0, 0.05), units="V", low=0.5, high=1.5) for j in range(50)]
        runs.append(run(serial=f"S{i}", started_at=at(i), phases=[phase("p", measurements=ms)]))
    html = render_batch(runs, title="B")
    root = parse(html)
    assert len(root.find_all("svg", "control-chart")) == 50
    # 2,000 values per chart are drawn as 240 columns: fifty measurements' statistics stay under a megabyte
    statistics = html[html.index('<section class="statistics"'):]
    assert len(statistics.encode()) < 1_000_000, len(statistics.encode())


def test_a_run_page_links_back_to_its_batch_and_to_its_units_other_runs() -> None:
    runs = [sensor_run("SN-1", vdd=3.59, started_at=at(0)), sensor_run("SN-2", started_at=at(10)),
            sensor_run("SN-1", started_at=at(600))]
    from reports.render.html import unit_histories

    histories = unit_histories(runs)
    page = parse(render_run(runs[2], unit_runs=histories[runs[2].run_id]))
    assert page.find("a", id="batch-link").attrs["href"] == "index.html"
    history = page.find("div", id="unit-history")
    assert history.clean_text.startswith("Test 2 of 2 of this unit; previous: FAIL at power_rails: measurement "
                                         "'vdd_3v3': 3.59 is above 3.4")
    assert history.find("a").attrs["href"] == f"{runs[0].run_id}.html"
    # a retest in another batch: its page is in that batch's folder, beside this one
    other = attrs.evolve(runs[0], batch="B 2/evil")
    page = parse(render_run(runs[2], unit_runs=[other, runs[2]]))
    assert page.find("div", id="unit-history").find("a").attrs["href"].startswith("../B_2_evil-")
    assert not parse(render_run(runs[1], unit_runs=histories[runs[1].run_id])).find_all("div", id="unit-history")
