"""The esp32-sensor product on a simulated farm, with faulty DUTs beside healthy ones.

Each fault must end as the right outcome with a reason that names the port or
the measurement, and must not touch any other slot.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from fixtures.sim.device import Faults
from sequencer.records import Outcome, RunRecord
from tests.farm_support import run_on_esp32_farm

SENSOR = Path(__file__).resolve().parent.parent / "products" / "esp32_sensor.py"


async def run_farm(store_path: Path, n: int, faults: dict[int, Faults]) -> list[RunRecord]:
    return await run_on_esp32_farm(SENSOR, store_path, n, faults=faults)


async def test_healthy_farm_passes_and_records_identity(store_path: Path) -> None:
    runs = await run_farm(store_path, 4, {})
    assert [r.outcome for r in runs] == [Outcome.PASS] * 4
    for r in runs:
        assert r.serial and r.dut["mac"] and r.dut["firmware"]
        assert r.limits_sha256
        transcript = r.phase("console_transcript").attachments[0]
        assert b"IDENT" in transcript.data
        assert r.phase("sleep_current").measurements[0].value < 25e-6


@pytest.mark.parametrize(
    "fault, phase, outcome, reason",
    [
        (Faults(garbage=True), "identify", Outcome.ERROR, "line is not UTF-8"),
        (Faults(overlong=True), "identify", Outcome.ERROR, "line longer than 1024 bytes"),
        (Faults(hang=True), "boot", Outcome.ERROR, "waiting for the boot banner to end in READY"),
        (Faults(rail_offsets={"3V3": 0.3}), "supply_rails", Outcome.FAIL, "measurement 'vdd_3v3': 3."),
        (Faults(selftest_fail=frozenset({"psram"})), "self_test", Outcome.FAIL, "'psram' is not ''"),
    ],
)
async def test_a_faulty_dut_fails_alone(store_path: Path, fault: Faults, phase: str, outcome: Outcome,
                                        reason: str) -> None:
    runs = await run_farm(store_path, 3, {1: fault})
    assert runs[0].outcome is Outcome.PASS and runs[2].outcome is Outcome.PASS
    bad = runs[1]
    assert bad.outcome is not Outcome.PASS
    failed = bad.phase(phase)
    assert failed.outcome is outcome
    assert reason in failed.reason
    # The teardown ran on the faulty slot too.
    assert bad.phase("console_transcript") is not None


async def test_marginal_rail_passes_flagged(store_path: Path) -> None:
    runs = await run_farm(store_path, 2, {0: Faults(rail_offsets={"3V3": 0.075})})
    marginal = runs[0]
    assert marginal.outcome is Outcome.PASS and marginal.marginal
    rail = next(m for m in marginal.phase("supply_rails").measurements if m.name == "vdd_3v3")
    assert rail.marginal and "above marginal 3.35" in rail.reason
    assert not runs[1].marginal
