"""Flashing N ESP32s at once: worker processes (the flasher fixture) vs worker threads vs the esptool CLI.

    python tools/bench/flash_throughput.py             # the whole matrix, ~8 min; prints a table
    python tools/bench/flash_throughput.py --write     # ... and rewrites its section of docs/benchmarks.md
    python tools/bench/flash_throughput.py --quick     # N = 1, 4 unpaced only: a 1-minute smoke run
    python tools/bench/flash_throughput.py --resets [--write]   # connect time of each reset sequence (~1 min)

A 1 MiB app of random bytes (incompressible, so compression cannot beat the
wire) is written to 0x10000 of N simulated ESP32s by the unmodified esptool
5.6, three ways:

* ``processes`` -- the shipped flasher fixture (:class:`fixtures.flasher.EspFlasher`):
  each slot's port is opened once by the station (a ``SerialLink``) and lent
  to a worker process per slot that runs esptool's Python API;
* ``threads`` -- the same esptool API calls, one ``trio.to_thread`` worker
  thread per slot, in the station's process;
* ``cli`` -- ``python -m esptool ... write-flash`` as one subprocess per port,
  what the factory runs today.

All three use esptool's flasher stub (``--before/--after no-reset``: a pty
has no reset lines) at 921600 baud; one extra row flashes through the ROM
loader, which the station uses on boards without reset lines because only
the ROM can start the app without one (docs/flashing.md). The simulated
boards run in a process of their own, as hardware would, so their CPU is
not the flasher's; with ``--pace`` they take as long as 921600 baud takes
(10 bits per byte each way), and the wire limit is ``bytes x 10 / baud``.

Each (mode, N, pacing) is a fresh child process. Measured there: wall time
from starting all N flashes to the last one verified; CPU (user + system) of
the child and, once reaped, of its children (workers, CLI processes); peak
RSS summed over the child and its live children, sampled every 50 ms. Every
board's flash is then read back by the farm and compared with the image.

``--resets`` measures instead what each way into the loader costs: the
flasher's ``detect`` on N factory-fresh boards of each ``--sim-board`` kind
(a jig on a pty, ``no-reset``; a DevKitC over RFC 2217, ``default-reset``,
for which esptool picks ``ClassicReset``; an ESP32-S3 on its USB-Serial/JTAG
over RFC 2217, ``usb-reset``: ``USBJTAGSerialReset``), each in a fresh farm
and station child. Its connect time is esptool's, from the first reset (or
SYNC) to the loader answering (``ResetReport.seconds``); the detect command
adds the worker and reading the chip's identity.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import random
import re
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

BAUD = 921600
APP_OFFSET = 0x10000
APP_BYTES = 1 << 20
MODES = ("processes", "threads", "cli")
DOC = ROOT / "docs" / "benchmarks.md"
MARK = "flash_throughput"
RESETS_MARK = "flash_resets"
#: (--sim-board kind, [flash] before) for --resets
RESET_CASES = (("jig", "no-reset"), ("devkitc", "default-reset"), ("esp32s3-usb", "usb-reset"))


def app_image(path: Path) -> bytes:
    rng = random.Random(2026)
    data = rng.randbytes(APP_BYTES)
    if data[0] == 0xE9:  # not an ESP image header: esptool must not patch it
        data = b"\x00" + data[1:]
    path.write_bytes(data)
    return data


# ------------------------------------------------------------------- the farm


def farm_main(n: int, pace: bool) -> None:
    """N simulated ESP32 ROMs on ptys until stdin closes; then the MD5 of each app region."""
    import trio

    from fixtures.sim.esp32_device import serve_esp32_rom
    from fixtures.sim.esp32_rom import Esp32ChipState
    from fixtures.sim.pty import PtyEndpoint

    async def main() -> None:
        chips = [Esp32ChipState.create(seed=i) for i in range(n)]
        endpoints = [PtyEndpoint() for _ in range(n)]
        async with trio.open_nursery() as nursery:
            for endpoint, chip in zip(endpoints, chips):
                nursery.start_soon(lambda e=endpoint, c=chip: serve_esp32_rom(e, c, pace_baud=pace))
            print(json.dumps({"ports": [e.path for e in endpoints]}), flush=True)
            await trio.to_thread.run_sync(sys.stdin.read)
            nursery.cancel_scope.cancel()
        ru = resource.getrusage(resource.RUSAGE_SELF)
        print(json.dumps({
            "md5": [c.flash.md5(APP_OFFSET, APP_BYTES).hex() for c in chips],
            "cpu_s": ru.ru_utime + ru.ru_stime,
        }), flush=True)
        for e in endpoints:
            e.close()

    trio.run(main)


def boards_main(kind: str, n: int) -> None:
    """N factory-fresh boards of ``kind`` (``--sim-board``) until stdin closes."""
    import trio

    from fixtures.sim.esp32_board import open_esp32_farm

    async def main() -> None:
        async with open_esp32_farm(n, kind=kind) as devices:
            print(json.dumps({"ports": [d.path for d in devices]}), flush=True)
            await trio.to_thread.run_sync(sys.stdin.read)

    trio.run(main)


def connect_main(before: str, ports: list[str]) -> None:
    """Detect the chip on every port at once, as the station's first phase does; how long each took."""
    import trio

    from fixtures.flasher import EspFlasher, FlashWorkers
    from fixtures.serial_link import open_serial_link
    from sequencer.config import FlashConfig

    config = FlashConfig(before=before, boot="hard-reset" if before != "no-reset" else "run-user-code")
    slots: list[dict[str, Any]] = []

    async def one(port: str, workers: FlashWorkers) -> None:
        async with open_serial_link(port, lines=config.console_lines) as link:
            flasher = EspFlasher(config, workers=workers)
            try:
                t0 = time.perf_counter()
                await flasher.detect(link)
                detect_s = time.perf_counter() - t0
            finally:
                await flasher.aclose()
        assert flasher.reset is not None
        slots.append({"connect_s": flasher.reset.seconds, "detect_s": detect_s, "sequence": flasher.reset.sequence,
                      "attempts": flasher.reset.attempts})

    async def main() -> None:
        async with FlashWorkers.open() as workers:
            # The server imports esptool once per session; a station has done it before its first board.
            await (await workers.start("warm-up")).aclose()
            async with trio.open_nursery() as nursery:
                for port in ports:
                    nursery.start_soon(one, port, workers)

    trio.run(main)
    print(json.dumps({"slots": slots}), flush=True)


