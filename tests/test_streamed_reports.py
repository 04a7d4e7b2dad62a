"""Batch pages and exports read their runs as a stream, twice, and hold a page of them at a time.

A batch of 100,000 runs held in memory took gigabytes: the page, the
workbook and the JUnit file are made from a store's (or MongoDB's)
``iter_runs``, read once for the numbers and again for the rows. These tests
hold the streamed results to the in-memory ones, and count how many run
records are alive at once while the real commands run.
"""

from __future__ import annotations

import datetime as dt
import random
import statistics as stdlib_statistics
import weakref
from pathlib import Path
from typing import Any

import openpyxl
import pytest
import trio

from reports.quality.statistics import measurement_statistics
from reports.quality.yields import batch_summary, chronological, first_failure
from reports.render.export import Export, export_tables, write_xlsx
from reports.render.html import render_batch, write_batch
from reports.storage.store import LocalStore
from sequencer.cli import main
from sequencer.records import RunRecord
from tests import records_factory as rf
from tests.htmltree import parse
from tests.store_support import store_runs


def a_batch(n: int, seed: int = 7) -> list[RunRecord]:
    """``n`` sensor runs: some failing, some retested, one board known only by its MAC at first."""
    rnd = random.Random(seed)
    runs = []
    for i in range(n):
        serial = f"SN-{i // 2 if i % 7 == 0 else i:04d}"  # every seventh run a retest of an earlier unit
        runs.append(rf.sensor_run(serial, vdd=rnd.gauss(3.30, 0.03), fail_rf=rnd.random() < 0.05,
                                  slot=i % 4, started_at=rf.at(40 * i)))
    mac_only = rf.run(serial=None, dut={"mac": runs[1].dut["mac"].upper()}, started_at=rf.at(-40),
                      phases=[rf.phase("identify", rf.Outcome.FAIL, reason="no answer")])
    return [mac_only, *runs]


@pytest.fixture(scope="module")
def stored(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[RunRecord]]:
    runs = a_batch(260)
    path = tmp_path_factory.mktemp("store") / "store.sqlite"
    trio.run(store_runs, path, runs)
    return path, runs


def _read(path: Path) -> list[RunRecord]:
    store = LocalStore.open(path)
    try:
        return store.find_runs(batch=rf.run().batch)
    finally:
        store.close()


def test_the_page_read_from_the_store_page_by_page_is_the_page_of_the_runs_in_memory(
    stored: tuple[Path, list[RunRecord]], tmp_path: Path
) -> None:
    path, _ = stored
    runs = _read(path)  # as the store gives them back
    store = LocalStore.open(path)
    readings: list[bool] = []

    def reading(phases: bool) -> Any:
        readings.append(phases)
        return store.iter_runs(batch=runs[0].batch, page=7, phases=phases)

    try:
        write_batch(tmp_path / "index.html", lambda: reading(True), headers=lambda: reading(False), title="B")
        write_batch(tmp_path / "twice.html", lambda: store.iter_runs(batch=runs[0].batch, page=7), title="B")
    finally:
        store.close()
    # the phases (tens of kB a run) are read once; the rows need the headers alone
    assert readings == [True, False]
    streamed = (tmp_path / "index.html").read_text(encoding="utf-8")
    assert streamed == render_batch(list(reversed(runs)), title="B")
    assert (tmp_path / "twice.html").read_text(encoding="utf-8") == streamed
    # a failed run's row still says where it failed, and a marginal one says so, from the headers' reading
    failed = next(r for r in runs if r.outcome is rf.Outcome.FAIL and r.phases)
    link = next(a for a in parse(streamed).find("table", "units").find_all("a") if a.text == failed.run_id)
    assert first_failure(failed).name in link.ancestor("tr").find("td", "failure").text


