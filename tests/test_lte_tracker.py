"""The LTE tracker product end to end on a simulated station: provisioning, retests, faults, and no secret anywhere.

Everything is real on the station's side: esptool flashing simulated ESP32s
over ptys, AT commands to simulated modems on their own ptys, the
provisioning service on loopback (hypercorn), ZPL over TCP to the simulated
printer, the SQLite store, the station log and the HTML reports.
"""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import sys
from collections.abc import Mapping
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import pytest

from fixtures.device_config import SecretSource
from fixtures.nvs import find_partition, load_partition_table, read_nvs_image
from fixtures.partition_table import NVS
from fixtures.sim.esp32_board import open_esp32_farm
from fixtures.sim.instruments import open_simulated_instrument
from fixtures.sim.modem import ModemFaults, open_modems
from fixtures.station import STATION_FIXTURES, StationServices, station_fixtures
from phases.retest_gate import retest_gate
from reports.render.export import export_tables, write_csv
from reports.render.html import render_batch, render_run
from web.provisioning.server import serve_provisioning
from web.provisioning.storage import SqliteStorage
from reports.storage.store import LocalStore
from sequencer.config import StationConfig
from sequencer.engine import RunSettings
from sequencer.events import EventBus
from sequencer.logs import configure_logging
from sequencer.product import LoadedProduct, load_product
from sequencer.records import Outcome, RunRecord, run_to_json
from sequencer.resources import SharedResource
from sequencer.station import run_station

ROOT = Path(__file__).resolve().parent.parent
TRACKER = ROOT / "products" / "lte_tracker.py"

#: distinctive secret values: finding one anywhere is a finding
CA_TOKEN = "ca-7e1f0c9b2a4d4e8f9a1b3c5d"
API_TOKEN = "api-5d3c1b9a7e8f4a2c6b0d1e3f"


def measurements(run: RunRecord, phase: str) -> dict[str, Any]:
    [record] = [p for p in run.phases if p.name == phase]
    return {m.name: m.value for m in record.attempts[-1].measurements}


def phase_of(run: RunRecord, name: str) -> Any:
    return next(p for p in run.phases if p.name == name)


class Station:
    """One simulated station session's worth of outputs, kept for the assertions."""

    def __init__(self, tmp_path: Path) -> None:
        self.dir = tmp_path
        self.store_path = tmp_path / "store.sqlite"
        self.provisioning_db = tmp_path / "provisioning.sqlite"
        self.log_path = tmp_path / "station.log"
        self.nvs_passwords: list[str] = []
        self.labels: list[Any] = []

    async def run(
        self,
        n: int,
        *,
        loaded: LoadedProduct | None = None,
        modem_faults: Mapping[int, ModemFaults] | None = None,
        batch: str = "TRK-1",
        boards: list[Any] | None = None,
    ) -> list[RunRecord]:
        """Run a station session on ``n`` units: new boards, or ``boards`` (a farm kept open: the same units)."""
        loaded = loaded or load_product(TRACKER, station_fixtures=STATION_FIXTURES)
        secrets = SecretSource.from_env({"SEQUENCER_SECRET_MQTT_CA_TOKEN": CA_TOKEN,
                                         "SEQUENCER_SECRET_TRACKER_API_TOKEN": API_TOKEN})
        handle = configure_logging(self.log_path)  # the station log, as `sequencer run` writes it
        store = LocalStore.open(self.store_path, station=True)
        try:
            async with AsyncExitStack() as stack:
                await stack.enter_async_context(store.writer())
                if boards is None:
                    boards = await stack.enter_async_context(open_esp32_farm(n, seed=11))
                modems = await stack.enter_async_context(open_modems(n, seed=11, faults=modem_faults))
                storage = SqliteStorage.open(self.provisioning_db)
                stack.push_async_callback(storage.aclose)
                url = await stack.enter_async_context(serve_provisioning(storage))
                printer = await stack.enter_async_context(open_simulated_instrument("zpl-printer", boards))
                services = StationServices({b.path: m.path for b, m in zip(boards, modems, strict=True)}, url,
                                           secrets)
                result = await run_station(
                    loaded, [b.path for b in boards], settings=RunSettings("st-lte", operator="op", batch=batch),
                    store=store, bus=EventBus(), resources={"printer": SharedResource("printer", 1, printer)},
                    handle_signals=False, fixtures=station_fixtures(StationConfig(), services),
                )
                self.nvs_passwords += [p for b in boards if (p := nvs_password(b)) is not None]
        finally:
            store.close()
            if handle is not None:
                handle.close()
        return sorted(result.runs, key=lambda r: r.slot)

    def every_output(self, runs: list[RunRecord]) -> str:
        """Everything the station wrote or showed: store, log, provisioning DB, reports, exports, records."""
        files = [p for p in self.dir.rglob("*") if p.is_file()]
        text = "\n".join(p.read_bytes().decode("latin-1") for p in files)
        text += "\n".join(run_to_json(r) + render_run(r) for r in runs) + render_batch(runs, title="b")
        exported = io.StringIO()
        for table in export_tables(runs).values():
            write_csv(table, exported)
        text += exported.getvalue()
        attachments = [a.data.decode("latin-1") for r in runs for p in r.phases for a in p.attachments]
        return text + "\n".join(attachments)


