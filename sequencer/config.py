"""Station configuration: one TOML file so an operator's command needs nothing else.

::

    station = "shannon-line1-st3"
    product = "products/esp32_sensor.py"      # when the command names none
    operator = "aoife"
    batch = "B2026-47"          # default: <station>-<UTC date>
    store = "/var/lib/sequencer/store.sqlite"
    reports = "/var/lib/sequencer/reports"      # default: reports/ beside the store
    ports = ["/dev/ttyUSB0", "/dev/ttyUSB1"]   # or: sim = 8
    seed = 0                    # simulated devices' variation

    [resources.dmm]
    capacity = 1                # slots that may hold it at once
    instrument = "scpi-dmm"     # optional driver; omit for a plain lock
    port = "/dev/ttyACM0"       # "sim" for a simulated instrument

    [mongo]                     # optional: stream records to a central MongoDB
    uri = "mongodb://db1,db2,db3/?replicaSet=factory"
    database = "sequencer"      # default: the URI's database, else "sequencer"

    [flash]                     # how the flasher fixture writes images (docs/flashing.md)
    baud = 921600
    before = "no-reset"         # into the loader: a jig holds GPIO0; "default-reset" (DTR/RTS), "usb-reset"
    stub = false                # ROM loader; the stub needs boot = "hard-reset"
    boot = "run-user-code"      # or "hard-reset" (RTS/DTR wired), "none"
    max_seconds = 60            # quality gate: longest write + verify per DUT
    max_image_bytes = { esp32 = 0x180000 }   # quality gate: largest image, per chip

    [flash.port."rfc2217://10.0.0.7:4000"]   # one port wired otherwise: before, boot, stub, baud
    before = "default-reset"
    boot = "hard-reset"

    [[detect]]                  # instead of ports: every USB serial port that matches a rule
    vid = 0x10C4                # and/or pid, serial, location, description (globs)
    location = "1-1.*"
    locations = ["1-1.1", "1-1.2"]   # or: one slot per USB location, in this order (continuous stations)
    before = "default-reset"    # and how the boards on these ports are wired (before, boot, stub, baud)
    boot = "hard-reset"

    continuous = true           # each slot tests a board whenever one is put in (--continuous)
    panel = "127.0.0.1:8081"    # the operator panel in a browser (--panel; docs/operating.md)

    build = "esp32-sensor@stable"   # flash the build this channel of the portal's registry points at
    [portal]
    url = "https://portal.factory.example"   # where builds come from; the token: the secret portal_token

    [modems]                    # products with an LTE modem: each DUT port's modem AT port
    "/dev/ttyUSB0" = "/dev/ttyUSB2"

    [provisioning]              # products that register devices (docs/provisioning.md)
    url = "https://provisioning.factory.example"

    [secrets]                   # NVS secrets (docs/device-config.md); SEQUENCER_SECRET_<NAME> wins
    file = "/etc/sequencer/secrets.toml"

    [quality]                   # how the reports judge the measurements' statistics
    cpk_threshold = 1.33        # Cpk below this is "not capable", listed first

    [scan]                      # barcode/QR scans (sequencer/scans.py, docs/operating.md)
    start = "scan"              # continuous: a slot starts on a start scan or the panel's Start ("board": when
                                # a board is put in); for jigs whose USB adapter is always there
    label = true                # every unit's label is scanned before its test starts
    port = "/dev/serial/by-id/usb-Zebra-if00"   # a serial scanner; omit for a keyboard wedge (standard input)
    baudrate = 9600
    badge = "OP:"               # what each kind of code starts with, or "re:" and a regular expression
    work_order = "WO:"
    slot = "SLOT:"
    start_code = "START"
    serial = "re:SN\\d{9}"       # a label's pattern when the product has no serial_pattern

Unknown keys are errors, not silently ignored: a misspelt ``prots`` must not
run the station on no ports. Command-line options override the file.
"""

from __future__ import annotations

import os
import re
import socket
import tomllib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import attrs

