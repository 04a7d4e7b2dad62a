"""Test records: what a run measured, as frozen values.

Records are the product of the station. Everything downstream (the local store,
MongoDB, HTML reports, exports) consumes them, so they are plain frozen attrs
classes with a versioned JSON form and no behaviour beyond small derived
properties. The engine builds them incrementally and never mutates one in place:
a phase that finishes yields a new :class:`PhaseRecord`, and the run record is
re-assembled from the phases committed so far.
"""

from __future__ import annotations

import datetime as dt
import enum
import functools
import hashlib
import json
import math
from collections.abc import Mapping
from typing import Any

import attrs
import cattrs
import orjson
from cattrs.preconf.json import make_converter

from sequencer.base85 import b85decode, b85encode

#: The record's JSON shape. 2: fixtures' log lines (``LogLine.fixture``, ``RunRecord.logs``).
#: Records of every earlier version are still read: :func:`upgrade` brings them to this one.
SCHEMA_VERSION = 2
#: The versions :func:`upgrade` reads.
READABLE_SCHEMA_VERSIONS = frozenset({1, 2})
#: Which ``dut`` keys name a unit when a product does not say: its serial, then its MAC.
DEFAULT_IDENTITY: tuple[str, ...] = ("serial", "mac")


class Outcome(str, enum.Enum):
    """How a run, phase or attempt ended.

    ``INTERRUPTED``: the run's record stops before its end. The store
    assigns it to runs that a previous station process left open (killed,
    power loss, a disk that filled up); the engine gives it to a run whose
    records the store refused, so the terminal says what the store will.
    """

    PASS = "PASS"
    FAIL = "FAIL"
    ERROR = "ERROR"
    TIMEOUT = "TIMEOUT"
    ABORTED = "ABORTED"
    SKIPPED = "SKIPPED"
    INTERRUPTED = "INTERRUPTED"

    @property
    def is_failure(self) -> bool:
        return self in _FAILURES


_FAILURES = frozenset({Outcome.FAIL, Outcome.ERROR, Outcome.TIMEOUT, Outcome.ABORTED, Outcome.INTERRUPTED})


class Disposition(str, enum.Enum):
    """Where a unit that did not pass goes: the bin the operator puts it in.

    ``RETEST``: test it again (a loose cable, a badly seated board);
    ``REWORK``: a technician repairs it; ``SCRAP``: not worth repairing.
    A unit whose run ended in station trouble (ERROR, TIMEOUT) or was
    aborted has none: it was not judged.
    """

    RETEST = "retest"
    REWORK = "rework"
    SCRAP = "scrap"


def as_disposition(value: Disposition | str | None) -> Disposition | None:
    """``value`` as a :class:`Disposition` (its name as text will do); ValueError naming the bins if it is none."""
    if value is None or isinstance(value, Disposition):
        return value
    try:
        return Disposition(value)
    except ValueError:
        raise ValueError(f"disposition must be one of {', '.join(d.value for d in Disposition)}, "
                         f"got {value!r}") from None


class MeasurementOutcome(str, enum.Enum):
    """How a measurement was judged. ``SKIPPED``: not judged, because its phase asked to skip or repeat
    (the value is kept as it was set, and decides nothing)."""

    PASS = "PASS"
    FAIL = "FAIL"
    UNSET = "UNSET"
    SKIPPED = "SKIPPED"


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


@attrs.frozen
class Limits:
    """Numeric limits of an ``in_range`` or ``within_percent`` validator, for display and export."""

    low: float | None = None
    high: float | None = None
    marginal_low: float | None = None
    marginal_high: float | None = None


@attrs.frozen
class MeasurementRecord:
    """One measurement as taken: its value, how it was judged and against what.

    For a dimensioned measurement ``value`` is a list of ``[x, y]`` points and
    ``dimensions`` names the x axis as ``(name, units)``.
    """

    name: str
    outcome: MeasurementOutcome
    value: Any = None
    units: str | None = None
    description: str = ""
    validators: tuple[str, ...] = ()
    limits: Limits | None = None
    marginal: bool = False
    reason: str | None = None
    dimensions: tuple[tuple[str, str], ...] = ()


@attrs.frozen
class ErrorInfo:
    type: str
    message: str
    traceback: str = ""


@attrs.frozen
class LogLine:
    """One line of a log a record keeps: a phase's (``ctx.log``) or a fixture's (``slot.log``)."""

    timestamp: dt.datetime
    level: str
    message: str
    #: the fixture that logged it (None: the phase itself, or the station saying why lines were dropped)
    fixture: str | None = None


