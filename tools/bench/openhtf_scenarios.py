"""OpenHTF's side of ``engine_vs_openhtf.py``: one scenario per process.

Runs under the OpenHTF venv made by ``setup-openhtf.sh`` (OpenHTF 1.6.3), never
under the project's venv, and prints one ``RESULT {json}`` line. Written the way
an OpenHTF station is written:

* phases are plain functions decorated with ``@htf.measures(...)`` with
  ``htf.Measurement(name).in_range(0, 10)`` validators, setting
  ``test.measurements[name]``;
* simulated I/O is ``time.sleep`` (OpenHTF runs every phase in a thread);
* the record is written by OpenHTF's own ``OutputToJSON`` output callback, which
  writes a temporary file and renames it into place when the test ends (no
  fsync: the sequencer's SQLite WAL with ``synchronous=NORMAL`` does not fsync a
  commit either, so both sides leave the record in the OS page cache, safe from
  a process kill, not from a power cut);
* several DUTs at once are several ``htf.Test`` objects, each executed by its
  own thread, all started together: OpenHTF's own model (one executor thread
  per test, plus a thread per running phase);
* no web UI or station server (OpenHTF starts none unless one is created), CLI
  output silenced (``console_output.CLI_QUIET``, verbosity 0). OpenHTF still
  keeps its framework log lines in each test record, as it does by default.

Usage: python openhtf_scenarios.py {a,b} --workdir DIR [--n N] [--runs R]
"""

from __future__ import annotations

import argparse
import itertools
import json
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import _common
from _common import Clock, GcTimer, ThreadSampler


def _import_openhtf() -> Any:
    import openhtf as htf
    from openhtf.util import console_output

    console_output.CLI_QUIET = True  # no banners, no CLI log lines
    return htf


def measured_phases(htf: Any, phases: int, measurements: int) -> list[Any]:
    """Scenario (a): ``phases`` phases, each setting ``measurements`` in_range measurements."""
    names = [f"m{j}" for j in range(measurements)]

    def make(i: int) -> Any:
        @htf.measures(*[htf.Measurement(n).in_range(0, 10) for n in names])
        def measure(test: Any) -> None:
            for n in names:
                test.measurements[n] = 5.0

        return htf.PhaseOptions(name=f"p{i}")(measure)

    return [make(i) for i in range(phases)]


def io_phases(htf: Any, phases: int, io_s: float, measurements: int) -> list[Any]:
    """Scenario (b): ``phases`` phases, each ``time.sleep(io_s)`` then ``measurements`` measurements."""
    names = [f"v{j}" for j in range(measurements)]

    def make(i: int) -> Any:
        @htf.measures(*[htf.Measurement(n).in_range(0, 10) for n in names])
        def io(test: Any) -> None:
            time.sleep(io_s)  # simulated I/O: a blocking call, as OpenHTF phases make
            for n in names:
                test.measurements[n] = 5.0

        return htf.PhaseOptions(name=f"io{i}")(io)

    return [make(i) for i in range(phases)]


def make_test(htf: Any, phases: list[Any], out: Path, prefix: str) -> Any:
    from openhtf.output.callbacks import json_factory

    counter = itertools.count()
    test = htf.Test(*phases, test_name=f"bench-{prefix}")
    # A callable file name: OpenHTF formats it with the record's fields.
    test.add_output_callbacks(json_factory.OutputToJSON(lambda **_: str(out / f"{prefix}-{next(counter)}.json")))
    return test


def check_records(files: list[Path], phases: int, measurements: int, expected: int) -> dict[str, Any]:
    """Read back what OpenHTF wrote: every record complete and PASS."""
    bad = []
    for f in files:
        rec = json.loads(f.read_text())
        ok = (
            rec["outcome"] == "PASS"
            and len(rec["phases"]) == phases
            and all(len(p["measurements"]) == measurements for p in rec["phases"])
            and all(m["outcome"] == "PASS" for p in rec["phases"] for m in p["measurements"].values())
        )
        if not ok:
            bad.append(f.name)
    return {"records": len(files), "bad": bad, "ok": not bad and len(files) == expected}


