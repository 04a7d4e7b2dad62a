"""Self-contained HTML reports: one file per run, one per batch.

A report must outlive the station: it is mailed, archived, opened years later
on a machine with no network and printed for a customer. So each page is one
file with its CSS inline, images as ``data:`` URIs, no JavaScript and a
Content-Security-Policy that forbids scripts and remote loads outright.

Everything a device says about itself (serial, MAC, log lines, attachments) is
untrusted. Templates are rendered with autoescape on for every template;
the only markup produced in Python is the SVG of :mod:`reports.render.svg`, built from
numbers and escaped labels. Attachments that are SVG are embedded as base64
``<img>`` sources, where a browser never runs their scripts, and never inlined.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import functools
import gc
import hashlib
import os
import shlex
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from urllib.parse import quote
from typing import Any, Literal

import attrs
import jinja2

from reports.render import formatting, svg
from reports.render.files import replacing
from reports.quality.period import PeriodReport
from reports.quality.statistics import DEFAULT_CPK_THRESHOLD, MeasurementStatistics, MeasurementTally, worst_first
from reports.quality.units import Units, group_units
from reports.quality.yields import BatchTally, RunPasses, chronological, failure_summary, first_failure
from sequencer.records import Attachment, MeasurementRecord, PhaseRecord, RunRecord

#: Attachments larger than this are listed (name, size, sha256) but not embedded.
MAX_EMBED_BYTES = 5 * 1024 * 1024
#: Text attachments are shown inline up to this many characters; the download link has all of it.
MAX_INLINE_TEXT_CHARS = 100_000
#: A log longer than this starts folded (a phase or fixture that logged in a loop would bury the page).
LOG_LINES_SHOWN = 30

# Only these image types become <img> sources; the data URI's type comes from
# this table, never from the attachment's own mimetype string.
_IMAGE_TYPES = {
    "image/png": "image/png",
    "image/jpeg": "image/jpeg",
    "image/jpg": "image/jpeg",
    "image/gif": "image/gif",
    "image/webp": "image/webp",
    "image/svg+xml": "image/svg+xml",
}
_TEXT_TYPES = {
    "application/json",
    "application/xml",
    "application/x-ndjson",
    "application/yaml",
    "application/x-yaml",
    "application/toml",
    "application/csv",
}


@attrs.frozen
class AttachmentView:
    """How one attachment appears on the page; every field is plain text or a base64 data URI."""

    name: str
    mimetype: str
    size: int
    sha256: str
    kind: Literal["text", "image", "binary"]
    embedded: bool
    text: str | None = None
    text_truncated: bool = False
    image_src: str | None = None
    download_href: str | None = None


def attachment_view(a: Attachment) -> AttachmentView:
    """Classify an attachment and prepare its inline text, ``<img>`` source and download link."""
    mime = a.mimetype.split(";", 1)[0].strip().lower()
    size = len(a.data)
    embedded = size <= MAX_EMBED_BYTES
    kind: Literal["text", "image", "binary"]
    if mime in _IMAGE_TYPES:
        kind = "image"
    elif mime.startswith("text/") or mime in _TEXT_TYPES or mime.endswith(("+json", "+xml")):
        kind = "text"
    else:
        kind = "binary"
    b64 = base64.b64encode(a.data).decode("ascii") if embedded else ""
    text = None
    truncated = False
    if kind == "text" and embedded:
        decoded = a.data.decode("utf-8", errors="replace")
        truncated = len(decoded) > MAX_INLINE_TEXT_CHARS
        text = decoded[:MAX_INLINE_TEXT_CHARS]
    return AttachmentView(
        name=a.name,
        mimetype=a.mimetype,
        size=size,
        sha256=a.sha256,
        kind=kind,
        embedded=embedded,
        text=text,
        text_truncated=truncated,
        image_src=f"data:{_IMAGE_TYPES[mime]};base64,{b64}" if kind == "image" and embedded else None,
        # Downloads are always octet-stream: the browser saves them and renders nothing.
        download_href=f"data:application/octet-stream;base64,{b64}" if embedded else None,
    )


def _measurement_graphic(m: MeasurementRecord) -> Any:
    """The inline SVG beside a measurement: a plot for series, a gauge for a number with two-sided limits."""
    if formatting.is_series(m):
        xname, xunits = m.dimensions[0]
        x_label = f"{xname} ({xunits})" if xunits else xname
        return svg.series_plot(
            formatting.finite_points(m.value),
            limits=m.limits,
            x_label=x_label,
            y_units=m.units or "",
            title=f"{m.name}: {formatting.series_summary(m)}",
        )
    if m.limits is not None and formatting.is_number(m.value):
        return svg.limit_gauge(float(m.value), m.limits)
    return ""


@functools.cache
def _environment() -> jinja2.Environment:
    """The jinja2 environment: autoescape on for every template, whatever its extension.

    Memoised because compiling the templates costs ~50 ms against ~2 ms for a
    render, and a 256-slot station writes 256 run pages at once. It is
    configured here and never changed afterwards (jinja2 environments are safe
    to share between threads), so the memo is a cache of a pure function, not
    state that renders could see each other through.
    """
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("reports.render", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(
        number=formatting.number,
        value=formatting.value,
        utc=formatting.utc,
        clock=formatting.clock,
        iso=formatting.iso,
        duration=formatting.duration,
        size=formatting.size,
        percent=formatting.percent,
        oclass=formatting.outcome_class,
        olabel=formatting.outcome_label,
        mclass=formatting.measurement_class,
        mlabel=formatting.measurement_label,
        lvlclass=formatting.level_class,
        mcounts=formatting.measurement_counts,
        band=formatting.marginal_band,
        keep_whole=formatting.keep_whole,
        stat=formatting.statistic,
        cpk=formatting.index,
    )
    env.globals.update(
        attachment_view=attachment_view,
        graphic=_measurement_graphic,
        is_series=formatting.is_series,
        series_summary=formatting.series_summary,
        is_number=formatting.is_number,
        max_embed=formatting.size(MAX_EMBED_BYTES),
        log_lines_shown=LOG_LINES_SHOWN,
        stat_histogram=svg.capability_histogram,
        stat_chart=svg.control_chart,
        failure_summary=failure_summary,
    )
    return env


def render_run(run: RunRecord, *, unit_runs: Sequence[RunRecord] = ()) -> str:
    """The report of one run: verdict, identity, phases, measurements, errors, logs and attachments.

    ``unit_runs`` are every run of the same unit (as :func:`unit_histories`
    finds them, this one included): the page says which test of the unit it
    is, why the others failed, and links to them. Links are relative (the
    batch's ``index.html`` beside the page, another batch's folder beside
    this one), so they work in a copied report folder and when served.
    """
    ordered = chronological(unit_runs) if unit_runs else [run]
    history = [{"run": r, "href": run_href(r, from_batch=run.batch), "current": r.run_id == run.run_id}
               for r in ordered]
    number = next((i for i, h in enumerate(history, 1) if h["current"]), 1)
    return _environment().get_template("run.html").render(
        run=run, first_failure=first_failure(run), history=history if len(history) > 1 else [],
        test_number=number, previous=history[number - 2]["run"] if number > 1 else None,
    )


def unit_histories(runs: Sequence[RunRecord]) -> dict[str, list[RunRecord]]:
    """For each run id, every run of its unit among ``runs`` (oldest first): what :func:`render_run` links."""
    ordered = chronological(runs)
    by_id = {r.run_id: r for r in ordered}
    units = group_units(ordered)
    return {rid: [by_id[i] for i in unit.run_ids] for rid, unit in units.by_run.items()}


def run_href(run: RunRecord, *, from_batch: str) -> str:
    """The relative link to ``run``'s page from a page in ``from_batch``'s folder."""
    page = quote(f"{run.run_id}.html")
    if run.batch == from_batch:
        return page
    return f"../{quote(batch_dir(Path(), run.batch).name)}/{page}"


def _export_command(batch: str) -> str:
    """The command that exports ``batch``, ready to paste (``--batch=`` when the id starts with a dash)."""
    quoted = shlex.quote(batch)
    return f"sequencer export --batch={quoted}" if batch.startswith("-") else f"sequencer export --batch {quoted}"


@contextlib.contextmanager
def _collector_paused() -> Iterator[None]:
    """The cyclic garbage collector off for a page's first reading, then as it was.

    Why: that reading makes several objects a measurement (its record, and
    the JSON it is read from) and drops them as it goes; none is in a
    reference cycle, so reference counting frees them all, and the
    collector's passes over them found nothing while they took a twentieth
    of a 10,000-run page's time. As ``subprocess`` does around a fork, it is
    restored however the reading ends.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


