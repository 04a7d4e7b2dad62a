"""Records: JSON round-trip as a hypothesis property, and outcome aggregation."""

from __future__ import annotations

import datetime as dt
import json
import math

import attrs
import pytest
from hypothesis import given
from hypothesis import strategies as st

from sequencer.records import (
    AttemptRecord,
    Limits,
    MeasurementOutcome,
    MeasurementRecord,
    Outcome,
    PhaseRecord,
    SCHEMA_VERSION,
    RunRecord,
    from_dict,
    json_loads,
    phase_to_json,
    run_from_json,
    run_header_json,
    run_outcome,
    run_to_json,
    to_dict,
)
from tests.store_support import as_version_1
from tests.strategies import phases, runs, text, times, value


@given(runs)
def test_run_record_json_round_trip(run: RunRecord) -> None:
    text_form = run_to_json(run)
    json.loads(text_form)  # valid JSON
    assert run_from_json(text_form) == run


# What a failed measurement may hold: values the fast encoder must hand to the json module.
any_value = value | st.floats() | st.lists(st.tuples(st.floats(), st.floats()).map(list), max_size=3)
any_limit = st.none() | st.floats()
phases_with_any_number = phases | st.builds(
    PhaseRecord,
    name=text,
    outcome=st.sampled_from(Outcome),
    started_at=times,
    ended_at=times,
    attempts=st.lists(
        st.builds(
            AttemptRecord,
            number=st.integers(1, 3),
            outcome=st.sampled_from(Outcome),
            started_at=times,
            ended_at=times,
            measurements=st.lists(
                st.builds(
                    MeasurementRecord,
                    name=text,
                    outcome=st.sampled_from(MeasurementOutcome),
                    value=any_value,
                    limits=st.none() | st.builds(Limits, any_limit, any_limit, any_limit, any_limit),
                ),
                max_size=3,
            ).map(tuple),
        ),
        max_size=2,
    ).map(tuple),
)


def _canonical(text_form: str) -> str:
    """One spelling per document: float formatting and NaN/Infinity as the json module writes them."""
    return json.dumps(json.loads(text_form), sort_keys=True)


@given(phases_with_any_number)
def test_the_stored_phase_text_is_the_general_json_form(phase: PhaseRecord) -> None:
    fast = phase_to_json(phase)
    general = json.dumps(to_dict(phase), separators=(",", ":"))
    assert _canonical(fast) == _canonical(general)


@given(runs)
def test_the_stored_run_header_is_the_general_json_form_without_phases(run: RunRecord) -> None:
    fast = run_header_json(run)
    general = json.dumps(to_dict(attrs.evolve(run, phases=())), separators=(",", ":"))
    assert _canonical(fast) == _canonical(general)
    assert run_from_json(fast) == attrs.evolve(run, phases=())


@given(phases)
def test_the_stored_phase_text_reads_back_as_the_same_record(phase: PhaseRecord) -> None:
    assert from_dict(json_loads(phase_to_json(phase)), PhaseRecord) == phase


@given(phases_with_any_number)
def test_phases_are_read_back_as_the_general_converter_reads_them(phase: PhaseRecord) -> None:
    """phase_from_dict (every read of a stored phase) against cattrs's own structuring, field for field."""
    from sequencer.records import _make_converter, phase_from_dict

    general = _make_converter()  # without the fast hook
    # JSON integers where floats and booleans belong are converted as cattrs converts them.
    for data in (to_dict(phase), json_loads(phase_to_json(phase)), to_dict(phase) | {"resource_wait_s": 2,
                                                                                      "teardown": 1}):
        fast, slow = phase_from_dict(data), general.structure(data, PhaseRecord)
        # compared as JSON text: NaN is not equal to itself, and 2 and 2.0 are spelled apart
        assert _canonical(json.dumps(to_dict(fast))) == _canonical(json.dumps(to_dict(slow)))
        assert [type(x) for x in attrs.astuple(fast, recurse=True)] == \
            [type(x) for x in attrs.astuple(slow, recurse=True)]


