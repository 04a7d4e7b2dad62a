"""Runs as tables, for the spreadsheet or script quality analyses them with.

The HTML pages answer the questions we thought of; an export answers the
rest: a capability study of one rail, a pivot of failures by operator, a
join with the supplier's lot list. Four tables, each a plain rectangle that
pandas, Excel or Minitab reads without help:

* **runs**: one row per run, its identity, outcome, and one column per
  scalar measurement (``phase.measurement [units]``, the value of the phase's
  last attempt). ``unit_run`` is 1 for a unit's first run in the export, 2 for
  its first retest, and so on; ``unit_final`` marks the run that decides the
  unit's final yield (see :mod:`reports.quality.yields`).
* **phases**: one row per phase of every run.
* **statistics**: one row per numeric measurement: n, mean, sd, min, max,
  limits, Cp, Cpk, Pp, Ppk, marginal and fail counts, whether it is capable
  (:mod:`reports.quality.statistics`, the numbers of the batch page), not
  capable ones first.
* **measurements**: one row per measurement of every phase's last attempt
  (the attempt that decided the phase; earlier attempts are in the run's
  report), with its limits and how it was judged. A dimensioned measurement
  (a series) is one row with its point count and verdict, not its points.

CSV holds one table; an ``.xlsx`` workbook holds them all and a summary
sheet with the yields. ``.xml`` is JUnit XML (:mod:`reports.render.junit`).

Every string a device sent is untrusted here as in the HTML. A spreadsheet
runs a cell that starts with ``=`` as a formula, so the workbook stores every
string as text, and the CSV writer puts a ``'`` before any text a spreadsheet
would read as a formula (a leading ``=``, ``+``, ``-``, ``@``, tab or carriage
return); numbers are written as numbers and never prefixed. The prefix does
change such text (a PEM public key starts with ``-----``): the workbook keeps
it exactly, and ``sequencer runs --json`` has every record exactly, for
scripts. Characters an xlsx file cannot hold (control characters) are written
as ``\\x..`` escapes. Open the workbook, not the CSV, in a spreadsheet: it
reads a long string of digits in a CSV as a number, and an ICCID loses its
last digits.
"""

from __future__ import annotations

import csv
import datetime as dt
import json
import math
import re
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, TextIO

import attrs

from reports.render.files import replacing
from reports.quality.statistics import (
    DEFAULT_CPK_THRESHOLD,
    MeasurementStatistics,
    MeasurementTally,
    worst_first,
)
from reports.quality.units import UnitGrouping, Units
from reports.quality.yields import (
    FAILURE_OUTCOMES,
    RUNNING,
    TROUBLE_OUTCOMES,
    BatchSummary,
    BatchTally,
    RunPasses,
    chronological,
)
from sequencer.records import MeasurementOutcome, MeasurementRecord, Outcome, RunRecord

#: The tables an export holds, in the order a workbook lists them.
TABLES = ("runs", "phases", "measurements", "statistics")

#: Rows and columns one worksheet can hold (the header row included).
XLSX_MAX_ROWS = 1_048_576
XLSX_MAX_COLUMNS = 16_384
#: Characters one xlsx cell can hold.
XLSX_MAX_CELL_CHARS = 32_767

#: The largest integer a spreadsheet's numbers (IEEE doubles) hold exactly.
_EXACT_INT = 2**53
_TIME_FORMAT = "yyyy-mm-dd hh:mm:ss"
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
#: What XML 1.0 cannot hold: C0 controls but tab, LF and CR; lone surrogates; U+FFFE and U+FFFF.
_XLSX_ILLEGAL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")


class ExportError(Exception):
    """The export cannot be written as asked; the message says why and what to do instead."""


@attrs.frozen
class Marked:
    """A cell value with a verdict a spreadsheet can colour (``pass``, ``marginal`` or ``fail``)."""

    value: Any
    mark: str


@attrs.frozen
class Table:
    """One rectangle of cells: ``columns`` names, ``rows`` of plain values or :class:`Marked` ones."""

    name: str
    columns: tuple[str, ...]
    rows: tuple[tuple[Any, ...], ...]

    def column(self, name: str) -> list[Any]:
        """The plain values of one column (what a reader of the CSV gets), for tests and scripts."""
        i = self.columns.index(name)
        return [plain(row[i]) for row in self.rows]


def plain(cell: Any) -> Any:
    return cell.value if isinstance(cell, Marked) else cell


