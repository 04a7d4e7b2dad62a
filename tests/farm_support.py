"""Run a product file on simulated ESP32 boards with the station's own fixtures and a shared DMM."""

from __future__ import annotations

from collections.abc import Collection, Mapping
from functools import partial
from pathlib import Path

import trio

from fixtures.sim.device import Faults
from fixtures.sim.esp32_board import open_esp32_farm
from fixtures.sim.instruments import open_simulated_instrument
from fixtures.sim.operator import simulated_operator
from fixtures.station import STATION_FIXTURES, station_fixtures
from reports.storage.store import LocalStore
from sequencer.config import StationConfig
from sequencer.engine import RunSettings
from sequencer.events import EventBus
from sequencer.operator import OperatorDesk
from sequencer.product import load_product
from sequencer.records import RunRecord
from sequencer.resources import SharedResource
from sequencer.station import run_station


async def run_on_esp32_farm(
    product_file: Path, store_path: Path, n: int, *, faults: Mapping[int, Faults] | None = None, seed: int = 7,
    operator_says_no: Collection[int] = (),
) -> list[RunRecord]:
    """Load ``product_file`` as a station does and run it on ``n`` boards; the records, by slot.

    The boards arrive factory-fresh, held in download mode, so the product
    flashes them first with the station's ``flasher`` fixture, as on the line.
    The simulated operator answers the product's questions (no on the
    ``operator_says_no`` slots).
    """
    loaded = load_product(product_file, station_fixtures=STATION_FIXTURES)
    store = LocalStore.open(store_path, station=True)
    bus = EventBus()
    desk = OperatorDesk(bus)
    try:
        async with store.writer(), open_esp32_farm(n, seed=seed, faults=dict(faults or {})) as boards:
            async with open_simulated_instrument("scpi-dmm", boards, seed=seed) as dmm, trio.open_nursery() as nursery:
                nursery.start_soon(partial(simulated_operator, desk, says_no=operator_says_no, seed=seed))
                result = await run_station(
                    loaded, [b.path for b in boards], settings=RunSettings("test", batch="F"), store=store,
                    bus=bus, resources={"dmm": SharedResource("dmm", 1, dmm)}, handle_signals=False,
                    fixtures=station_fixtures(StationConfig()), desk=desk,
                )
                nursery.cancel_scope.cancel()
    finally:
        store.close()
    return sorted(result.runs, key=lambda r: r.slot)
