"""Exports of any filtered view, streamed: CSV, XLSX and JUnit by the export modules' own rows and suites.

``/export.csv?FILTERS[&table=runs|phases|measurements]`` and
``/export.xlsx?FILTERS``: the tables ``sequencer export`` writes
(:mod:`reports.render.export`), made a run at a time while the download
goes, with two columns the portal adds to the runs table: the device's
disposition and its notes. The runs are read twice: first their headers
(identity and outcome, no phases), which decide the columns and each
run's unit; then the whole runs, oldest first, a batch at a time. So memory
holds one batch of runs and the headers, never every run's phases: 100,000
runs download with the memory of a few hundred (docs/benchmarks.md).
"""

from __future__ import annotations

import csv
import io
import os
import tempfile
from collections.abc import AsyncIterator, Iterator
from typing import Any

import trio
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import BaseRoute, Route

from reports.render.export import (
    MEASUREMENT_COLUMNS,
    PHASE_COLUMNS,
    TABLES,
    ExportError,
    RunsLayout,
    XlsxCells,
    csv_cells,
    measurement_rows,
    phase_rows,
    write_rows,
)
from reports.storage.notes import Note, disposition
from sequencer.records import RunRecord
from web.app import require
from web.auth import Role
from web.portal.query import BadQuery, RunQuery, parse_run_query

__all__ = ["export_routes"]

#: Most runs one export holds; a wider filter is narrowed first (a period, a product).
MAX_EXPORT_RUNS = 500_000
#: Runs turned into rows per step (one worker-thread call).
CHUNK = 100
NOTE_COLUMNS = ("serial", "created_utc", "author", "role", "run_id", "disposition", "text")


def _query(request: Request, allowed: tuple[str, ...] = ()) -> RunQuery:
    try:
        q = parse_run_query(request.query_params, allowed=("table", *allowed))
    except BadQuery as exc:
        raise HTTPException(400, str(exc)) from None
    if q.empty:
        raise HTTPException(400, "give a filter: an identity, a batch, a product, a station, an outcome or a period")
    return q


class _Export:
    """One export: the layout from the runs' headers, then rows a chunk at a time."""

    def __init__(self, data: Any, q: RunQuery) -> None:
        self.data, self.q = data, q
        headers, measured = data.export_headers(q, MAX_EXPORT_RUNS + 1)
        if len(headers) > MAX_EXPORT_RUNS:
            raise HTTPException(400, f"more than {MAX_EXPORT_RUNS:,} runs match: narrow the filter")
        if not headers:
            raise HTTPException(404, "no runs match")
        self.layout = RunsLayout.of(headers, measured)
        self.count = len(headers)

    def runs_columns(self) -> tuple[str, ...]:
        return (*self.layout.columns, "disposition", "notes")

    def chunks(self) -> Iterator[list[RunRecord]]:
        chunk: list[RunRecord] = []
        for run in self.data.iter_runs(self.q, oldest_first=True):
            chunk.append(run)
            if len(chunk) == CHUNK:
                yield chunk
                chunk = []
        if chunk:
            yield chunk

    def notes(self, runs: list[RunRecord]) -> dict[str, list[Note]]:
        return self.data.notes_for([r.serial for r in runs if r.serial])

    def rows(self, table: str, runs: list[RunRecord]) -> Iterator[tuple[Any, ...]]:
        if table == "runs":
            notes = self.notes(runs)
            for r in runs:
                mine = notes.get(r.serial or "", [])
                yield (*self.layout.row(r), disposition(mine),
                       " | ".join(f"{n.created_at:%Y-%m-%d %H:%M} {n.author}: {n.text}" for n in mine) or None)
        elif table == "phases":
            for r in runs:
                yield from phase_rows(r)
        else:
            for r in runs:
                yield from measurement_rows(r)


def _filename(q: RunQuery, suffix: str) -> str:
    name = "-".join(v for _, v in sorted(q.params().items())) or "runs"
    safe = "".join(c if c.isascii() and (c.isalnum() or c in "._-") else "_" for c in name)[:80]
    return f"{safe or 'runs'}.{suffix}"