def export_tables(runs: Iterable[RunRecord], *, cpk_threshold: float = DEFAULT_CPK_THRESHOLD) -> dict[str, Table]:
    """The tables of ``runs`` held in memory (any order; rows come oldest run first), by name."""
    export = Export.of(runs, cpk_threshold=cpk_threshold)
    return {name: export.table(name) for name in TABLES}


class Export:
    """The tables of runs read twice as a stream, so an export of any size never holds its runs.

    The first reading decides what a row cannot know alone: the runs
    table's columns and each run's unit (:class:`LayoutTally`), the yields of
    the summary (:class:`~reports.quality.yields.BatchTally`), the statistics
    (:class:`~reports.quality.statistics.MeasurementTally`) and how many rows
    each table will have (a workbook refuses too many before anything is
    written). :meth:`rows` reads the runs again and makes a table's rows a
    run at a time; :meth:`sheets` gives the runs, phases and measurements
    tables' rows together, from one reading.
    """

    def __init__(self, passes: RunPasses, *, cpk_threshold: float = DEFAULT_CPK_THRESHOLD) -> None:
        self._passes = passes
        self.threshold = cpk_threshold
        layout = LayoutTally()
        tally = BatchTally()
        statistics = MeasurementTally()
        self.row_counts = {"runs": 0, "phases": 0, "measurements": 0}
        for r in passes():
            layout.add(r)
            tally.add(r)
            statistics.add(r)
            self.row_counts["runs"] += 1
            self.row_counts["phases"] += len(r.phases)
            self.row_counts["measurements"] += sum(len(ph.attempts[-1].measurements) for ph in r.phases if ph.attempts)
        self.layout = layout.layout()
        self.summary = tally.summary(self.layout.units)
        self.statistics = worst_first(statistics.statistics(), cpk_threshold)
        self.row_counts["statistics"] = len(self.statistics)

    @classmethod
    def of(cls, runs: Iterable[RunRecord], *, cpk_threshold: float = DEFAULT_CPK_THRESHOLD) -> Export:
        """An export of runs held in memory (any order)."""
        ordered = chronological(runs)
        return cls(lambda: ordered, cpk_threshold=cpk_threshold)

    def columns(self, table: str) -> tuple[str, ...]:
        return {"runs": self.layout.columns, "phases": PHASE_COLUMNS, "measurements": MEASUREMENT_COLUMNS,
                "statistics": _STATISTICS_COLUMNS}[table]

    def rows(self, table: str) -> Iterator[tuple[Any, ...]]:
        """One table's rows, oldest run first (the runs read again; the statistics from the first reading)."""
        if table == "statistics":
            yield from statistics_rows(self.statistics, self.threshold)
            return
        for r in self._passes():
            if table == "runs":
                yield self.layout.row(r)
            elif table == "phases":
                yield from phase_rows(r)
            else:
                yield from measurement_rows(r)

    def sheets(self) -> Iterator[tuple[str, tuple[Any, ...]]]:
        """(table, row) of the runs, phases and measurements tables together, from one more reading."""
        for r in self._passes():
            yield "runs", self.layout.row(r)
            for row in phase_rows(r):
                yield "phases", row
            for row in measurement_rows(r):
                yield "measurements", row

    def table(self, name: str) -> Table:
        """One table whole, in memory: for a few runs (tests, a script's small export)."""
        return Table(name, self.columns(name), tuple(self.rows(name)))


# --- building the tables --------------------------------------------------------------------------

_RUN_COLUMNS = ("run_id", "batch", "serial")
_RUN_COLUMNS_AFTER_IDENTITY = (
    "product", "product_version", "station", "slot", "port", "operator", "started_utc", "ended_utc",
    "duration_s", "outcome", "marginal", "unit", "unit_run", "unit_final", "identity_conflict", "failed_phases",
    "error_phases", "limits_sha256", "product_sha256", "sequencer_version",
)


def measured_columns(ordered: Iterable[RunRecord]) -> dict[tuple[str, str], str]:
    """The runs table's measurement columns: (phase, measurement) -> ``phase.name [units]``, first seen first."""
    measured: dict[tuple[str, str], str] = {}
    for r in ordered:
        _add_measured(measured, r)
    return measured


def _add_measured(measured: dict[tuple[str, str], str], r: RunRecord) -> None:
    for p in r.phases:
        for m in p.measurements:
            if not m.dimensions and (p.name, m.name) not in measured:
                measured[(p.name, m.name)] = measured_column(p.name, m.name, m.units)


def measured_column(phase: str, measurement: str, units: str | None) -> str:
    return f"{phase}.{measurement}{f' [{units}]' if units else ''}"


