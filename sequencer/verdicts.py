"""What the operator is told when a run ends: PASS, or what to do with the unit, in the product's words.

An engineer's reason ("measurement 'vdd_3v3': 3.59 is above 3.4") is not
an instruction. A product says what to do where it knows: a phase or a
measurement declares ``on_fail="Reseat the sensor cable and retest"`` and a
:class:`~sequencer.records.Disposition` (the retest, rework or scrap bin).
When a run ends the engine decides (:func:`decide`) and stamps the bin and
the instruction on the record; whoever shows the run (the terminal, the
operator panel, a report) reads them back with :func:`verdict_of`.

The rules, in order:

* PASS needs no instruction.
* A run the operator aborted (or a station killed) was not tested to the
  end: test it again. No bin.
* A unit past the product's ``max_retests`` is sent to rework untested
  (the engine refuses it as soon as it knows the unit; see
  :class:`UnitHistory`).
* A unit judged bad (a phase ended FAIL): the first phase that failed
  decides. Each of its failed measurements says what its own
  ``on_fail``/``disposition`` say, else what the phase's say; the worst bin
  named wins (scrap, rework, retest), in its words; nothing said, the
  retest bin. A unit whose last allowed test failed goes to rework instead
  of back to the retest bin.
* ERROR and TIMEOUT with nothing judged bad are station trouble (a port, a
  fixture, the firmware protocol), not a bad unit: call the engineer. No bin.

A unit is named by its serial, or by its MAC before the serial is read
(:func:`unit_label`).
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import attrs

from sequencer.records import (
    DEFAULT_IDENTITY,
    Disposition,
    MeasurementOutcome,
    MeasurementRecord,
    Outcome,
    PhaseRecord,
    RunRecord,
)

__all__ = [
    "UNIT_KEYS", "UnitHistory", "UnitHistorySource", "Verdict", "decide", "failure_where", "unit_identity",
    "unit_label", "verdict_of",
]

#: The ``dut`` keys that name a unit when its product does not say (``Product(identity=...)``): serial, then MAC.
UNIT_KEYS: tuple[str, ...] = DEFAULT_IDENTITY

#: What the operator does with a unit in each bin, when the product says nothing more.
BIN_INSTRUCTION = {
    Disposition.RETEST: "Put it in the retest bin and test it again",
    Disposition.REWORK: "Put it in the rework bin",
    Disposition.SCRAP: "Put it in the scrap bin",
}
TROUBLE_INSTRUCTION = "Station trouble, not a bad unit: call the engineer, and keep the unit to test again"
ABORTED_INSTRUCTION = "Not tested to the end: test it again"


def unit_identity(dut: Mapping[str, str], keys: Sequence[str] = UNIT_KEYS) -> tuple[tuple[str, str], ...]:
    """The unit's identity values (non-empty), most trusted first: what its earlier runs are found by."""
    return tuple((k, v) for k in keys if (v := str(dut.get(k, "")).strip()))


def unit_label(dut: Mapping[str, str], keys: Sequence[str] = UNIT_KEYS) -> str:
    """How the operator finds the unit: its serial, ``mac 24:0A:C4:...`` before the serial is read, or ''."""
    ids = unit_identity(dut, keys)
    if not ids:
        return ""
    key, value = ids[0]
    return value if key == "serial" else f"{key} {value}"


@attrs.frozen
class UnitHistory:
    """What the station knew of a unit's earlier runs when it recognised the unit.

    ``tests`` counts the earlier runs that ended with a verdict (a run
    ABORTED or INTERRUPTED was not a test to the end); this run is retest
    number ``tests``. ``last_*`` describe the most recent of them.
    """

    tests: int
    last_outcome: Outcome | None = None
    last_where: str = ""
    last_started_at: dt.datetime | None = None

    @property
    def retest(self) -> bool:
        return self.tests > 0

    def line(self) -> str:
        """``retest 2: last FAIL at supply_rails, vdd_3v3 3.59 V > 3.4 V`` (empty for a first test)."""
        if not self.tests or self.last_outcome is None:
            return ""
        where = f" at {shortened(self.last_where)}" if self.last_where and self.last_outcome is not Outcome.PASS else ""
        return f"retest {self.tests}: last {self.last_outcome.value}{where}"

    @classmethod
    def of(cls, earlier: Sequence[RunRecord]) -> UnitHistory:
        """From the unit's earlier runs (any order); unfinished, aborted and interrupted ones are not tests."""
        tested = sorted((r for r in earlier if r.outcome is not None and r.outcome not in _NOT_TESTS),
                        key=lambda r: (r.started_at, r.run_id))
        if not tested:
            return cls(0)
        last = tested[-1]
        return cls(len(tested), last.outcome, failure_where(last), last.started_at)


