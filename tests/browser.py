"""Debian's headless chromium for the HTML checks: where it is, and how the tests start it."""

from __future__ import annotations

import os
import shutil
import time
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


def chromedriver() -> str:
    """Debian's chromium-driver; missing, the test fails with the way to install it."""
    path = shutil.which("chromedriver")
    if path is None and os.path.exists("/usr/bin/chromedriver"):
        path = "/usr/bin/chromedriver"
    if path is None:
        pytest.fail("Debian's chromium-driver is needed to drive the portal in a browser and was not found. Install "
                    "it with:  apt-get update && apt-get install -y chromium chromium-driver, or run "
                    "bash tools/test.sh  which installs it.")
    return path


def selenium_chromium(profile: Path, downloads: Path | None = None):  # type: ignore[no-untyped-def]
    """A selenium WebDriver on headless chromium through chromium-driver (no driver download, no network)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = chromium()
    for arg in chromium_args("", profile)[1:]:
        options.add_argument(arg)
    options.add_argument("--window-size=1400,900")
    if downloads is not None:
        options.add_experimental_option("prefs", {"download.default_directory": str(downloads),
                                                  "download.prompt_for_download": False})
    return webdriver.Chrome(service=Service(chromedriver()), options=options)


def wait_for(condition, what: str, timeout: float = 30.0):  # type: ignore[no-untyped-def]
    """``condition()``'s first true value, polled every 0.1 s; AssertionError naming ``what`` after ``timeout``."""
    from selenium.common.exceptions import StaleElementReferenceException

    deadline = time.monotonic() + timeout
    while True:
        try:
            value = condition()
        except StaleElementReferenceException:  # a live page re-rendered between finding and reading
            value = None
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)