@attrs.frozen
class RunsLayout:
    """The runs table's columns and each run's unit, decided over every run before any row is made.

    Made from the runs themselves (:meth:`of`; :class:`LayoutTally` for a
    stream), or, for an export streamed a run at a time, from their headers
    (phases left out: identity and outcome are all the units need) and the
    measurement columns found another way; rows are then made one run at a
    time (:meth:`row`).
    """

    identity: tuple[str, ...]
    measured: dict[tuple[str, str], str]
    units: Units
    final_run: dict[str, str]  # a unit's first run id -> the run its final yield counts

    @classmethod
    def of(cls, ordered: Iterable[RunRecord], measured: dict[tuple[str, str], str] | None = None) -> RunsLayout:
        """``ordered`` oldest first (or their headers, with ``measured`` given)."""
        tally = LayoutTally()
        for r in ordered:
            tally.add(r)
        return tally.layout(measured)

    @property
    def columns(self) -> tuple[str, ...]:
        fixed = set(_RUN_COLUMNS) | set(_RUN_COLUMNS_AFTER_IDENTITY)
        # A device may report identity under a name the table already uses ("port"): keep both.
        identity_columns = tuple(f"dut.{k}" if k in fixed else k for k in self.identity)
        return (*_RUN_COLUMNS, *identity_columns, *_RUN_COLUMNS_AFTER_IDENTITY, *self.measured.values())

    def row(self, r: RunRecord) -> tuple[Any, ...]:
        unit = self.units.of(r)
        values: dict[tuple[str, str], Any] = {}
        for p in r.phases:
            for m in p.measurements:
                if not m.dimensions:
                    values[(p.name, m.name)] = _marked(_value(m.value), m)
        return (
            r.run_id, r.batch, r.serial,
            *(r.dut.get(k) for k in self.identity),
            r.product, r.product_version, r.station, r.slot, r.port, r.operator,
            r.started_at, r.ended_at, _seconds(r.duration_s),
            _outcome(r.outcome, r.marginal), r.marginal,
            unit.label, unit.run_ids.index(r.run_id) + 1, self.final_run.get(unit.run_ids[0]) == r.run_id,
            unit.conflict,
            "; ".join(p.name for p in r.phases if p.outcome in FAILURE_OUTCOMES),
            "; ".join(p.name for p in r.phases if p.outcome in TROUBLE_OUTCOMES),
            r.limits_sha256, r.product_sha256, r.sequencer_version,
            *(values.get(k) for k in self.measured),
        )


class LayoutTally:
    """A :class:`RunsLayout` from runs added one at a time, oldest first (none of them kept)."""

    def __init__(self) -> None:
        self._grouping = UnitGrouping()
        self._identity: set[str] = set()
        self._measured: dict[tuple[str, str], str] = {}
        self._final: dict[str, str] = {}

    def add(self, r: RunRecord) -> None:
        unit = self._grouping.add(r)
        if r.outcome is not None:
            self._final[unit.run_ids[0]] = r.run_id
        self._identity.update(r.dut)
        _add_measured(self._measured, r)

    def layout(self, measured: dict[tuple[str, str], str] | None = None) -> RunsLayout:
        return RunsLayout(identity=tuple(sorted(self._identity - {"serial"})),
                          measured=measured if measured is not None else self._measured,
                          units=self._grouping.units(), final_run=self._final)


PHASE_COLUMNS = ("run_id", "serial", "phase", "teardown", "outcome", "attempts", "started_utc", "duration_s",
                 "resource_wait_s", "marginal", "reason", "error")


def phase_rows(r: RunRecord) -> Iterator[tuple[Any, ...]]:
    """The phases table's rows of one run."""
    for p in r.phases:
        error = p.error
        yield (
            r.run_id, r.serial, p.name, p.teardown, _outcome(p.outcome, p.marginal), len(p.attempts),
            p.started_at, _seconds(p.duration_s), _seconds(p.resource_wait_s), p.marginal, p.reason,
            None if error is None else f"{error.type}: {error.message}",
        )


MEASUREMENT_COLUMNS = ("run_id", "serial", "phase", "attempt", "measurement", "value", "units", "outcome",
                       "marginal", "low", "high", "marginal_low", "marginal_high", "validators", "points", "reason")