@attrs.frozen
class RowFacts:
    """What a batch page's row shows of a run's phases: its first failure and whether it was marginal.

    Taken in the first reading, so the second reads the runs' headers alone.
    Kept only for runs that have either (failures are few), never a phase.
    """

    failure: str | None = None
    #: the failure's reason, or its error's type
    why: str | None = None
    marginal: bool = False

    @classmethod
    def of(cls, run: RunRecord) -> RowFacts | None:
        p = first_failure(run)
        marginal = run.marginal
        if p is None and not marginal:
            return None
        if p is None:
            return cls(marginal=True)
        why = p.reason or (p.error.type if p.error is not None else None)
        return cls(p.name, why, marginal)


class BatchPage:
    """The report of many runs, from runs read as a stream: nothing holds them all.

    Made by :func:`batch_page`, which reads them once, whole: counts, yields,
    units, Paretos, each measurement's moments and its values for the
    histograms and charts (:class:`~reports.quality.yields.BatchTally`,
    :class:`~reports.quality.statistics.MeasurementTally`: 8 bytes a value),
    and the few facts a row shows of a failed or marginal run's phases.
    :meth:`chunks` then writes the page as it reads the runs' headers again
    (``headers``, if the source can read runs without their phases: a
    store's header is a few hundred bytes, its phases tens of kB), the units
    table a row at a time. So the memory a page takes is the tallies' (a few
    numbers per measurement, its values, the units' identity index), never
    the runs'.
    """

    def __init__(self, passes: RunPasses, *, title: str | Callable[[Sequence[str]], str],
                 cpk_threshold: float, headers: RunPasses | None = None) -> None:
        self._headers = headers if headers is not None else passes
        self.threshold = cpk_threshold
        self._tally = BatchTally()
        self._statistics = MeasurementTally(drawing=True)
        self._facts: dict[str, RowFacts] = {}
        batches: set[str] = set()
        stations: set[str] = set()
        self._products: dict[str, None] = {}
        self._first_start: dt.datetime | None = None
        self._last_end: dt.datetime | None = None
        with _collector_paused():
            self._read(passes(), batches, stations)
        #: every run's unit (the runs' ids and identity: what grows with the runs)
        self.units = self._tally.grouping.units()
        self.summary = self._tally.summary(self.units)
        self.batches = sorted(batches)
        self.stations = sorted(stations)
        names = sorted({u.product for u in self.units.units})
        self.title = title if isinstance(title, str) else title(names)
        self._several_products = len(names) > 1

    def _read(self, runs: Iterable[RunRecord], batches: set[str], stations: set[str]) -> None:
        """The first reading: every tally, and what the rows will need of the runs' phases."""
        for r in runs:
            self._tally.add(r)
            self._statistics.add(r)
            if (facts := RowFacts.of(r)) is not None:
                self._facts[r.run_id] = facts
            batches.add(r.batch) if r.batch else None
            stations.add(r.station)
            self._products[f"{r.product} {r.product_version}".strip()] = None
            if self._first_start is None:
                self._first_start = r.started_at
            if r.ended_at is not None and (self._last_end is None or r.ended_at > self._last_end):
                self._last_end = r.ended_at

    def _rows(self) -> Iterator[dict[str, Any]]:
        """The second reading, of the runs' headers: a row per run."""
        here = self.batches[0] if len(self.batches) == 1 else ""
        tests: Counter[str] = Counter()
        none = RowFacts()
        for r in self._headers():
            unit = self.units.of(r)
            tests[unit.key] += 1
            yield {"run": r, "unit": unit, "test_number": tests[unit.key], "tests": len(unit.run_ids),
                   "facts": self._facts.get(r.run_id, none), "href": run_href(r, from_batch=here or r.batch)}

    def _statistics_drawn(self) -> list[MeasurementStatistics]:
        """Called by the template after the units table: the statistics with their histograms and charts."""
        return worst_first(self._statistics.statistics(), self.threshold)

    def chunks(self) -> Iterator[str]:
        """The page's HTML, a piece at a time, reading the runs' headers as it goes."""
        stream = _environment().get_template("batch.html").stream(
            title=self.title,
            summary=self.summary,
            rows=self._rows(),
            products=sorted(self._products),
            stations=self.stations,
            batches=self.batches,
            # where quality gets the numbers behind this page, for a spreadsheet
            export_command=_export_command(self.batches[0]) if len(self.batches) == 1 else None,
            first_start=self._first_start,
            last_end=self._last_end,
            statistics=self._statistics_drawn,
            threshold=self.threshold,
            several_products=self._several_products,
        )
        stream.enable_buffering(256)  # the template's pieces are a few bytes each: hundreds of thousands of writes
        return iter(stream)


