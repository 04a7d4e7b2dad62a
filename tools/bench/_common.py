"""Helpers shared by the benchmark's child processes (standard library only).

Both sides import this: the sequencer child runs in the project's venv, the
OpenHTF child in its own venv, so nothing here may depend on either framework.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import sys
import time
from typing import Any

#: The scenarios, as the issue states them. Both children take these from the
#: command line so the parent is the single source of truth.
A_PHASES = 50
A_MEASUREMENTS = 10
B_PHASES = 20
B_IO_S = 0.010
B_MEASUREMENTS = 1


class Clock:
    """Wall and CPU time (user + system, every thread of this process) of a block."""

    def __enter__(self) -> Clock:
        self._ru = resource.getrusage(resource.RUSAGE_SELF)
        self._t = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        t = time.perf_counter()
        ru = resource.getrusage(resource.RUSAGE_SELF)
        self.wall_s = t - self._t
        self.user_s = ru.ru_utime - self._ru.ru_utime
        self.sys_s = ru.ru_stime - self._ru.ru_stime
        self.cpu_s = self.user_s + self.sys_s

    def as_dict(self) -> dict[str, float]:
        return {"wall_s": self.wall_s, "cpu_s": self.cpu_s, "user_s": self.user_s, "sys_s": self.sys_s}


def rss_kib() -> int:
    """Current resident set size (VmRSS) in KiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def peak_rss_kib() -> int:
    """Peak resident set size of this process so far (ru_maxrss is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def threads_now() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("Threads:"):
                return int(line.split()[1])
    return 0


def python_info() -> dict[str, str]:
    return {
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "executable": sys.executable,
    }


def emit(result: dict[str, Any]) -> None:
    """The child's result: one JSON object on the last line of stdout."""
    result["loadavg_end"] = os.getloadavg()
    sys.stdout.write("\nRESULT " + json.dumps(result) + "\n")
    sys.stdout.flush()


def emit_scenario(
    result: dict[str, Any], *, framework: str, args: Any, import_s: float, rss_after_import_kib: int,
    versions: dict[str, str],
) -> None:
    """An engine-vs-OpenHTF child's result, with the fields both frameworks' children report."""
    result.update(
        framework=framework,
        scenario=args.scenario,
        n=args.n if args.scenario == "b" else 1,
        phases=args.phases,
        measurements=args.measurements,
        import_s=import_s,
        rss_after_import_kib=rss_after_import_kib,
        peak_rss_kib=peak_rss_kib(),
        versions=versions,
        **python_info(),
    )
    emit(result)


class ThreadSampler:
    """Samples this process's thread count every ``interval`` s in a daemon thread (peak kept)."""

    def __init__(self, interval: float = 0.02) -> None:
        import threading

        self.peak = threads_now()
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-thread-sampler", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self.peak = max(self.peak, threads_now())

    def __enter__(self) -> ThreadSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, threads_now())


class GcTimer:
    """Time spent in the cyclic garbage collector while active (all generations)."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.collections = 0
        self._t = 0.0

    def _callback(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._t = time.perf_counter()
        else:
            self.seconds += time.perf_counter() - self._t
            self.collections += 1

    def __enter__(self) -> GcTimer:
        import gc

        gc.callbacks.append(self._callback)
        return self

    def __exit__(self, *exc: object) -> None:
        import gc

        gc.callbacks.remove(self._callback)


def replace_doc_section(doc: "os.PathLike[str] | str", begin: str, end: str, section: str) -> None:
    """Replace a benchmark's section of ``doc`` between its markers, or append it; nothing else changes."""
    from pathlib import Path

    path = Path(doc)
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        _, tail = rest.split(end, 1)
        text = head + section + tail
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    path.write_text(text)
