"""The station as an operator runs it: a real `sequencer` process, real signals, real store."""

from __future__ import annotations

import contextlib
import os
import re
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from reports.storage.store import LocalStore
from sequencer.records import Outcome

ROOT = Path(__file__).resolve().parent.parent
SLOW = ROOT / "tests" / "products" / "slow_widget.py"


def sequencer(*args: str, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "sequencer.cli", *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT, **kwargs,
    )


def wait_for(predicate, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError("condition not met in time")


def soaking_runs(store_path: Path) -> int:
    if not store_path.exists():
        return 0
    store = LocalStore.open(store_path)
    try:
        return sum(1 for r in store.find_runs() if r.phase("identify") is not None)
    finally:
        store.close()


def reopened(store_path: Path, batch: str) -> tuple[list, int]:
    """Open the store as the next station start would: the batch's runs, and how many were found open."""
    store = LocalStore.open(store_path, station=True)
    try:
        return store.find_runs(batch=batch), store.interrupted_on_open
    finally:
        store.close()


def start_station(tmp_path: Path, slots: int, batch: str, *, own_group: bool = False) -> tuple[subprocess.Popen, Path]:
    """Start `sequencer run` on the slow product and return once every slot is soaking.

    ``own_group``: in a process group of its own, as a terminal's foreground job, so a test can signal the
    whole group as a terminal's Ctrl-C does (``os.killpg``).
    """
    store_path = tmp_path / "store.sqlite"
    proc = sequencer("run", str(SLOW), "--sim", str(slots), "--store", str(store_path),
                     "--reports", str(tmp_path / "reports"), "--plain", "--batch", batch, start_new_session=own_group)
    try:
        wait_for(lambda: soaking_runs(store_path) == slots)
    except BaseException:
        proc.kill()
        raise
    return proc, store_path


@pytest.mark.slow
def test_ctrl_c_aborts_16_slots_runs_teardowns_and_records_everything(tmp_path: Path) -> None:
    proc, store_path = start_station(tmp_path, 16, "ABORT-TEST")
    try:
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert "aborted by the operator; 16 unfinished run(s) recorded ABORTED" in out
    runs, left_open = reopened(store_path, "ABORT-TEST")
    assert len(runs) == 16 and left_open == 0
    for r in runs:
        assert r.outcome is Outcome.ABORTED
        assert r.phase("identify").outcome is Outcome.PASS
        assert r.phase("soak").outcome is Outcome.ABORTED
        assert r.phase("final_check").outcome is Outcome.SKIPPED
        teardown = r.phase("power_off")
        assert teardown.outcome is Outcome.PASS and teardown.logs[-1].message == "powered off"
    assert (tmp_path / "reports" / "ABORT-TEST" / "index.html").exists()


@pytest.mark.slow
def test_second_ctrl_c_skips_teardowns_but_keeps_records(tmp_path: Path) -> None:
    proc, store_path = start_station(tmp_path, 4, "TWICE")
    try:
        proc.send_signal(signal.SIGINT)
        time.sleep(0.05)  # teardowns take 0.2 s: the second signal lands inside them
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    runs, left_open = reopened(store_path, "TWICE")
    assert len(runs) == 4 and left_open == 0
    assert all(r.outcome is Outcome.ABORTED for r in runs)
    assert all(r.phase("power_off").outcome in (Outcome.ABORTED, Outcome.SKIPPED) for r in runs)


def outcomes_in(store_path: Path) -> list[str | None]:
    """The runs' outcomes as the store's database has them now (read-only: the station may be writing)."""
    import sqlite3

    try:
        conn = sqlite3.connect(f"file:{store_path}?mode=ro", uri=True, timeout=5)
    except sqlite3.Error:
        return []
    try:
        return [row[0] for row in conn.execute("SELECT outcome FROM runs ORDER BY slot")]
    except sqlite3.Error:
        return []
    finally:
        conn.close()


def assert_ended_as_aborted(proc: subprocess.Popen, out: str, err: str, tmp_path: Path, slots: int,
                            batch: str) -> None:
    """What must follow any number of stop signals: exit 130, the summary, the report, every run ABORTED."""
    assert proc.returncode == 130, out + err
    assert "Traceback" not in err, err
    assert f"0/{slots} passed.  Report: " in out, out
    assert f"aborted by the operator; {slots} unfinished run(s) recorded ABORTED" in out, out
    assert (tmp_path / "reports" / batch / "index.html").exists()
    runs, left_open = reopened(tmp_path / "store.sqlite", batch)
    assert len(runs) == slots and left_open == 0
    assert all(r.outcome is Outcome.ABORTED for r in runs)
    assert len(list((tmp_path / "reports" / batch).glob("*.html"))) == slots + 1  # each run's page and the batch's


@pytest.mark.slow
def test_a_second_ctrl_c_after_the_slots_have_stopped_still_gives_the_summary_the_report_and_130(
    tmp_path: Path,
) -> None:
    # In a terminal both Ctrl-Cs go to the whole process group, whatever the
    # station is doing: here the second comes once every run is recorded
    # ABORTED, while the records are flushed and the report is written.
    proc, store_path = start_station(tmp_path, 4, "LATE", own_group=True)
    try:
        os.killpg(proc.pid, signal.SIGINT)
        wait_for(lambda: outcomes_in(store_path) == ["ABORTED"] * 4, timeout=30)
        os.killpg(proc.pid, signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert_ended_as_aborted(proc, out, err, tmp_path, 4, "LATE")
    for r in reopened(store_path, "LATE")[0]:
        assert r.phase("power_off").outcome is Outcome.PASS  # the second came after the teardowns: none cut


@pytest.mark.slow
def test_stop_signals_sent_over_and_over_only_stop_testing(tmp_path: Path) -> None:
    # An operator leaning on Ctrl-C, a closed terminal, a service manager's
    # SIGTERM, all at once and until the station exits: every moment of the
    # abort, the flush and the report writing gets a signal. They may skip
    # teardowns; they never cost the summary, the report or exit status 130.
    proc, store_path = start_station(tmp_path, 4, "HAMMER", own_group=True)
    sent = 0
    try:
        while proc.poll() is None and sent < 3000:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, (signal.SIGINT, signal.SIGINT, signal.SIGTERM, signal.SIGHUP)[sent % 4])
            sent += 1
            time.sleep(0.005)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert_ended_as_aborted(proc, out, err, tmp_path, 4, "HAMMER")
    assert sent > 10  # signals came all the way through, not only at the start
    for r in reopened(store_path, "HAMMER")[0]:
        assert r.phase("power_off").outcome in (Outcome.PASS, Outcome.ABORTED, Outcome.SKIPPED)


@pytest.mark.slow
def test_a_terminal_that_goes_away_aborts_cleanly_and_keeps_records_and_reports(tmp_path: Path) -> None:
    # The operator closes the window (or the SSH session drops): the station
    # gets SIGHUP and its output has no reader any more. It must abort as for
    # Ctrl-C (teardowns run, runs recorded), not die with its DUTs powered, and
    # failing to print must cost neither records nor reports.
    proc, store_path = start_station(tmp_path, 4, "HUNGUP")
    try:
        proc.stdout.close()
        proc.send_signal(signal.SIGHUP)
        proc.wait(timeout=30)
        err = proc.stderr.read()
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    runs, left_open = reopened(store_path, "HUNGUP")
    assert len(runs) == 4 and left_open == 0  # every run was closed, none left open
    for r in runs:
        assert r.outcome is Outcome.ABORTED
        assert r.phase("power_off").outcome is Outcome.PASS
    assert (tmp_path / "reports" / "HUNGUP" / "index.html").exists()


def test_a_reader_that_stops_reading_ends_runs_quietly(tmp_path: Path) -> None:
    # `sequencer runs --json | head -1`: no traceback, and the exit status of
    # a process whose reader went away (141), not "a DUT did not pass".
    from reports.storage.store import _Write
    from tests import records_factory

    store_path = tmp_path / "store.sqlite"
    store = LocalStore.open(store_path)
    r = records_factory.run()
    store._write_batch([_Write.begin(r), _Write.finish(r)])
    store.close()
    for args in (["runs", "--json"], ["runs"], ["find", "--local", "--serial", r.serial]):
        proc = sequencer(*args, "--store", str(store_path))
        proc.stdout.close()
        assert proc.wait(timeout=30) == 141
        assert proc.stderr.read() == ""


def test_a_station_started_after_a_crash_copies_the_journal_and_says_what_it_could_not_restore(tmp_path: Path) -> None:
    from reports.storage.store import _Write
    from tests import records_factory

    store_path = tmp_path / "store.sqlite"
    LocalStore.open(store_path).close()
    crashed = records_factory.run(outcome=None, batch="CRASHED")
    boot = records_factory.phase("boot")
    journal = [_Write.begin(crashed).line(),
               _Write.phase(crashed.run_id, 0, boot, dict(crashed.dut)).line(), b"P\tgarbage\n"]
    (tmp_path / "store.sqlite.journal-000001").write_bytes(b"".join(journal))
    proc = sequencer("run", str(ROOT / "products" / "esp32_sensor.py"), "--sim", "1", "--store", str(store_path),
                     "--plain", "--batch", "NEXT")
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, out + err
    assert "1 run(s) left open by a previous station were marked INTERRUPTED" in out
    assert f"1 line(s) of {store_path}'s journal could not be restored" in out
    [run], _ = reopened(store_path, "CRASHED")
    assert run.outcome is Outcome.INTERRUPTED
    assert [p.name for p in run.phases] == [boot.name]
    assert not list(tmp_path.glob("store.sqlite.journal-*"))


@pytest.mark.slow
def test_sigkill_mid_run_then_reopen_marks_interrupted_and_keeps_finished_phases(tmp_path: Path) -> None:
    proc, store_path = start_station(tmp_path, 8, "KILLED")
    try:
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=10)
    finally:
        proc.kill()
    runs, left_open = reopened(store_path, "KILLED")
    assert left_open == 8
    assert len(runs) == 8
    for r in runs:
        assert r.outcome is Outcome.INTERRUPTED
        assert r.phase("identify").outcome is Outcome.PASS
        assert r.serial == f"SLOW{r.slot:04d}"


