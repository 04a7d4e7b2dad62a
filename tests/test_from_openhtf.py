"""docs/from-openhtf.md stays true: its sequencer code is the example products', which run as the page says.

Every product in docs/examples/openhtf/ is run here through the command line,
under ``--bench`` (no board, no port) or ``--sim``, and its records are read
back from the store.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from reports.storage.store import LocalStore
from sequencer.cli import main
from sequencer.records import MeasurementOutcome, Outcome, RunRecord

ROOT = Path(__file__).resolve().parent.parent
GUIDE = ROOT / "docs" / "from-openhtf.md"
EXAMPLES = ROOT / "docs" / "examples" / "openhtf"


def run(product: str, tmp_path: Path, *options: str) -> tuple[int, list[RunRecord]]:
    store = tmp_path / "store.sqlite"
    code = main(["run", str(EXAMPLES / product), *options, "--store", str(store), "--plain", "--batch", "B"])
    reading = LocalStore.open(store)
    try:
        return code, reading.find_runs(batch="B")
    finally:
        reading.close()


def ran(record: RunRecord) -> list[tuple[str, str]]:
    return [(p.name, p.outcome.value) for p in record.phases]


def test_every_sequencer_block_of_the_page_is_an_example_products_own() -> None:
    sources = "\n".join(p.read_text(encoding="utf-8") for p in sorted(EXAMPLES.glob("*.py")))
    blocks = re.findall(r"```python\n(.*?)```", GUIDE.read_text(encoding="utf-8"), flags=re.S)
    ours = [b for b in blocks if not b.startswith("# OpenHTF")]
    assert len(ours) >= 8 and len(blocks) > len(ours)
    for block in ours:
        assert block in sources, f"the page shows code no example product has:\n{block}"
    for block in blocks:
        compile(block, "<from-openhtf block>", "exec")


def test_hello_world_on_a_bench(tmp_path: Path) -> None:
    code, [record] = run("hello_world.py", tmp_path, "--bench", "1")
    assert code == 0 and record.outcome is Outcome.PASS and record.port == "bench"
    assert record.phase("hello_world").measurements[0].value == "Hello Again!"


def test_groups_a_failing_phase_and_a_checkpoint_record_every_phase_in_order(tmp_path: Path) -> None:
    code, [record] = run("phase_groups.py", tmp_path, "--bench", "1")
    assert code == 1 and record.outcome is Outcome.FAIL
    assert ran(record) == [
        ("setup_phase", "PASS"), ("main_phase", "PASS"), ("failing_phase", "FAIL"), ("inner_main_phase", "PASS"),
        ("inner_teardown_phase", "PASS"), ("teardown_phase", "PASS"), ("checkpoint", "FAIL"),
        ("long_running_phase", "SKIPPED"),
    ]
    assert record.phase("long_running_phase").reason == "run stopped by phase 'checkpoint'"
    assert [p.teardown for p in record.phases] == [False] * 4 + [True, True] + [False] * 2


def test_measurements_as_openhtf_judges_them(tmp_path: Path) -> None:
    code, [record] = run("measurements.py", tmp_path, "--bench", "1")
    assert code == 1 and record.outcome is Outcome.FAIL
    failed = [p.name for p in record.phases if p.outcome is Outcome.FAIL]
    assert failed == ["inline_phase"]
    series, average, resistance = record.phase("multdim_measurements").measurements
    assert len(series.value) == 10 and series.value[1] == [1, 20.0, 2.0] and resistance.value == pytest.approx(10)
    assert record.phase("marginal_measurements").marginal
    vbat = record.phase("monitored_phase").measurements[0]
    assert vbat.outcome is MeasurementOutcome.PASS and len(vbat.value) >= 3 and vbat.dimensions == (("t", "s"),)


def test_repeat_and_its_limit(tmp_path: Path) -> None:
    code, [record] = run("repeat.py", tmp_path, "--bench", "1")
    assert code == 1
    assert ran(record) == [("phase_repeat", "PASS"), ("phase_repeat_with_limit", "FAIL"), ("never_reached", "SKIPPED")]
    assert [a.outcome.value for a in record.phase("phase_repeat").attempts] == ["SKIPPED", "SKIPPED", "PASS"]


def test_with_plugs_takes_its_settings_from_the_station_file_and_knows_it_is_simulated(tmp_path: Path) -> None:
    code, [record] = run("with_plugs.py", tmp_path, "--sim", "1")
    assert code == 0
    assert [name for name, _ in ran(record)] == ["ping_google_2", "ping_dns_a_2", "ping_dns_b_2"]
    # What the pinger (OpenHTF's plug) said is in the record of the phase that used it, naming it.
    said = [(line.fixture, line.message) for line in record.phase("ping_dns_a_2").logs]
    assert said == [("dns_a", "running: ping -c 2 8.8.8.8")]
    # On a bench (slot.simulated is False) there is no network: each ping is its fixture's error, one line.
    station = tmp_path / "station.toml"
    station.write_text('station = "bench-1"\nbench = 1\n[fixtures.dns_a]\naddress = "10.0.0.53"\n')
    (tmp_path / "b").mkdir()
    code, [bench] = run("with_plugs.py", tmp_path / "b", "--station", str(station))
    assert code == 1
    assert bench.phase("ping_dns_a_2").reason == "OSError: no route to 10.0.0.53 from a bench without a network"
    station.write_text('station = "bench-1"\nbench = 1\n[fixtures.dns_a]\nadress = "10.0.0.53"\n')
    assert main(["run", str(EXAMPLES / "with_plugs.py"), "--station", str(station), "--store",
                 str(tmp_path / "c.sqlite")]) == 2


def test_phase_branches_answered_by_the_simulated_operator(tmp_path: Path) -> None:
    code, [record] = run("phase_branches.py", tmp_path, "--sim", "1")
    assert code == 0
    assert ran(record) == [("select_testing_branch", "PASS"), ("prototype_observation", "PASS"),
                           ("evt_observation", "SKIPPED"), ("dvt_validation", "SKIPPED")]
    assert record.phase("prototype_observation").measurements[0].value == "all lights green"


def test_a_free_text_question_gets_a_matching_answer_under_sim_never_a_timeout(tmp_path: Path) -> None:
    product = tmp_path / "label.py"
    product.write_text(
        "from sequencer import Measurement, Product, phase\n"
        "@phase(measurements=[Measurement('label').matches(r'EVT-\\d{4}')], timeout=60)\n"
        "async def scan(ctx, operator):\n"
        "    ctx.measurements.label = await operator.ask('Scan the EVT label', matches=r'EVT-\\d{4}')\n"
        "product = Product('label', [scan])\n"
    )
    store = tmp_path / "store.sqlite"
    assert main(["run", str(product), "--sim", "1", "--store", str(store), "--plain", "--batch", "B"]) == 0
    reading = LocalStore.open(store)
    try:
        [record] = reading.find_runs(batch="B")
    finally:
        reading.close()
    assert record.phase("scan").measurements[0].value == "EVT-0000"  # drawn from the pattern, the simplest
    assert record.phase("scan").duration_s < 30
