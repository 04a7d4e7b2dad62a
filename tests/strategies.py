"""Hypothesis strategies for every record class: any record the schema allows, not only realistic ones.

Shared by the tests that must hold for every record (JSON round-trip, the
store, exports), so a field added to a record class is generated everywhere.
"""

from __future__ import annotations

import datetime as dt

from hypothesis import strategies as st

from sequencer.records import (
    AttemptRecord,
    Attachment,
    Disposition,
    ErrorInfo,
    Limits,
    LogLine,
    MeasurementOutcome,
    MeasurementRecord,
    Outcome,
    PhaseRecord,
    RunRecord,
    ScanRecord,
    SourceFile,
)

times = st.datetimes(
    min_value=dt.datetime(2000, 1, 1), max_value=dt.datetime(2100, 1, 1), timezones=st.just(dt.timezone.utc)
)
text = st.text(max_size=30)
json_scalar = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**53), 2**53), st.floats(allow_nan=False, allow_infinity=False), text
)
value = st.one_of(json_scalar, st.lists(st.tuples(st.floats(allow_nan=False), st.floats(allow_nan=False)).map(list), max_size=5))
maybe_float = st.none() | st.floats(allow_nan=False, allow_infinity=False)

measurements = st.builds(
    MeasurementRecord,
    name=text,
    outcome=st.sampled_from(MeasurementOutcome),
    value=value,
    units=st.none() | text,
    description=text,
    validators=st.lists(text, max_size=3).map(tuple),
    limits=st.none() | st.builds(Limits, maybe_float, maybe_float, maybe_float, maybe_float),
    marginal=st.booleans(),
    reason=st.none() | text,
    dimensions=st.lists(st.tuples(text, text), max_size=1).map(tuple),
)
attempts = st.builds(
    AttemptRecord,
    number=st.integers(1, 10),
    outcome=st.sampled_from(Outcome),
    started_at=times,
    ended_at=times,
    measurements=st.lists(measurements, max_size=3).map(tuple),
    reason=st.none() | text,
    error=st.none() | st.builds(ErrorInfo, text, text, text),
)
log_lines = st.lists(st.builds(LogLine, times, text, text, st.none() | text), max_size=3).map(tuple)
phases = st.builds(
    PhaseRecord,
    name=text,
    outcome=st.sampled_from(Outcome),
    started_at=times,
    ended_at=times,
    attempts=st.lists(attempts, max_size=3).map(tuple),
    reason=st.none() | text,
    teardown=st.booleans(),
    resource_wait_s=st.floats(0, 1e6),
    logs=log_lines,
    attachments=st.lists(st.builds(Attachment, text, text, st.binary(max_size=64)), max_size=2).map(tuple),
)
runs = st.builds(
    RunRecord,
    run_id=text,
    product=text,
    station=text,
    slot=st.integers(0, 512),
    port=text,
    started_at=times,
    operator=text,
    batch=text,
    dut=st.dictionaries(text, text, max_size=5),
    ended_at=st.none() | times,
    outcome=st.none() | st.sampled_from(Outcome),
    phases=st.lists(phases, max_size=3).map(tuple),
    limits_file=st.none() | text,
    limits_sha256=st.none() | text,
    product_sha256=st.none() | text,
    sequencer_version=text,
    product_files=st.lists(st.builds(SourceFile, text, text), max_size=3).map(tuple),
    identity=st.sampled_from([("serial", "mac"), ("imei",), ("serial", "mac", "imei"), ("%.x", "")]),
    disposition=st.none() | st.sampled_from(Disposition),
    instruction=text,
    logs=log_lines,
    scans=st.lists(st.builds(ScanRecord, text, text, times, text), max_size=2).map(tuple),
)
