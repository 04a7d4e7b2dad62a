"""Runs as JUnit XML, for the CI dashboards and test-management tools that read nothing else.

One ``<testsuite>`` per run (named by the unit and the run id, its package
the product), one ``<testcase>`` per phase (its class ``<product>.<unit>``,
so Jenkins groups a unit's phases). A FAIL phase is a ``<failure>`` whose
message is the phase's reason and whose text lists its measurements; an
ERROR, TIMEOUT or ABORTED phase is an ``<error>`` (the traceback when there
is one): station or communication trouble, not a product failure, as in the
batch report. A SKIPPED phase is ``<skipped>``. Every phase's measurements and
log (its own lines and its fixtures', each naming the fixture) are in its
``<system-out>``, and what fixtures logged outside phases in the suite's; the
run's identity, product version, limits file and station are ``<property>``
elements of its suite.

Device text is untrusted: the XML writer escapes markup, and characters XML
1.0 cannot hold (control characters) are written as ``\\x..`` escapes.
"""

from __future__ import annotations

import datetime as dt
import xml.etree.ElementTree as ET
from collections.abc import Iterable
from pathlib import Path

from reports.render.export import xml_text
from reports.render.files import replacing
from reports.render.formatting import clock
from reports.render.formatting import value as format_value
from reports.quality.units import UnitGrouping, group_units
from reports.quality.yields import RunPasses, chronological
from sequencer.records import LogLine, MeasurementRecord, Outcome, PhaseRecord, RunRecord

_TROUBLE = frozenset({Outcome.ERROR, Outcome.TIMEOUT, Outcome.ABORTED, Outcome.INTERRUPTED})


def junit_tree(runs: Iterable[RunRecord], *, name: str) -> ET.ElementTree:
    """The ``<testsuites>`` document of ``runs`` (oldest run first)."""
    ordered = chronological(runs)
    units = group_units(ordered)
    root = ET.Element("testsuites", name=xml_text(name))
    totals = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    time_s = 0.0
    for run in ordered:
        suite = testsuite(run, units.of(run).label)
        root.append(suite)
        for key in totals:
            totals[key] += int(suite.get(key, "0"))
        time_s += run.duration_s or 0.0
    for key in ("tests", "failures", "errors"):
        root.set(key, str(totals[key]))
    root.set("time", _seconds(time_s))
    ET.indent(root, space=" ")
    return ET.ElementTree(root)


def write_junit(path: str | Path, passes: RunPasses, *, name: str) -> Path:
    """Write the JUnit XML of the runs ``passes`` reads to ``path``, atomically; the document :func:`junit_tree` makes.

    The runs are read twice, never held: first for the totals the root
    carries and each run's unit, then a suite at a time into the file.
    """
    grouping = UnitGrouping()
    totals = {"tests": 0, "failures": 0, "errors": 0}
    time_s = 0.0
    for run in passes():
        grouping.add(run)
        totals["tests"] += len(run.phases)
        for p in run.phases:
            kind = _verdict_kind(p)
            if kind in totals:
                totals[kind] += 1
        time_s += run.duration_s or 0.0
    units = grouping.units()
    root = ET.Element("testsuites", name=xml_text(name), **{k: str(n) for k, n in totals.items()},
                      time=_seconds(time_s))
    with replacing(path) as tmp, open(tmp, "w", encoding="utf-8") as out:
        out.write("<?xml version='1.0' encoding='utf-8'?>\n")
        out.write(ET.tostring(root, encoding="unicode").replace(" />", ">") + "\n")
        for run in passes():
            suite = testsuite(run, units.of(run).label)
            ET.indent(suite, space=" ", level=1)
            out.write(" " + ET.tostring(suite, encoding="unicode") + "\n")
        out.write("</testsuites>")
    return Path(path)