def nvs_password(board: Any) -> str | None:
    """The MQTT password the phase wrote into the board's NVS partition, read back from its flash."""
    table = load_partition_table(ROOT / "products" / "data" / "esp32_sensor" / "build" / "flasher_args.json")
    part = find_partition(table, subtype=NVS, label="nvs")
    image = board.board.chip.flash.read(part.offset, part.size)
    entries = {(e.namespace, e.key): e.value for e in read_nvs_image(image)}
    return entries.get(("mqtt", "password"))


async def test_every_unit_is_tested_provisioned_registered_and_labelled(tmp_path: Path) -> None:
    station = Station(tmp_path)
    runs = await station.run(3)
    assert [r.outcome for r in runs] == [Outcome.PASS] * 3, [
        (p.name, p.outcome.value, p.reason) for r in runs for p in r.phases if p.outcome is not Outcome.PASS
    ]
    device_ids = set()
    for run in runs:
        dut = run.dut
        assert dut["mac"] and dut["serial"] and dut["public_key"].startswith("-----BEGIN PUBLIC KEY-----")
        assert len(dut["imei"]) == 15 and dut["imsi"].startswith("310410") and dut["apn"] == "broadband"
        assert measurements(run, "retest_gate")["retest"] is False
        assert measurements(run, "register")["registration_kind"] == "new"
        assert measurements(run, "nvs_config")["nvs_verdict"] == "pass"
        label = phase_of(run, "label")
        assert {a.name for a in label.attachments} == {"label-qr.svg", "label.zpl"}
        device_ids.add(dut["device_id"])
    assert len(device_ids) == 3
    # The NVS on each board holds its own broker password; none of them, and no
    # other secret, appears in anything the station wrote or showed.
    assert len(set(station.nvs_passwords)) == 3
    everything = station.every_output(runs)
    for secret in [CA_TOKEN, API_TOKEN, *station.nvs_passwords]:
        assert secret not in everything
    assert runs[0].dut["serial"] in everything  # the grep does see the outputs


async def test_a_retest_keeps_the_identity_and_device_id_and_says_so(tmp_path: Path) -> None:
    station = Station(tmp_path)
    first = await station.run(2)
    again = await station.run(2)  # the same units come back to the station
    assert [r.outcome for r in again] == [Outcome.PASS, Outcome.PASS]
    for before, after in zip(first, again, strict=True):
        assert after.dut["device_id"] == before.dut["device_id"]
        assert after.dut["public_key_sha256"] == before.dut["public_key_sha256"]
        gate = measurements(after, "retest_gate")
        assert gate["retest"] is True and gate["registered_device_id"] == before.dut["device_id"]
        assert measurements(after, "register")["registration_kind"] == "retest"
        assert measurements(after, "register")["claim_code"] == measurements(before, "register")["claim_code"]


async def test_a_config_rewrite_and_a_retest_keep_the_device_key_and_its_proof(tmp_path: Path) -> None:
    # The key KEYGEN makes lives in the board's flash. Kept in the app's NVS,
    # it was erased by nvs_config (which rewrites that partition whole) right
    # after keygen proved it: the unit was registered with a key it no longer
    # had, and its retest made a new one, which the service refused.
    station = Station(tmp_path)
    async with open_esp32_farm(2, seed=11) as boards:
        first = await station.run(2, boards=boards)
        assert [r.outcome for r in first] == [Outcome.PASS, Outcome.PASS]
        for board, run in zip(boards, first, strict=True):  # after the config was written, the key is there
            assert board.has_key and hashlib.sha256(board.public_key_der()).hexdigest() == run.dut["public_key_sha256"]
        again = await station.run(2, boards=boards)  # the same units come back: re-flashed, reconfigured
    assert [r.outcome for r in again] == [Outcome.PASS, Outcome.PASS], [
        (p.name, p.reason) for r in again for p in r.phases if p.outcome is not Outcome.PASS
    ]
    for before, after in zip(first, again, strict=True):
        keygen = measurements(after, "keygen")
        assert keygen["key_created"] is False and keygen["key_verified"] is True  # proved again, the same key
        assert after.dut["public_key_sha256"] == before.dut["public_key_sha256"]
        assert measurements(after, "register")["registration_kind"] == "retest"
        assert after.dut["device_id"] == before.dut["device_id"]