async def export_csv(request: Request) -> Response:
    """One table as CSV, streamed as it is made."""
    require(request, Role.VIEWER)
    q = _query(request)
    table = request.query_params.get("table", "runs")
    if table not in TABLES:
        raise HTTPException(400, f"table: one of {', '.join(TABLES)}")
    export: _Export = await trio.to_thread.run_sync(_Export, request.app.state.data, q)
    columns = {"runs": export.runs_columns(), "phases": PHASE_COLUMNS, "measurements": MEASUREMENT_COLUMNS}[table]
    chunks = export.chunks()

    def next_text() -> str | None:
        runs = next(chunks, None)
        if runs is None:
            return None
        out = io.StringIO()
        writer = csv.writer(out)
        for row in export.rows(table, runs):
            writer.writerow(csv_cells(row))
        return out.getvalue()

    async def body() -> AsyncIterator[bytes]:
        header = io.StringIO()
        csv.writer(header).writerow(columns)
        yield header.getvalue().encode()
        while (text := await trio.to_thread.run_sync(next_text)) is not None:
            yield text.encode()

    return StreamingResponse(body(), media_type="text/csv; charset=utf-8", headers={
        "Content-Disposition": f'attachment; filename="{_filename(q, "csv")}"', "Cache-Control": "no-store"})


async def export_xlsx(request: Request) -> Response:
    """A workbook of the runs, phases, measurements and notes, written row by row to a file, then streamed."""
    require(request, Role.VIEWER)
    q = _query(request)
    data = request.app.state.data
    fd, path = tempfile.mkstemp(suffix=".xlsx", prefix="portal-export-")
    os.close(fd)

    def write() -> None:
        from openpyxl import Workbook

        export = _Export(data, q)
        workbook = Workbook(write_only=True)
        cells = XlsxCells()
        for table, columns in (("runs", export.runs_columns()), ("phases", PHASE_COLUMNS),
                               ("measurements", MEASUREMENT_COLUMNS)):
            sheet = workbook.create_sheet(table.capitalize())
            write_rows(sheet, columns, (row for runs in export.chunks() for row in export.rows(table, runs)), cells)
        sheet = workbook.create_sheet("Notes")
        serials = sorted({u.serial for u in export.layout.units.units if u.serial})
        notes = data.notes_for(serials) if serials else {}
        write_rows(sheet, NOTE_COLUMNS, ((n.serial, n.created_at, n.author, n.role, n.run_id, n.disposition, n.text)
                                         for s in serials for n in notes.get(s, [])), cells)
        workbook.save(path)

    try:
        await trio.to_thread.run_sync(write)
    except ExportError as exc:
        os.unlink(path)
        raise HTTPException(400, str(exc)) from None
    except BaseException:
        os.unlink(path)
        raise

    async def body() -> AsyncIterator[bytes]:
        try:
            with open(path, "rb") as f:
                while block := await trio.to_thread.run_sync(f.read, 1 << 16):
                    yield block
        finally:
            os.unlink(path)

    return StreamingResponse(body(), headers={
        "Content-Type": "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet",
        "Content-Disposition": f'attachment; filename="{_filename(q, "xlsx")}"', "Cache-Control": "no-store"})


async def export_junit(request: Request) -> Response:
    """JUnit XML (``reports.render.junit``: a suite per run, a case per phase), streamed a chunk of runs at a time.

    The root ``<testsuites>`` carries no totals, which only the end would
    know; every suite has its own, as the consumers read them.
    """
    import xml.etree.ElementTree as ET

    from reports.render.export import xml_text
    from reports.render.junit import testsuite

    require(request, Role.VIEWER)
    q = _query(request)
    export: _Export = await trio.to_thread.run_sync(_Export, request.app.state.data, q)
    chunks = export.chunks()
    name = ", ".join(f"{k} {v}" for k, v in q.params().items())

    def next_xml() -> str | None:
        runs = next(chunks, None)
        if runs is None:
            return None
        return "".join(ET.tostring(testsuite(r, export.layout.units.of(r).label), encoding="unicode") + "\n"
                       for r in runs)

    async def body() -> AsyncIterator[bytes]:
        root = ET.tostring(ET.Element("testsuites", name=xml_text(name)), encoding="unicode")
        yield ('<?xml version="1.0" encoding="utf-8"?>\n' + root.replace(" />", ">") + "\n").encode()
        while (text := await trio.to_thread.run_sync(next_xml)) is not None:
            yield text.encode()
        yield b"</testsuites>\n"

    return StreamingResponse(body(), media_type="application/xml", headers={
        "Content-Disposition": f'attachment; filename="{_filename(q, "xml")}"', "Cache-Control": "no-store"})


def export_routes() -> list[BaseRoute]:
    return [Route("/export.csv", export_csv), Route("/export.xlsx", export_xlsx),
            Route("/export.xml", export_junit)]