def testsuite(run: RunRecord, unit: str) -> ET.Element:
    """One run as a ``<testsuite>``: its phases as test cases (``unit``: the label of the unit it tested)."""
    counts = {"tests": len(run.phases), "failures": 0, "errors": 0, "skipped": 0}
    suite = ET.Element("testsuite", {
        "name": xml_text(f"{unit} {run.run_id}"),
        "package": xml_text(run.product),
        "id": xml_text(run.run_id),
        "hostname": xml_text(run.station),
        "timestamp": run.started_at.astimezone(dt.timezone.utc).replace(tzinfo=None).isoformat(timespec="seconds"),
        "time": _seconds(run.duration_s or 0.0),
    })
    properties = ET.SubElement(suite, "properties")
    for key, val in (
        ("outcome", run.outcome.value if run.outcome is not None else "RUNNING"),
        ("product", run.product), ("product_version", run.product_version), ("batch", run.batch),
        ("station", run.station), ("slot", str(run.slot)), ("port", run.port), ("operator", run.operator),
        ("limits_sha256", run.limits_sha256 or ""), ("product_sha256", run.product_sha256 or ""),
        ("sequencer_version", run.sequencer_version),
        *((f"dut.{k}", v) for k, v in run.dut.items()),
    ):
        ET.SubElement(properties, "property", name=xml_text(key), value=xml_text(val))
    classname = xml_text(f"{run.product}.{unit.replace('.', '_')}")
    for p in run.phases:
        case = ET.SubElement(suite, "testcase", name=xml_text(p.name), classname=classname,
                             time=_seconds(p.duration_s))
        verdict = _verdict(p)
        if verdict is not None:
            counts[_verdict_kind(p)] += 1  # type: ignore[index]
            case.append(verdict)
        if p.measurements or p.logs:
            out = ET.SubElement(case, "system-out")
            out.text = xml_text("\n".join([*(_measurement_line(m) for m in p.measurements),
                                           *(_log_line(line) for line in p.logs)]))
    if run.logs:
        out = ET.SubElement(suite, "system-out")
        out.text = xml_text("\n".join(_log_line(line) for line in run.logs))
    for key, n in counts.items():
        suite.set(key, str(n))
    return suite


def _verdict_kind(p: PhaseRecord) -> str | None:
    """Which of a suite's counts the phase adds to: ``failures`` (FAIL), ``errors`` (trouble), ``skipped``."""
    if p.outcome is Outcome.FAIL:
        return "failures"
    if p.outcome in _TROUBLE:
        return "errors"
    if p.outcome is Outcome.SKIPPED:
        return "skipped"
    return None


def _verdict(p: PhaseRecord) -> ET.Element | None:
    reason = p.reason or ""
    if p.outcome is Outcome.FAIL:
        element = ET.Element("failure", type="FAIL", message=xml_text(reason))
        failed = [m for m in p.measurements if m.outcome.value != "PASS"]
        element.text = xml_text("\n".join(_measurement_line(m) for m in failed or p.measurements))
        return element
    if p.outcome in _TROUBLE:
        error = p.error
        element = ET.Element("error", type=xml_text(error.type if error else p.outcome.value),
                             message=xml_text(reason or (error.message if error else p.outcome.value)))
        element.text = xml_text(error.traceback if error and error.traceback else f"{p.outcome.value}: {reason}")
        return element
    if p.outcome is Outcome.SKIPPED:
        return ET.Element("skipped", message=xml_text(reason))
    return None


def _measurement_line(m: MeasurementRecord) -> str:
    units = f" {m.units}" if m.units else ""
    limits = ""
    if m.limits is not None and (m.limits.low is not None or m.limits.high is not None):
        low = "" if m.limits.low is None else format_value(m.limits.low)
        high = "" if m.limits.high is None else format_value(m.limits.high)
        limits = f"  limits [{low}, {high}]"
    elif m.validators:
        limits = "  " + "; ".join(m.validators)
    verdict = m.outcome.value + (" MARGINAL" if m.marginal else "")
    why = f"  ({m.reason})" if m.reason and m.outcome.value != "PASS" else ""
    value = f"{len(m.value)} points" if m.dimensions and isinstance(m.value, list) else format_value(m.value)
    return f"{m.name} = {value}{units}{limits}  {verdict}{why}"


def _log_line(line: LogLine) -> str:
    """``08:30:01.600 INFO [dmm] range 10 V``: the time in UTC, the level, the fixture that said it (if one did)."""
    source = f" [{line.fixture}]" if line.fixture else ""
    return f"{clock(line.timestamp)} {line.level.upper()}{source} {line.message}"


def _seconds(s: float) -> str:
    return f"{s:.3f}"