def run_reset_case(kind: str, before: str, n: int) -> dict[str, Any]:
    boards = subprocess.Popen([sys.executable, __file__, "_boards", kind, str(n)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        ports = json.loads(boards.stdout.readline())["ports"]
        station = subprocess.run([sys.executable, __file__, "_connect", before, *ports], capture_output=True,
                                 text=True, check=False, timeout=300)
        if station.returncode:
            raise RuntimeError(f"{kind} n={n}: station child failed:\n{station.stderr[-2000:]}")
        slots = json.loads(station.stdout.strip().splitlines()[-1])["slots"]
    finally:
        boards.stdin.close()
        boards.wait(timeout=30)
    return {"kind": kind, "before": before, "n": n, "slots": slots}


def resets_table(results: list[dict[str, Any]]) -> list[str]:
    import statistics

    lines = ["| board (`--sim-board`) | `before` | esptool's sequence | N | connect (s), median / max | "
             "detect command (s), median / max | reset attempts |", "|---|---|---|---|---|---|---|"]
    for case in results:
        slots = case["slots"]
        connect = [s["connect_s"] for s in slots]
        detect = [s["detect_s"] for s in slots]
        sequences = sorted({s["sequence"] or "none" for s in slots})
        attempts = sorted({s["attempts"] for s in slots})
        lines.append(
            f"| {case['kind']} | {case['before']} | {', '.join(sequences)} | {case['n']} | "
            f"{statistics.median(connect):.2f} / {max(connect):.2f} | {statistics.median(detect):.2f} / "
            f"{max(detect):.2f} | {', '.join(map(str, attempts))} |"
        )
    return lines


def render_resets(results: list[dict[str, Any]], started: str, load: tuple[tuple[float, ...], tuple[float, ...]]) -> str:
    import esptool

    busy = max(load[0][0], load[1][0]) > 0.5
    out = [
        f"<!-- BEGIN {RESETS_MARK}: generated by tools/bench/flash_throughput.py --resets --write; edit the script, "
        "not this section -->",
        "## Getting into the loader: the cost of each reset sequence",
        "",
        f"The flasher's `detect` (the first phase of a flashing product) on N factory-fresh simulated boards at once, "
        f"with the unmodified esptool {esptool.__version__}: a jig holding GPIO0 on a pty (`before = \"no-reset\"`), "
        "a DevKitC-style board over RFC 2217 (`default-reset`: esptool picks `ClassicReset` for RFC 2217 ports), an "
        "ESP32-S3 on its USB-Serial/JTAG over RFC 2217 (`usb-reset`: `USBJTAGSerialReset`). *Connect* is esptool's "
        "own, from its first reset (or SYNC) to the loader answering; the *detect command* adds forking the slot's "
        "worker (from a server that has imported esptool) and reading the chip's identity. The boards run in a "
        "process of their own.",
        "",
        f"Run {started} on {os.cpu_count()} CPUs ({platform.machine()}), Python {platform.python_version()}, sequencer "
        f"at `{git_state()}`. Load average at start {'/'.join(f'{x:.2f}' for x in load[0])}, at end "
        f"{'/'.join(f'{x:.2f}' for x in load[1])}"
        + (" — **the machine was shared and busy; treat the numbers as indicative**." if busy else "."),
        "",
        "Reproduce: `python tools/bench/flash_throughput.py --resets --write` (~1 min).",
        "",
        *resets_table(results),
        "",
        "- The sequences' own sleeps set the floor: `ClassicReset` and `UnixTightReset` hold EN low 0.1 s and GPIO0 "
        "0.05 s past it (0.55 s on esptool's second attempt), `USBJTAGSerialReset` three steps of 0.1 s; then the "
        "ROM boots and answers SYNC. A jig's board is already in its loader and only syncs.",
        "- The jig's and the DevKitC's connect include esptool's chip detection on an ESP32: its first probe, "
        "GET_SECURITY_INFO, is refused by the ESP32 ROM, and esptool drains its input for 0.2 s before reading the "
        "chip's magic word (a flash after a detect skips it, knowing the chip); the ESP32-S3 answers it.",
        "- `UnixTightReset` (both lines in one `TIOCMSET`), which esptool tries first on a local port, needs a tty "
        "with modem lines: a pty has none and an RFC 2217 port cannot set two lines at once, so it has no row here. "
        "Its timing is `ClassicReset`'s.",
        f"<!-- END {RESETS_MARK} -->",
    ]
    return "\n".join(out) + "\n"


# --------------------------------------------------------------- the station


class RssSampler:
    """Peak of (this process + its live descendants) VmRSS, sampled every 50 ms.

    Descendants, not only children: the flasher's workers are forked by its
    fork server. Pages they share with the server (copy-on-write) are counted
    once per process, so this overstates what forked workers really cost.
    """

    def __init__(self) -> None:
        self.peak_kib = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def _rss(pid: str) -> int:
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        return int(line.split()[1])
        except OSError:
            pass
        return 0

    def _children(self) -> list[str]:
        parents: dict[str, str] = {}
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                with open(f"/proc/{pid}/stat") as f:
                    parents[pid] = f.read().rsplit(")", 1)[1].split()[1]
            except OSError:
                pass
        ours = {str(os.getpid())}
        grew = True
        while grew:  # follow the process tree down from this process
            found = {pid for pid, parent in parents.items() if parent in ours} - ours
            grew = bool(found)
            ours |= found
        return sorted(ours - {str(os.getpid())})

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            total = self._rss("self") + sum(self._rss(pid) for pid in self._children())
            self.peak_kib = max(self.peak_kib, total)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _esptool_api_flash(port: str, data: bytes, stub: bool) -> None:
    """What the worker process does, minus the fd lending: the esptool API on a port it opens."""
    from esptool.cmds import attach_flash, run_stub, write_flash
    from esptool.targets import CHIP_DEFS

    # The chip is known, as for the other modes (the build is for an ESP32).
    esp = CHIP_DEFS["esp32"](port)
    esp.connect("no-reset")
    try:
        if stub:
            esp = run_stub(esp)
        esp.change_baud(BAUD)
        attach_flash(esp)
        write_flash(esp, [(APP_OFFSET, data)], no_progress=True)
    finally:
        esp._port.close()


def station_main(mode: str, ports: list[str], image: Path, stub: bool) -> None:
    import trio

    data = image.read_bytes()

    async def processes() -> None:
        from fixtures.flasher import EspFlasher, FlashWorkers
        from fixtures.images import load_image_set
        from fixtures.serial_link import open_serial_link
        from sequencer.config import FlashConfig

        images = load_image_set({APP_OFFSET: image}, chip="esp32")  # an ESP-IDF build names its chip
        config = FlashConfig(baud=BAUD, stub=stub, boot="none" if stub else "run-user-code")

        async def one(port: str, workers: FlashWorkers) -> None:
            async with open_serial_link(port) as link:
                flasher = EspFlasher(config, workers=workers)
                try:
                    await flasher.flash(link, images)
                finally:
                    await flasher.aclose()

        # As `sequencer run` does: one server imports esptool and forks each slot's worker.
        async with FlashWorkers.open() as workers, trio.open_nursery() as nursery:
            for port in ports:
                nursery.start_soon(one, port, workers)

    async def threads() -> None:
        from esptool.logger import log

        from fixtures.flash_worker import skip_untraced_hex_dumps

        log.set_verbosity("silent")
        skip_untraced_hex_dumps()  # what a thread-based flasher would do too
        limiter = trio.CapacityLimiter(len(ports))
        async with trio.open_nursery() as nursery:
            for port in ports:
                nursery.start_soon(
                    lambda p=port: trio.to_thread.run_sync(_esptool_api_flash, p, data, stub, limiter=limiter)
                )

    async def cli() -> None:
        async def one(port: str) -> None:
            command = [sys.executable, "-m", "esptool", "--chip", "esp32", "--port", port, "--baud", str(BAUD),
                       "--before", "no-reset", "--after", "no-reset", *([] if stub else ["--no-stub"]),
                       "write-flash", hex(APP_OFFSET), str(image)]
            result = await trio.run_process(command, capture_stdout=True, capture_stderr=True, check=False)
            if result.returncode:
                raise RuntimeError(f"{port}: esptool exited {result.returncode}: {result.stdout[-300:]!r}")

        async with trio.open_nursery() as nursery:
            for port in ports:
                nursery.start_soon(one, port)

    run = {"processes": processes, "threads": threads, "cli": cli}[mode]
    with RssSampler() as rss:
        r0, c0 = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        trio.run(run)
        wall = time.perf_counter() - t0
        r1, c1 = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    print(json.dumps({
        "wall_s": wall,
        "cpu_self_s": r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime,
        "cpu_children_s": c1.ru_utime + c1.ru_stime - c0.ru_utime - c0.ru_stime,
        "peak_rss_mib": rss.peak_kib / 1024,
    }), flush=True)


# ---------------------------------------------------------------- the driver


def run_case(mode: str, n: int, pace: bool, image: Path, expected_md5: str, stub: bool = True) -> dict[str, Any]:
    farm = subprocess.Popen(
        [sys.executable, __file__, "_farm", str(n), *(["--pace"] if pace else [])],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    try:
        ports = json.loads(farm.stdout.readline())["ports"]
        station = subprocess.run(
            [sys.executable, __file__, "_station", mode, str(image), *(["--rom"] if not stub else []), *ports],
            capture_output=True, text=True, check=False, timeout=600,
        )
        if station.returncode:
            raise RuntimeError(f"{mode} n={n}: station child failed:\n{station.stderr[-2000:]}")
        result = json.loads(station.stdout.strip().splitlines()[-1])
        farm.stdin.close()
        after = json.loads(farm.stdout.readline())
        farm.wait(timeout=30)
    finally:
        if farm.poll() is None:
            farm.kill()
            farm.wait()
    result.update(mode=mode if stub else f"{mode} (ROM loader)", n=n, paced=pace, farm_cpu_s=after["cpu_s"],
                  verified=all(m == expected_md5 for m in after["md5"]))
    result["cpu_s"] = result["cpu_self_s"] + result["cpu_children_s"]
    if pace:
        result["wire_limit_s"] = APP_BYTES * 10 / BAUD
        result["vs_wire"] = result["wall_s"] / result["wire_limit_s"]
    return result


def table(results: list[dict[str, Any]], paced: bool) -> list[str]:
    rows = [r for r in results if r["paced"] == paced]
    head = "| N | mode | wall (s) | " + ("wall / wire limit | " if paced else "MiB/s per slot | ")
    head += "CPU (s) | of which children (s) | peak RSS (MiB) | board sim CPU (s) | flash verified |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in sorted(rows, key=lambda r: (r["n"], r["mode"])):
        speed = f"{r['vs_wire']:.2f}x" if paced else f"{APP_BYTES / 2**20 / r['wall_s']:.2f}"
        lines.append(
            f"| {r['n']} | {r['mode']} | {r['wall_s']:.2f} | {speed} | {r['cpu_s']:.1f} | {r['cpu_children_s']:.1f} "
            f"| {r['peak_rss_mib']:.0f} | {r['farm_cpu_s']:.1f} | {'yes' if r['verified'] else '**NO**'} |"
        )
    return lines


def git_state() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True).stdout
    except OSError:
        return "unknown"
    return head.strip() + (" + uncommitted changes" if dirty.strip() else "")


def _stub_upload_s() -> float:
    """Wire time of esptool's ESP32 flasher stub at the ROM's 115200 baud (text + data, 10 bits a byte)."""
    import base64
    import importlib.util

    spec = importlib.util.find_spec("esptool")
    assert spec is not None and spec.submodule_search_locations
    stubs = sorted(Path(next(iter(spec.submodule_search_locations)), "targets", "stub_flasher").glob("*/esp32.json"))
    stub = json.loads(stubs[-1].read_text())
    size = len(base64.b64decode(stub["text"])) + len(base64.b64decode(stub.get("data", "")))
    return size * 10 / 115200


def _wire_note(results: list[dict[str, Any]]) -> str:
    """Where a slot's time beyond the wire limit goes: this run's totals, and a breakdown measured once."""
    one = next((r for r in results if r["mode"] == "processes" and r["n"] == 1 and r["paced"]), None)
    eight = next((r for r in results if r["mode"] == "processes" and r["n"] == 8 and r["paced"]), None)
    if one is None or eight is None:
        return "(needs paced runs of 1 and 8 slots)"
    wire = APP_BYTES * 10 / BAUD
    return (
        f"Here one slot alone took {one['wall_s']:.2f} s and eight {eight['wall_s']:.2f} s against "
        f"{wire:.2f} s on the wire. The write itself is at the wire's pace: the flasher's own report "
        "(`FlashReport.write_seconds`) gave 11.5-11.65 s, 1.01-1.02x, for every slot of an 8-slot run on "
        "2026-12-01. The rest is before the first block: about 0.2 s connecting (SYNC and the chip's magic "
        "number at the ROM's 115200 baud, switching to 921600 in the ROM, uploading esptool's stub at 921600, "
        "reading the chip's identity; 0.6 s with esptool's own chip detection, whose first probe an ESP32 ROM "
        "refuses), and getting a worker: the station's `FlashWorkers` server imports esptool "
        "once (about 0.2 s of CPU) and forks each slot's worker from it, where eight workers importing it "
        "themselves at the same moment cost about 0.9 s on two cores. (Before the stub was uploaded at the "
        f"flash rate, it took {_stub_upload_s():.2f} s more at 115200 baud.)"
    )


def _processes_note(results: list[dict[str, Any]]) -> str:
    """Threads against processes, in this run's numbers, and why the fixture keeps processes."""
    def wall(mode: str, n: int, paced: bool) -> float | None:
        return next((r["wall_s"] for r in results if r["mode"] == mode and r["n"] == n and r["paced"] is paced), None)

    sizes = sorted({r["n"] for r in results})
    pairs = [(n, wall("processes", n, False), wall("threads", n, False)) for n in sizes]
    shown = ", ".join(f"N = {n}: {p:.2f} s vs {t:.2f} s" for n, p, t in pairs if p is not None and t is not None)
    return (
        "Without the dumps a slot needs little CPU, so unpaced the two are close (processes vs threads, "
        f"{shown}); forked from the station's server, a worker process starts in milliseconds. The flasher "
        "uses a process per slot because esptool has no cancel hook: on an abort the station kills the worker mid-write and the "
        "port is free at once, where a thread would have to run to the end of the image; and esptool's "
        "remaining per-byte Python work never competes with the station's slots for the GIL."
    )


def render(results: list[dict[str, Any]], started: str, load: tuple[tuple[float, ...], tuple[float, ...]]) -> str:
    import esptool

    eight = {r["mode"]: r for r in results if r["paced"] and r["n"] == 8}
    best = min(eight.values(), key=lambda r: r["wall_s"]) if eight else None
    cpu = os.cpu_count()
    out = [
        f"<!-- BEGIN {MARK}: generated by tools/bench/flash_throughput.py --write; edit the script, not this section -->",
        "## Flashing ESP32s: worker processes vs threads vs the esptool CLI",
        "",
        f"A 1 MiB app of random bytes written to 0x10000 of N simulated ESP32s at once by the unmodified esptool "
        f"{esptool.__version__} (flasher stub, {BAUD} baud, `--before/--after no-reset`), three ways: **processes** "
        "(the flasher fixture: the station opens each port once and lends it to one esptool-API worker process per "
        "slot, forked from one server process that has imported esptool), **threads** (the same esptool API calls in one worker thread per slot, in the station process), "
        "**cli** (`python -m esptool write-flash`, one subprocess per port: what the factory runs today). The "
        "simulated boards run in a process of their own, as hardware would. Paced: the boards take the time "
        f"{BAUD} baud takes, and the wire limit is 1 MiB x 10 bits / {BAUD} = {APP_BYTES * 10 / BAUD:.2f} s. "
        "CPU is the station child's plus its reaped children's (forked workers are reaped by their server, so "
        "they count); peak RSS is summed over the station process and all its live descendants (50 ms samples; "
        "pages forked workers share with their server are counted in each). Every board's flash is read back and compared with the image.",
        "",
        f"Run {started} on {cpu} CPUs ({platform.machine()}), Python {platform.python_version()}, sequencer at "
        f"`{git_state()}`. Load average at start {'/'.join(f'{x:.2f}' for x in load[0])}, at end "
        f"{'/'.join(f'{x:.2f}' for x in load[1])}"
        + (" — **the machine was shared and busy; treat the numbers as indicative**." if max(load[0][0], load[1][0]) > 0.5
           else "."),
        "",
        "Reproduce: `python tools/bench/flash_throughput.py --write` (~8 min).",
        "",
        "### Paced at 921600 baud (the wire is the limit)",
        "",
        *table(results, True),
        "",
        "### Unpaced (the CPU is the limit)",
        "",
        *table(results, False),
        "",
        "### Targets and choice",
        "",
    ]
    if best is not None:
        fixture = eight.get("processes")
        met = fixture is not None and fixture["vs_wire"] <= 1.1
        out += [
            "| target | measured |  |",
            "|---|---|---|",
            f"| 8 slots, paced, within 1.1x of the wire limit ({APP_BYTES * 10 / BAUD * 1.1:.2f} s) | fixture "
            f"{fixture['wall_s']:.2f} s = {fixture['vs_wire']:.2f}x; best mode {best['mode']} {best['vs_wire']:.2f}x "
            f"| {'met' if met else '**not met**'} |",
            "",
        ]
    out += [
        "- *esptool's hex dumps.* esptool 5.6 renders a hex dump of every packet for its trace log even when "
        "tracing is off (`HexFormatter` inside f-strings in `loader.py`): about 1.5 s of CPU per MiB, some 20 ms "
        "per 16 KiB block on the critical path of its stop-and-wait protocol. The flasher's workers, and the "
        "threads mode here, replace `HexFormatter` with one that prints only the length "
        "(`fixtures.flash_worker.skip_untraced_hex_dumps`); the cli mode is esptool as the factory runs it today, "
        "dumps included. Compare the cli rows' CPU with the others'.",
        f"- *Why processes.* {_processes_note(results)}",
        f"- *Where the time goes beyond the wire.* {_wire_note(results)}",
        "- *ROM loader row.* The station flashes through the ROM loader on boards with no reset lines (the "
        "simulator's ptys; jigs that only strap GPIO0), because only the ROM can start the app afterwards without "
        "a reset; the ROM takes 1 KiB blocks, so the per-block costs are paid 16 times as often.",
        f"<!-- END {MARK} -->",
    ]
    return "\n".join(out) + "\n"


def write_doc(section: str, mark: str = MARK) -> None:
    text = DOC.read_text() if DOC.exists() else "# Benchmarks\n\nOne `##` section per benchmark.\n"
    pattern = re.compile(rf"<!-- BEGIN {mark}:.*?<!-- END {mark} -->\n", re.S)
    text = pattern.sub(lambda _: section, text) if pattern.search(text) else text.rstrip("\n") + "\n\n" + section
    DOC.write_text(text)


def main(argv: list[str]) -> int:
    if argv[:1] == ["_farm"]:
        farm_main(int(argv[1]), "--pace" in argv)
        return 0
    if argv[:1] == ["_boards"]:
        boards_main(argv[1], int(argv[2]))
        return 0
    if argv[:1] == ["_connect"]:
        connect_main(argv[1], argv[2:])
        return 0
    if argv[:1] == ["_station"]:
        rom = "--rom" in argv
        rest = [a for a in argv[1:] if a != "--rom"]
        station_main(rest[0], rest[2:], Path(rest[1]), stub=not rom)
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--write", action="store_true", help=f"rewrite this benchmark's section of {DOC.name}")
    parser.add_argument("--quick", action="store_true", help="N = 1, 4, unpaced only")
    parser.add_argument("--n", default="1,4,8,16", help="slot counts (default 1,4,8,16)")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--json", type=Path, help="also write every result here")
    parser.add_argument("--resets", action="store_true",
                        help="instead: the connect time of each reset sequence, on 1 and 8 boards of each kind")
    args = parser.parse_args(argv)
    if args.resets:
        started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        load0 = os.getloadavg()
        cases = [run_reset_case(kind, before, n) for kind, before in RESET_CASES for n in (1, 8)]
        section = render_resets(cases, started, (load0, os.getloadavg()))
        print(section)
        if args.json:
            args.json.write_text(json.dumps(cases, indent=2))
        if args.write:
            write_doc(section, RESETS_MARK)
            print(f"wrote {DOC}")
        return 0
    ns = [1, 4] if args.quick else [int(x) for x in args.n.split(",")]
    modes = args.modes.split(",")
    work = Path(os.environ.get("TMPDIR", "/tmp")) / "sequencer-bench"
    work.mkdir(parents=True, exist_ok=True)
    image = work / "app-1mib.bin"
    expected = hashlib.md5(app_image(image)).hexdigest()
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    load0 = os.getloadavg()
    results = []
    pacings = [False] if args.quick else [False, True]
    for pace in pacings:
        for n in ns:
            for mode in modes:
                r = run_case(mode, n, pace, image, expected)
                results.append(r)
                print(json.dumps(r), flush=True)
    if not args.quick and 8 in ns:
        r = run_case("processes", 8, True, image, expected, stub=False)
        results.append(r)
        print(json.dumps(r), flush=True)
    load1 = os.getloadavg()
    section = render(results, started, (load0, load1))
    print(section)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    if args.write:
        write_doc(section)
        print(f"wrote {DOC}")
    return 0 if all(r["verified"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