@attrs.frozen
class Attachment:
    name: str
    mimetype: str
    data: bytes = attrs.field(repr=False)

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()


@attrs.frozen
class AttemptRecord:
    number: int
    outcome: Outcome
    started_at: dt.datetime
    ended_at: dt.datetime
    measurements: tuple[MeasurementRecord, ...] = ()
    reason: str | None = None
    error: ErrorInfo | None = None

    @property
    def duration_s(self) -> float:
        return (self.ended_at - self.started_at).total_seconds()


@attrs.frozen
class PhaseRecord:
    """A phase as it finished: every attempt, its logs and attachments.

    ``outcome``, ``reason`` and ``measurements`` are those of the last attempt,
    except for phases that never ran (``SKIPPED``), which have no attempts and
    say why in ``reason``.
    """

    name: str
    outcome: Outcome
    started_at: dt.datetime
    ended_at: dt.datetime
    attempts: tuple[AttemptRecord, ...] = ()
    reason: str | None = None
    teardown: bool = False
    resource_wait_s: float = 0.0
    logs: tuple[LogLine, ...] = ()
    attachments: tuple[Attachment, ...] = ()

    @property
    def measurements(self) -> tuple[MeasurementRecord, ...]:
        return self.attempts[-1].measurements if self.attempts else ()

    @property
    def marginal(self) -> bool:
        return any(m.marginal for m in self.measurements)

    @property
    def error(self) -> ErrorInfo | None:
        return self.attempts[-1].error if self.attempts else None

    @property
    def duration_s(self) -> float:
        return (self.ended_at - self.started_at).total_seconds()


@attrs.frozen
class SourceFile:
    """One file of a product's test code as it was loaded: its path (relative to the product's folder) and hash."""

    path: str
    sha256: str


@attrs.frozen
class ScanRecord:
    """A barcode or QR code scanned for a run (or typed as one): the operator's badge, the work order, the label.

    ``kind`` is what the station took it for (``badge``, ``work_order``,
    ``label``, ``start``, :mod:`sequencer.scans`); ``value`` what it read
    from it (a name, a batch id, a serial, a slot); ``source`` where it came
    from (``keyboard``, ``scanner /dev/...``, ``panel``, ``simulated``).
    """

    kind: str
    value: str
    scanned_at: dt.datetime
    source: str = ""


@attrs.frozen
class RunRecord:
    """One DUT's pass through one product on one slot.

    ``dut`` is an open mapping of identity (serial, mac, imei, ...) that phases
    fill as they learn it. ``outcome`` is ``None`` while the run is open.
    """

    run_id: str
    product: str
    station: str
    slot: int
    port: str
    started_at: dt.datetime
    product_version: str = ""
    operator: str = ""
    batch: str = ""
    dut: dict[str, str] = attrs.field(factory=dict, converter=lambda d: {str(k): str(v) for k, v in sorted(d.items())})
    ended_at: dt.datetime | None = None
    outcome: Outcome | None = None
    phases: tuple[PhaseRecord, ...] = ()
    limits_file: str | None = None
    limits_sha256: str | None = None
    #: which test code produced this record: the product's code as loaded (the product file's SHA-256, or
    #: when it imports modules of its own, the SHA-256 of ``product_files``; see sequencer/provenance.py)
    #: and the sequencer that ran it
    product_sha256: str | None = None
    sequencer_version: str = ""
    schema_version: int = SCHEMA_VERSION
    #: the product file and every module it imports from its own folder or package, each with its SHA-256
    product_files: tuple[SourceFile, ...] = ()
    #: the ``dut`` keys that name the unit, most trusted first (the product's ``identity``)
    identity: tuple[str, ...] = DEFAULT_IDENTITY
    #: the bin the station sent the unit to when the run ended (None: passed, or not judged)
    disposition: Disposition | None = None
    #: what the operator was told to do with the unit, in the product's words ("" for a pass)
    instruction: str = ""
    #: what fixtures logged outside any phase (while opening beside other phases, between phases, closing);
    #: what they logged during a phase that uses them is in that phase's ``logs``
    logs: tuple[LogLine, ...] = ()
    #: what was scanned for this run: the operator's badge, the work order, the unit's label, the start
    scans: tuple[ScanRecord, ...] = ()

    @property
    def serial(self) -> str | None:
        return self.dut.get("serial")

    @property
    def marginal(self) -> bool:
        return any(p.marginal for p in self.phases)

    @property
    def duration_s(self) -> float | None:
        if self.ended_at is None:
            return None
        return (self.ended_at - self.started_at).total_seconds()

    def phase(self, name: str) -> PhaseRecord | None:
        for p in self.phases:
            if p.name == name:
                return p
        return None

    def measurement(self, phase: str, name: str) -> MeasurementRecord | None:
        """An earlier phase's measurement as its last attempt took it, or None (not run, not set, no such)."""
        rec = self.phase(phase)
        return next((m for m in rec.measurements if m.name == name), None) if rec is not None else None

    def value(self, phase: str, name: str) -> Any:
        """An earlier phase's measurement value; KeyError saying what is missing (a phase's ERROR, in its words)."""
        rec = self.phase(phase)
        if rec is None:
            raise KeyError(f"phase {phase!r} has not finished (finished: {', '.join(p.name for p in self.phases)})")
        m = self.measurement(phase, name)
        if m is None or m.outcome is MeasurementOutcome.UNSET:
            raise KeyError(f"phase {phase!r} ended {rec.outcome.value} without measurement {name!r}")
        return m.value

    def attachment(self, phase: str, name: str) -> Attachment | None:
        """An earlier phase's attachment by name (its last, if it attached the name twice), or None."""
        rec = self.phase(phase)
        return next((a for a in reversed(rec.attachments) if a.name == name), None) if rec is not None else None


