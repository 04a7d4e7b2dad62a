"""Station configuration: one TOML file so an operator's command needs nothing else.

::

    station = "shannon-line1-st3"
    operator = "aoife"
    batch = "B2026-47"          # default: <station>-<UTC date>
    store = "/var/lib/sequencer/store.sqlite"
    reports = "/var/lib/sequencer/reports"
    ports = ["/dev/ttyUSB0", "/dev/ttyUSB1"]   # or: sim = 8
    seed = 0                    # simulated devices' variation

    [resources.dmm]
    capacity = 1                # slots that may hold it at once
    instrument = "scpi-dmm"     # optional driver; omit for a plain lock
    port = "/dev/ttyACM0"       # "sim" for a simulated instrument

Unknown keys are errors, not silently ignored: a misspelt ``prots`` must not
run the station on no ports. Command-line options override the file.
"""

from __future__ import annotations

import os
import socket
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs

from sequencer.records import utcnow


class ConfigError(Exception):
    """The station configuration is not usable; the message is one line naming the file and key."""


@attrs.frozen
class ResourceConfig:
    name: str
    capacity: int = 1
    instrument: str | None = None
    port: str | None = None


def default_data_dir() -> Path:
    """Where a station keeps its store and reports when nothing says otherwise (XDG data home)."""
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "sequencer"


@attrs.frozen
class StationConfig:
    station: str = attrs.field(factory=lambda: socket.gethostname() or "station")
    operator: str = ""
    batch: str = ""
    store: Path = attrs.field(factory=lambda: default_data_dir() / "store.sqlite", converter=Path)
    reports: Path = attrs.field(factory=lambda: default_data_dir() / "reports", converter=Path)
    ports: tuple[str, ...] = attrs.field(default=(), converter=tuple)
    sim: int = 0
    seed: int = 0
    resources: Mapping[str, ResourceConfig] = attrs.field(factory=dict)
    source: Path | None = None

    @property
    def batch_or_default(self) -> str:
        return self.batch or f"{self.station}-{utcnow():%Y%m%d}"

    def with_overrides(self, **overrides: Any) -> StationConfig:
        """Apply command-line options; ``None`` means "not given"."""
        given = {k: v for k, v in overrides.items() if v is not None}
        if "ports" in given and given["ports"]:
            given.setdefault("sim", 0)
        if given.get("sim"):
            given.setdefault("ports", ())
        return attrs.evolve(self, **given)

    def check(self) -> None:
        where = str(self.source) if self.source else "station"
        if self.sim < 0:
            raise ConfigError(f"{where}: sim must be >= 0, got {self.sim}")
        if self.sim and self.ports:
            raise ConfigError(f"{where}: give either ports or sim, not both")
        if not self.sim and not self.ports:
            raise ConfigError(f"{where}: no DUT ports: give ports (or --port) or a simulated count (sim / --sim N)")
        if len(set(self.ports)) != len(self.ports):
            raise ConfigError(f"{where}: a port is listed twice")


_TOP_KEYS = {"station", "operator", "batch", "store", "reports", "ports", "sim", "seed", "resources"}
_RESOURCE_KEYS = {"capacity", "instrument", "port"}


def load_station_config(path: str | Path) -> StationConfig:
    p = Path(path)
    try:
        data = tomllib.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{p}: no such station file") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{p}: not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{p}: bad TOML: {exc}") from None
    except OSError as exc:
        raise ConfigError(f"{p}: cannot read: {exc.strerror}") from None
    for key in data:
        if key not in _TOP_KEYS:
            raise ConfigError(f"{p}: unknown key {key!r} (known: {', '.join(sorted(_TOP_KEYS))})")

    def typed(key: str, kind: type | tuple[type, ...], default: Any) -> Any:
        value = data.get(key, default)
        if isinstance(value, bool) and kind is int or not isinstance(value, kind):
            raise ConfigError(f"{p}: {key} must be {_kind_name(kind)}, got {value!r}")
        return value

    base = p.parent
    ports = typed("ports", list, [])
    if not all(isinstance(x, str) and x for x in ports):
        raise ConfigError(f"{p}: ports must be a list of device paths")
    resources = {}
    raw_resources = typed("resources", dict, {})
    for name, table in raw_resources.items():
        if not isinstance(table, dict):
            raise ConfigError(f"{p}: resources.{name} must be a table")
        for key in table:
            if key not in _RESOURCE_KEYS:
                raise ConfigError(f"{p}: resources.{name}: unknown key {key!r} (known: {', '.join(sorted(_RESOURCE_KEYS))})")
        capacity = table.get("capacity", 1)
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
            raise ConfigError(f"{p}: resources.{name}.capacity must be a whole number >= 1, got {capacity!r}")
        for key in ("instrument", "port"):
            if key in table and not isinstance(table[key], str):
                raise ConfigError(f"{p}: resources.{name}.{key} must be text")
        resources[name] = ResourceConfig(name, capacity, table.get("instrument"), table.get("port"))
    defaults = StationConfig()
    config = StationConfig(
        station=typed("station", str, defaults.station),
        operator=typed("operator", str, ""),
        batch=typed("batch", str, ""),
        store=_relative(base, typed("store", str, str(defaults.store))),
        reports=_relative(base, typed("reports", str, str(defaults.reports))),
        ports=tuple(ports),
        sim=typed("sim", int, 0),
        seed=typed("seed", int, 0),
        resources=resources,
        source=p,
    )
    return config


def _relative(base: Path, value: str) -> Path:
    path = Path(value).expanduser()
    return path if path.is_absolute() else base / path


def _kind_name(kind: type | tuple[type, ...]) -> str:
    names = {str: "text", int: "a whole number", list: "a list", dict: "a table"}
    if isinstance(kind, tuple):
        return " or ".join(names.get(k, k.__name__) for k in kind)
    return names.get(kind, kind.__name__)