from sequencer.records import utcnow
from sequencer.scans import RULE_KEYS, ScanConfig


class ConfigError(Exception):
    """The station configuration is not usable; the message is one line naming the file and key."""


@attrs.frozen
class ResourceConfig:
    name: str
    capacity: int = 1
    instrument: str | None = None
    port: str | None = None


_BOOT_MODES = ("run-user-code", "hard-reset", "none")
#: esptool's --before names: how the board is put into its serial loader
BEFORE_MODES = ("default-reset", "usb-reset", "no-reset")
#: what ``--sim-board`` simulates: a jig holding GPIO0, a DevKitC-style auto-reset board over RFC 2217,
#: an ESP32-S3 on its USB-Serial/JTAG (over RFC 2217)
SIM_BOARDS = ("jig", "devkitc", "esp32s3-usb")


def _positive(_: object, attribute: attrs.Attribute, value: Any) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0):
        raise ValueError(f"{attribute.name} must be a positive number, got {value!r}")


def _one_of(options: tuple[str, ...]) -> Any:
    def check(_: object, attribute: attrs.Attribute, value: Any) -> None:
        if value not in options:
            raise ValueError(f"{attribute.name} must be one of {', '.join(options)}, got {value!r}")

    return check


def _chip_limits(value: Mapping[str, int]) -> Mapping[str, int]:
    limits = {}
    for chip, limit in dict(value).items():
        if isinstance(limit, bool) or not isinstance(limit, int) or limit <= 0:
            raise ValueError(f"max_image_bytes.{chip} must be a positive whole number of bytes, got {limit!r}")
        limits[str(chip).lower().replace("-", "").replace("_", "")] = limit
    return limits


def _optional(check: Any) -> Any:
    def optional(instance: object, attribute: attrs.Attribute, value: Any) -> None:
        if value is not None:
            check(instance, attribute, value)

    return optional


@attrs.frozen
class PortWiring:
    """How the board on one port is wired for flashing: ``[flash]`` keys that differ on that port.

    Set per port (``[flash.port."PATH"]``), per ``[[detect]]`` rule, or by
    ``--sim-board`` for the simulated ports; None leaves the ``[flash]``
    value. ``source`` says where it was set, for messages.
    """

    before: str | None = attrs.field(default=None, validator=_optional(_one_of(BEFORE_MODES)))
    boot: str | None = attrs.field(default=None, validator=_optional(_one_of(_BOOT_MODES)))
    stub: bool | None = None
    baud: int | None = attrs.field(default=None, validator=_positive)
    source: str = attrs.field(default="", eq=False)

    def overrides(self) -> dict[str, Any]:
        """The ``[flash]`` keys this wiring sets."""
        return {f.name: getattr(self, f.name) for f in attrs.fields(PortWiring)
                if f.name != "source" and getattr(self, f.name) is not None}


@attrs.frozen
class SerialLines:
    """The DTR and RTS levels a port's links hold while open (True: asserted), set before the port opens."""

    dtr: bool
    rts: bool


#: Lines released: on a board whose DTR/RTS drive EN and GPIO0 the chip runs, neither reset nor strapped.
RELEASED = SerialLines(dtr=False, rts=False)