def test_the_streamed_page_shows_the_in_memory_arithmetic(stored: tuple[Path, list[RunRecord]]) -> None:
    runs = _read(stored[0])
    root = parse(render_batch(runs, title="B"))
    summary = batch_summary(runs)
    assert root.find(id="kpi-units").text == str(summary.units) == str(len(summary.unit_summaries))
    # a unit per serial: the retests joined theirs, and so did the run that knew only its MAC
    assert summary.units == len({r.serial for r in runs if r.serial}) and summary.runs == 261
    assert root.find(id="kpi-fpy").text.startswith(f"{100 * summary.first_pass_yield:.1f}")
    # every numeric measurement's moments, as the standard library computes them from all its values
    values: dict[tuple[str, str], list[float]] = {}
    for r in chronological(runs):
        for p in r.phases:
            for m in p.measurements:
                if isinstance(m.value, float) and m.outcome.value in ("PASS", "FAIL"):
                    values.setdefault((p.name, m.name), []).append(m.value)
    for s in measurement_statistics(runs):
        vs = values[(s.phase, s.name)]
        assert s.moments.n == len(vs) and s.moments.minimum == min(vs) and s.moments.maximum == max(vs)
        assert s.moments.mean == pytest.approx(stdlib_statistics.fmean(vs), rel=1e-12)
        if len(vs) > 1:
            assert s.moments.sd == pytest.approx(stdlib_statistics.stdev(vs), rel=1e-9, abs=1e-15)
        assert s.histogram is None or sum(s.histogram.counts) == len(vs)
        assert s.drawn is None or (s.drawn.values.count, s.drawn.total) == (len(vs), len(vs))
    stats_rows = root.find("table", "stats-overview").find("tbody").find_all("tr")
    assert len(stats_rows) == len(values)


def test_the_streamed_workbook_holds_the_tables_of_the_runs_in_memory(
    stored: tuple[Path, list[RunRecord]], tmp_path: Path
) -> None:
    path, _ = stored
    runs = _read(path)
    store = LocalStore.open(path)
    try:
        book_path = write_xlsx(tmp_path / "b.xlsx", Export(lambda: store.iter_runs(batch=runs[0].batch, page=9)),
                               title="B")
    finally:
        store.close()
    book = openpyxl.load_workbook(book_path)
    for name, table in export_tables(runs).items():
        sheet = book[name.capitalize()]
        got = [[c.value for c in row] for row in sheet.iter_rows(min_row=2)]
        want = [[_cell(v) for v in row] for row in table.rows]
        for i, (a, b) in enumerate(zip(got, want, strict=True)):
            assert a == b, (name, i, [(x, y) for x, y in zip(a, b, strict=True) if x != y])
    summary = {row[0].value: row[1].value for row in book["Summary"].iter_rows() if len(row) > 1}
    assert summary["units"] == batch_summary(runs).units


def _cell(v: Any) -> Any:
    v = getattr(v, "value", v)
    if isinstance(v, dt.datetime):
        return v.astimezone(dt.timezone.utc).replace(tzinfo=None)
    if isinstance(v, float):
        return float("%.16g" % v)  # openpyxl writes 16 significant digits
    return None if v == "" else v  # a workbook keeps no empty text: the cell is empty


class _Alive:
    """How many run records the store has made and nobody holds any more, at most at once."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.now = 0
        self.peak = 0
        page = LocalStore._assemble_page  # every run the store reads whole is made there

        def assemble_page(store: LocalStore, rows: Any) -> list[RunRecord]:
            return [self._made(run) for run in page(store, rows)]

        monkeypatch.setattr(LocalStore, "_assemble_page", assemble_page)

    def _made(self, run: RunRecord) -> RunRecord:
        self.now += 1
        self.peak = max(self.peak, self.now)
        weakref.finalize(run, self._gone)
        return run

    def _gone(self) -> None:
        self.now -= 1


@pytest.mark.parametrize("command", [
    ["report", "--batch", "B2024-05-14", "-o", "{tmp}/index.html"],
    ["export", "--batch", "B2024-05-14", "-o", "{tmp}/b.xlsx"],
    ["export", "--batch", "B2024-05-14", "-o", "{tmp}/b.csv", "--table", "measurements"],
    ["export", "--batch", "B2024-05-14", "-o", "{tmp}/b.xml"],
    ["report", "--product", "esp32_sensor", "--since", "2024-05-01", "-o", "{tmp}/period.html"],
])
def test_report_and_export_hold_a_page_of_runs_not_the_batch(
    stored: tuple[Path, list[RunRecord]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, command: list[str]
) -> None:
    """The batch has 261 runs; the store reads 200 at a time. Holding the batch (as before) kept 261 alive.

    So does a period report of a station's own store, which loaded every run of the period before.
    """
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path))
    alive = _Alive(monkeypatch)
    args = [a.replace("{tmp}", str(tmp_path)) for a in command]
    assert main([*args, "--store", str(stored[0]), "--local"]) == 0
    assert 0 < alive.peak <= 210, alive.peak