def run_outcome(phases: tuple[PhaseRecord, ...]) -> Outcome:
    """The outcome a finished run earns from its phases.

    The worst phase outcome wins, in the order ABORTED > ERROR > TIMEOUT > FAIL;
    a run whose phases all passed or were skipped passes.
    """
    seen = {p.outcome for p in phases}
    for worst in (Outcome.ABORTED, Outcome.ERROR, Outcome.TIMEOUT, Outcome.FAIL):
        if worst in seen:
            return worst
    return Outcome.PASS


def _make_converter() -> cattrs.Converter:
    conv = make_converter()
    conv.register_unstructure_hook(dt.datetime, lambda d: d.isoformat())
    conv.register_structure_hook(dt.datetime, lambda s, _: dt.datetime.fromisoformat(s))
    # Measurement values are JSON values already (numbers, strings, lists of points).
    conv.register_structure_hook(Any, lambda v, _: v)
    # Attachments: the preconf hook decodes base85 in Python, a step per character.
    conv.register_structure_hook(bytes, lambda v, _: b85decode(v))
    return conv


def _optional_str(v: Any) -> str | None:
    return None if v is None else str(v)


def _optional_float(v: Any) -> float | None:
    return None if v is None else float(v)


def _limits_from_values(low: Any, high: Any, m_low: Any, m_high: Any) -> Limits:
    return Limits(None if low is None else float(low), None if high is None else float(high),
                  None if m_low is None else float(m_low), None if m_high is None else float(m_high))


#: A product's measurements have a few limits each, read back tens of thousands of times: one
#: ``Limits`` per distinct set (records are frozen, so sharing one is safe). Bounded, so a store
#: of many products cannot grow it without end.
_shared_limits = functools.lru_cache(maxsize=4096)(_limits_from_values)

#: ``MeasurementOutcome(value)`` goes through ``EnumType.__call__``: a dict is several times faster.
_MEASUREMENT_OUTCOMES: Mapping[str, MeasurementOutcome] = {o.value: o for o in MeasurementOutcome}
_OUTCOMES: Mapping[str, Outcome] = {o.value: o for o in Outcome}


def _measurement_outcome(value: Any) -> MeasurementOutcome:
    o = _MEASUREMENT_OUTCOMES.get(value) if isinstance(value, str) else None
    return o if o is not None else MeasurementOutcome(value)  # the enum's own error for a bad value


def _outcome(value: Any) -> Outcome:
    o = _OUTCOMES.get(value) if isinstance(value, str) else None
    return o if o is not None else Outcome(value)


def _measurement_from_dict(d: Mapping[str, Any]) -> MeasurementRecord:
    # The hottest loop of reading a batch back (fifty of these a run): lookups and calls kept few.
    lim = d.get("limits")
    if lim is not None:
        bounds = (lim.get("low"), lim.get("high"), lim.get("marginal_low"), lim.get("marginal_high"))
        try:
            lim = _shared_limits(*bounds)
        except TypeError:  # an unhashable bound: not a number, so float() says what is wrong
            lim = _limits_from_values(*bounds)
    units, reason, validators, dimensions = d.get("units"), d.get("reason"), d.get("validators"), d.get("dimensions")
    return MeasurementRecord(
        str(d["name"]), _measurement_outcome(d["outcome"]), d.get("value"), None if units is None else str(units),
        str(d.get("description", "")), tuple(map(str, validators)) if validators else (), lim,
        bool(d.get("marginal", False)), None if reason is None else str(reason),
        tuple((str(x), str(u)) for x, u in dimensions) if dimensions else (),
    )


