"""Which sequencer code is running: stamped on every run record, shown by ``sequencer --version``.

A released install is named by its version. But stations are also set up
from a git checkout (``pip install -e .``, then ``git pull`` to update), and
there the installed version never changes while ``phases/`` and
``fixtures/`` do: two records from different code would claim the same
version. So when the package runs from a checkout, the commit is added as a
PEP 440 local version, ``0.1.0+gbe7f69f1a2b3``, and ``.dirty`` when tracked
files differ from that commit (code that no commit holds).

Worked out once, at import, before any event loop runs: asking git takes a
few milliseconds and must never happen on the trio thread.
"""

from __future__ import annotations

import importlib.metadata
import subprocess
from pathlib import Path

#: The folder holding the ``sequencer`` package: a checkout's root when installed editable.
_PACKAGE_ROOT = Path(__file__).resolve().parent.parent


def installed_version() -> str:
    try:
        return importlib.metadata.version("sequencer")
    except importlib.metadata.PackageNotFoundError:  # a source tree that was never installed
        return ""


def checkout_suffix(root: Path) -> str:
    """``+g<commit>[.dirty]`` when ``root`` is a git checkout; empty otherwise, or when git cannot say."""
    if not (root / ".git").exists():  # site-packages: a released install
        return ""

    def git(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10, stdin=subprocess.DEVNULL
        )

    try:
        head = git("rev-parse", "--short=12", "HEAD")
        if head.returncode != 0:  # no commit yet, or a checkout git will not read (another owner)
            return ""
        changed = git("diff", "--quiet", "HEAD", "--").returncode
    except (OSError, subprocess.SubprocessError):  # no git on this machine, or it hung
        return ""
    return f"+g{head.stdout.strip()}" + (".dirty" if changed == 1 else "")


def _sequencer_version() -> str:
    version = installed_version()
    return version + checkout_suffix(_PACKAGE_ROOT) if version else ""


#: Stamped on every run record, with the product file's hash: which test code produced it.
SEQUENCER_VERSION = _sequencer_version()
