"""Station logging: structlog, one JSON object per line, bound per slot.

The terminal belongs to the live display, so the station log goes to a file
beside the store (``station.log``), one JSON line per event with the slot,
port, run id, serial and phase bound by the engine. ``--verbose`` also prints
readable lines to stderr.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any, TextIO

import structlog


class LogFile:
    """The station log file: a line that cannot be written is counted and dropped, never raised.

    Why: the log is for diagnosis, the store is the record. A full disk or
    a pulled USB stick under ``station.log`` must not turn every log call
    in every slot into an exception that stops testing; the store reports
    its own failures, and the CLI says how many log lines were lost.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.dropped = 0
        self._file: TextIO = open(path, "a", encoding="utf-8")  # noqa: SIM115 - closed by close()

    def write(self, text: str) -> None:
        try:
            self._file.write(text)
        except OSError:
            self.dropped += 1

    def flush(self) -> None:
        try:
            self._file.flush()
        except OSError:
            self.dropped += 1  # the lines buffered since the last flush; counted as one

    def close(self) -> None:
        try:
            self._file.close()
        except OSError:
            self.dropped += 1


class _Tee:
    def __init__(self, *streams: Any) -> None:
        self._streams = streams

    def write(self, text: str) -> None:
        for s in self._streams:
            s.write(text)

    def flush(self) -> None:
        for s in self._streams:
            s.flush()


def configure_logging(log_file: Path | None, *, verbose: bool = False) -> LogFile | None:
    """Send structlog output to ``log_file`` (JSON lines) and, if verbose, stderr.

    Returns the opened file so the caller can close it at exit (and ask it
    how many lines it could not write).
    """
    processors: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.format_exc_info,
    ]
    handle: LogFile | None = None
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        handle = LogFile(log_file)
    if handle is not None and verbose:
        # JSON to the file, readable text to stderr: render JSON and let
        # stderr read the same line; simple and honest beats two pipelines.
        stream: Any = _Tee(handle, sys.stderr)
    elif handle is not None:
        stream = handle
    else:
        stream = sys.stderr if verbose else None
    if stream is None:
        structlog.configure(
            processors=processors + [structlog.processors.JSONRenderer()],
            wrapper_class=structlog.make_filtering_bound_logger(logging.CRITICAL),
            logger_factory=structlog.ReturnLoggerFactory(),
            cache_logger_on_first_use=False,
        )
        return None
    structlog.configure(
        processors=processors + [structlog.processors.JSONRenderer()],
        wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG if verbose else logging.INFO),
        logger_factory=structlog.WriteLoggerFactory(file=stream),
        cache_logger_on_first_use=False,
    )
    return handle
