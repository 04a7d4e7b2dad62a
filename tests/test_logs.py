"""The station log: JSON lines in a file, and a full disk under it never stops testing."""

from __future__ import annotations

import json
from pathlib import Path

import structlog

from sequencer.logs import configure_logging


def test_station_log_lines_are_json_with_what_was_bound(tmp_path: Path) -> None:
    handle = configure_logging(tmp_path / "station.log")
    assert handle is not None
    structlog.get_logger("t").bind(slot=3, port="/dev/ttyUSB3").info("run started", product="p")
    handle.close()
    [line] = (tmp_path / "station.log").read_text().splitlines()
    entry = json.loads(line)
    assert entry["event"] == "run started" and entry["slot"] == 3 and entry["port"] == "/dev/ttyUSB3"
    assert entry["level"] == "info" and entry["timestamp"].endswith("Z")
    assert handle.dropped == 0


def test_a_log_file_that_cannot_be_written_drops_lines_and_counts_them() -> None:
    # /dev/full answers every write with ENOSPC, as a full disk does.
    handle = configure_logging(Path("/dev/full"))
    assert handle is not None
    log = structlog.get_logger("t")
    for n in range(3):
        log.info("phase finished", n=n)  # must not raise: the store, not the log, is the record
    handle.close()
    assert handle.dropped >= 3