@attrs.frozen
class FlashConfig:
    """``[flash]``: the station's flashing policy and quality gates (see docs/flashing.md)."""

    baud: int = attrs.field(default=921600, validator=_positive)
    #: how the board is put into its serial loader: "no-reset" (a jig holds GPIO0 low),
    #: "default-reset" (esptool's DTR/RTS sequences for a DevKitC-style circuit),
    #: "usb-reset" (the chip's USB-Serial/JTAG)
    before: str = attrs.field(default="no-reset", validator=_one_of(BEFORE_MODES))
    #: esptool's flasher stub (faster) instead of the ROM loader; it cannot
    #: start the app by itself, so it needs ``boot = "hard-reset"``
    stub: bool = False
    #: how the board leaves download mode after flashing: "run-user-code"
    #: (ROM loader: FLASH_END jumps to the app, no reset line needed),
    #: "hard-reset" (RTS pulses EN), "none" (stay in the loader)
    boot: str = attrs.field(default="run-user-code", validator=_one_of(_BOOT_MODES))
    compress: bool = True
    connect_attempts: int = attrs.field(default=3, validator=_positive)
    #: quality gate: longest write + verify of the whole image set, seconds
    max_seconds: float | None = attrs.field(default=None, validator=_positive)
    #: quality gate: largest single image, bytes, by chip (esptool --chip names)
    max_image_bytes: Mapping[str, int] = attrs.field(factory=dict, converter=_chip_limits, hash=False)
    #: ports wired otherwise (``[flash.port."PATH"]``, ``[[detect]]`` rules, ``--sim-board``)
    port: Mapping[str, PortWiring] = attrs.field(factory=dict, converter=dict, hash=False)

    def __attrs_post_init__(self) -> None:
        if self.stub and self.boot == "run-user-code":
            raise ValueError('stub = true needs boot = "hard-reset" (or "none"): the flasher stub cannot start '
                             "the app without a reset line")
        for path, wiring in self.port.items():
            try:
                self.for_port(path)
            except ValueError as exc:
                raise ValueError(f"{wiring.source or path}: {exc}") from None

    def for_port(self, path: str) -> FlashConfig:
        """The policy on ``path``: these settings with the port's wiring applied."""
        wiring = self.port.get(path)
        if wiring is None:
            return attrs.evolve(self, port={}) if self.port else self
        return attrs.evolve(self, port={}, **wiring.overrides())

    def wired(self, wiring: Mapping[str, PortWiring]) -> FlashConfig:
        """These settings with more ports wired (a port already named keeps its own)."""
        return attrs.evolve(self, port={**wiring, **self.port})

    @property
    def console_lines(self) -> SerialLines | None:
        """What DTR/RTS the DUT port's links hold while open, set before the port opens.

        With reset lines wired (``before`` resets the board), asserted lines
        would hold the chip in reset or strap it into its loader on boards
        wired straight to EN and GPIO0, so they are released. A jig wires
        none: the port opens as pyserial opens it (None).
        """
        return None if self.before == "no-reset" else RELEASED


_DETECT_FILTERS = ("vid", "pid", "serial", "location", "description")


def _positive_number(instance: Any, attribute: Any, value: float) -> None:
    if not (isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value < float("inf")):
        raise ValueError(f"{attribute.name} must be a positive number, got {value!r}")


@attrs.frozen
class QualityConfig:
    """``[quality]``: how reports judge measurement statistics (the default is reports.quality.statistics')."""

    #: Cpk below this is not capable: such measurements are flagged and listed first
    cpk_threshold: float = attrs.field(default=1.33, validator=_positive_number)


@attrs.frozen
class DetectConfig:
    """A ``[detect]`` rule: find DUT ports by USB identity instead of listing them (globs for text).

    ``wiring`` is how the boards on the ports it finds are wired, when that
    differs from ``[flash]`` (the rule's ``before``, ``boot``, ``stub``,
    ``baud``): a station can mix jigs, DevKitC boards and USB-Serial/JTAG
    boards, one rule each.
    """

    vid: int | None = None
    pid: int | None = None
    serial: str | None = None
    location: str | None = None
    description: str | None = None
    #: one slot per USB location, in this order (``1-1.2``, as ``sequencer`` lists them): where boards go in
    locations: tuple[str, ...] = attrs.field(default=(), converter=tuple)
    wiring: PortWiring = attrs.field(factory=PortWiring)

    def __attrs_post_init__(self) -> None:
        if all(getattr(self, name) is None for name in _DETECT_FILTERS) and not self.locations:
            raise ValueError("detect needs at least one of vid, pid, serial, location, description, locations")
        if not all(isinstance(x, str) and x for x in self.locations) or len(set(self.locations)) != len(self.locations):
            raise ValueError("detect.locations must be distinct USB locations (text), one per slot")

    def describe(self) -> str:
        """The rule's filters, as written: ``vid=4292, location='1-1.*'``."""
        given = [f"{name}={getattr(self, name)!r}" for name in _DETECT_FILTERS if getattr(self, name) is not None]
        if self.locations:
            given.append(f"locations={list(self.locations)!r}")
        return ", ".join(given)


