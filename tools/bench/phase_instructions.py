"""What a phase costs the engine in CPU instructions, counted by valgrind's callgrind: the same on a busy machine.

Wall and CPU time on a shared machine move with the load (other processes
evict the caches and take the cores); the number of instructions a piece of
work executes does not. This runs the engine benchmark's scenario (b) (N
DUTs x 20 phases x 10 ms simulated I/O, one measurement each; the phases
put in order as ``--ordering`` says) in fresh child processes under
``valgrind --tool=callgrind`` and reports, per phase:

* **engine**: a station of N slots, records written to the store (journal
  and its copy into SQLite, every thread counted), or with ``--no-store``
  handed to a writer that keeps nothing;
* **floor**: the same N DUTs doing nothing but the same sleeps as bare trio
  tasks on the station's clock (engine_vs_openhtf.py's bare floor).

Each is (instructions of the child) minus (instructions of a child that does
everything but the measured part: imports, the product, the store, a one-slot
warm-up run), divided by N x phases, for the trio thread (where every slot
runs: what bounds the wall time) and for the other threads (the store's
copier and checkpointer) apart. Callgrind runs the program some 50x slower,
so simulated sleeps are short next to the work, as they are at 256 DUTs on a
saturated trio thread; the trio thread's count still varies a little with how
many times the event loop happens to wait, and the other threads', which run
on timers, with how long the child took (so a little with the load; the
store's intervals are stretched by valgrind's slowdown, so that a copy into
SQLite takes about as many records as at full speed), so each count is the
median of ``--reps`` children. With ``--calls``, cProfile's count of
function calls per phase instead (trio thread; no valgrind; the measured run
only).

Usage::

    python tools/bench/phase_instructions.py                      # N = 256, after, store: ~3-10 min
    python tools/bench/phase_instructions.py --ordering groups --no-store --n 64
    python tools/bench/phase_instructions.py --calls --ordering after,follows,sequential,groups
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import _common  # noqa: E402

WHATS = ("none", "floor", "engine")
#: About how much slower a child runs under callgrind (its store's timers are stretched by as much).
VALGRIND_SLOWDOWN = 50
#: The engine benchmark's target: CPU per phase at 256 DUTs <= this x the bare floor's (engine_vs_openhtf.py).
TARGET_OVER_FLOOR = 2.5


def child(args: argparse.Namespace) -> None:
    """Everything the engine benchmark's (b) child does; only ``args.what`` differs between the counted children."""
    import trio

    from engine_vs_openhtf import _DiscardingWriter, _sequencer_product
    from reports.storage.store import LocalStore
    from sequencer.clock import run_on_station_clock
    from sequencer.engine import RunSettings
    from sequencer.events import EventBus
    from sequencer.logs import configure_logging
    from sequencer.product import LoadedProduct, validate_product
    from sequencer.station import run_station, tune_garbage_collector

    work: Path = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    log_handle = configure_logging(work / "station.log")
    product = _sequencer_product("b", args.phases, args.measurements, args.io_s, args.ordering)
    validate_product(product)
    loaded = LoadedProduct(product, Path("<bench b>"))
    store = LocalStore.open(work / "store.sqlite", station=True)
    if not args.calls:
        # The store's threads run on timers of wall time, and under valgrind the run takes some 50x longer:
        # with the store's own intervals each copy would take a fiftieth of the records it takes at full
        # speed (and pay a fifty times larger share of a transaction's fixed cost per record).
        store.copy_interval_s *= VALGRIND_SLOWDOWN
        store.checkpoint_interval_s *= VALGRIND_SLOWDOWN
    writer: Any = _DiscardingWriter() if args.no_store else store
    settings = RunSettings(station="bench", operator="bench", batch="bench")
    tune_garbage_collector()
    profiler = None
    if args.calls:
        import cProfile

        profiler = cProfile.Profile()

    async def station(ports: list[str]) -> Any:
        return await run_station(loaded, ports, settings=settings, store=writer, bus=EventBus(), handle_signals=False)

    async def bare_dut() -> None:
        for _ in range(args.phases):
            await trio.sleep(args.io_s)

    async def main() -> None:
        async with store.writer():
            warm = await station(["/dev/sim-warm"])
            assert warm.all_passed
            if profiler is not None:
                profiler.enable()
            if args.what == "engine":
                res = await station([f"/dev/sim{i}" for i in range(args.n)])
                assert res.all_passed and len(res.runs) == args.n
            elif args.what == "floor":
                async with trio.open_nursery() as nursery:
                    for _ in range(args.n):
                        nursery.start_soon(bare_dut)
            if profiler is not None:
                profiler.disable()

    run_on_station_clock(main)
    store.close()
    if log_handle is not None:
        log_handle.close()
    if profiler is not None:
        import pstats

        stats = pstats.Stats(profiler)
        print(f"CALLS {stats.total_calls}")  # type: ignore[attr-defined]
        shares: dict[str, float] = {}
        for (path, _, function), (_, _, own, _, _) in stats.stats.items():  # type: ignore[attr-defined]
            part = _part(path, function)
            shares[part] = shares.get(part, 0.0) + own
        print("PARTS " + json.dumps(shares))