def _attempt_from_dict(d: Mapping[str, Any]) -> AttemptRecord:
    e = d.get("error")
    return AttemptRecord(
        int(d["number"]), _outcome(d["outcome"]), dt.datetime.fromisoformat(d["started_at"]),
        dt.datetime.fromisoformat(d["ended_at"]), tuple(_measurement_from_dict(m) for m in d.get("measurements", ())),
        _optional_str(d.get("reason")),
        None if e is None else ErrorInfo(str(e["type"]), str(e["message"]), str(e.get("traceback", ""))),
    )


def phase_from_dict(d: Mapping[str, Any]) -> PhaseRecord:
    """``from_dict(d, PhaseRecord)``, built directly: the inverse of :func:`phase_to_json`'s shape.

    Every report, export and portal page reads its runs' phases back, a
    few dozen measurements each; through cattrs's general structuring that
    was about 1 ms a run, ten seconds for a batch of 10,000, and a batch page
    reads its runs twice. The same conversions (``str``, ``float``, ``bool``,
    the enums, ISO times, base85) done in place are several times faster;
    tests/test_records.py compares the two over generated records.
    """
    return PhaseRecord(
        str(d["name"]), _outcome(d["outcome"]), dt.datetime.fromisoformat(d["started_at"]),
        dt.datetime.fromisoformat(d["ended_at"]), tuple(_attempt_from_dict(a) for a in d.get("attempts", ())),
        _optional_str(d.get("reason")), bool(d.get("teardown", False)), float(d.get("resource_wait_s", 0.0)),
        tuple(LogLine(dt.datetime.fromisoformat(ln["timestamp"]), str(ln["level"]), str(ln["message"]),
                      _optional_str(ln.get("fixture"))) for ln in d.get("logs", ())),
        tuple(Attachment(str(a["name"]), str(a["mimetype"]), b85decode(a["data"])) for a in d.get("attachments", ())),
    )


#: The general converter, for every record class but phases; its structuring of phases is :func:`phase_from_dict`.
converter = _make_converter()
converter.register_structure_hook(PhaseRecord, lambda d, _: phase_from_dict(d))


def to_dict(record: Any) -> dict[str, Any]:
    """The JSON-ready form of any record class (bytes become base85 text)."""
    return converter.unstructure(record)


def from_dict(data: Mapping[str, Any], cls: type[Any]) -> Any:
    return converter.structure(data, cls)


def run_to_json(run: RunRecord) -> str:
    return json.dumps(to_dict(run), separators=(",", ":"))


def run_header_json(run: RunRecord) -> str:
    """The compact JSON text of ``to_dict(run)`` without its phases: what the store keeps per run.

    Built directly and written by orjson, as :func:`phase_to_json` is: the
    store encodes one when each run begins and ends, on the trio thread,
    where going through cattrs took tens of microseconds per slot.
    """
    # Field for field the shape of ``to_dict`` (tests/test_records.py compares the two).
    data = {
        "run_id": run.run_id, "product": run.product, "station": run.station, "slot": run.slot, "port": run.port,
        "started_at": run.started_at, "product_version": run.product_version, "operator": run.operator,
        "batch": run.batch, "dut": run.dut, "ended_at": run.ended_at, "outcome": run.outcome, "phases": [],
        "limits_file": run.limits_file, "limits_sha256": run.limits_sha256, "product_sha256": run.product_sha256,
        "sequencer_version": run.sequencer_version, "schema_version": run.schema_version,
        "product_files": [{"path": f.path, "sha256": f.sha256} for f in run.product_files],
        "identity": run.identity,
        "disposition": run.disposition, "instruction": run.instruction,
        "logs": [_line_data(ln) for ln in run.logs],
        "scans": [{"kind": c.kind, "value": c.value, "scanned_at": c.scanned_at, "source": c.source}
                  for c in run.scans],
    }
    try:
        return orjson.dumps(data).decode()
    except TypeError:  # text orjson refuses (a lone surrogate): the general path escapes it
        return json.dumps(to_dict(attrs.evolve(run, phases=())), separators=(",", ":"))


