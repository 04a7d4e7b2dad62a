"""Build realistic run records in a line or two, for report, export and store tests.

Every helper takes keyword overrides for the fields a test cares about and
fills the rest with what an ESP32 sensor board run on a real station looks like,
so a test reads as "a run of unit SN-1 that failed vdd_3v3" rather than forty
lines of constructor calls. Times are derived from one start time so that
durations are consistent (phase ends never precede phase starts).
"""

from __future__ import annotations

import datetime as dt
import hashlib
from collections.abc import Mapping, Sequence
from typing import Any

from sequencer.records import (
    Attachment,
    AttemptRecord,
    ErrorInfo,
    Limits,
    LogLine,
    MeasurementOutcome,
    MeasurementRecord,
    Outcome,
    PhaseRecord,
    RunRecord,
    run_outcome,
)

T0 = dt.datetime(2024, 5, 14, 8, 30, 0, tzinfo=dt.timezone.utc)

# 1x1 transparent PNG.
TINY_PNG = bytes.fromhex(
    "89504e470d0a1a0a0000000d4948445200000001000000010806000000"
    "1f15c4890000000d49444154789c6360000002000154a24f5d0000000049454e44ae426082"
)


def at(seconds: float, base: dt.datetime = T0) -> dt.datetime:
    return base + dt.timedelta(seconds=seconds)


def measurement(
    name: str,
    value: Any,
    *,
    outcome: MeasurementOutcome | None = None,
    units: str | None = None,
    low: float | None = None,
    high: float | None = None,
    marginal: tuple[float | None, float | None] | None = None,
    validators: Sequence[str] | None = None,
    description: str = "",
    dimensions: Sequence[tuple[str, str]] = (),
    reason: str | None = None,
) -> MeasurementRecord:
    """A judged measurement. With ``low``/``high`` the outcome and marginal flag are derived like ``in_range``."""
    limits = None
    mlow, mhigh = marginal if marginal is not None else (None, None)
    if low is not None or high is not None:
        limits = Limits(low, high, mlow, mhigh)
    if validators is None:
        validators = (_describe(limits),) if limits is not None else ()
    is_marginal = False
    if outcome is None:
        outcome, is_marginal, derived = _judge(value, limits)
        reason = reason if reason is not None else derived
    return MeasurementRecord(
        name=name,
        outcome=outcome,
        value=value,
        units=units,
        description=description,
        validators=tuple(validators),
        limits=limits,
        marginal=is_marginal,
        reason=reason,
        dimensions=tuple(dimensions),
    )


def _describe(limits: Limits) -> str:
    if limits.low is not None and limits.high is not None:
        text = f"{limits.low:g} <= x <= {limits.high:g}"
    elif limits.low is not None:
        text = f"x >= {limits.low:g}"
    else:
        text = f"x <= {limits.high:g}"
    if limits.marginal_low is not None or limits.marginal_high is not None:
        lo = "" if limits.marginal_low is None else f"{limits.marginal_low:g}"
        hi = "" if limits.marginal_high is None else f"{limits.marginal_high:g}"
        text += f" (marginal outside {lo}..{hi})"
    return text


def _judge(value: Any, limits: Limits | None) -> tuple[MeasurementOutcome, bool, str | None]:
    if value is None:
        return MeasurementOutcome.UNSET, False, "not set"
    if limits is None:
        return MeasurementOutcome.PASS, False, None
    ys = [p[1] for p in value] if isinstance(value, list) else [value]
    for y in ys:
        if limits.low is not None and y < limits.low:
            return MeasurementOutcome.FAIL, False, f"{y:g} is below {limits.low:g}"
        if limits.high is not None and y > limits.high:
            return MeasurementOutcome.FAIL, False, f"{y:g} is above {limits.high:g}"
    for y in ys:
        if limits.marginal_low is not None and y < limits.marginal_low:
            return MeasurementOutcome.PASS, True, f"{y:g} is below marginal {limits.marginal_low:g}"
        if limits.marginal_high is not None and y > limits.marginal_high:
            return MeasurementOutcome.PASS, True, f"{y:g} is above marginal {limits.marginal_high:g}"
    return MeasurementOutcome.PASS, False, None


def attempt(
    number: int = 1,
    outcome: Outcome = Outcome.PASS,
    *,
    start: float = 0.0,
    duration: float = 1.0,
    measurements: Sequence[MeasurementRecord] = (),
    reason: str | None = None,
    error: ErrorInfo | None = None,
    base: dt.datetime = T0,
) -> AttemptRecord:
    return AttemptRecord(
        number, outcome, at(start, base), at(start + duration, base), tuple(measurements), reason, error
    )