def measurement_rows(r: RunRecord) -> Iterator[tuple[Any, ...]]:
    """The measurements table's rows of one run: each phase's deciding (last) attempt."""
    for p in r.phases:
        if not p.attempts:
            continue
        last = p.attempts[-1]
        for m in last.measurements:
            series = bool(m.dimensions)
            lim = m.limits
            yield (
                r.run_id, r.serial, p.name, last.number, m.name,
                None if series else _value(m.value), m.units, _marked(m.outcome.value, m), m.marginal,
                *(_value(v) for v in ((lim.low, lim.high, lim.marginal_low, lim.marginal_high)
                                      if lim is not None else (None,) * 4)),
                "; ".join(m.validators),
                (len(m.value) if isinstance(m.value, list) else 0) if series else None,
                m.reason,
            )


_STATISTICS_COLUMNS = (
    "product", "phase", "measurement", "units", "n", "mean", "sd", "min", "max", "low", "high", "marginal_low",
    "marginal_high", "cp", "cpk", "pp", "ppk", "sigma_within", "marginal", "fails", "capable", "limits_changed",
)


def statistics_rows(stats: Iterable[MeasurementStatistics], threshold: float) -> Iterator[tuple[Any, ...]]:
    """The statistics table: one row per numeric measurement (reports/quality/statistics.py), as ``stats`` come."""
    for s in stats:
        m, c, lim = s.moments, s.capability, s.limits
        capable = s.capable(threshold)
        yield (
            s.product, s.phase, s.name, s.units, m.n, m.mean, m.sd, m.minimum, m.maximum,
            *((lim.low, lim.high, lim.marginal_low, lim.marginal_high) if lim is not None else (None,) * 4),
            *(Marked(x, "fail") if x is not None and capable is False and name == "cpk" else x
              for name, x in (("cp", c.cp), ("cpk", c.cpk), ("pp", c.pp), ("ppk", c.ppk))),
            m.sigma_within, m.marginals, m.fails, capable, s.limits_changed,
        )