_NOT_TESTS = frozenset({Outcome.ABORTED, Outcome.INTERRUPTED})


class UnitHistorySource(Protocol):
    """Where the engine looks up a unit's earlier runs (the station's store; ``reports/storage/unit_history.py``)."""

    async def history(self, product: str, identity: Sequence[tuple[str, str]], *, run_id: str) -> UnitHistory:
        """The unit's earlier runs of ``product``, this run (``run_id``) left out."""
        ...


@attrs.frozen
class Verdict:
    """A finished run as the operator reads it: a word, what to do, and where it failed."""

    #: PASS, RETEST, REWORK, SCRAP, CALL ENGINEER or ABORTED: what the operator acts on, shown large
    headline: str
    instruction: str
    #: the first failure, in a few words: ``supply_rails, vdd_3v3 3.59 V > 3.4 V`` ('' for a pass)
    where: str
    disposition: Disposition | None
    outcome: Outcome

    @property
    def passed(self) -> bool:
        return self.outcome is Outcome.PASS


def decide(
    run: RunRecord, phases: Mapping[str, Any], *, max_retests: int | None = None,
    history: UnitHistory | None = None, refused: str | None = None,
) -> tuple[Disposition | None, str]:
    """The bin and the instruction for a finished ``run``; ``phases`` are the product's declarations by name.

    ``history`` is what was known of the unit's earlier runs; ``refused``
    the reason the unit was sent to rework untested (past ``max_retests``).
    """
    outcome = run.outcome
    if outcome is Outcome.PASS:
        return None, ""
    if outcome in (Outcome.ABORTED, Outcome.INTERRUPTED, None):
        return None, ABORTED_INSTRUCTION
    if refused is not None:
        return Disposition.REWORK, refused
    failed = next((p for p in run.phases if p.outcome is Outcome.FAIL), None)
    if failed is None:
        return None, TROUBLE_INSTRUCTION
    bin_, words = _declared(failed, phases.get(failed.name))
    bin_ = bin_ or Disposition.RETEST
    words = words or BIN_INSTRUCTION[bin_]
    if bin_ is Disposition.RETEST and max_retests is not None and (history.tests if history else 0) >= max_retests:
        return Disposition.REWORK, (f"{words.rstrip('.')}. That was its last allowed test "
                                    f"(max {max_retests} retest{'s' if max_retests != 1 else ''}): "
                                    "put it in the rework bin")
    return bin_, words


def _declared(failed: PhaseRecord, declaration: Any) -> tuple[Disposition | None, str]:
    """What the failed phase's declarations say of it: the most severe of its failed measurements' words.

    Each failed measurement says what its own ``on_fail``/``disposition``
    say, else what its phase's say; the unit goes to the worst bin any of
    them names (scrap, then rework, then retest), in that one's words.
    """
    if declaration is None:
        return None, ""
    said = [(declaration.disposition, declaration.on_fail)]
    failed_measurements = [m for m in failed.measurements if m.outcome in _FAILED]
    if failed_measurements:
        said = []
        for m in failed_measurements:
            declared = declaration.measurement(m.name)
            own = (declared.disposition, declared.on_fail) if declared is not None else (None, "")
            said.append((own[0] or declaration.disposition, own[1] or declaration.on_fail))
    return max(said, key=lambda s: _SEVERITY[s[0]])  # the first of the worst


#: Which bin wins when several failures name one.
_SEVERITY = {None: 0, Disposition.RETEST: 1, Disposition.REWORK: 2, Disposition.SCRAP: 3}