def phase(
    name: str,
    outcome: Outcome | None = None,
    *,
    start: float = 0.0,
    duration: float = 1.0,
    measurements: Sequence[MeasurementRecord] = (),
    attempts: Sequence[AttemptRecord] | None = None,
    reason: str | None = None,
    error: ErrorInfo | None = None,
    teardown: bool = False,
    resource_wait_s: float = 0.0,
    logs: Sequence[tuple[float, str, str] | tuple[float, str, str, str]] = (),
    attachments: Sequence[Attachment] = (),
    base: dt.datetime = T0,
) -> PhaseRecord:
    """A finished phase. Without ``attempts`` it gets one attempt holding ``measurements``.

    The outcome and reason default to what the engine would record: ERROR when
    ``error`` is given, FAIL when a measurement failed or was never set, else PASS. ``logs`` are ``(seconds after
    phase start, level, message)``, and the fixture's name after them for a line a fixture logged.
    """
    if outcome is None:
        outcome, derived = _judge_phase(measurements, error)
        reason = reason if reason is not None else derived
    if attempts is None:
        attempts = () if outcome is Outcome.SKIPPED else (
            attempt(1, outcome, start=start, duration=duration, measurements=measurements, reason=reason,
                    error=error, base=base),
        )
    return PhaseRecord(
        name=name,
        outcome=outcome,
        started_at=at(start, base),
        ended_at=at(start + duration, base),
        attempts=tuple(attempts),
        reason=reason,
        teardown=teardown,
        resource_wait_s=resource_wait_s,
        logs=log_lines(logs, at(start, base)),
        attachments=tuple(attachments),
    )


def log_lines(lines: Sequence[tuple[float, str, str] | tuple[float, str, str, str]],
              base: dt.datetime) -> tuple[LogLine, ...]:
    """``(seconds after base, level, message[, fixture])`` as log lines."""
    return tuple(LogLine(at(s, base), level, msg, *fixture) for s, level, msg, *fixture in lines)


def _judge_phase(
    measurements: Sequence[MeasurementRecord], error: ErrorInfo | None
) -> tuple[Outcome, str | None]:
    """The outcome and reason the engine gives an attempt (see ``sequencer.engine._judge``)."""
    if error is not None:
        return Outcome.ERROR, f"{error.type}: {error.message}"
    for m in measurements:
        if m.outcome is MeasurementOutcome.UNSET:
            return Outcome.FAIL, f"measurement {m.name!r} was never set"
        if m.outcome is MeasurementOutcome.FAIL:
            return Outcome.FAIL, f"measurement {m.name!r}: {m.reason}"
    return Outcome.PASS, None


def run(
    *,
    serial: str | None = "SN-0001",
    run_id: str | None = None,
    phases: Sequence[PhaseRecord] = (),
    outcome: Outcome | None | str = "auto",
    dut: Mapping[str, str] | None = None,
    slot: int = 0,
    port: str | None = None,
    started_at: dt.datetime = T0,
    duration: float | None = None,
    product: str = "esp32_sensor",
    product_version: str = "1.4.2",
    station: str = "line1-st03",
    operator: str = "alice",
    batch: str = "B2024-05-14",
    limits_file: str | None = "esp32_sensor.limits.toml",
    limits_sha256: str | None = "9f2c" * 16,
    product_sha256: str | None = "3c1e" * 16,
    sequencer_version: str = "0.1.0",
    logs: Sequence[tuple[float, str, str, str]] = (),
) -> RunRecord:
    """A run record. ``outcome="auto"`` derives it from the phases; ``None`` leaves the run open.

    ``logs``: what fixtures logged outside phases, ``(seconds after the start, level, message, fixture)``.
    """
    if dut is None:
        dut = {"serial": serial} if serial is not None else {}
    if outcome == "auto":
        outcome = run_outcome(tuple(phases))
    if duration is None:
        duration = max([1.0, *((p.ended_at - started_at).total_seconds() for p in phases)])
    return RunRecord(
        run_id=run_id or hashlib.sha1(f"{serial}|{slot}|{started_at.isoformat()}".encode()).hexdigest()[:32],
        product=product,
        station=station,
        slot=slot,
        port=port if port is not None else f"/dev/ttyUSB{slot}",
        started_at=started_at,
        product_version=product_version,
        operator=operator,
        batch=batch,
        dut=dict(dut),
        ended_at=None if outcome is None else started_at + dt.timedelta(seconds=duration),
        outcome=outcome,  # type: ignore[arg-type]
        phases=tuple(phases),
        limits_file=limits_file,
        limits_sha256=limits_sha256,
        product_sha256=product_sha256,
        sequencer_version=sequencer_version,
        logs=log_lines(logs, started_at),
    )


