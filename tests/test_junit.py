"""JUnit XML export: read back by a real JUnit consumer (junitparser) and valid against Jenkins' schema."""

from __future__ import annotations

from pathlib import Path

import junitparser
import pytest
import trio
from lxml import etree

from reports.render.junit import write_junit
from sequencer.cli import main
from sequencer.records import ErrorInfo, Outcome
from tests import records_factory as rf
from tests.store_support import store_runs

#: Jenkins xUnit plugin's JUnit schema (tests/schemas/ says where it comes from).
SCHEMA = etree.XMLSchema(etree.parse(str(Path(__file__).parent / "schemas" / "jenkins-junit-10.xsd")))


def batch() -> list:
    rails_fail = rf.sensor_run("SN-1", vdd=3.59, started_at=rf.at(0))
    crashed = rf.sensor_run("SN-2", crash=True, started_at=rf.at(30), slot=1)
    hostile = rf.run(serial="SN-3\x1b[2J<&>", dut={"serial": "SN-3\x1b[2J<&>", "note": "]]>\x00"},
                     started_at=rf.at(60), phases=[rf.phase("identify", Outcome.TIMEOUT, reason="timed out after 2 s")])
    retest = rf.sensor_run("SN-1", started_at=rf.at(100))
    return [rails_fail, crashed, hostile, retest]


def test_one_suite_per_run_one_case_per_phase_read_back_by_junitparser(tmp_path: Path) -> None:
    runs = batch()
    path = write_junit(tmp_path / "results.xml", lambda: runs, name="esp32_sensor — batch B1")
    xml = junitparser.JUnitXml.fromfile(str(path))
    suites = list(xml)
    assert len(suites) == 4
    first = suites[0]
    assert first.name == f"SN-1 {runs[0].run_id}"
    assert first.tests == len(runs[0].phases) and first.failures == 1 and first.errors == 0
    cases = {c.name: c for c in first}
    rails = cases["power_rails"]
    assert not rails.is_passed
    [failure] = rails.result
    assert isinstance(failure, junitparser.Failure)
    assert failure.message == runs[0].phase("power_rails").reason
    assert "vdd_3v3 = 3.59 V  limits [3.2, 3.4]  FAIL" in failure.text
    assert cases["identify"].is_passed and "chip_id = ESP32-D0WD-V3" in cases["identify"].system_out
    # Logs: a phase's lines (its fixtures' named) after its measurements; the fixtures' outside phases, the suite's.
    assert cases["power_rails"].system_out.splitlines()[-2:] == [
        "08:30:01.600 INFO [dmm] range 10 V, NPLC 1", "08:30:03.600 INFO rails measured"]
    assert first.child(junitparser.SystemOut).text == "08:30:25.000 INFO [jig] relays opened, port closed"
    assert rails.classname == "esp32_sensor.SN-1"
    props = {p.name: p.value for p in first.properties()}
    assert props["outcome"] == "FAIL" and props["dut.serial"] == "SN-1" and props["product_version"] == "1.4.2"

    crashed = {c.name: c for c in suites[1]}
    [error] = crashed["self_test"].result
    assert isinstance(error, junitparser.Error) and error.type == "DutProtocolError"
    assert "Traceback" in error.text
    [skipped] = crashed["rf_sweep"].result
    assert isinstance(skipped, junitparser.Skipped)
    assert suites[1].errors == 1 and suites[1].skipped == 1 and suites[1].failures == 0

    # device text with control characters and markup survives as text, escaped
    assert suites[2].name.startswith("SN-3\\x1b[2J<&>")
    assert {p.name: p.value for p in suites[2].properties()}["dut.note"] == "]]>\\x00"
    [timeout] = list(suites[2])[0].result
    assert isinstance(timeout, junitparser.Error) and timeout.type == "TIMEOUT"
    assert all(c.is_passed for c in suites[3] if c.name != "rf_sweep")
    assert (xml.tests, xml.failures, xml.errors) == (sum(s.tests for s in suites), 1, 2)


def test_the_export_is_valid_against_jenkins_junit_schema(tmp_path: Path) -> None:
    path = write_junit(tmp_path / "results.xml", batch, name="B1")
    document = etree.parse(str(path))
    assert SCHEMA.validate(document), SCHEMA.error_log
    # the schema is not a formality: a testsuite without its required tests count fails it
    suite = document.getroot()[0]
    del suite.attrib["tests"]
    assert not SCHEMA.validate(document)


@pytest.mark.parametrize("where", ["explicit", "batch"])
def test_sequencer_export_writes_junit_for_an_xml_output(tmp_path: Path, where: str,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    store = tmp_path / "store.sqlite"
    trio.run(store_runs, store, batch())
    out = tmp_path / "results.xml"
    assert main(["export", "--batch", "B2024-05-14", "--store", str(store), "-o", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    assert SCHEMA.validate(etree.parse(str(out)))
    assert len(list(junitparser.JUnitXml.fromfile(str(out)))) == 4
    assert main(["export", "--batch", "B2024-05-14", "--store", str(store), "-o", str(out), "--table", "runs"]) == 2
    assert "--table" in capsys.readouterr().err


def test_the_streamed_file_is_the_document_junit_tree_makes(tmp_path: Path) -> None:
    """write_junit reads the runs twice and holds none; what it writes is the in-memory tree, element for element."""
    import xml.etree.ElementTree as ET

    from reports.render.junit import junit_tree

    runs = batch()
    path = write_junit(tmp_path / "results.xml", lambda: runs, name="B1")
    assert ET.canonicalize(path.read_text(encoding="utf-8")) == ET.canonicalize(
        ET.tostring(junit_tree(runs, name="B1").getroot(), encoding="unicode"))