def phase_to_json(phase: PhaseRecord) -> str:
    """The compact JSON text of ``to_dict(phase)``: what the store writes per phase.

    Same document as ``json.dumps(to_dict(phase))``, about five times
    faster: the store encodes one per finished phase, on the slot's critical
    path (its dependents wait for the commit) and under the GIL every slot
    shares. The dictionaries are built directly rather than through cattrs,
    and orjson writes them. orjson writes NaN and infinities as ``null``,
    and a failed measurement may hold one, so a phase with a non-finite
    number goes through the ``json`` module, which keeps them (``NaN``,
    ``Infinity``, as Python's own JSON reader expects).
    """
    data, finite = _phase_data(phase)
    if finite:
        try:
            return orjson.dumps(data).decode()
        except TypeError:  # a measurement value orjson does not know; the general path says what it is
            pass
    return json.dumps(to_dict(phase), separators=(",", ":"))


def _phase_data(p: PhaseRecord) -> tuple[dict[str, Any], bool]:
    # The same shape as ``to_dict(p)``, field for field. A field added to a
    # record class must be added here too; tests/test_records.py compares the
    # two forms over generated records, so forgetting fails there. Enums,
    # tuples and datetimes are left for orjson, which writes them as
    # ``to_dict`` does (value, array, ``isoformat``) at C speed: this runs
    # once per phase on the trio thread.
    finite = math.isfinite(p.resource_wait_s)
    attempts = []
    for a in p.attempts:
        measurements = []
        for m in a.measurements:
            lim = m.limits
            if lim is None:
                limits = None
            else:
                low, high, marginal_low, marginal_high = lim.low, lim.high, lim.marginal_low, lim.marginal_high
                limits = {"low": low, "high": high, "marginal_low": marginal_low, "marginal_high": marginal_high}
                finite = finite and _finite(low, high, marginal_low, marginal_high)
            value = m.value
            finite = finite and (value is None or _finite(value))
            measurements.append({
                "name": m.name, "outcome": m.outcome, "value": value, "units": m.units,
                "description": m.description, "validators": m.validators, "limits": limits,
                "marginal": m.marginal, "reason": m.reason, "dimensions": m.dimensions,
            })
        e = a.error
        attempts.append({
            "number": a.number, "outcome": a.outcome, "started_at": a.started_at, "ended_at": a.ended_at,
            "measurements": measurements, "reason": a.reason,
            "error": None if e is None else {"type": e.type, "message": e.message, "traceback": e.traceback},
        })
    data = {
        "name": p.name, "outcome": p.outcome, "started_at": p.started_at, "ended_at": p.ended_at,
        "attempts": attempts, "reason": p.reason, "teardown": p.teardown, "resource_wait_s": p.resource_wait_s,
        "logs": [_line_data(ln) for ln in p.logs],
        "attachments": [
            {"name": at.name, "mimetype": at.mimetype, "data": b85encode(at.data).decode() if at.data else ""}
            for at in p.attachments
        ],
    }
    return data, finite


def _line_data(line: LogLine) -> dict[str, Any]:
    return {"timestamp": line.timestamp, "level": line.level, "message": line.message, "fixture": line.fixture}


def _finite(*values: Any) -> bool:
    """No NaN or infinity in these values (measurement values may be lists of points)."""
    for v in values:
        if type(v) is float:
            if not math.isfinite(v):
                return False
        elif isinstance(v, (list, tuple)):
            if not _finite(*v):
                return False
    return True


def json_loads(text: str | bytes) -> Any:
    """Parse a record's JSON: orjson, or the json module for what orjson refuses.

    That is NaN and infinities (written by the json module when a value is
    one), integers beyond 64 bits and escaped lone surrogates; all rare, and
    orjson reads the rest several times faster.
    """
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        return json.loads(text)


def upgrade(data: dict[str, Any]) -> dict[str, Any]:
    """A run's ``to_dict`` form (its phases may be left out) of any readable schema version, as this version's.

    What each version added, and what an older record gets for it:
    2, fixtures' log lines: a run of version 1 has no ``logs`` of its own
    (none), and its phases' lines no ``fixture`` (None: the phase's own,
    which all of them were). Raises ValueError naming the version for a
    record this sequencer cannot read (written by a newer one).
    """
    version = data.get("schema_version")
    if version == SCHEMA_VERSION:
        return data
    if version not in READABLE_SCHEMA_VERSIONS:
        raise ValueError(f"record schema version {version!r} is not supported (this sequencer reads "
                         f"{', '.join(str(v) for v in sorted(READABLE_SCHEMA_VERSIONS))})")
    return {**data, "logs": data.get("logs") or [], "schema_version": SCHEMA_VERSION}


def run_from_json(text: str) -> RunRecord:
    return from_dict(upgrade(json_loads(text)), RunRecord)
