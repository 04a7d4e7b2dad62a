"""How long the station's own thread goes without serving its slots, during a simulated session.

    python tools/bench/station_stalls.py                       # lte_tracker --sim 64, printed
    python tools/bench/station_stalls.py --runs 3 --write      # and its section in docs/benchmarks.md
    python tools/bench/station_stalls.py --product products/esp32_sensor.py --sim 16

A station drives every slot from one trio thread; so, under ``--sim``, do
the simulated boards, modems and services. A task step that runs long
(work done between two checkpoints) holds every slot up: a board's answer
sits unread, and a 1 s command timeout or a 5 s boot wait runs out though
the board answered in time. This runs ``sequencer run PRODUCT --sim N``
in-process with a trio instrument that times every task step and every
gap between two waits for I/O, and reports the longest, where they were
(the innermost project frames of the task before and after the step), how
many units passed, and the load average -- the machine is shared, so
numbers are only comparable at similar load.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import trio

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import replace_doc_section  # noqa: E402

DOC = ROOT / "docs" / "benchmarks.md"
BEGIN = "<!-- station_stalls: begin -->"
END = "<!-- station_stalls: end -->"
#: step lengths counted, seconds
BUCKETS = (0.05, 0.2, 0.5, 1.0)


def _where(task: trio.lowlevel.Task) -> str:
    """The innermost frames of the project's own code in ``task``'s await chain."""
    frames = []
    coro: Any = task.coro
    while coro is not None:
        frame = getattr(coro, "cr_frame", None) or getattr(coro, "ag_frame", None) or getattr(coro, "gi_frame", None)
        if frame is not None and str(ROOT) in frame.f_code.co_filename and ".venv" not in frame.f_code.co_filename:
            frames.append(f"{Path(frame.f_code.co_filename).name}:{frame.f_code.co_name}")
        coro = getattr(coro, "cr_await", None) or getattr(coro, "ag_await", None) or getattr(coro, "gi_yieldfrom", None)
    return " > ".join(frames[-2:]) or task.name


class Stalls(trio.abc.Instrument):
    """Times every task step, and every stretch between two waits for I/O."""

    def __init__(self) -> None:
        self.steps = 0
        self.over = collections.Counter[float]()
        self.longest: list[tuple[float, str, str]] = []
        self.io_gap_max = 0.0
        self._t0 = 0.0
        self._before = ""
        self._io_done: float | None = None

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        self._before = _where(task)
        self._t0 = time.perf_counter()

    def after_task_step(self, task: trio.lowlevel.Task) -> None:
        took = time.perf_counter() - self._t0
        self.steps += 1
        for bucket in BUCKETS:
            if took >= bucket:
                self.over[bucket] += 1
        if took >= BUCKETS[0]:
            self.longest.append((took, self._before, _where(task)))
            self.longest = sorted(self.longest, reverse=True)[:10]

    def before_io_wait(self, timeout: float) -> None:
        if self._io_done is not None:
            self.io_gap_max = max(self.io_gap_max, time.perf_counter() - self._io_done)

    def after_io_wait(self, timeout: float) -> None:
        self._io_done = time.perf_counter()


def run_once(product: str, sim: int, data: Path) -> dict[str, Any]:
    """One ``sequencer run`` session in this process, instrumented; its numbers."""
    from sequencer.cli import main

    stalls = Stalls()
    real_run = trio.run

    def instrumented_run(*args: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("instruments", []).append(stalls)
        return real_run(*args, **kwargs)

    data.mkdir(parents=True, exist_ok=True)
    os.environ["XDG_DATA_HOME"] = str(data)
    load = os.getloadavg()[0]
    output = data / "output.txt"
    trio.run = instrumented_run  # type: ignore[assignment]  # this process is the benchmark's own
    started = time.perf_counter()
    try:
        with open(output, "w") as out:
            saved = sys.stdout
            sys.stdout = out
            try:
                code = main(["run", product, "--sim", str(sim), "--plain"])
            finally:
                sys.stdout = saved
    finally:
        trio.run = real_run  # type: ignore[assignment]
    summary = output.read_text().strip().splitlines()[-1] if output.exists() else ""
    return {
        "exit": code,
        "summary": summary.split("  Report:")[0],
        "seconds": round(time.perf_counter() - started, 1),
        "load_at_start": round(load, 1),
        "steps": stalls.steps,
        "steps_over": {f">={b:g}s": stalls.over[b] for b in BUCKETS},
        "longest_io_gap_s": round(stalls.io_gap_max, 3),
        "longest_steps": [(round(t, 3), before, after) for t, before, after in stalls.longest[:5]],
    }


def section(product: str, sim: int, results: list[dict[str, Any]]) -> str:
    lines = [
        BEGIN,
        "## Station stalls: how long the station's thread goes without serving its slots",
        "",
        f"`python tools/bench/station_stalls.py --product {product} --sim {sim} --runs {len(results)} --write` "
        f"({time.strftime('%Y-%m-%d')}, {os.cpu_count()} cores, shared with other work: the load average is the "
        "machine's). Every task step of the session timed by a trio instrument; a long step holds every slot's "
        "reads up (see `tools/bench/station_stalls.py`).",
        "",
        "| run | load | units | session | steps | >= 50 ms | >= 200 ms | >= 0.5 s | >= 1 s | longest I/O gap | "
        "longest step (where) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for n, r in enumerate(results, 1):
        over = r["steps_over"]
        top = r["longest_steps"][0] if r["longest_steps"] else (0, "", "")
        lines.append(
            f"| {n} | {r['load_at_start']} | {r['summary'].split('.')[0]} | {r['seconds']} s | {r['steps']} | "
            f"{over['>=0.05s']} | {over['>=0.2s']} | {over['>=0.5s']} | {over['>=1s']} | {r['longest_io_gap_s']} s | "
            f"{top[0]} s ({top[1]} → {top[2]}) |"
        )
    lines += [
        "",
        "What the station's own thread no longer does (issue 16, item 14): make a TLS context per provisioning "
        "client (20-300 ms each, two per unit: `fixtures/station.py` makes one per round, in a thread); draw the "
        "label's QR code (~40 ms of mask selection, in a thread now); and the simulated provisioning service "
        "hashes each registration's password once, its retries waiting for it (`web/provisioning/app.py`). The "
        "boot banner is no longer lost to the flash worker (docs/flashing.md). Measured before and after those "
        "changes, two runs each, interleaved, at load 11-13: before, 19/64 and 18/64 units passed (the others "
        "ERROR or FAIL: command timeouts, registrations unanswered), with 153 and 135 steps >= 50 ms, 17 and 16 "
        ">= 200 ms; after, 64/64 both times, 24 and 22 steps >= 50 ms, 1 and 2 >= 200 ms. The one step over "
        "0.5 s left is the session's start (the farm and its services opening), before any slot runs.",
        END,
    ]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--product", default="products/lte_tracker.py")
    parser.add_argument("--sim", type=int, default=64)
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--write", action="store_true", help=f"write the section in {DOC.relative_to(ROOT)}")
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory(prefix="station-stalls-") as tmp:
        for n in range(args.runs):
            result = run_once(str(ROOT / args.product), args.sim, Path(tmp) / f"run{n}")
            print(json.dumps(result), flush=True)
            results.append(result)
    if args.write:
        replace_doc_section(DOC, BEGIN, END, section(args.product, args.sim, results))
    return 0 if all(r["exit"] == 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
