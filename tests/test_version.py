"""Which code ran: the installed version, plus the commit when running from a git checkout."""

from __future__ import annotations

import re
import subprocess
from importlib.metadata import version
from pathlib import Path

import pytest

from sequencer.version import SEQUENCER_VERSION, checkout_suffix

ROOT = Path(__file__).resolve().parent.parent


def git(repo: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@example.com", *args],
        check=True, capture_output=True, text=True,
    ).stdout.strip()


@pytest.fixture
def checkout(tmp_path: Path) -> Path:
    repo = tmp_path / "checkout"
    repo.mkdir()
    git(repo, "init", "-q")
    (repo / "phases.py").write_text("LIMIT = 3.3\n")
    git(repo, "add", "phases.py")
    git(repo, "commit", "-q", "-m", "first")
    return repo


def test_a_clean_checkout_is_named_by_its_commit(checkout: Path) -> None:
    assert checkout_suffix(checkout) == f"+g{git(checkout, 'rev-parse', '--short=12', 'HEAD')}"
    # files git does not track (a store, a log, a scratch file) are not changed code
    (checkout / "station.log").write_text("x\n")
    assert not checkout_suffix(checkout).endswith(".dirty")


def test_changed_tracked_code_is_dirty_until_committed(checkout: Path) -> None:
    (checkout / "phases.py").write_text("LIMIT = 3.4\n")
    first = git(checkout, "rev-parse", "--short=12", "HEAD")
    assert checkout_suffix(checkout) == f"+g{first}.dirty"
    git(checkout, "commit", "-q", "-am", "widen")
    second = git(checkout, "rev-parse", "--short=12", "HEAD")
    assert second != first and checkout_suffix(checkout) == f"+g{second}"


def test_no_checkout_or_no_commit_adds_nothing(tmp_path: Path) -> None:
    assert checkout_suffix(tmp_path) == ""  # site-packages: a released install
    git(tmp_path, "init", "-q")
    assert checkout_suffix(tmp_path) == ""  # a repository with no commit yet


def test_no_git_on_the_machine_adds_nothing(checkout: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(checkout))  # nothing called git there
    assert checkout_suffix(checkout) == ""


def test_the_running_sequencer_names_its_commit_when_run_from_a_checkout() -> None:
    if (ROOT / ".git").exists():
        head = git(ROOT, "rev-parse", "--short=12", "HEAD")
        assert re.fullmatch(rf"{re.escape(version('sequencer'))}\+g{head}(\.dirty)?", SEQUENCER_VERSION)
    else:
        assert SEQUENCER_VERSION == version("sequencer")