#: Where a function's own time goes in the profile by parts (``--calls``): the first pattern its file or
#: name contains decides.
PARTS = (
    ("the store: encoding and journalling the record", ("reports/storage", "phase_to_json", "_phase_data", "_finite",
                                                        "orjson", "posix.write", "memoryview")),
    ("per run: start, finish, logs, verdict", ("structlog", "logging", "uuid", "sequencer/station.py",
                                               "sequencer/verdicts.py", "sequencer/logs.py", "urandom", "evolve")),
    ("the phase's context, measurement and judging", ("sequencer/context.py", "sequencer/measurements.py",
                                                      "sequencer/phase.py", "sequencer/resources.py")),
    ("records: attempt, phase and measurement records, times", ("sequencer/records.py", "sequencer.records",
                                                                "method now", "datetime")),
    ("the engine: scheduling, attempts, commits", ("sequencer/engine.py", "sequencer/events.py",
                                                   "sequencer/plan.py")),
    ("the phase itself (the benchmark's)", ("engine_vs_openhtf.py",)),
    ("trio: run loop, sleeps, cancel scopes, clock", ("trio", "outcome", "sequencer/clock.py", "heapq", "select",
                                                     "epoll", "contextlib", "abc")),
)
OTHER_PART = "other (builtins, containers)"


def _part(path: str, function: str) -> str:
    where = f"{path} {function}"
    for part, patterns in PARTS:
        if any(pattern in where for pattern in patterns):
            return part
    return OTHER_PART


_TOTALS = re.compile(rb"^totals:\s*(\d+)", re.MULTILINE)
_THREAD = re.compile(rb"^thread:\s*(\d+)", re.MULTILINE)


def _thread_counts(out: Path) -> tuple[int, int]:
    """Instructions of the main (trio) thread and of every other thread, from callgrind's files per thread."""
    main = others = 0
    files = sorted(out.parent.glob(f"{out.name}-*"))
    for f in files:
        data = f.read_bytes()
        thread, total = _THREAD.search(data), _TOTALS.search(data)
        if thread is None or total is None:
            raise SystemExit(f"{f}: not a callgrind profile")
        if int(thread.group(1)) == 1:
            main += int(total.group(1))
        else:
            others += int(total.group(1))
    if not files:
        raise SystemExit(f"no callgrind profile at {out}-*")
    return main, others


def count(python: str, what: str, args: argparse.Namespace, ordering: str, no_store: bool, tmp: Path,
          rep: int) -> tuple[int, int]:
    """One child's count: instructions under callgrind (the trio thread's, the other threads'), or with
    ``--calls`` cProfile's function calls (the trio thread's, 0)."""
    work = tmp / f"{what}-{ordering}{'-no-store' if no_store else ''}-{rep}"
    cmd = [python, str(Path(__file__).resolve()), "_child", what, "--workdir", str(work), "--n", str(args.n),
           "--phases", str(args.phases), "--measurements", str(args.measurements), "--io-s", str(args.io_s),
           "--ordering", ordering, *(["--no-store"] if no_store else []), *(["--calls"] if args.calls else [])]
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    out = Path(f"{work}.callgrind")
    if not args.calls:
        cmd = ["valgrind", "--tool=callgrind", "--separate-threads=yes", f"--callgrind-out-file={out}", *cmd]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3600)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-3000:])
        raise SystemExit(f"child failed ({proc.returncode}): {' '.join(cmd)}")
    if args.calls:
        return int(next(ln for ln in proc.stdout.splitlines() if ln.startswith("CALLS ")).split()[1]), 0
    counts = _thread_counts(out)
    for f in out.parent.glob(f"{out.name}-*"):
        if args.keep is None:
            f.unlink()
        else:
            args.keep.mkdir(parents=True, exist_ok=True)
            f.rename(args.keep / f"{work.name}.callgrind{f.name[len(out.name):]}")
    return counts