def _detect_rules_tuple(value: DetectConfig | Iterable[DetectConfig] | None) -> tuple[DetectConfig, ...]:
    """``detect=`` as given: no rules (None), one rule, or several."""
    if value is None:
        return ()
    return (value,) if isinstance(value, DetectConfig) else tuple(value)


def default_data_dir() -> Path:
    """Where a station keeps its store and reports when nothing says otherwise (XDG data home)."""
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "sequencer"


@attrs.frozen
class StationConfig:
    station: str = attrs.field(factory=lambda: socket.gethostname() or "station")
    operator: str = ""
    #: ask who is testing at the start of each session (a badge scan), unless the operator is given
    ask_operator: bool = False
    batch: str = ""
    store: Path = attrs.field(factory=lambda: default_data_dir() / "store.sqlite", converter=Path)
    #: HTML reports; None: a ``reports`` folder beside the store, so that a
    #: station given only ``--store`` keeps its records and reports together
    reports: Path | None = attrs.field(default=None, converter=attrs.converters.optional(Path))
    ports: tuple[str, ...] = attrs.field(default=(), converter=tuple)
    sim: int = 0
    #: slots with no board and no port (``bench``, ``--bench N``): instrument-only products, OpenHTF-style tests
    bench: int = 0
    #: ``[fixtures.NAME]`` tables: settings passed to that fixture's factory (sequencer/fixtures.py)
    fixture_settings: Mapping[str, Mapping[str, Any]] = attrs.field(factory=dict)
    #: what the simulated DUTs are (``sim_board``, ``--sim-board``): one of SIM_BOARDS
    sim_board: str = "jig"
    seed: int = 0
    #: sets of boards per session (``rounds``, ``--rounds``): the operator puts the next set in between
    #: rounds; 0: until the operator types stop
    rounds: int = 1
    #: each slot tests a board whenever one is put in, until the operator stops the station (``--continuous``)
    continuous: bool = False
    resources: Mapping[str, ResourceConfig] = attrs.field(factory=dict)
    source: Path | None = None
    #: the product this station tests when the command names none (``product``, relative to the file)
    product: Path | None = None
    #: central MongoDB (``[mongo]`` table); empty: the local store alone
    mongo_uri: str = ""
    mongo_db: str = ""
    flash: FlashConfig = attrs.field(factory=FlashConfig)
    quality: QualityConfig = attrs.field(factory=QualityConfig)
    #: find ports by USB identity (``[detect]``, or several ``[[detect]]`` rules) when none are listed
    detect: tuple[DetectConfig, ...] = attrs.field(default=(), converter=_detect_rules_tuple)
    #: DUT console port -> the AT port of its modem (``[modems]``)
    modems: Mapping[str, str] = attrs.field(factory=dict)
    #: the provisioning service (``[provisioning] url``); with --sim and none, the station runs one
    provisioning_url: str = ""
    #: where ``sequencer portal`` listens (``[portal] host`` and ``port``); empty: its defaults
    portal: Mapping[str, Any] = attrs.field(factory=dict)
    #: the firmware build to flash: ``PRODUCT@CHANNEL`` of the portal's build registry (``build``); empty:
    #: the product's own image set (docs/flashing.md)
    build: str = ""
    #: secrets file (``[secrets] file``); SEQUENCER_SECRETS_FILE when empty
    secrets_file: Path | None = None
    #: barcode and QR scans: what they look like, where they come from, what starts a slot (``[scan]``)
    scan: ScanConfig = attrs.field(factory=ScanConfig)
    #: where the operator panel listens (``panel``, ``--panel HOST:PORT``); empty: no panel
    panel: str = ""

    @property
    def panel_address(self) -> tuple[str, int]:
        """``panel`` as a host and a port; ConfigError naming it if it is not ``HOST:PORT``."""
        return panel_address(self.panel, f"{self.source or 'station'}: panel")

    @property
    def reports_dir(self) -> Path:
        return self.reports if self.reports is not None else self.store.parent / "reports"

    @property
    def batch_or_default(self) -> str:
        return self.batch or f"{self.station}-{utcnow():%Y%m%d}"

    @property
    def located(self) -> DetectConfig | None:
        """The ``[detect]`` rule with ``locations``: a continuous station's slots, one per location."""
        return next((rule for rule in self.detect if rule.locations), None)

    def with_overrides(self, **overrides: Any) -> StationConfig:
        """Apply command-line options; ``None`` means "not given"."""
        given = {k: v for k, v in overrides.items() if v is not None}
        if "ports" in given and given["ports"]:
            given.setdefault("sim", 0)
        if given.get("sim"):
            given.setdefault("ports", ())
            given.setdefault("bench", 0)
        if given.get("bench"):
            given.setdefault("ports", ())
            given.setdefault("sim", 0)
        elif "ports" in given and given["ports"] or given.get("sim"):
            given.setdefault("bench", 0)
        return attrs.evolve(self, **given)

    def check(self) -> None:
        where = str(self.source) if self.source else "station"
        if not self.station.strip() or self.station != self.station.strip() or not self.station.isprintable():
            # It names the station in every record and starts the default batch id.
            raise ConfigError(f"{where}: station must be a name (printable, no spaces at either end), "
                              f"got {self.station!r}")
        if self.sim < 0:
            raise ConfigError(f"{where}: sim must be >= 0, got {self.sim}")
        if self.sim_board not in SIM_BOARDS:
            raise ConfigError(f"{where}: sim_board must be one of {', '.join(SIM_BOARDS)}, got {self.sim_board!r}")
        if self.rounds < 0:
            raise ConfigError(f"{where}: rounds must be >= 0 (0: until the operator types stop), got {self.rounds}")
        if self.continuous and self.rounds != 1:
            raise ConfigError(f"{where}: continuous stations have no rounds: each slot tests a board whenever one is "
                              "put in; give one or the other")
        if self.continuous and not self.sim:
            for port in self.ports:
                if _RENUMBERED.fullmatch(port):
                    raise ConfigError(f"{where}: continuous: port {port} is named in the order boards are plugged "
                                      "in, not where: give its /dev/serial/by-path/ (or by-id) link, or [detect] "
                                      "locations")
            if not self.ports and self.located is None:
                raise ConfigError(f"{where}: continuous: say where each slot's board plugs in: ports "
                                  "(/dev/serial/by-path/ links) or [detect] locations")
        if self.continuous and self.sim and self.sim_board != "jig":
            raise ConfigError(f"{where}: continuous: the simulated operator swaps jig boards only; "
                              f"sim_board = {self.sim_board!r} needs rounds")
        if sum(1 for rule in self.detect if rule.locations) > 1:
            raise ConfigError(f"{where}: detect: locations belong to one rule (the slots, in order)")
        if not self.continuous and (self.scan.start == "scan" or self.scan.label):
            key = "start = \"scan\"" if self.scan.start == "scan" else "label = true"
            raise ConfigError(f"{where}: scan: {key} is for continuous stations, whose slots start on their own; in "
                              "rounds every slot starts together (a phase may ask for a label: operator.ask)")
        if self.rounds == 0 and self.sim:
            raise ConfigError(f"{where}: rounds = 0 goes on until the operator types stop, and the simulated "
                              "operator never does: give simulated stations a number of rounds")
        if self.bench < 0:
            raise ConfigError(f"{where}: bench must be >= 0, got {self.bench}")
        if sum(bool(x) for x in (self.sim, self.ports, self.bench)) > 1:
            raise ConfigError(f"{where}: give one of ports, sim and bench")
        if not self.sim and not self.ports and not self.bench and not self.detect:
            raise ConfigError(f"{where}: no DUT ports: give ports (or --port), a simulated count (sim / --sim N) "
                              "or bench slots with no board (bench / --bench N)")
        if len(set(self.ports)) != len(self.ports):
            raise ConfigError(f"{where}: a port is listed twice")
        if self.panel:
            self.panel_address  # noqa: B018 - checked now, before any board is tested


