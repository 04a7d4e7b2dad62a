#!/usr/bin/env python3
"""Fault drills: a simulated station killed, stopped twice and cut off from MongoDB, then counted.

Issue 16's drills, re-runnable. Each drill runs the real command an operator
runs, ``sequencer run products/<product>.py --sim N --rounds R --plain --mongo
URI``, in a child process with its own data directory (``XDG_DATA_HOME``,
``--store``, ``--reports``), shipping to a real mongod this script starts
(``reports/storage/mongod.py``). Every moment is drawn from ``--seed``, so a
drill that finds something can be run again as it was.

- ``sigkill``: SIGKILL the station at a random moment after its first run
  began; wait for its shipper child to notice and exit; start the station
  again (one round), which must mark the killed runs INTERRUPTED and ship them.
- ``ctrl-c``: SIGINT to the station's process group (a terminal's Ctrl-C), and
  a second one soon after, or once every slot has finished aborting, or late:
  the summary, the batch's HTML report (and each run's page) and exit status
  130 must always follow, and MongoDB must already hold every run as the
  store has it, unless the station said it left a backlog.
- ``mongod``: kill mongod (SIGKILL, as a crashed host) at a random moment of a
  session, keep it down for a random while, and start it again; testing goes
  on, and everything ships once it is back.

After each drill (and ``sequencer sync``), :func:`count` compares the store
with MongoDB: runs *lost* (in one and not the other), *duplicated* (a run
listed twice by a device, or one test recorded under two run ids), *stale*
(open: outcome null in either, a device still RUNNING, a journal not
replayed), MongoDB documents *behind* the store (an older change) or
*ahead* of it (a change the store no longer has), and devices that disagree
with their runs. Each kind of drill keeps one station (store and database)
through its repetitions, as a station on a line would be. Exit status 1 if
anything is lost, duplicated, stale, out of step, or a drill's own check
failed (no summary, no report, wrong exit status, a process left behind).

Usage::

    python tools/drills.py                         # 3 of each drill, --sim 8: a few minutes
    python tools/drills.py --each 10 --sim 16      # more
    python tools/drills.py --sigkill 20 --ctrl-c 0 --mongod 0 --seed 7
    python tools/drills.py --write                 # ... and rewrite docs/drills.md's section
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import os
import random
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import attrs
import pymongo

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fixtures.station import STATION_FIXTURES  # noqa: E402
from reports.storage.mongo_cli import device_from_runs  # noqa: E402
from reports.storage.mongod import Mongod, MongodError  # noqa: E402
from reports.storage.shipper import shipper_pids  # noqa: E402
from reports.storage.store import LocalStore  # noqa: E402
from sequencer.product import load_product  # noqa: E402
from tools.bench._common import replace_doc_section  # noqa: E402

DOC = ROOT / "docs" / "drills.md"
BEGIN = "<!-- drills.py: begin -->"
END = "<!-- drills.py: end -->"
#: A station that has not ended this long after it should have is hung: a finding, then killed.
EXIT_TIMEOUT_S = 180.0
#: What the terminal prints per finished run with --plain: ``slot 3 /dev/pts/7 SN696100003: PASS``.
RUN_LINE = re.compile(r"^slot (\d+) (\S+) (\S+): ([A-Z]+)(?: \(marginal\))?$", re.MULTILINE)


# -- counting ----------------------------------------------------------------------


@attrs.frozen
class Tally:
    """Store against MongoDB at one moment: the run ids in each kind of trouble."""

    runs: int  # in the store
    shipped: int  # documents in MongoDB's runs
    not_shipped: tuple[str, ...] = ()  # in the store, not in MongoDB
    not_stored: tuple[str, ...] = ()  # in MongoDB, not in the store
    duplicated: tuple[str, ...] = ()
    stale: tuple[str, ...] = ()  # open in the store or MongoDB, or its device says RUNNING
    behind: tuple[str, ...] = ()  # MongoDB has an older change of the run than the store
    ahead: tuple[str, ...] = ()  # MongoDB has a change the store does not (a store rolled back)
    devices_off: tuple[str, ...] = ()  # serials whose device document disagrees with their runs

    @property
    def lost(self) -> tuple[str, ...]:
        return self.not_shipped + self.not_stored

    @property
    def problems(self) -> dict[str, tuple[str, ...]]:
        found = {"lost": self.lost, "duplicated": self.duplicated, "stale": self.stale, "behind": self.behind,
                 "ahead": self.ahead, "devices off": self.devices_off}
        return {k: v for k, v in found.items() if v}


def count(store_path: Path, db: Any) -> Tally:
    """Compare the station's store (read only: nothing is recovered or marked) with MongoDB database ``db``.

    Call it once the station has ended: a run still open then is stale, not
    running. ``db`` is a pymongo ``Database``.
    """
    store = LocalStore.open_readonly(store_path)
    try:
        changes = store.iter_changes(0, limit=10**9)
        unrestored = store.unrestored
    finally:
        store.close()
    seqs = {run.run_id: seq for seq, run in changes}
    runs = {run.run_id: run for _, run in changes}
    docs = {d["_id"]: d for d in db.runs.find({}, {"seq": 1, "outcome": 1, "station": 1, "slot": 1,
                                                     "started_at": 1, "serial": 1})}
    devices = list(db.devices.find({}, {"runs.run_id": 1, "last_outcome": 1, "last_run_id": 1}))

    stale = {rid for rid, r in runs.items() if r.outcome is None}
    stale |= {rid for rid, d in docs.items() if d.get("outcome") is None}
    stale |= {d.get("last_run_id") or d["_id"] for d in devices if d.get("last_outcome") == "RUNNING"}
    if unrestored:
        stale.add(f"({unrestored} journal line(s) not restored)")

    duplicated: set[str] = set()
    listed: Counter[str] = Counter(e["run_id"] for d in devices for e in d.get("runs", []))
    duplicated |= {rid for rid, n in listed.items() if n > 1}
    # One test recorded twice: the same slot of the same station starting at the same moment, two ids.
    for source in (
        [(r.station, r.slot, r.started_at.replace(tzinfo=None), rid) for rid, r in runs.items()],
        [(d.get("station"), d.get("slot"), _naive(d.get("started_at")), rid) for rid, d in docs.items()],
    ):
        ids_by_test: dict[tuple[Any, ...], list[str]] = {}
        for *test, rid in source:
            ids_by_test.setdefault(tuple(test), []).append(rid)
        duplicated |= {rid for ids in ids_by_test.values() if len(ids) > 1 for rid in ids}

    both = seqs.keys() & docs.keys()
    behind = {rid for rid in both if docs[rid]["seq"] < seqs[rid]}
    ahead = {rid for rid in both if docs[rid]["seq"] > seqs[rid]}

    by_serial: dict[str, list[Any]] = {}
    for r in runs.values():
        if r.serial:
            by_serial.setdefault(r.serial, []).append(r)
    shipped_devices = {d["_id"]: d for d in devices}
    devices_off = set(shipped_devices) ^ set(by_serial)
    for serial, its_runs in by_serial.items():
        got = shipped_devices.get(serial)
        want = device_from_runs(its_runs)
        if got is not None and (
            [e["run_id"] for e in got.get("runs", [])] != [e["run_id"] for e in want["runs"]]
            or got.get("last_outcome") != want["last_outcome"] or got.get("last_run_id") != want["last_run_id"]
        ):
            devices_off.add(serial)

    return Tally(
        runs=len(runs), shipped=len(docs),
        not_shipped=tuple(sorted(seqs.keys() - docs.keys())), not_stored=tuple(sorted(docs.keys() - seqs.keys())),
        duplicated=tuple(sorted(duplicated)), stale=tuple(sorted(stale)), behind=tuple(sorted(behind)),
        ahead=tuple(sorted(ahead)), devices_off=tuple(sorted(devices_off)),
    )


def _naive(when: Any) -> Any:
    return when.replace(tzinfo=None) if isinstance(when, dt.datetime) else when


# -- one station -------------------------------------------------------------------


@attrs.define
class Station:
    """A station's files and database, kept through one kind of drill's repetitions."""

    home: Path
    mongo_uri: str
    database: str
    product: Path
    sim: int

    @property
    def store(self) -> Path:
        return self.home / "store.sqlite"

    @property
    def reports(self) -> Path:
        return self.home / "reports"

    def options(self) -> list[str]:
        return ["--store", str(self.store), "--mongo", self.mongo_uri, "--mongo-db", self.database]

    def start(self, batch: str, rounds: int, seed: int, name: str) -> Session:
        """``sequencer run`` in a process group of its own (a terminal's foreground job), output to files."""
        out, err = self.home / f"{name}.out", self.home / f"{name}.err"
        with out.open("w") as stdout, err.open("w") as stderr:
            proc = subprocess.Popen(
                [sys.executable, "-m", "sequencer.cli", "run", str(self.product), "--sim", str(self.sim),
                 "--rounds", str(rounds), "--batch", batch, "--seed", str(seed), "--plain",
                 "--reports", str(self.reports), *self.options()],
                stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr, cwd=ROOT, env=self.env(),
                start_new_session=True,
            )
        return Session(proc, out, err, time.monotonic())

    def sync(self) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "sequencer.cli", "sync", *self.options()], capture_output=True,
                              text=True, cwd=ROOT, env=self.env(), timeout=EXIT_TIMEOUT_S)

    def env(self) -> dict[str, str]:
        return {**os.environ, "XDG_DATA_HOME": str(self.home), "PYTHONUNBUFFERED": "1"}

    def rows(self) -> list[tuple[str, str | None, str]]:
        """(run id, outcome, batch) of every run the store's database has now, read only (the station writes)."""
        try:
            conn = sqlite3.connect(f"file:{self.store}?mode=ro", uri=True, timeout=5)
        except sqlite3.Error:
            return []
        try:
            return conn.execute("SELECT run_id, outcome, batch FROM runs").fetchall()
        except sqlite3.Error:
            return []
        finally:
            conn.close()

    def batch_runs(self, batch: str) -> list[Any]:
        store = LocalStore.open_readonly(self.store)
        try:
            return store.find_runs(batch=batch)
        finally:
            store.close()