def batch_page(passes: RunPasses, *, title: str | Callable[[Sequence[str]], str],
               cpk_threshold: float = DEFAULT_CPK_THRESHOLD, headers: RunPasses | None = None) -> BatchPage:
    """Read the runs once (``passes()``, oldest first) for the page's numbers; see :class:`BatchPage`.

    ``title`` may be a function of the products the runs are of (:func:`batch_title`).
    ``headers``: the same runs without their phases, for the rows (else ``passes`` again).
    """
    return BatchPage(passes, title=title, cpk_threshold=cpk_threshold, headers=headers)


def render_batch(runs: Sequence[RunRecord], *, title: str | Callable[[Sequence[str]], str],
                 cpk_threshold: float = DEFAULT_CPK_THRESHOLD) -> str:
    """The report of many runs held in memory (any order): counts, yields, units, Paretos and statistics.

    Each run links to its page (``<run id>.html`` beside this one; a run of
    another batch, in a page of every station's runs, to its own batch's folder).
    """
    ordered = chronological(runs)
    return "".join(batch_page(lambda: ordered, title=title, cpk_threshold=cpk_threshold).chunks())


def write_batch(path: str | os.PathLike[str], passes: RunPasses, *, title: str | Callable[[Sequence[str]], str],
                cpk_threshold: float = DEFAULT_CPK_THRESHOLD, headers: RunPasses | None = None) -> BatchPage:
    """Write the batch page of the runs ``passes`` reads to ``path``, atomically, as it is made.

    ``headers``: the same runs without their phases, read for the rows (else ``passes`` again).
    """
    page = batch_page(passes, title=title, cpk_threshold=cpk_threshold, headers=headers)
    with replacing(path) as tmp, open(tmp, "w", encoding="utf-8", newline="\n") as out:
        for chunk in page.chunks():
            out.write(chunk)
    return page


