"""What a fixture logs: ``slot.log``, and where its lines go in the run's record.

A fixture is opened, used and closed by a run, so what it says is part of
that run's story as much as what the phases say: a relay that had to be
switched twice, a DMM that changed range, a port that closed with an error.
OpenHTF puts a plug's log lines in the test record; so does this, and says
which fixture spoke.

A fixture's factory is given a :class:`SlotInfo` whose ``log`` is a
:class:`FixtureLog`. Each line goes to the station log (structlog, the
slot, port and run bound, and the fixture and phase named) and, unless it
is ``debug``, to the run's record:

* while exactly one phase in progress uses the fixture, to that phase's
  log (in its record, durable with it, next to the phase's own lines);
* otherwise to the run's own ``logs``: while the fixture opens beside
  another phase that uses it, a reader task of its own between phases,
  closing after the last phase. These are written with the run's end.

``debug`` is for chatter (a protocol trace, the flasher's esptool lines):
the station log keeps it under ``--verbose``, the record does not. Both logs
are bounded as a phase's is (sequencer/context.py :class:`KeptLines`): past
the limit, one line says how many were dropped.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Mapping
from typing import Any

from sequencer.context import KeptLines, log_text
from sequencer.phase import Phase
from sequencer.records import LogLine, utcnow

#: The run's own fixture lines (outside any phase) a record keeps at most.
MAX_RUN_LOG_LINES = 1000


class FixtureLines:
    """Where the lines of one run's fixtures go: the phase in progress that uses the fixture, or the run.

    Holds the run's own bookkeeping (its phases in flight, their logs), never
    the run: a fixture keeps its logger, and a fixture that led back to its
    run would be a reference cycle that outlives the run.
    """

    def __init__(self, phases: Iterable[Phase], in_flight: Mapping[str, Any],
                 partial: Mapping[str, Any]) -> None:
        self._phases = tuple(phases)
        self._in_flight = in_flight
        self._partial = partial
        #: each phase's fixtures and built-ins, by phase name; worked out at the first line
        self._needs: dict[str, frozenset[str]] | None = None
        #: the lines kept outside any phase: the record's ``logs``
        self.outside = KeptLines(MAX_RUN_LOG_LINES, "the fixtures' log outside phases")

    def phase_using(self, fixture: str) -> str | None:
        """The one phase in progress that uses ``fixture``, or None (none, or several: which spoke is unknown)."""
        if self._needs is None:
            self._needs = {p.name: p.needs for p in self._phases}
        using = None
        for name in tuple(self._in_flight):  # a copy: a fixture may log from a worker thread
            if fixture in self._needs.get(name, ()) and name in self._partial:
                if using is not None:
                    return None
                using = name
        return using

    def keep(self, phase: str | None, line: LogLine) -> None:
        kept = self._partial.get(phase) if phase is not None else None
        (kept.log if kept is not None else self.outside).keep(line)  # the engine's _PhaseRun


class FixtureLog:
    """``slot.log`` as a fixture's factory gets it: lines for the station log and the run's record.

    ``slot.log.info("relay closed", channel=3)``: fields as structlog takes
    them; the record keeps ``relay closed channel=3`` (values by ``repr``,
    so a :class:`~fixtures.device_config.Secret` is ``***`` in both logs).
    """

    def __init__(self, fixture: str, logger: Any, lines: FixtureLines) -> None:
        self.fixture = fixture
        self._logger = logger
        self._lines = lines

    @property
    def station(self) -> Any:
        """A logger for the station log alone (structlog's, naming the fixture): a traceback, a dump.

        For what would bury the record, whose reader already has the one line that matters.
        """
        return self._logger.bind(fixture=self.fixture) if self._logger is not None else None

    def _log(self, level: str, message: Any, fields: dict[str, Any], exc_info: bool = False) -> None:
        phase = self._lines.phase_using(self.fixture)
        if level != "debug":
            self._lines.keep(phase, LogLine(utcnow(), level, log_text(message, fields), fixture=self.fixture))
        if self._logger is not None:
            named = {"fixture": self.fixture, "phase": phase} if phase is not None else {"fixture": self.fixture}
            if exc_info:
                named["exc_info"] = True
            getattr(self._logger, level)(message, **{**named, **fields})

    def debug(self, message: Any, **fields: Any) -> None:
        self._log("debug", message, fields)

    def info(self, message: Any, **fields: Any) -> None:
        self._log("info", message, fields)

    def warning(self, message: Any, **fields: Any) -> None:
        self._log("warning", message, fields)

    def error(self, message: Any, **fields: Any) -> None:
        self._log("error", message, fields)

    def exception(self, message: Any, **fields: Any) -> None:
        """An error line naming the exception being handled; the station log also gets its traceback."""
        exc = sys.exc_info()[1]
        if exc is None:
            self._log("error", message, fields)
        else:
            self._log("error", message, {**fields, "error": f"{type(exc).__name__}: {exc}"}, exc_info=True)