def scenario_a(htf: Any, args: argparse.Namespace, out: Path) -> dict[str, Any]:
    test = make_test(htf, measured_phases(htf, args.phases, args.measurements), out, "a")
    warm = Clock()
    with warm:
        warm_ok = test.execute()
    baseline = _common.rss_kib()
    runs = []
    for r in range(args.runs):
        with GcTimer() as g, Clock() as c:
            ok = test.execute()
        runs.append({**c.as_dict(), "gc_s": g.seconds, "passed": bool(ok)})
    files = [out / f"a-{i}.json" for i in range(1, args.runs + 1)]
    return {
        "warmup": {**warm.as_dict(), "passed": bool(warm_ok)},
        "runs": runs,
        "rss_before_kib": baseline,
        "check": check_records(files, args.phases, args.measurements, args.runs),
    }


def scenario_b(htf: Any, args: argparse.Namespace, out: Path) -> dict[str, Any]:
    phases = io_phases(htf, args.phases, args.io_s, args.measurements)
    warm_test = make_test(htf, phases, out, "warm")
    with Clock() as warm:
        warm_ok = warm_test.execute()
    # One htf.Test per DUT, built before the clock starts (a station builds them once).
    tests = [make_test(htf, phases, out, f"b{i:03d}") for i in range(args.n)]
    results: list[bool | None] = [None] * args.n

    def slot(i: int) -> None:
        results[i] = bool(tests[i].execute())

    threads = [threading.Thread(target=slot, args=(i,), name=f"slot{i}") for i in range(args.n)]
    baseline = _common.rss_kib()
    with ThreadSampler() as sampler, GcTimer() as g, Clock() as c:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    # The floor: the same N DUTs and sleeps as bare threads, no framework, no records.
    def bare_dut() -> None:
        for _ in range(args.phases):
            time.sleep(args.io_s)

    bare = [threading.Thread(target=bare_dut) for _ in range(args.n)]
    with Clock() as floor:
        for t in bare:
            t.start()
        for t in bare:
            t.join()
    files = sorted(out.glob("b*-0.json"))
    return {
        "warmup": {**warm.as_dict(), "passed": bool(warm_ok)},
        "runs": [{**c.as_dict(), "gc_s": g.seconds, "passed": all(r is True for r in results)}],
        "rss_before_kib": baseline,
        "threads_peak": sampler.peak,
        "floor_s": floor.wall_s,
        "floor_cpu_s": floor.cpu_s,
        "check": check_records(files, args.phases, args.measurements, args.n),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("scenario", choices=["a", "b"])
    ap.add_argument("--workdir", type=Path, required=True)
    ap.add_argument("--n", type=int, default=1, help="DUTs (scenario b)")
    ap.add_argument("--runs", type=int, default=5, help="measured runs after the warm-up (scenario a)")
    ap.add_argument("--phases", type=int)
    ap.add_argument("--measurements", type=int)
    ap.add_argument("--io-s", type=float, default=_common.B_IO_S)
    args = ap.parse_args()
    if args.phases is None:
        args.phases = _common.A_PHASES if args.scenario == "a" else _common.B_PHASES
    if args.measurements is None:
        args.measurements = _common.A_MEASUREMENTS if args.scenario == "a" else _common.B_MEASUREMENTS
    args.workdir.mkdir(parents=True, exist_ok=True)
    # OutputToJSON writes a NamedTemporaryFile then renames it: keep that on
    # the same file system as the records so it is a rename, not a copy.
    tempfile.tempdir = str(args.workdir)

    with Clock() as imp:
        htf = _import_openhtf()
    import importlib.metadata as md

    versions = {}
    for pkg in ("openhtf", "protobuf", "attrs", "tornado", "mutablerecords"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = "-"
    rss_after_import = _common.rss_kib()
    fn = scenario_a if args.scenario == "a" else scenario_b
    result = fn(htf, args, args.workdir)
    _common.emit_scenario(
        result, framework="openhtf", args=args, import_s=imp.wall_s, rss_after_import_kib=rss_after_import,
        versions=versions,
    )


if __name__ == "__main__":
    main()