@attrs.define
class Session:
    proc: subprocess.Popen[bytes]
    out: Path
    err: Path
    started: float

    def wait(self, timeout: float = EXIT_TIMEOUT_S) -> int | None:
        """The exit status, or None if it hung (then its whole group is killed)."""
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill_group()
            self.proc.wait()
            return None

    def kill_group(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)

    def group_alive(self) -> bool:
        """Is any process of the station's group (its flash workers, say) still there?"""
        try:
            os.killpg(self.proc.pid, 0)
        except ProcessLookupError:
            return False
        return True

    @property
    def output(self) -> str:
        return self.out.read_text(errors="replace")

    @property
    def errors(self) -> str:
        return self.err.read_text(errors="replace")


# A simulated run takes a few seconds even on a loaded machine: an outage this long with no run
# finished means the station waited for MongoDB.
RUN_STALL_S = 60.0


def wait_for(predicate: Callable[[], bool], timeout: float, poll: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(poll)
    return True


# -- the drills --------------------------------------------------------------------


@attrs.frozen
class Drill:
    kind: str
    number: int
    moment: str  # what was done when, in words
    batch_runs: int  # the drill's own session's runs
    tally: Tally
    failed: tuple[str, ...] = ()  # the drill's own checks that failed, in words

    @property
    def ok(self) -> bool:
        return not self.failed and not self.tally.problems


@attrs.frozen
class Settings:
    sim: int
    rounds: int
    window_s: float  # the random moment falls this many seconds at most after the first run began
    outage_s: tuple[float, float]
    #: The product registers devices: under --sim its provisioning service keeps them in the station's
    #: MongoDB, so its slots wait for MongoDB by design and need not finish runs while it is away.
    provisions: bool


def first_run_began(station: Station, session: Session, batch: str, failed: list[str]) -> bool:
    if wait_for(lambda: any(b == batch for _, _, b in station.rows()) or session.proc.poll() is not None, 120):
        if session.proc.poll() is None:
            return True
        failed.append(f"the station ended (status {session.proc.returncode}) before testing: "
                      f"{session.errors.strip()[-300:]}")
    else:
        failed.append("no run began within 120 s")
    session.kill_group()
    session.proc.wait()
    return False


def sigkill_drill(station: Station, db: Any, number: int, rng: random.Random, s: Settings) -> Drill:
    batch, failed = f"KILL{number}", []
    session = station.start(batch, s.rounds, rng.randrange(10**6), f"kill{number}")
    delay = rng.uniform(0, s.window_s)
    moment = f"SIGKILL {delay:.2f} s after the first run began"
    if first_run_began(station, session, batch, failed):
        time.sleep(delay)
        if session.proc.poll() is not None:
            failed.append(f"the session had ended (status {session.proc.returncode}) before the kill: raise --rounds")
        session.proc.kill()
        session.proc.wait()
        open_at_kill = sum(1 for _, outcome, b in station.rows() if b == batch and outcome is None)
        moment += f" ({open_at_kill} open)"
        if not wait_for(lambda: not shipper_pids(station.store), 30, poll=0.2):
            failed.append("its shipper child outlived the station by 30 s")
        if not wait_for(lambda: not session.group_alive(), 30, poll=0.2):
            failed.append("a process of its group outlived the station by 30 s")
            session.kill_group()
        shown = RUN_LINE.findall(session.output)

        again = station.start(f"{batch}-AFTER", 1, rng.randrange(10**6), f"kill{number}-after")
        status = again.wait()
        if status not in (0, 1):
            failed.append(f"the restarted station ended with status {status}: {again.errors.strip()[-300:]}")
        runs = station.batch_runs(batch)
        interrupted = sum(1 for r in runs if r.outcome is not None and r.outcome.value == "INTERRUPTED")
        said = re.search(r"(\d+) run\(s\) left open by a previous station were marked INTERRUPTED", again.output)
        if interrupted and (said is None or int(said.group(1)) != interrupted):
            failed.append(f"{interrupted} killed run(s) are INTERRUPTED, the restart said "
                          f"{said.group(1) if said else 'nothing'}")
        # Every run the terminal showed finished is in the store so, whatever the moment of the kill.
        closed = Counter((r.slot, r.outcome.value) for r in runs if r.outcome is not None)
        lost_shown = Counter((int(slot), outcome) for slot, _port, _unit, outcome in shown) - closed
        if lost_shown:
            failed.append(f"{sum(lost_shown.values())} run(s) shown finished before the kill are not so in the store")
        failed += synced(station)
    return Drill("sigkill", number, moment, len(station.batch_runs(batch)), count(station.store, db), tuple(failed))


def ctrl_c_drill(station: Station, db: Any, number: int, rng: random.Random, s: Settings) -> Drill:
    batch, failed = f"CTRLC{number}", []
    session = station.start(batch, s.rounds, rng.randrange(10**6), f"ctrlc{number}")
    delay = rng.uniform(0, s.window_s)
    when = rng.choice(("soon", "aborted", "late"))
    second = rng.uniform(*{"soon": (0, 0.5), "aborted": (0, 1.0), "late": (0.5, 1.5)}[when])
    moment = f"Ctrl-C {delay:.2f} s after the first run began, again " + {
        "soon": f"{second:.2f} s later", "aborted": f"{second:.2f} s after every run was closed",
        "late": f"{second:.2f} s later"}[when]
    if first_run_began(station, session, batch, failed):
        time.sleep(delay)
        if session.proc.poll() is not None:
            failed.append(f"the session had ended (status {session.proc.returncode}) before Ctrl-C: raise --rounds")
        with contextlib.suppress(ProcessLookupError):
            os.killpg(session.proc.pid, signal.SIGINT)
        if when == "aborted":
            wait_for(lambda: all(o is not None for _, o, b in station.rows() if b == batch)
                     or session.proc.poll() is not None, 60)
        time.sleep(second)
        if session.proc.poll() is not None:
            moment += " (it had ended)"
        with contextlib.suppress(ProcessLookupError):
            os.killpg(session.proc.pid, signal.SIGINT)
        status = session.wait()
        out = session.output
        if status != 130:
            failed.append(f"exit status {status}, not 130")
        if "Traceback" in session.errors:
            failed.append("a traceback on stderr")
        if not re.search(r"\d+/\d+ passed\.", out):
            failed.append("no summary")
        if "aborted by the operator" not in out and "stopped by the operator" not in out:
            failed.append("no 'aborted' line")
        folder = station.reports / batch
        if not (folder / "index.html").is_file():
            failed.append("no batch report")
        missing = [r.run_id for r in station.batch_runs(batch) if not (folder / f"{r.run_id}.html").is_file()]
        if missing:
            failed.append(f"{len(missing)} run(s) without their page")
        # Before any sync: no run open in the store, and MongoDB as the store has it unless the station
        # said what it left to ship (a drain cut short after 5 s, the documented exception).
        if any(outcome is None for _, outcome, _ in station.rows()):
            failed.append("runs open in the store after the station ended")
        left = re.search(r"(\d+) run\(s\) waiting to ship", out)
        if left:
            moment += f" (left {left.group(1)} to ship)"
        elif "nothing waiting to ship" not in out:
            failed.append("no line about what waits to ship")
        else:
            at_exit = {k: len(v) for k, v in count(station.store, db).problems.items()}
            if at_exit:
                failed.append(f"said nothing waits to ship, but MongoDB is not the store before sync: {at_exit}")
        failed += synced(station)
    return Drill("ctrl-c", number, moment, len(station.batch_runs(batch)), count(station.store, db), tuple(failed))


def mongod_drill(station: Station, db: Any, number: int, rng: random.Random, s: Settings, *, mongod: Mongod) -> Drill:
    batch, failed = f"AWAY{number}", []
    session = station.start(batch, s.rounds, rng.randrange(10**6), f"away{number}")
    delay, down = rng.uniform(0, s.window_s), rng.uniform(*s.outage_s)
    moment = f"mongod killed {delay:.2f} s after the first run began"
    if first_run_began(station, session, batch, failed):
        time.sleep(delay)
        mongod.kill()
        killed_at = time.monotonic()

        def finished() -> int:
            return sum(1 for _, o, b in station.rows() if b == batch and o is not None)

        finished_before = finished()
        time.sleep(down)
        # A short outage may end before any run could have: what the drill asks is that runs go on
        # finishing while MongoDB is away, so the outage lasts until one does (or the station
        # ends), and only a station that finishes nothing in RUN_STALL_S of outage has stalled.
        stalled = False
        if not s.provisions and finished() == finished_before:
            stalled = not wait_for(lambda: finished() > finished_before or session.proc.poll() is not None,
                                   RUN_STALL_S)
        finished_during = finished() - finished_before
        mongod.restart()
        moment = (f"mongod killed {delay:.2f} s after the first run began, "
                  f"down {time.monotonic() - killed_at:.1f} s ({finished_during} run(s) finished meanwhile)")
        status = session.wait()
        if status not in (0, 1):
            failed.append(f"exit status {status}: {session.errors.strip()[-300:]}")
        if stalled:
            failed.append(f"no run finished in {RUN_STALL_S:.0f} s while MongoDB was away")
        out = session.output
        if "nothing waiting to ship" not in out and not re.search(r"\d+ run\(s\) waiting to ship", out):
            failed.append("no line about what waits to ship")
        failed += synced(station)
    return Drill("mongod", number, moment, len(station.batch_runs(batch)), count(station.store, db), tuple(failed))


def synced(station: Station) -> list[str]:
    """``sequencer sync``, as after any outage: it must ship everything (exit 0)."""
    sync = station.sync()
    if sync.returncode != 0:
        return [f"sequencer sync: status {sync.returncode}: {(sync.stdout + sync.stderr).strip()[-300:]}"]
    return []


# -- the report ----------------------------------------------------------------------


COLUMNS = ("drill", "what happened", "runs", "in store", "in MongoDB", "lost", "duplicated", "stale", "behind",
           "ahead", "devices off", "checks")


def table_rows(drills: list[Drill]) -> Iterator[tuple[str, ...]]:
    for d in drills:
        t = d.tally
        yield (f"{d.kind} {d.number}", d.moment, str(d.batch_runs), str(t.runs), str(t.shipped), str(len(t.lost)),
               str(len(t.duplicated)), str(len(t.stale)), str(len(t.behind)), str(len(t.ahead)),
               str(len(t.devices_off)), "ok" if not d.failed else "; ".join(d.failed))


def markdown(drills: list[Drill], args: argparse.Namespace, load: tuple[tuple[float, ...], tuple[float, ...]],
             wall_s: float) -> str:
    verdict = "nothing lost, duplicated, stale or out of step; every check held" if all(d.ok for d in drills) else \
        "**problems found** (see the rows)"
    lines = [
        BEGIN,
        "## The latest run",
        "",
        f"`python tools/drills.py --sigkill {args.sigkill} --ctrl-c {args.ctrl_c} --mongod {args.mongod} "
        f"--sim {args.sim} --rounds {args.rounds} --seed {args.seed}` on {dt.date.today().isoformat()}, "
        f"{wall_s / 60:.1f} min, load average {_load(load[0])} at the start, {_load(load[1])} at the end "
        f"({os.cpu_count()} cores): {verdict}.",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
        *("| " + " | ".join(row) + " |" for row in table_rows(drills)),
        "",
        "*runs*: the drill's own session; *in store* and *in MongoDB*: the station's runs after the drill and "
        "`sequencer sync` (its earlier drills' included).",
        END,
    ]
    return "\n".join(lines)


def _load(avg: tuple[float, ...]) -> str:
    return " / ".join(f"{x:.1f}" for x in avg)


def print_table(drills: list[Drill]) -> None:
    rows = [COLUMNS, *table_rows(drills)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS) - 1)]
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=False)) + "  " + row[-1])


