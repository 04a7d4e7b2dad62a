"""A disk that really fills up under a station, and what the station and the reading commands do then.

The disk is a small tmpfs mounted in a user and mount namespace of its own
(``unshare --user --map-root-user --mount``): no privileges needed, nothing
left mounted afterwards, and the space runs out for every process inside,
for SQLite, the journal and the station log alike, as on a station whose
disk filled. Everything that must see that disk runs inside the namespace
(this module run as a script); the test gets back, as JSON, what each
command printed and what the store held once there was room again.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PRODUCT = ROOT / "products" / "esp32_sensor.py"
BATCH = "FULL"


def on_a_full_disk(work: Path, size_kib: int = 640, slots: int = 8) -> dict[str, Any]:
    """Run a station on a ``size_kib`` disk until it fills, then the reading commands; what each did."""
    done = subprocess.run(
        ["unshare", "--user", "--map-root-user", "--mount", sys.executable, "-m", "tests.full_disk", str(work),
         str(size_kib), str(slots)],
        capture_output=True, text=True, cwd=ROOT, timeout=600,
    )
    if done.returncode != 0:
        raise AssertionError(f"the full-disk scenario could not run: {done.stderr[-3000:]}")
    return json.loads(done.stdout)


def _sequencer(*args: str) -> dict[str, Any]:
    done = subprocess.run([sys.executable, "-m", "sequencer.cli", *args], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"}, timeout=300)
    return {"code": done.returncode, "out": done.stdout, "err": done.stderr}


def _fill(folder: Path) -> None:
    """Take whatever room is left, so the reading commands run on a disk with none."""
    fd = os.open(folder / "filler", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        block = b"\0" * 4096
        while True:
            try:
                os.write(fd, block)
            except OSError:
                if len(block) == 1:
                    return
                block = block[: len(block) // 2]
    finally:
        os.close(fd)


def _scenario(work: Path, size_kib: int, slots: int) -> dict[str, Any]:
    disk = work / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kib}k", "tmpfs", str(disk)], check=True)
    store = disk / "store.sqlite"
    seen: dict[str, Any] = {}
    seen["station"] = _sequencer("run", str(PRODUCT), "--sim", str(slots), "--store", str(store), "--reports",
                                 str(work / "reports"), "--plain", "--batch", BATCH)
    _fill(disk)
    seen["files"] = sorted(p.name for p in disk.iterdir())
    seen["runs"] = _sequencer("runs", "--store", str(store), "--local")
    seen["runs_json"] = _sequencer("runs", "--store", str(store), "--json", "--local")
    serials = [json.loads(line)["dut"].get("serial") for line in seen["runs_json"]["out"].splitlines() if line]
    seen["report"] = _sequencer("report", "--batch", BATCH, "--store", str(store), "-o", str(work / "batch.html"),
                                "--local")
    seen["export"] = _sequencer("export", "--batch", BATCH, "--store", str(store), "-o", str(work / "runs.csv"),
                                "--local")
    first = next((s for s in serials if s), None)
    seen["find"] = _sequencer("find", "--serial", first or "-", "--store", str(store), "--local")
    # Room again, as after the operator cleared the disk: the next station start restores what was journalled.
    (disk / "filler").unlink()
    subprocess.run(["mount", "-o", f"remount,size={64 * 1024}k", str(disk)], check=True)
    from reports.storage.store import LocalStore

    reopened = LocalStore.open(store, station=True)
    try:
        seen["store"] = [{"slot": r.slot, "serial": r.serial, "outcome": r.outcome.value if r.outcome else None,
                          "phases": len(r.phases)} for r in reopened.find_runs(batch=BATCH)]
    finally:
        reopened.close()
    return seen


if __name__ == "__main__":
    json.dump(_scenario(Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])), sys.stdout)