def _value(value: Any) -> Any:
    """A measurement value as one cell: numbers, text and booleans as they are; NaN and infinities as text."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        # A spreadsheet holds numbers as doubles: a 20-digit ICCID read as an
        # integer would lose its last digits there. Beyond 2**53, keep the digits.
        return value if abs(value) <= _EXACT_INT else str(value)
    if isinstance(value, float):
        if math.isfinite(value):
            return value
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    # Lists and mappings (a custom validator's value): their JSON, as the record holds it.
    return json.dumps(value, separators=(",", ":"), default=str)


def _marked(value: Any, m: MeasurementRecord) -> Any:
    if m.outcome is MeasurementOutcome.PASS:
        return Marked(value, "marginal") if m.marginal else value
    if m.outcome is MeasurementOutcome.SKIPPED:
        return value  # kept, not judged: neither a pass nor a failure
    return Marked(value, "fail")


def _outcome(outcome: Outcome | None, marginal: bool) -> Any:
    if outcome is None:
        return RUNNING
    if outcome is Outcome.PASS:
        return Marked(outcome.value, "marginal" if marginal else "pass")
    if outcome is Outcome.SKIPPED:
        return outcome.value
    return Marked(outcome.value, "fail")


def _seconds(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


# --- CSV ------------------------------------------------------------------------------------------


def write_csv(table: Table, out: TextIO) -> None:
    """Write ``table`` as RFC 4180 CSV (UTF-8 is the caller's choice of ``out``; no BOM)."""
    write_csv_rows(table.columns, table.rows, out)


def write_csv_rows(columns: Sequence[str], rows: Iterable[Sequence[Any]], out: TextIO) -> None:
    """A table as CSV a row at a time (``rows`` may be an :meth:`Export.rows` stream)."""
    writer = csv.writer(out)
    writer.writerow(columns)
    for row in rows:
        writer.writerow(csv_cells(row))


def csv_cells(row: Iterable[Any]) -> list[Any]:
    """One row's cells as CSV writes them: plain values, times in ISO form, formula-like text defused."""
    return [_csv_cell(plain(c)) for c in row]


def write_csv_file(path: str | Path, table: Table | tuple[Sequence[str], Iterable[Sequence[Any]]]) -> Path:
    """Write ``table`` (or its columns and a stream of its rows) to ``path`` as UTF-8 CSV, atomically."""
    columns, rows = table if isinstance(table, tuple) else (table.columns, table.rows)
    with replacing(path) as tmp, open(tmp, "w", encoding="utf-8", newline="") as out:
        write_csv_rows(columns, rows, out)
    return Path(path)


def _csv_cell(value: Any) -> Any:
    if isinstance(value, dt.datetime):
        return value.isoformat()
    if isinstance(value, str) and value.startswith(_FORMULA_START):
        return "'" + value
    return value


# --- xlsx -----------------------------------------------------------------------------------------

_FILLS = {"pass": ("C6EFCE", "006100"), "marginal": ("FFEB9C", "9C5700"), "fail": ("FFC7CE", "9C0006")}


def check_fits_xlsx(tables: Iterable[Table]) -> None:
    """Raise :class:`ExportError` naming the first table too big for a worksheet."""
    for t in tables:
        _check_fits(t.name, len(t.rows), len(t.columns))


def _check_fits(name: str, rows: int, columns: int) -> None:
    if rows + 1 > XLSX_MAX_ROWS or columns > XLSX_MAX_COLUMNS:
        raise ExportError(
            f"the {name} table has {rows:,} rows and {columns:,} columns, more than a"
            f" worksheet holds ({XLSX_MAX_ROWS - 1:,} rows, {XLSX_MAX_COLUMNS:,} columns): export it as"
            f" CSV (-o FILE.csv --table {name}) or select fewer runs"
        )


def write_xlsx(path: str | Path, export: Export, *, title: str) -> Path:
    """Write a workbook: a Summary sheet (the export's yields), then one sheet per table; atomically.

    Written as the runs are read the second time (openpyxl's write-only
    mode: each sheet's rows go to a file of their own as they come), so a
    workbook of 10,000 runs takes the memory of a few.
    """
    from openpyxl import Workbook  # imported here: the station's own commands never need it

    for name in TABLES:
        _check_fits(name, export.row_counts[name], len(export.columns(name)))
    # The file first: a workbook's sheets stream into temporary files of
    # their own, which only saving closes.
    with replacing(path) as tmp:
        workbook = Workbook(write_only=True)
        cells = XlsxCells()
        _write_summary(workbook.create_sheet("Summary"), export.summary, title, cells)
        sheets = {name: workbook.create_sheet(name.capitalize()) for name in TABLES}
        for name, sheet in sheets.items():
            start_sheet(sheet, export.columns(name), cells)
        for name, row in export.sheets():
            sheet = sheets[name]
            sheet.append([cells(sheet, c) for c in row])
        sheet = sheets["statistics"]
        for row in export.rows("statistics"):
            sheet.append([cells(sheet, c) for c in row])
        for name, sheet in sheets.items():
            end_sheet(sheet, len(export.columns(name)), export.row_counts[name])
        workbook.save(tmp)
    return Path(path)


class XlsxCells:
    """Turns table cells into what a write-only worksheet appends, with the few styles a workbook uses."""

    def __init__(self) -> None:
        from openpyxl.cell import WriteOnlyCell
        from openpyxl.styles import Font, PatternFill

        self._cell = WriteOnlyCell
        self.bold = Font(bold=True)
        self.marks = {
            mark: (PatternFill("solid", start_color=fill, end_color=fill), Font(color=text))
            for mark, (fill, text) in _FILLS.items()
        }

    def __call__(self, sheet: Any, cell: Any, *, bold: bool = False, number_format: str | None = None) -> Any:
        value, mark = (cell.value, cell.mark) if isinstance(cell, Marked) else (cell, None)
        if isinstance(value, dt.datetime):
            # Excel has no time zones; every time in a record is UTC and the column says so.
            value = value.astimezone(dt.timezone.utc).replace(tzinfo=None)
            number_format = number_format or _TIME_FORMAT
        elif isinstance(value, str):
            value = _xlsx_text(value)
        formula_like = isinstance(value, str) and value.startswith("=")
        if not (formula_like or mark or bold or number_format):
            return value  # a plain value: appended as it is, much faster than a styled cell
        out = self._cell(sheet, value=value)
        if formula_like:
            out.data_type = "s"  # text, never a formula
        if number_format:
            out.number_format = number_format
        if bold:
            out.font = self.bold
        if mark is not None:
            out.fill, out.font = self.marks[mark]
        return out


def start_sheet(sheet: Any, columns: Sequence[str], cells: XlsxCells) -> None:
    """A table's header row (bold, frozen with the run id beside it) and column widths."""
    from openpyxl.utils import get_column_letter

    sheet.freeze_panes = "B2"  # the header and the run id stay in view
    for i, name in enumerate(columns, start=1):
        sheet.column_dimensions[get_column_letter(i)].width = min(max(len(name) + 2, 10), 40)
    sheet.append([cells(sheet, name, bold=True) for name in columns])


def end_sheet(sheet: Any, columns: int, rows: int) -> None:
    """The filter over a table's ``rows`` (set before the workbook is saved)."""
    from openpyxl.utils import get_column_letter

    sheet.auto_filter.ref = f"A1:{get_column_letter(columns)}{rows + 1}"


def write_rows(sheet: Any, columns: Sequence[str], rows: Iterable[Sequence[Any]], cells: XlsxCells) -> int:
    """A table into a write-only worksheet, a row at a time (``rows`` may be a generator); the rows written."""
    start_sheet(sheet, columns, cells)
    n = 0
    for row in rows:
        if n + 2 > XLSX_MAX_ROWS:
            raise ExportError(f"more rows than a worksheet holds ({XLSX_MAX_ROWS - 1:,}): export CSV or select "
                              "fewer runs")
        sheet.append([cells(sheet, c) for c in row])
        n += 1
    end_sheet(sheet, len(columns), n)
    return n


def _escaped(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x80 else f"\\u{code:04x}"


def xml_text(text: str) -> str:
    """``text`` with what XML 1.0 cannot hold (control characters, lone surrogates) as ``\\x..`` escapes."""
    return _XLSX_ILLEGAL.sub(_escaped, text)


def _xlsx_text(text: str) -> str:
    text = xml_text(text)
    if len(text) > XLSX_MAX_CELL_CHARS:
        text = text[: XLSX_MAX_CELL_CHARS - 1] + "…"
    return text


def _write_summary(sheet: Any, s: BatchSummary, title: str, cells: XlsxCells) -> None:
    sheet.column_dimensions["A"].width = 34
    sheet.column_dimensions["B"].width = 48

    def row(label: str, value: Any = None, number_format: str | None = None) -> None:
        sheet.append([cells(sheet, label, bold=True), cells(sheet, value, number_format=number_format)])

    sheet.append([cells(sheet, title, bold=True)])
    row("exported (UTC)", dt.datetime.now(dt.timezone.utc).replace(microsecond=0))
    sheet.append([])
    row("runs", s.runs)
    row("units", s.units)
    for y in s.products:
        heading = y.product if len(s.products) > 1 else ""
        if heading:
            sheet.append([])
            row(f"product {y.product}", ", ".join(v or "(no version)" for v in y.versions))
            row("limits files (sha256)", ", ".join((h or "none")[:16] for h in y.limits_sha256))
            row(f"{heading} units", y.units)
        row(f"{heading} first-pass yield".strip(), y.first_pass_yield, "0.0%")
        row(f"{heading} final yield".strip(), y.final_yield, "0.0%")
        row(f"{heading} units with a verdict".strip(), y.yield_units)
    if s.conflicts:
        row("units flagged (identity conflict)", len(s.conflicts))
    sheet.append([])
    row("runs failed (FAIL)", s.failed)
    row("runs with station or communication trouble (ERROR, TIMEOUT)", s.errored)
    row("marginal runs", s.marginal)
    row("median run duration (s)", _seconds(s.median_duration_s))
    for name, count in s.outcome_counts:
        row(f"runs {name}", count)
    for heading, rows in (("product failures (FAIL) by phase", s.phase_pareto),
                          ("failures by measurement", s.measurement_pareto),
                          ("station or communication trouble (ERROR, TIMEOUT) by phase", s.trouble_pareto)):
        if rows:
            sheet.append([])
            row(heading, "count")
            for p in rows:
                row(p.label, p.count)
    if len(s.slots) > 1:
        sheet.append([])
        row("pass rate by station and slot", "passed / finished runs, retests included")
        for slot in s.slots:
            row(f"{slot.station} slot {slot.slot} ({slot.passed} / {slot.finished})", slot.pass_rate, "0.0%")
    if len(s.code_versions) > 1:
        sheet.append([])
        row("warning", f"these runs were made with {len(s.code_versions)} different versions of the test code"
                       " (product, limits or sequencer): see the batch report")
    sheet.append([])
    for line in (
        "A unit is one device of one product: runs sharing its serial or MAC (the product's identity) and"
        " disagreeing on none. A run whose serial and MAC disagree with an earlier unit's is flagged, not merged.",
        "Yields are per product. First-pass yield: units whose first finished run passed. Final yield: units whose"
        " last one passed.",
        "Only PASS passes. Product failures are FAIL phases; ERROR and TIMEOUT phases are station or communication"
        " trouble, counted apart; every run, retests included.",
    ):
        sheet.append([line])