# -- main --------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tools/drills.py", description=__doc__.split("\n")[0])
    parser.add_argument("--each", type=int, default=3, help="drills of each kind (default 3)")
    parser.add_argument("--sigkill", type=int, help="SIGKILL drills (default: --each)")
    parser.add_argument("--ctrl-c", type=int, help="double Ctrl-C drills (default: --each)")
    parser.add_argument("--mongod", type=int, help="mongod-kill drills (default: --each)")
    parser.add_argument("--product", default="esp32_sensor", help="products/<name>.py (default esp32_sensor)")
    parser.add_argument("--sim", type=int, default=8, help="simulated DUTs per station (default 8)")
    parser.add_argument("--rounds", type=int, default=12,
                        help="rounds per session, enough to outlast every drill's moment (default 12)")
    parser.add_argument("--window", type=float, default=4.0,
                        help="the random moment falls up to this many seconds after the first run began (default 4)")
    parser.add_argument("--outage", type=float, nargs=2, default=(1.0, 5.0), metavar=("MIN", "MAX"),
                        help="seconds mongod stays down (default 1 5)")
    parser.add_argument("--seed", type=int, default=16, help="seed of every random moment (default 16)")
    parser.add_argument("--keep", action="store_true", help="keep the stations' files (their path is printed)")
    parser.add_argument("--write", action="store_true", help=f"rewrite the results section of {DOC.relative_to(ROOT)}")
    args = parser.parse_args(argv)
    for kind in ("sigkill", "ctrl_c", "mongod"):
        if getattr(args, kind) is None:
            setattr(args, kind, args.each)
    product = ROOT / "products" / f"{args.product}.py"
    if not product.is_file():
        parser.error(f"--product: {product} does not exist")
    if args.sim < 1 or args.rounds < 1:
        parser.error("--sim and --rounds: 1 or more")

    provisions = load_product(product, station_fixtures=STATION_FIXTURES, station_resources=None).product.uses(
        "provisioning")
    settings = Settings(args.sim, args.rounds, args.window, tuple(args.outage), provisions)
    rng = random.Random(args.seed)
    load_start, started = os.getloadavg(), time.monotonic()
    print(f"load average {_load(load_start)} ({os.cpu_count()} cores)", flush=True)
    base = Path(tempfile.mkdtemp(prefix="sequencer-drills-"))
    drills: list[Drill] = []
    try:
        mongod = Mongod.start(base / "mongod")
    except MongodError as exc:
        shutil.rmtree(base, ignore_errors=True)
        print(f"tools/drills.py: error: {exc}", file=sys.stderr)
        return 2
    client: pymongo.MongoClient[dict[str, Any]] = pymongo.MongoClient(mongod.uri, tz_aware=True,
                                                                      serverSelectionTimeoutMS=30000)
    try:
        plan = {"sigkill": (sigkill_drill, args.sigkill), "ctrl-c": (ctrl_c_drill, args.ctrl_c),
                "mongod": (partial(mongod_drill, mongod=mongod), args.mongod)}
        for kind, (drill_once, times) in plan.items():
            station = Station(base / "stations" / kind, f"mongodb://{mongod.address}",
                              f"drills_{kind.replace('-', '_')}", product, args.sim)
            station.home.mkdir(parents=True)
            db = client[station.database]
            for number in range(1, times + 1):
                drill = drill_once(station, db, number, rng, settings)
                drills.append(drill)
                problems = {k: len(v) for k, v in drill.tally.problems.items()}
                print(f"{kind} {number}: {drill.moment}: {drill.batch_runs} run(s); "
                      + ("ok" if drill.ok else f"PROBLEMS {problems} {'; '.join(drill.failed)}"), flush=True)
                for what, ids in drill.tally.problems.items():
                    print(f"    {what}: {', '.join(ids[:8])}{' ...' if len(ids) > 8 else ''}")
    finally:
        client.close()
        mongod.stop()
        if args.keep:
            print(f"stations kept in {base}")
        else:
            shutil.rmtree(base, ignore_errors=True)
    load_end, wall = os.getloadavg(), time.monotonic() - started
    print()
    print_table(drills)
    print(f"\n{len(drills)} drill(s) in {wall:.0f} s; load average {_load(load_end)} at the end")
    if args.write:
        replace_doc_section(DOC, BEGIN, END, markdown(drills, args, (load_start, load_end), wall))
        print(f"wrote {DOC.relative_to(ROOT)}")
    bad = [d for d in drills if not d.ok]
    if bad:
        print(f"{len(bad)} drill(s) found problems", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