def profile_parts(python: str, args: argparse.Namespace, tmp: Path) -> dict[str, float]:
    """The engine-and-store child's trio thread under cProfile: each part's share of its time (see PARTS)."""
    work = tmp / "profile"
    cmd = [python, str(Path(__file__).resolve()), "_child", "engine", "--workdir", str(work), "--n", str(args.n),
           "--phases", str(args.phases), "--measurements", str(args.measurements), "--io-s", str(args.io_s),
           "--ordering", "after", "--calls"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-3000:])
        raise SystemExit(f"child failed ({proc.returncode}): {' '.join(cmd)}")
    parts = json.loads(next(ln for ln in proc.stdout.splitlines() if ln.startswith("PARTS "))[len("PARTS "):])
    total = sum(parts.values())
    return {part: own / total for part, own in sorted(parts.items(), key=lambda kv: -kv[1])}


def main(argv: list[str] | None = None) -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_child":
        ap = argparse.ArgumentParser()
        ap.add_argument("_child")
        ap.add_argument("what", choices=WHATS)
        ap.add_argument("--workdir", type=Path, required=True)
        ap.add_argument("--n", type=int, required=True)
        ap.add_argument("--phases", type=int, required=True)
        ap.add_argument("--measurements", type=int, required=True)
        ap.add_argument("--io-s", type=float, required=True)
        ap.add_argument("--ordering", required=True)
        ap.add_argument("--no-store", action="store_true")
        ap.add_argument("--calls", action="store_true")
        child(ap.parse_args())
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=256, help="DUTs (default 256)")
    ap.add_argument("--phases", type=int, default=_common.B_PHASES)
    ap.add_argument("--measurements", type=int, default=_common.B_MEASUREMENTS)
    ap.add_argument("--io-s", type=float, default=_common.B_IO_S)
    ap.add_argument("--ordering", default="after", help="comma-separated: after, follows, sequential, groups")
    ap.add_argument("--no-store", action="store_true", help="records handed to a writer that keeps nothing")
    ap.add_argument("--calls", action="store_true", help="count function calls with cProfile, not instructions")
    ap.add_argument("--reps", type=int, default=1, help="children per count; the median is taken (default 1)")
    ap.add_argument("--keep", type=Path, help="keep callgrind's profiles here (for callgrind_annotate)")
    ap.add_argument("--sequencer-python", default=sys.executable)
    ap.add_argument("--write", action="store_true",
                    help="measure the engine with and without the store, and rewrite this section of docs/benchmarks.md")
    args = ap.parse_args(argv)
    if args.write and (args.calls or args.no_store or args.ordering != "after"):
        ap.error("--write measures the engine's own setting (after; with and without the store, in instructions)")
    unit = "calls" if args.calls else "instructions"
    phases = args.n * args.phases
    modes = [False, True] if args.write else [args.no_store]
    load_start, started = os.getloadavg(), time.time()
    rows: list[tuple[str, tuple[float, float]]] = []
    with tempfile.TemporaryDirectory(prefix="phase-instructions-") as tmp:
        def per_phase(what: str, ordering: str, no_store: bool, base: tuple[float, float] = (0.0, 0.0)
                      ) -> tuple[float, float]:
            """Median over ``--reps`` children, minus ``base`` (totals), per phase: (trio thread, other threads)."""
            runs = [count(args.sequencer_python, what, args, ordering, no_store, Path(tmp), rep)
                    for rep in range(args.reps)]
            return (statistics.median(r[0] for r in runs) - base[0]) / phases, \
                (statistics.median(r[1] for r in runs) - base[1]) / phases

        print(f"{args.n} DUTs x {args.phases} phases; {unit} per phase (median of {args.reps}):")
        if not args.calls:
            print(f"  {'':32s} {'trio thread':>12s} {'other threads':>14s} {'all':>12s}   all / floor's all")
        floor: tuple[float, float] | None = None
        for no_store in modes:
            base = per_phase("none", "after", no_store)
            base = (base[0] * phases, base[1] * phases)
            if floor is None:
                floor = per_phase("floor", "after", no_store, base)
                rows.append(("bare floor", floor))
                print(f"  {'bare floor':32s} {floor[0]:12,.0f}" + ("" if args.calls else
                                                                   f" {floor[1]:14,.0f} {sum(floor):12,.0f}"))
            for ordering in args.ordering.split(","):
                engine = per_phase("engine", ordering, no_store, base)
                label = f"engine{' alone' if no_store else ' and store'}, {ordering}"
                rows.append((label, engine))
                if args.calls:
                    print(f"  {label:32s} {engine[0]:12,.0f}  = {engine[0] / floor[0]:.2f}x the floor", flush=True)
                else:
                    print(f"  {label:32s} {engine[0]:12,.0f} {engine[1]:14,.0f} {sum(engine):12,.0f}   "
                          f"{sum(engine) / sum(floor):.2f}x (trio thread {engine[0] / floor[0]:.2f}x)", flush=True)
    if args.write:
        with tempfile.TemporaryDirectory(prefix="phase-instructions-") as tmp:
            parts = profile_parts(args.sequencer_python, args, Path(tmp))
        meta = {"date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "minutes": (time.time() - started) / 60,
                "load_start": load_start, "load_end": os.getloadavg(), "git": _git_rev(), "n": args.n,
                "phases": args.phases, "reps": args.reps}
        _common.replace_doc_section(DOC, BEGIN, END, render_section(meta, rows, parts))
        print(f"wrote {DOC}")