async def test_a_product_that_refuses_retests_stops_before_flashing(tmp_path: Path) -> None:
    station = Station(tmp_path)
    [first] = await station.run(1)
    loaded = load_product(TRACKER, station_fixtures=STATION_FIXTURES)
    phases = [retest_gate("refuse").depends_on(loaded.product.phases[0]) if p.name == "retest_gate" else p
              for p in loaded.product.phases]
    import attrs

    refusing = LoadedProduct(attrs.evolve(loaded.product, phases=phases), loaded.source)
    [again] = await station.run(1, loaded=refusing)
    gate = phase_of(again, "retest_gate")
    assert again.outcome is Outcome.FAIL and gate.outcome is Outcome.FAIL
    assert f"registered as device {first.dut['device_id']}" in gate.reason
    assert "does not allow retests" in gate.reason
    assert phase_of(again, "flash").outcome is Outcome.SKIPPED


async def test_a_missing_sim_fails_its_unit_with_the_reason_and_no_other(tmp_path: Path) -> None:
    station = Station(tmp_path)
    runs = await station.run(3, modem_faults={1: ModemFaults(sim_absent=True)})
    assert [r.outcome for r in runs] == [Outcome.PASS, Outcome.FAIL, Outcome.PASS]
    cellular = phase_of(runs[1], "cellular_identity")
    assert cellular.outcome is Outcome.FAIL and "SIM not inserted (+CME ERROR: 10)" in cellular.reason
    # Never registered, so never a device: no label, no NVS, nothing half done.
    assert {phase_of(runs[1], n).outcome for n in ("nvs_config", "register", "label")} == {Outcome.SKIPPED}
    assert "device_id" not in runs[1].dut


@pytest.mark.slow
def test_the_demo_command_runs_the_tracker_on_a_simulated_station(tmp_path: Path) -> None:
    """`sequencer run products/lte_tracker.py --sim N` with nothing configured; its outputs hold no secret."""
    env = {**os.environ, "XDG_DATA_HOME": str(tmp_path / "data"), "SEQUENCER_SECRET_MQTT_CA_TOKEN": CA_TOKEN}
    env.pop("SEQUENCER_PROVISIONING_URL", None)
    done = subprocess.run(
        [sys.executable, "-m", "sequencer.cli", "run", str(TRACKER), "--sim", "3", "--plain", "--batch", "DEMO"],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=240,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "3/3 passed" in done.stdout and "provisioning: simulated service at http://127.0.0.1:" in done.stdout
    written = "\n".join(p.read_bytes().decode("latin-1") for p in (tmp_path / "data").rglob("*") if p.is_file())
    assert (tmp_path / "data" / "sequencer" / "provisioning.sqlite").is_file()
    for output in (done.stdout, done.stderr, written):
        assert CA_TOKEN not in output


@pytest.mark.slow
def test_with_mongodb_the_simulated_station_registers_into_it_and_streams_the_runs(tmp_path: Path, mongo: Any) -> None:
    """With --mongo, the simulated provisioning service keeps its devices in the station's MongoDB."""
    from tests.mongo_support import database

    env = {**os.environ, "XDG_DATA_HOME": str(tmp_path / "data")}
    env.pop("SEQUENCER_PROVISIONING_URL", None)
    done = subprocess.run(
        [sys.executable, "-m", "sequencer.cli", "run", str(TRACKER), "--sim", "2", "--plain",
         "--mongo", mongo.uri, "--mongo-db", mongo.database],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=240,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    db = database(mongo)
    provisioned = list(db.provisioned_devices.find({}, {"requests": 0}))
    assert len(provisioned) == 2 and all("broker_password_hash" in d for d in provisioned)
    shipped = {r["dut"]["device_id"] for r in db.runs.find({})}  # the runs, streamed by the shipper
    assert shipped == {d["device_id"] for d in provisioned}
    assert not (tmp_path / "data" / "sequencer" / "provisioning.sqlite").exists()
    db.client.close()
