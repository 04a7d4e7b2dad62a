"""What a phase sees of its run: the ``ctx`` parameter.

``ctx`` is the phase author's whole API to the engine::

    ctx.measurements.vdd_3v3 = 3.31          # judged when the attempt ends
    ctx.log.info("rails read", count=3)        # kept in the phase record
    ctx.attach("console.txt", transcript)      # kept in the record and the report
    ctx.identify(serial="SN0042", mac="...")   # DUT identity, in the record
    ctx.progress(0.4, "flashing app")          # live display only
    ctx.record.phase("flash").outcome          # the run so far (read-only)
    ctx.no_retry("board too old for the build")  # this attempt's outcome is final
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import structlog

from sequencer.events import EventBus, MeasurementTaken, PhaseProgress
from sequencer.measurements import Measurement, Series
from sequencer.phase import Phase
from sequencer.records import Attachment, LogLine, MeasurementRecord, RunRecord, utcnow

#: A phase that logs without bound would grow its record without bound.
MAX_LOG_LINES_PER_PHASE = 2000
MAX_LOG_LINE_CHARS = 4000


class UndeclaredMeasurement(AttributeError):
    """A phase set a measurement it did not declare."""


class Measurements:
    """Attribute- and item-style access to one attempt's measurement values."""

    def __init__(self, phase: Phase, on_set: Callable[[str, Any], MeasurementRecord | None]) -> None:
        object.__setattr__(self, "_phase", phase)
        object.__setattr__(self, "_values", {})
        object.__setattr__(self, "_judged", {})
        object.__setattr__(self, "_on_set", on_set)

    def __setattr__(self, name: str, value: Any) -> None:
        self[name] = value

    def __setitem__(self, name: str, value: Any) -> None:
        phase: Phase = self._phase
        declared = phase.measurement(name)
        if declared is None:
            names = ", ".join(m.name for m in phase.measurements) or "none"
            raise UndeclaredMeasurement(
                f"phase {phase.name!r}: measurement {name!r} is not declared (declared: {names})"
            )
        if declared.dimensions:
            # Checked here, in the phase: a malformed series is the phase's error, and it can grow point by point.
            series = Series(declared)
            for point in declared.points(value):
                series[tuple(point[:-1])] = point[-1]
            value = series
        self._values[name] = value
        judged = self._on_set(name, value)
        if judged is None:
            self._judged.pop(name, None)
        else:
            self._judged[name] = judged

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"measurement {name!r} has not been set") from None

    def __getitem__(self, name: str) -> Any:
        """The value set; a dimensioned measurement's :class:`~sequencer.measurements.Series`, to add points to."""
        try:
            return self._values[name]
        except KeyError:
            declared = self._phase.measurement(name)
            if declared is None or not declared.dimensions:
                raise
            series = self._values[name] = Series(declared)
            return series

    def __contains__(self, name: object) -> bool:
        return name in self._values

    @property
    def values(self) -> Mapping[str, Any]:
        return dict(self._values)

    def record(self, declared: Measurement) -> MeasurementRecord:
        """``declared`` judged as the attempt left it (unset if it was never set)."""
        if declared.name not in self._values:
            return declared.unset()
        value = self._values[declared.name]
        if isinstance(value, Series):  # points may have come since it was set: judged as it is now
            return declared.judge(value.points)
        judged = self._judged.get(declared.name)
        return judged if judged is not None else declared.judge(value)

    def unjudged(self, declared: Measurement, reason: str) -> MeasurementRecord:
        """``declared`` as the attempt left it, not judged (its phase asked to skip or repeat)."""
        value = self._values.get(declared.name)
        return declared.unjudged(value.points if isinstance(value, Series) else value, reason)


def log_text(message: Any, fields: Mapping[str, Any]) -> str:
    """A log call as a record keeps it: the message, then ``key=repr(value)`` per field, cut at MAX_LOG_LINE_CHARS.

    ``repr``, so a :class:`~fixtures.device_config.Secret` shows as ``***``.
    """
    text = str(message)
    if fields:
        text += " " + " ".join(f"{k}={v!r}" for k, v in fields.items())
    return text[:MAX_LOG_LINE_CHARS]


class KeptLines:
    """The log lines a record keeps: the first ``limit``, then one last line saying how many more were dropped.

    Why a limit: a phase or a fixture that logs in a loop would otherwise
    grow the record, the store and every report without bound. The station
    log still gets every line.
    """

    #: a record keeps at most this many lines of one log
    limit = MAX_LOG_LINES_PER_PHASE
    #: whose lines, for the dropped-lines line: "a phase's log", "the fixtures' log outside phases"
    what = "a phase's log"

    def __init__(self, limit: int | None = None, what: str | None = None) -> None:
        self.lines: list[LogLine] = []
        self.dropped = 0
        if limit is not None:
            self.limit = limit
        if what is not None:
            self.what = what

    def keep(self, line: LogLine) -> None:
        if len(self.lines) < self.limit:
            self.lines.append(line)
            return
        self.dropped += 1
        marker = LogLine(line.timestamp, "warning",
                         f"{self.dropped} more log line{'s' if self.dropped > 1 else ''} dropped: the record keeps "
                         f"the first {self.limit} of {self.what} (the station log has them all)")
        if self.dropped == 1:
            self.lines.append(marker)
        else:
            self.lines[-1] = marker