def verdict_of(run: RunRecord) -> Verdict:
    """How ``run`` reads to the operator, from its record alone (the bin and the words the engine stamped)."""
    outcome = run.outcome or Outcome.ABORTED
    where = failure_where(run)
    if outcome is Outcome.PASS:
        return Verdict("PASS", "", "", None, outcome)
    if outcome in (Outcome.ABORTED, Outcome.INTERRUPTED):
        return Verdict("ABORTED", run.instruction or ABORTED_INSTRUCTION, where, None, outcome)
    if run.disposition is not None:
        return Verdict(run.disposition.value.upper(), run.instruction or BIN_INSTRUCTION[run.disposition], where,
                       run.disposition, outcome)
    if outcome is Outcome.FAIL or any(p.outcome is Outcome.FAIL for p in run.phases):
        return Verdict("FAIL", run.instruction, where, None, outcome)  # a record from before bins were stamped
    return Verdict("CALL ENGINEER", run.instruction or TROUBLE_INSTRUCTION, where, None, outcome)


def failure_where(run: RunRecord) -> str:
    """The run's first failure in a few words: ``supply_rails, vdd_3v3 3.59 V > 3.4 V``; '' if none.

    A phase judged FAIL comes before station trouble (ERROR, TIMEOUT), and
    that before an abort; among equals, the first committed.
    """
    for kinds in ((Outcome.FAIL,), (Outcome.ERROR, Outcome.TIMEOUT), (Outcome.ABORTED, Outcome.INTERRUPTED)):
        p = next((p for p in run.phases if p.outcome in kinds), None)
        if p is not None:
            return _phase_where(p)
    if run.outcome not in (None, Outcome.PASS):
        # Not passed, yet no phase failed (stopped before its phases ran): the first that says why.
        p = next((p for p in run.phases if p.reason), None)
        if p is not None:
            return f"{p.name}: {p.reason}"
    return ""


def _phase_where(p: PhaseRecord) -> str:
    if p.outcome is Outcome.FAIL:
        failed = [m for m in p.measurements if m.outcome in _FAILED]
        if failed:
            more = f" (+{len(failed) - _WHERE_MEASUREMENTS} more)" if len(failed) > _WHERE_MEASUREMENTS else ""
            return f"{p.name}, " + ", ".join(_measurement_where(m) for m in failed[:_WHERE_MEASUREMENTS]) + more
    return f"{p.name}: {p.reason or p.outcome.value}"


_FAILED = frozenset({MeasurementOutcome.FAIL, MeasurementOutcome.UNSET})
#: A phase's failed measurements named in a verdict; more are counted.
_WHERE_MEASUREMENTS = 2


def _measurement_where(m: MeasurementRecord) -> str:
    """``vdd_3v3 3.59 V > 3.4 V``: the value against the limit it broke, else the validator's own reason."""
    if m.outcome is MeasurementOutcome.UNSET:
        return f"{m.name} not measured"
    value, limits = m.value, m.limits
    if limits is not None and _number(value):
        if limits.high is not None and value > limits.high:
            return f"{m.name} {quantity(value, m.units)} > {quantity(limits.high, m.units)}"
        if limits.low is not None and value < limits.low:
            return f"{m.name} {quantity(value, m.units)} < {quantity(limits.low, m.units)}"
    return f"{m.name}: {m.reason}" if m.reason else m.name


#: The longest a failure is quoted in a line the operator reads at a glance; the summary and reports have it whole.
GLANCE_CHARS = 100


def shortened(text: str, limit: int = GLANCE_CHARS) -> str:
    """``text`` cut to ``limit`` characters with an ellipsis: a raw reason can be a kilobyte of a DUT's bytes."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


#: SI prefixes for small values of SI units: a sleep current reads 31 µA, not 3.1e-05 A.
_PREFIXES = ((1e-9, "n"), (1e-6, "µ"), (1e-3, "m"))
_SI_UNITS = frozenset({"V", "A", "W", "s", "F", "H", "Hz", "Ω", "Ohm", "ohm"})


def quantity(value: float, units: str | None) -> str:
    """A value and its units as a person reads them: ``3.59 V``, ``31 µA``, ``0.5``."""
    if not units:
        return f"{value:.4g}"
    if units in _SI_UNITS and value != 0 and abs(value) < 1:
        for scale, prefix in _PREFIXES:
            if abs(value) < scale * 1000:
                return f"{value / scale:.4g} {prefix}{units}"
    return f"{value:.4g} {units}"
