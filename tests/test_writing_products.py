"""docs/writing-products.md stays true: its code is the example product's, which loads, runs and fails as it says."""

from __future__ import annotations

import hashlib
import re
import tomllib
from pathlib import Path

import pytest

from sequencer.cli import main
from sequencer.records import Outcome
from tests.farm_support import run_on_esp32_farm

ROOT = Path(__file__).resolve().parent.parent
GUIDE = ROOT / "docs" / "writing-products.md"
EXAMPLE = ROOT / "docs" / "examples" / "tutorial_board.py"
LIMITS = EXAMPLE.with_suffix(".limits.toml")


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", GUIDE.read_text(encoding="utf-8"), flags=re.S)


def test_every_code_block_of_the_guide_is_the_example_products_own() -> None:
    example = EXAMPLE.read_text(encoding="utf-8")
    python = blocks("python")
    assert len(python) >= 8
    for block in python:
        if block.startswith("# sketch"):
            compile(block, "<guide sketch>", "exec")  # not in the example, but valid Python
        else:
            assert block in example, f"the guide shows code the example does not have:\n{block}"
    limits, station = blocks("toml")
    assert limits in LIMITS.read_text(encoding="utf-8")
    assert tomllib.loads(station)["fixtures"]  # a station file's [fixtures.NAME] table


def test_the_example_checks_and_names_its_limits(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", str(EXAMPLE)]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^limits  \S*docs/examples/tutorial_board\.limits\.toml  sha256 ", out, flags=re.M)
    assert "rev_c_self_test  (after identify; timeout 10 s; conditional; 1 measurement)" in out


def _broken(tmp_path: Path, old: str, new: str, limits: str | None = None) -> Path:
    """A copy of the example named board.py with one mistake (and its image set found from anywhere)."""
    text = EXAMPLE.read_text(encoding="utf-8").replace(
        'Path(__file__).resolve().parents[2] / "products"', repr(str(ROOT / "products")).join(("Path(", ")"))
    )
    assert old in text
    product = tmp_path / "board.py"
    product.write_text(text.replace(old, new, 1), encoding="utf-8")
    if limits is not None:
        product.with_suffix(".limits.toml").write_text(limits, encoding="utf-8")
    return product


def test_the_mistakes_the_guide_lists_are_the_errors_check_gives(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    [listed] = blocks("text")
    mistakes = [
        ("    after=[rails, regulator_startup, temperature, status_led],",
         '    after=[rails, regulator_startup, "temprature", status_led],',
         None),
        ("detect = esp32.detect\n", 'detect = esp32.detect.depends_on("identify")\n', None),
        ("async def revision(ctx):", "async def revision(ctx, jig):", None),
        ("", "", "[rails]\nvdd_3v3 = { low = 3.4, high = 3.2 }\n"),
        ("", "", "[rails]\nvdd_33 = { low = 3.2, high = 3.4 }\n"),
    ]
    monkeypatch.chdir(tmp_path)  # the messages name board.py as typed
    got = []
    for i, (old, new, limits) in enumerate(mistakes):
        folder = tmp_path / str(i)
        folder.mkdir()
        _broken(folder, old, new, limits)
        monkeypatch.chdir(folder)
        assert main(["check", "board.py"]) == 2
        got.append(capsys.readouterr().err.strip())
    assert "\n".join(got) == listed.strip()


async def test_the_example_runs_on_simulated_boards_as_the_guide_says(tmp_path: Path) -> None:
    runs = await run_on_esp32_farm(EXAMPLE, tmp_path / "store.sqlite", 6, seed=3)
    assert [r.outcome for r in runs] == [Outcome.PASS] * 6, [
        (p.name, p.outcome.value, p.reason) for r in runs for p in r.phases if p.outcome is not Outcome.PASS]
    revisions = {r.dut["hardware_rev"] for r in runs}
    assert revisions == {"B", "C"}  # both branches of run_if are exercised
    for r in runs:
        assert r.limits_sha256 == hashlib.sha256(LIMITS.read_bytes()).hexdigest()
        check = r.phase("rev_c_self_test")
        if r.dut["hardware_rev"] == "C":
            assert check.outcome is Outcome.PASS
        else:
            assert (check.outcome, check.reason) == (Outcome.SKIPPED, "run_if was false")
        startup = r.phase("regulator_startup")
        assert len(startup.measurements[0].value) == 100
        assert [a.name for a in startup.attachments] == ["startup.csv"]
        # the limits file's band, not the one in the product file
        vdd = r.phase("rails").measurements[0]
        assert (vdd.limits.marginal_low, vdd.limits.marginal_high) == (3.24, 3.36)
        assert r.phase("console_transcript").attachments[0].name == "console.txt"
        led = r.phase("status_led")  # the simulated operator answered
        assert led.outcome is Outcome.PASS and led.measurements[0].value is True
        assert led.logs[0].message == "asked the operator question='Is the status LED green?' expected='yes/no'"


async def test_a_led_the_operator_does_not_see_fails_that_unit_alone(tmp_path: Path) -> None:
    runs = await run_on_esp32_farm(EXAMPLE, tmp_path / "store.sqlite", 3, seed=3, operator_says_no=[1])
    assert [r.outcome for r in runs] == [Outcome.PASS, Outcome.FAIL, Outcome.PASS]
    led = runs[1].phase("status_led")
    assert (led.outcome, led.reason) == (Outcome.FAIL, "measurement 'status_led_green': False is not True")