def panel_address(text: str, where: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:8081`` for IPv6; port 0 picks a free one) as a host and a port; ConfigError if not."""
    host, sep, port = text.strip().rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535 or any(c in host for c in "/ []"):
        raise ConfigError(f"{where}: give the address to listen on as HOST:PORT (127.0.0.1:8081), got {text!r}")
    return host, int(port)


#: Device names the kernel hands out in the order adapters enumerate: not a place on the jig.
_RENUMBERED = re.compile(r"/dev/tty(USB|ACM)\d+")

_TOP_KEYS = {"station", "product", "operator", "ask_operator", "batch", "store", "reports", "ports", "sim", "sim_board",
             "bench", "seed", "fixtures", "rounds", "continuous", "resources", "mongo", "flash", "detect", "modems",
             "provisioning", "secrets", "portal", "quality", "scan", "build", "panel"}
_RESOURCE_KEYS = {"capacity", "instrument", "port"}
_MONGO_KEYS = {"uri", "database"}


def reading_config(station: Path | None, store: Path | None) -> StationConfig:
    """The configuration of a command that reads a station's records (``runs``, ``report``, ``sync``, ``find``).

    The station file, if given, says where its store and reports are;
    ``--store`` overrides it.
    """
    config = load_station_config(station) if station else StationConfig()
    return attrs.evolve(config, store=store) if store else config


def require_store(config: StationConfig) -> Path:
    """The store's path; a clear error if there is none (reading commands never create an empty one)."""
    if not config.store.exists():
        raise ConfigError(f"{config.store}: no local store here (give --store PATH or --station FILE)")
    return config.store


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
        ask_operator=typed("ask_operator", bool, False),
        batch=typed("batch", str, ""),
        store=_relative(base, typed("store", str, str(defaults.store))),
        reports=_relative(base, typed("reports", str, "")) if "reports" in data else None,
        ports=tuple(ports),
        sim=typed("sim", int, 0),
        bench=typed("bench", int, 0),
        fixture_settings=_fixtures_tables(p, typed("fixtures", dict, {})),
        sim_board=typed("sim_board", str, "jig"),
        seed=typed("seed", int, 0),
        rounds=typed("rounds", int, 1),
        continuous=typed("continuous", bool, False),
        resources=resources,
        source=p,
        product=_product_path(p, base, typed("product", str, "")) if "product" in data else None,
        **_mongo_table(p, typed("mongo", dict, {})),
        flash=_flash_table(p, typed("flash", dict, {})),
        quality=_table(p, "quality", QualityConfig, typed("quality", dict, {}), {"cpk_threshold": (int, float)}),
        detect=_detect_rules(p, typed("detect", (dict, list), None)) if "detect" in data else (),
        modems=_modems_table(p, typed("modems", dict, {})),
        provisioning_url=_text_table(p, "provisioning", typed("provisioning", dict, {}), "url"),
        secrets_file=_secrets_file(p, typed("secrets", dict, {})),
        portal=_portal_table(p, typed("portal", dict, {})),
        scan=_scan_table(p, typed("scan", dict, {})),
        build=_build_name(p, typed("build", str, "")),
        panel=typed("panel", str, ""),
    )
    for rule in config.detect:  # a rule's wiring must make sense with [flash] before any port is found
        try:
            config.flash.wired({rule.wiring.source: rule.wiring})
        except ValueError as exc:
            raise ConfigError(f"{p}: {exc}") from None
    return config