@pytest.fixture(scope="module")
def full_disk(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A station run until its disk filled, then the reading commands on that disk (tests/full_disk.py)."""
    from tests.full_disk import on_a_full_disk

    return on_a_full_disk(tmp_path_factory.mktemp("full-disk"))


@pytest.mark.slow
def test_reading_commands_work_while_the_disk_is_full(full_disk: dict) -> None:
    station = full_disk["station"]
    assert station["code"] == 2, station["out"] + station["err"]
    assert "write failed" in station["err"]  # the disk filled up under the station
    assert "filler" in full_disk["files"]  # and the commands below ran with no room left at all
    for command in ("runs", "runs_json", "report", "export", "find"):
        seen = full_disk[command]
        assert seen["code"] == 0, (command, seen["err"])
        assert "cannot" not in seen["err"] and "Traceback" not in seen["err"], (command, seen["err"])
    runs = [line for line in full_disk["runs_json"]["out"].splitlines() if line]
    assert len(runs) == len(full_disk["store"])  # every run the store has, as far as its database has it
    assert f"{len(runs)} run(s): " in full_disk["runs"]["out"]
    assert full_disk["report"]["out"].strip().endswith("batch.html")
    assert full_disk["export"]["out"].strip().endswith("runs.csv")
    assert "device SN" in full_disk["find"]["out"]
    # The dead station's journal is left for the next station start, and the reader says so.
    assert "stopped without closing its runs" in full_disk["runs"]["err"]
    assert "record(s) in its journal are not shown" in full_disk["runs"]["err"]


def summary_outcomes(out: str) -> dict[int, str]:
    """Each slot's outcome as the summary table printed it (the first word of its result)."""
    rows = re.findall(r"^│ (\d+)\s+│[^│]*│[^│]*│ ([A-Z]+)\b[^│]*│", out, flags=re.MULTILINE)
    return {int(slot): outcome for slot, outcome in rows}


@pytest.mark.slow
def test_after_a_full_disk_the_summary_says_what_the_store_says(full_disk: dict) -> None:
    printed = summary_outcomes(full_disk["station"]["out"])
    stored = {r["slot"]: r["outcome"] for r in full_disk["store"]}
    assert "INTERRUPTED" in stored.values()  # runs the full disk cut short
    assert printed == stored, full_disk["station"]["out"]


def as_an_operator() -> None:
    """In the child: write permissions count, as for an operator's account (root would write anyway)."""
    import ctypes

    if os.geteuid() == 0:
        libc = ctypes.CDLL(None, use_errno=True)
        for capability in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, out of the bounding set
            if libc.prctl(24, capability, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
                raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


@pytest.mark.parametrize("where", ["folder", "inside"])
def test_a_reports_folder_that_cannot_be_written_is_refused_before_any_unit_is_tested(
    tmp_path: Path, where: str
) -> None:
    reports = tmp_path / "reports"
    reports.mkdir()
    if where == "inside":  # the batch's folder is there already, and read-only
        (reports / "RO").mkdir()
        (reports / "RO").chmod(0o555)
    else:
        reports.chmod(0o555)
    store_path = tmp_path / "store.sqlite"
    proc = sequencer("run", str(SLOW), "--sim", "2", "--store", str(store_path), "--reports", str(reports),
                     "--plain", "--batch", "RO", preexec_fn=as_an_operator)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 2, out + err
    [line] = err.strip().splitlines()
    assert line.startswith(f"sequencer: error: {reports}: the HTML reports cannot be written there: "), line
    assert "Permission denied" in line
    assert not store_path.exists()  # refused before the store was opened: no unit tested, no run recorded
    assert [p.name for p in reports.rglob("*")] == (["RO"] if where == "inside" else [])


def test_a_store_that_cannot_be_written_stops_the_station_with_one_line_and_keeps_what_was_committed(
    tmp_path: Path,
) -> None:
    # The station's disk fills up mid-batch. Here every file the station
    # writes is capped (RLIMIT_FSIZE), so SQLite's writes start failing for
    # real after a few commits; so would the station log's, if it grew.
    def cap_file_size() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the cap fails (EFBIG) instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (300_000, 300_000))

    store_path = tmp_path / "store.sqlite"
    proc = sequencer("run", str(ROOT / "products" / "esp32_sensor.py"), "--sim", "4", "--store", str(store_path),
                     "--plain", "--batch", "FULL", preexec_fn=cap_file_size)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 2, out + err
    [line] = err.strip().splitlines()  # no traceback, no noise from half-closed fixtures
    assert line.startswith(f"sequencer: error: {store_path}: write failed: "), line
    assert "testing stopped on every slot" in line
    assert not (tmp_path / "reports").exists()  # no report of runs the store does not hold in full

    # A full disk refuses some writes and not others (a write into space the
    # WAL already has succeeds), so after the first refusal a run may still
    # have been closed, ERROR, or a phase the stop skipped still recorded; and
    # on a busy machine a run may have finished, and been journalled, before
    # the disk filled. What must hold: nothing was lost or made up.
    runs, _ = reopened(store_path, "FULL")
    assert len(runs) == 4
    assert all(r.outcome in (Outcome.INTERRUPTED, Outcome.ERROR, Outcome.PASS) for r in runs), [r.outcome for r in runs]
    assert any(r.outcome is not Outcome.PASS for r in runs)  # the slot the store refused, at least
    phases_per_run = max(len(r.phases) for r in runs)
    assert all(len(r.phases) == phases_per_run for r in runs if r.outcome is Outcome.PASS)  # whole, if PASS
    committed = [p for r in runs for p in r.phases]
    assert any(p.outcome is Outcome.PASS for p in committed), "the phases committed before the disk filled are kept"
    # each one either finished before the disk filled, or says it is a consequence of it
    assert all(p.outcome is Outcome.PASS or "records cannot be written" in (p.reason or "") for p in committed), [
        (p.name, p.outcome, p.reason) for p in committed
    ]