def write_retested_runs(folder: Path, units: Units, get_run: Callable[[str], RunRecord | None]) -> None:
    """The page of every run of a unit tested more than once, which links to the unit's other runs.

    One unit's runs are read at a time (``get_run``), so a batch's worth is never held.
    """
    for unit in units.units:
        if len(unit.run_ids) < 2:
            continue
        runs = [r for rid in unit.run_ids if (r := get_run(rid)) is not None]
        for r in runs:
            write_html(folder / f"{r.run_id}.html", render_run(r, unit_runs=runs))


def render_period(report: PeriodReport, *, title: str, period: str, source: str,
                  cpk_threshold: float = DEFAULT_CPK_THRESHOLD) -> str:
    """The trend report of a product over a period: yields by time, station, slot, operator; Paretos; statistics."""
    return _environment().get_template("period.html").render(
        report=report, title=title, period=period, source=source,
        statistics=worst_first(report.statistics, cpk_threshold), threshold=cpk_threshold,
    )


def batch_title(batch: str, products: Iterable[str]) -> str:
    """The heading of a batch's report: the products tested (their names), then the batch."""
    names = " / ".join(sorted(set(products)))
    return f"{names} — batch {batch}" if names else f"Batch {batch}"


def batch_dir(reports_dir: Path, batch: str) -> Path:
    """The folder of a batch's reports: ``reports_dir / batch`` when the batch id is a safe folder name.

    A batch id is typed or scanned by a person, or comes from the factory's
    system, and may hold anything: a ``/``, a ``..``. Used as it is, it could
    name a folder outside the reports directory, or several levels of them.
    Characters other than letters, digits, ``.``, ``_`` and ``-`` become
    ``_``, and a name that had to change ends with a short hash of the id, so
    two batches whose ids differ only there never share a folder.
    """
    safe = "".join(c if c.isascii() and (c.isalnum() or c in "._-") else "_" for c in batch)
    if safe.startswith("."):
        safe = "_" + safe[1:]
    if safe != batch or not safe:
        safe = f"{safe}-{hashlib.sha256(batch.encode()).hexdigest()[:8]}".lstrip("-")
    return reports_dir / safe


def write_html(path: str | os.PathLike[str], html: str) -> Path:
    """Write ``html`` to ``path`` atomically (a reader never sees half a report); return the path."""
    with replacing(path) as tmp:
        tmp.write_text(html, encoding="utf-8", newline="\n")
    return Path(path)