@given(phases_with_any_number)
def test_record_json_is_read_as_the_json_module_reads_it(phase: PhaseRecord) -> None:
    # NaN, infinities and integers past 64 bits included: orjson refuses those, json_loads falls back.
    stored = phase_to_json(phase)
    assert json.dumps(json_loads(stored), sort_keys=True) == json.dumps(json.loads(stored), sort_keys=True)


def test_a_phase_with_a_value_orjson_cannot_write_is_still_stored() -> None:
    now = dt.datetime.now(dt.timezone.utc)
    m = MeasurementRecord("count", MeasurementOutcome.PASS, value=2**70)  # past orjson's 64-bit integers
    phase = PhaseRecord("p", Outcome.PASS, now, now, (AttemptRecord(1, Outcome.PASS, now, now, (m,)),))
    assert json_loads(phase_to_json(phase))["attempts"][0]["measurements"][0]["value"] == 2**70


def test_nan_values_survive_the_round_trip() -> None:
    now = dt.datetime.now(dt.timezone.utc)
    m = MeasurementRecord("x", MeasurementOutcome.FAIL, value=float("nan"))
    run = RunRecord("r", "p", "s", 0, "/dev/x", now, phases=(PhaseRecord("p", Outcome.FAIL, now, now, (AttemptRecord(1, Outcome.FAIL, now, now, (m,)),)),))
    back = run_from_json(run_to_json(run))
    assert back.phases[0].measurements[0].value != back.phases[0].measurements[0].value  # still NaN
    stored = from_dict(json_loads(phase_to_json(run.phases[0])), PhaseRecord)
    assert math.isnan(stored.measurements[0].value)  # the store's own encoding keeps it too


def test_unknown_schema_version_is_refused() -> None:
    now = dt.datetime.now(dt.timezone.utc)
    data = json.loads(run_to_json(RunRecord("r", "p", "s", 0, "/dev/x", now)))
    data["schema_version"] = 99
    with pytest.raises(ValueError, match=r"^record schema version 99 is not supported \(this sequencer reads 1, 2\)$"):
        run_from_json(json.dumps(data))


@given(runs)
def test_a_record_of_schema_version_1_reads_as_this_versions(run: RunRecord) -> None:
    # Version 1 had no fixtures' lines: an older record is one whose lines are all its phases' own.
    older = attrs.evolve(run, logs=(), phases=tuple(
        attrs.evolve(p, logs=tuple(attrs.evolve(line, fixture=None) for line in p.logs)) for p in run.phases))
    text = json.dumps(as_version_1(to_dict(older)))
    assert '"fixture"' not in text and json.loads(text)["schema_version"] == 1
    back = run_from_json(text)
    assert back == older and back.schema_version == SCHEMA_VERSION == 2


@pytest.mark.parametrize(
    "outcomes, expected",
    [
        ([Outcome.PASS, Outcome.SKIPPED], Outcome.PASS),
        ([Outcome.PASS, Outcome.FAIL], Outcome.FAIL),
        ([Outcome.FAIL, Outcome.TIMEOUT], Outcome.TIMEOUT),
        ([Outcome.TIMEOUT, Outcome.ERROR, Outcome.FAIL], Outcome.ERROR),
        ([Outcome.ERROR, Outcome.ABORTED], Outcome.ABORTED),
        ([], Outcome.PASS),
    ],
)
def test_run_outcome_takes_the_worst_phase(outcomes: list[Outcome], expected: Outcome) -> None:
    now = dt.datetime.now(dt.timezone.utc)
    assert run_outcome(tuple(PhaseRecord(f"p{i}", o, now, now) for i, o in enumerate(outcomes))) is expected


def test_a_secret_held_by_mistake_is_refused_never_written() -> None:
    from fixtures.device_config import Secret

    now = dt.datetime.now(dt.timezone.utc)
    m = MeasurementRecord("token", MeasurementOutcome.PASS, value=Secret("hunter2-broker-password"))
    phase = PhaseRecord("p", Outcome.PASS, now, now, (AttemptRecord(1, Outcome.PASS, now, now, (m,)),))
    with pytest.raises(TypeError) as caught:
        phase_to_json(phase)
    assert "hunter2" not in str(caught.value)
