"""Debian's headless chromium for the HTML checks: where it is, and how the tests start it."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

CHROMIUM_HINT = (
    "Debian's headless chromium is needed for the HTML browser checks and was not found. "
    "Install it with:  apt-get update && apt-get install -y chromium   (as root, or with sudo), "
    "or run  bash tools/test.sh  which installs it."
)


def chromium() -> str:
    """The chromium binary; a missing browser fails the test (a skipped check is not a passing one)."""
    path = shutil.which("chromium") or ("/usr/bin/chromium" if os.path.exists("/usr/bin/chromium") else None)
    if path is None:
        pytest.fail(CHROMIUM_HINT)
    return path


def chromium_args(binary: str, profile: Path) -> list[str]:
    """Headless, offline, with a profile of its own (so parallel runs do not share one)."""
    return [binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--no-first-run", f"--user-data-dir={profile}"]