class PhaseLog(KeptLines):
    """A logger that keeps lines in the phase record and sends them to the station log."""

    def __init__(self, logger: Any, **context: Any) -> None:
        # Bound on the first line: most phases log nothing, and binding a
        # structlog logger per phase was a measurable part of a phase's cost.
        # KeptLines.__init__ is not called for the same reason: these two are all it sets.
        self._unbound: tuple[Any, dict[str, Any]] | None = (logger, context) if logger is not None else None
        self._logger: Any = None
        self.lines = []
        self.dropped = 0

    def _log(self, level: str, message: str, fields: dict[str, Any]) -> None:
        self.keep(LogLine(utcnow(), level, log_text(message, fields)))
        if self._unbound is not None:
            logger, context = self._unbound
            self._logger, self._unbound = logger.bind(**context), None
        if self._logger is not None:
            getattr(self._logger, level)(message, **fields)

    def debug(self, message: str, **fields: Any) -> None:
        self._log("debug", message, fields)

    def info(self, message: str, **fields: Any) -> None:
        self._log("info", message, fields)

    def warning(self, message: str, **fields: Any) -> None:
        self._log("warning", message, fields)

    def error(self, message: str, **fields: Any) -> None:
        self._log("error", message, fields)


class PhaseContext:
    """The ``ctx`` of one phase attempt."""

    def __init__(
        self,
        *,
        phase: Phase,
        attempt: int,
        run_id: str,
        slot: int,
        bus: EventBus,
        log: PhaseLog,
        attachments: list[Attachment],
        snapshot: Callable[[], RunRecord],
        identify: Callable[[dict[str, str]], None],
    ) -> None:
        self.phase = phase
        self.attempt = attempt
        self.log = log
        self._run_id = run_id
        self._slot = slot
        self._bus = bus
        self._attachments = attachments
        self._snapshot = snapshot
        self._identify = identify
        # Not a method of this context: ctx -> measurements -> ctx would be a
        # reference cycle, and through the run's snapshot and identify a
        # finished run's fixtures and records would wait for the cyclic
        # collector instead of being freed when the attempt ends.
        self.measurements = Measurements(phase, _live_judge(phase, bus, run_id, slot))
        #: why a retry cannot change how this attempt ends, if the phase said so
        self.no_retry_reason: str | None = None

    def measure(self, name: str, value: Any) -> None:
        self.measurements[name] = value

    def attach(self, name: str, data: bytes | str, mimetype: str = "text/plain") -> None:
        """Keep a file with the phase record (a console transcript, a plot, a label)."""
        payload = data.encode("utf-8") if isinstance(data, str) else bytes(data)
        self._attachments.append(Attachment(name, mimetype, payload))

    def identify(self, **fields: Any) -> None:
        """Add to the DUT's identity (serial, mac, imei, ...); values are kept as text."""
        self._identify({k: str(v) for k, v in fields.items() if v is not None})

    @property
    def dut(self) -> Mapping[str, str]:
        return self._snapshot().dut

    @property
    def record(self) -> RunRecord:
        """The run so far: phases finished before this one, and the identity known now."""
        return self._snapshot()

    def no_retry(self, reason: str) -> None:
        """Say that retrying cannot change how this attempt ends; the engine then does not retry it.

        For failures that are facts about the unit or the station, not
        chance: a board whose chip is older than the build needs, a port
        that is gone. Retrying those only repeats the work (re-flashing
        every image) and then reports the same failure -- or a misleading
        one. The phase's log says why it was not retried.
        """
        self.no_retry_reason = str(reason)

    def progress(self, fraction: float, detail: str = "") -> None:
        self._bus.publish(
            PhaseProgress(self._run_id, self._slot, self.phase.name, max(0.0, min(1.0, fraction)), detail)
        )


def _live_judge(phase: Phase, bus: EventBus, run_id: str, slot: int) -> Callable[[str, Any], MeasurementRecord | None]:
    """Judges a value as it is set, for someone watching live; the record reuses the judgement."""

    def judge(name: str, value: Any) -> MeasurementRecord | None:
        if not bus.has_subscribers:
            return None
        declared = phase.measurement(name)
        assert declared is not None
        judged = declared.judge(value)
        bus.publish(MeasurementTaken(run_id, slot, phase.name, judged))
        return judged

    return judge


def bind_logger(**context: Any) -> Any:
    return structlog.get_logger("sequencer").bind(**context)