def _fixtures_tables(p: Path, tables: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """``[fixtures.NAME]``: a table per fixture; its keys are checked against the fixture's factory at run."""
    for name, table in tables.items():
        if not isinstance(table, dict):
            raise ConfigError(f"{p}: fixtures.{name} must be a table of the fixture's settings")
    return {name: dict(table) for name, table in tables.items()}


def _modems_table(p: Path, table: dict[str, Any]) -> dict[str, str]:
    """``[modems]``: DUT port -> modem port, both device paths."""
    for dut_port, modem_port in table.items():
        if not isinstance(modem_port, str) or not modem_port:
            raise ConfigError(f"{p}: modems.{dut_port!r} must be the modem's device path, got {modem_port!r}")
    if len(set(table.values())) != len(table):
        raise ConfigError(f"{p}: modems: two DUT ports share one modem port")
    return dict(table)


def _text_table(p: Path, name: str, table: dict[str, Any], *keys: str) -> str:
    """A table of one text key (``[provisioning] url``): its value, or ``""``."""
    for key, value in table.items():
        if key not in keys:
            raise ConfigError(f"{p}: {name}: unknown key {key!r} (known: {', '.join(keys)})")
        if not isinstance(value, str):
            raise ConfigError(f"{p}: {name}.{key} must be text")
    return table.get(keys[0], "")


def _build_name(p: Path, value: str) -> str:
    """``build``: ``PRODUCT@CHANNEL`` (the names are checked where the build is found, fixtures/builds.py)."""
    if value and (value.count("@") != 1 or value.startswith("@") or value.endswith("@")):
        raise ConfigError(f"{p}: build must be PRODUCT@CHANNEL, e.g. \"esp32-sensor@stable\", got {value!r}")
    return value


def _portal_table(p: Path, table: dict[str, Any]) -> dict[str, Any]:
    """``[portal]``: ``host`` (text) and ``port`` (0 to 65535) for ``sequencer portal``; ``url``: where it is."""
    for key, value in table.items():
        if key in ("host", "url") and isinstance(value, str) and value:
            continue
        if key == "port" and isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 65535:
            continue
        if key in ("host", "port", "url"):
            needed = {"host": "an address", "port": "a port number", "url": "the portal's URL"}[key]
            raise ConfigError(f"{p}: portal.{key}: {needed} is needed, got {value!r}")
        raise ConfigError(f"{p}: portal: unknown key {key!r} (known: host, port, url)")
    return dict(table)


def _secrets_file(p: Path, table: dict[str, Any]) -> Path | None:
    file = _text_table(p, "secrets", table, "file")
    return _relative(p.parent, file) if file else None


def _mongo_table(p: Path, table: dict[str, Any]) -> dict[str, str]:
    """``[mongo]``: ``uri`` and ``database`` (see docs/mongodb.md); the URI is checked when used."""
    for key, value in table.items():
        if key not in _MONGO_KEYS:
            raise ConfigError(f"{p}: mongo: unknown key {key!r} (known: {', '.join(sorted(_MONGO_KEYS))})")
        if not isinstance(value, str):
            raise ConfigError(f"{p}: mongo.{key} must be text")
    return {"mongo_uri": table.get("uri", ""), "mongo_db": table.get("database", "")}


def _table(p: Path, name: str, cls: type, table: dict[str, Any], kinds: dict[str, tuple[type, ...]],
           **given: Any) -> Any:
    """Build ``cls`` from a TOML table: unknown keys, wrong types and bad values name the key.

    ``given`` are further arguments the caller worked out itself (not keys of the table).
    """
    _check_keys(p, name, table, kinds)
    try:
        return cls(**table, **given)
    except ValueError as exc:
        raise ConfigError(f"{p}: {name}: {exc}") from None


def _check_keys(p: Path, name: str, table: dict[str, Any], kinds: dict[str, tuple[type, ...]]) -> None:
    for key, value in table.items():
        if key not in kinds:
            raise ConfigError(f"{p}: {name}: unknown key {key!r} (known: {', '.join(sorted(kinds))})")
        kind = kinds[key]
        if isinstance(value, bool) and bool not in kind or not isinstance(value, kind):
            raise ConfigError(f"{p}: {name}.{key} must be {_kind_name(kind)}, got {value!r}")


#: The [flash] keys a port, a [[detect]] rule or a simulated board may set otherwise.
_WIRING_KEYS: dict[str, tuple[type, ...]] = {"before": (str,), "boot": (str,), "stub": (bool,), "baud": (int,)}
_DETECT_KEYS: dict[str, tuple[type, ...]] = {
    "vid": (int,), "pid": (int,), "serial": (str,), "location": (str,), "description": (str,), "locations": (list,),
}


def _flash_table(p: Path, table: dict[str, Any]) -> FlashConfig:
    number = (int, float)
    table = dict(table)
    ports = table.pop("port", {})
    if not isinstance(ports, dict) or not all(isinstance(v, dict) for v in ports.values()):
        raise ConfigError(f'{p}: flash.port must hold one table per port, as [flash.port."/dev/ttyUSB0"]')
    wiring = {path: _wiring(p, f"flash.port.{path!r}", given, f'[flash.port."{path}"]') for path, given in ports.items()}
    return _table(p, "flash", FlashConfig, table, {
        "baud": (int,), "before": (str,), "stub": (bool,), "boot": (str,), "compress": (bool,),
        "connect_attempts": (int,), "max_seconds": number, "max_image_bytes": (dict,), "port": (dict,),
    }, port=wiring)


def _wiring(p: Path, name: str, table: dict[str, Any], source: str) -> PortWiring:
    return _table(p, name, PortWiring, table, _WIRING_KEYS, source=source)


def _detect_rules(p: Path, value: dict[str, Any] | list[Any]) -> tuple[DetectConfig, ...]:
    """``[detect]`` (one rule) or ``[[detect]]`` (several; a port takes the first rule it matches)."""
    tables = [value] if isinstance(value, dict) else value
    if not tables or not all(isinstance(t, dict) for t in tables):
        raise ConfigError(f"{p}: detect must be a table, or [[detect]] tables, one per rule")
    rules = []
    for number, table in enumerate(tables, 1):
        name, source = (("detect", "[detect]") if isinstance(value, dict)
                        else (f"detect rule {number}", f"[[detect]] rule {number}"))
        _check_keys(p, name, table, {**_DETECT_KEYS, **_WIRING_KEYS})
        wiring = _wiring(p, name, {k: v for k, v in table.items() if k in _WIRING_KEYS}, source)
        filters = {k: v for k, v in table.items() if k in _DETECT_KEYS}
        rules.append(_table(p, name, DetectConfig, filters, _DETECT_KEYS, wiring=wiring))
    return tuple(rules)


def _scan_table(p: Path, table: dict[str, Any]) -> ScanConfig:
    kinds: dict[str, tuple[type, ...]] = {"start": (str,), "label": (bool,), "port": (str,), "baudrate": (int,),
                                          **{key: (str,) for key in RULE_KEYS}}
    return _table(p, "scan", ScanConfig.from_table, table, kinds)


def _product_path(p: Path, base: Path, value: str) -> Path:
    if not value.strip():
        raise ConfigError(f"{p}: product must name a product file")
    return _relative(base, value)


def _relative(base: Path, value: str) -> Path:
    path = Path(value).expanduser()
    return path if path.is_absolute() else base / path


def _kind_name(kind: type | tuple[type, ...]) -> str:
    names = {str: "text", int: "a whole number", float: "a number", bool: "true or false", list: "a list",
             dict: "a table"}
    if isinstance(kind, tuple):
        return " or ".join(names.get(k, k.__name__) for k in kind)
    return names.get(kind, kind.__name__)
