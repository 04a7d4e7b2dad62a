"""Shared test helpers: a real local store and a one-call way to run a product on N slots."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
import structlog

from reports.storage.store import LocalStore
from sequencer.engine import RunSettings
from sequencer.events import EventBus
from sequencer.operator import OperatorDesk
from sequencer.product import LoadedProduct, Product, validate_product
from sequencer.records import RunRecord
from sequencer.resources import SharedResource
from sequencer.station import run_station


@pytest.fixture(autouse=True)
def quiet_structlog() -> None:
    # Engine logs would otherwise print to stdout in every test.
    import logging

    structlog.configure(
        processors=[structlog.processors.JSONRenderer()],
        wrapper_class=structlog.make_filtering_bound_logger(logging.CRITICAL),
        logger_factory=structlog.ReturnLoggerFactory(),
        cache_logger_on_first_use=False,
    )


@pytest.fixture
def store_path(tmp_path: Path) -> Path:
    return tmp_path / "store.sqlite"


async def run_product(
    product: Product,
    store_path: Path,
    *,
    slots: int = 1,
    ports: Sequence[str] | None = None,
    resources: Mapping[str, SharedResource] | None = None,
    bus: EventBus | None = None,
    fixtures: Mapping[str, Any] | None = None,
    desk: OperatorDesk | None = None,
    history: bool = False,
) -> list[RunRecord]:
    """Validate and run ``product`` on ``slots`` slots against a real store; return the records.

    ``history``: units are looked up in the store as a station does (retests, ``max_retests``).
    """
    from reports.storage.unit_history import StoreUnitHistory

    validate_product(product, station_fixtures=list(fixtures or ()))
    store = LocalStore.open(store_path, station=True)
    try:
        async with store.writer():
            result = await run_station(
                LoadedProduct(product, Path("<test>")),
                list(ports or [f"/dev/sim{i}" for i in range(slots)]),
                settings=RunSettings(station="test-station", operator="tester", batch="B1"),
                store=store,
                bus=bus or EventBus(),
                resources=resources,
                handle_signals=False,
                fixtures=fixtures,
                desk=desk,
                history=StoreUnitHistory(store) if history else None,
            )
    finally:
        store.close()
    return sorted(result.runs, key=lambda r: r.slot)


def outcomes(run: RunRecord) -> dict[str, Any]:
    return {p.name: p.outcome.value for p in run.phases}


@pytest.fixture(autouse=True)
def no_ambient_station_settings(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> None:
    # The default store and reports live in the XDG data folder: a developer's
    # own store there must not be what a test reads or writes by default.
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path_factory.mktemp("xdg-data")))
    # A developer's SEQUENCER_MONGO_URI must not make every station test ship
    # to their database; MongoDB tests pass their settings explicitly.
    monkeypatch.delenv("SEQUENCER_MONGO_URI", raising=False)
    monkeypatch.delenv("SEQUENCER_MONGO_DB", raising=False)
    # Likewise the developer's provisioning service and secrets.
    monkeypatch.delenv("SEQUENCER_PROVISIONING_URL", raising=False)
    monkeypatch.delenv("SEQUENCER_SECRETS_FILE", raising=False)
    # And the station file a station machine names for every command.
    monkeypatch.delenv("SEQUENCER_STATION", raising=False)


# real-mongod fixtures (one server per session), and the portal served over one
pytest_plugins = ["tests.mongo_support", "tests.portal_support"]