DOC = HERE.parent.parent / "docs" / "benchmarks.md"
BEGIN = ("<!-- BEGIN phase_instructions: generated by tools/bench/phase_instructions.py --write; "
         "edit the script, not this section -->")
END = "<!-- END phase_instructions -->"


def _git_rev() -> str:
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", "sequencer", "reports"],
                               cwd=HERE.parent.parent, capture_output=True, text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "?"
    return rev + (" + uncommitted changes" if dirty else "")


def render_section(meta: dict[str, Any], rows: list[tuple[str, tuple[float, float]]], parts: dict[str, float]
                   ) -> str:
    """This benchmark's section of docs/benchmarks.md."""
    floor = rows[0][1]
    table = ["| per phase | trio thread | other threads (the store's copier and checkpoints) | all threads "
             "| all / the floor's |", "|---|---|---|---|---|"]
    for label, (trio_thread, others) in rows:
        table.append(f"| {label} | {trio_thread:,.0f} | {others:,.0f} | {trio_thread + others:,.0f} "
                     f"| {(trio_thread + others) / sum(floor):.2f}x |")
    store = next((c for label, c in rows if label.startswith("engine and store")), None)
    alone = next((c for label, c in rows if label.startswith("engine alone")), None)
    target = TARGET_OVER_FLOOR * sum(floor)
    verdict = ""
    if store is not None and alone is not None:
        verdict = (
            f"Against the target (CPU per phase <= {TARGET_OVER_FLOOR:g}x the bare floor's, here in instructions: "
            f"<= {target:,.0f}): the engine and store take **{sum(store):,.0f} = {sum(store) / sum(floor):.2f}x**, "
            f"{'**met**' if sum(store) <= target else '**not met**'}. Of what they take over the floor, the engine "
            f"(running the phase, its context, judging, building the record) is "
            f"{sum(alone) - sum(floor):,.0f} and the store {sum(store) - sum(alone):,.0f} "
            f"({store[0] - alone[0]:,.0f} on the trio thread: encoding the record and appending it to the journal; "
            f"{store[1] - alone[1]:,.0f} in the copier: SQLite)."
        )
    profile = []
    if store is not None:
        profile = [
            f"Where the engine-and-store child's trio thread spends its time, by part (cProfile of the measured run, "
            f"a child of its own; the profiler's overhead weighs on every call alike, so read the shares, not "
            f"absolute times), and what that share of its {store[0]:,.0f} instructions per phase is:",
            "",
            "| part | share of the trio thread | ≈ instructions per phase |",
            "|---|---|---|",
            *(f"| {part} | {share:.0%} | {share * store[0]:,.0f} |" for part, share in parts.items()),
            "",
            f"'trio' is mostly what the bare floor does too ({floor[0]:,.0f} instructions per phase on the trio "
            f"thread): a sleep, its cancel scope and the wake-up.",
            "",
        ]
    lines = [
        BEGIN,
        f"## Instructions per phase at {meta['n']} DUTs (callgrind: the same on a busy machine)",
        "",
        f"Scenario (b) of the engine benchmark, {meta['n']} DUTs x {meta['phases']} phases x 10 ms, counted by "
        "valgrind's callgrind in fresh children (`tools/bench/phase_instructions.py`, see its docstring): per "
        "phase, the child's instructions minus those of a child that does everything but the measured run "
        "(imports, product, store, warm-up), for the trio thread (every slot runs there: what bounds the wall "
        "time) and the other threads apart. Instructions do not depend on the machine's load, so this is the "
        "number to compare between commits on a shared machine; the other threads' work runs on timers, so it "
        "moves a little with how long the child ran (the store's intervals are stretched by valgrind's slowdown "
        "so that each copy into SQLite takes about as many records as at full speed).",
        "",
        f"Run {meta['date']} ({meta['minutes']:.0f} min), sequencer at `{meta['git']}`, median of {meta['reps']} "
        f"child(ren) per row; load average {meta['load_start'][0]:.2f} at start, {meta['load_end'][0]:.2f} at end "
        "(only the run time depends on it).",
        "",
        "```sh",
        "python tools/bench/phase_instructions.py --write   # ~5-15 min (valgrind)",
        "```",
        "",
        *table,
        "",
        verdict,
        "",
        *profile,
        END,
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