def sensor_run(
    serial: str = "SN-0001",
    *,
    vdd: float = 3.301,
    fail_rf: bool = False,
    crash: bool = False,
    slot: int = 0,
    started_at: dt.datetime = T0,
    dut_extra: Mapping[str, str] | None = None,
) -> RunRecord:
    """A full, realistic ESP32 sensor board run: identify, rails, flash with retry, RF sweep, teardown.

    ``vdd`` sets the 3V3 rail (3.2..3.4 V, marginal outside 3.25..3.35), ``fail_rf``
    pushes the RF sweep out of limits, ``crash`` makes the self-test raise.
    """
    b = started_at
    # Each board its own MAC, as on a line (the same MAC under two serials is an identity conflict).
    nic = hashlib.sha1(serial.encode()).digest()[:3]
    mac = "24:0a:c4:" + ":".join(f"{b:02x}" for b in nic)
    dut = {"serial": serial, "mac": mac, "chip": "ESP32-D0WD-V3", **(dut_extra or {})}
    rails = [
        measurement("vdd_3v3", vdd, units="V", low=3.2, high=3.4, marginal=(3.25, 3.35),
                    description="3V3 rail at the LDO output"),
        measurement("vdd_1v8", 1.797, units="V", low=1.71, high=1.89),
        measurement("idle_current", 41.2, units="mA", high=60.0),
    ]
    flash_fail = attempt(1, Outcome.FAIL, start=4, duration=6.0, reason="flash verify mismatch at 0x10000",
                         measurements=[measurement("flash_verified", False, outcome=MeasurementOutcome.FAIL,
                                                   validators=["== True"], reason="False != True")], base=b)
    flash_ok = attempt(2, Outcome.PASS, start=10.2, duration=5.8,
                       measurements=[measurement("flash_verified", True, validators=["== True"])], base=b)
    sweep = [[freq, -42.0 + 0.8 * i + (9.5 if fail_rf and i == 5 else 0.0)]
             for i, freq in enumerate(range(2412, 2473, 5))]
    rf = measurement("rssi_sweep", sweep, units="dBm", low=-60.0, high=-30.0,
                     dimensions=[("frequency", "MHz")], description="RSSI across the 2.4 GHz channels")
    selftest_error = ErrorInfo(
        "DutProtocolError", "self-test: no reply to 'selftest' within 2.0 s",
        'Traceback (most recent call last):\n  File "phases/selftest.py", line 41, in selftest\n'
        "    reply = await dut.command('selftest', timeout=2.0)\nDutProtocolError: no reply\n",
    ) if crash else None
    phases = [
        phase("identify", start=0, duration=1.5, base=b,
              measurements=[measurement("chip_id", "ESP32-D0WD-V3", validators=["one of ESP32-D0WD-V3, ESP32-D0WD"]),
                            measurement("mac", dut["mac"], validators=["matches ^[0-9a-f:]{17}$"])],
              logs=[(0.1, "info", "ROM bootloader answered on /dev/ttyUSB0 at 115200 baud"),
                    (1.2, "info", f"identified {serial}")]),
        phase("power_rails", start=1.5, duration=2.4, base=b, measurements=rails, resource_wait_s=0.85,
              logs=[(0.1, "info", "range 10 V, NPLC 1", "dmm"), (2.1, "info", "rails measured")]),
        phase("flash_firmware", Outcome.PASS, start=4, duration=12.0, base=b, attempts=[flash_fail, flash_ok],
              logs=[(0.5, "warning", "verify failed, retrying"), (11.0, "info", "firmware 2.7.1 written")],
              attachments=[Attachment("esptool.log", "text/plain",
                                      b"esptool.py v4.7\nChip is ESP32-D0WD-V3\nHash of data verified.\n"),
                           Attachment("label.png", "image/png", TINY_PNG),
                           Attachment("nvs.bin", "application/octet-stream", bytes(range(64)))]),
        phase("self_test", start=16, duration=2.0, base=b, error=selftest_error,
              measurements=[] if crash else [measurement("selftest_ok", True, validators=["== True"])]),
        phase("rf_sweep", Outcome.SKIPPED, start=18, duration=0.0, base=b,
              reason="dependency self_test did not pass") if crash else
        phase("rf_sweep", start=18, duration=6.5, base=b, measurements=[rf]),
        phase("power_off", start=24.5, duration=0.4, base=b, teardown=True),
    ]
    return run(serial=serial, phases=phases, dut=dut, slot=slot, started_at=b,
               logs=[(25.0, "info", "relays opened, port closed", "jig")])
