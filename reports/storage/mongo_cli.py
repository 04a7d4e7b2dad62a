"""The MongoDB side of the ``sequencer`` command: ``run --mongo``, ``sync`` and ``find``.

Kept out of ``sequencer/cli.py`` so the station's command stays readable; the
CLI calls :func:`add_mongo_options`, :func:`add_mongo_commands`,
:func:`apply_mongo_options` and :func:`station_shipping`.

Where the database comes from, first found wins: ``--mongo URI``, the
environment (``SEQUENCER_MONGO_URI``), the station file's ``[mongo] uri``.
The database name likewise: ``--mongo-db``, ``SEQUENCER_MONGO_DB``,
``[mongo] database``, the URI's own path, ``sequencer``. With none of them the
station runs on its local store alone.
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs
from rich.console import Console
from rich.table import Table
from rich.text import Text

from sequencer.config import ConfigError, StationConfig, reading_config, require_store
from sequencer.terminal import OutputConsole, printable

if TYPE_CHECKING:
    from reports.storage.mongo import MongoSettings
    from sequencer.records import RunRecord

# pymongo costs a tenth of a second to import: the modules that need it are
# imported by the commands that use MongoDB, not by `sequencer check`.

ENV_URI = "SEQUENCER_MONGO_URI"
ENV_DB = "SEQUENCER_MONGO_DB"

EXIT_OK, EXIT_INCOMPLETE, EXIT_USAGE = 0, 1, 2


class _Usage(ConfigError):
    """Reported like any configuration error: one line, exit 2."""


# -- options -------------------------------------------------------------------


def add_mongo_options(parser: argparse.ArgumentParser, purpose: str = "to stream records to") -> None:
    parser.add_argument("--mongo", metavar="URI",
                        help=f"central MongoDB {purpose} (default: ${ENV_URI}, then the station file)")
    parser.add_argument("--mongo-db", metavar="NAME",
                        help=f"database name (default: ${ENV_DB}, the station file, the URI's, 'sequencer')")


def add_mongo_commands(sub: Any) -> None:
    """Add ``sync`` and ``find`` to the command's subparsers."""
    sync = sub.add_parser("sync", help="ship what MongoDB has not acknowledged yet, now")
    sync.add_argument("--store", type=Path, help="local store (SQLite) path")
    sync.add_argument("--station", type=Path, help="station file (for its store and [mongo] table)")
    add_mongo_options(sync)
    what = sync.add_mutually_exclusive_group()
    what.add_argument("--status", action="store_true", help="show the backlog and quarantine; ship nothing")
    what.add_argument("--quarantine", action="store_true", help="list quarantined runs with the reason")
    what.add_argument("--retry-quarantined", action="store_true",
                      help="ship quarantined runs again (after fixing the schema or the data), then the backlog")
    what.add_argument("--all", action="store_true", dest="ship_all",
                      help="ship every run again, from the first (after MongoDB was restored from a backup)")

    find = sub.add_parser("find", help="a device and its run history (MongoDB when configured, else local)")
    key = find.add_mutually_exclusive_group(required=True)
    key.add_argument("--serial", metavar="S")
    key.add_argument("--mac", metavar="M")
    key.add_argument("--imei", metavar="I")
    find.add_argument("--store", type=Path, help="local store (SQLite) path")
    find.add_argument("--station", type=Path, help="station file (for its store and [mongo] table)")
    find.add_argument("--local", action="store_true", help="look in the local store even if MongoDB is configured")
    find.add_argument("--json", action="store_true", help="print the devices as one JSON document")
    add_mongo_options(find)


def add_reading_options(parser: argparse.ArgumentParser) -> None:
    """Where ``report`` and ``export`` read runs: MongoDB when configured, else (or with ``--local``) the store."""
    parser.add_argument("--local", action="store_true",
                        help="read this station's local store even if MongoDB is configured")
    add_mongo_options(parser, "to read every station's runs from")


@attrs.frozen
class RunsReading:
    """Where a reading command reads runs: the store or MongoDB, both with ``find_runs`` and ``outcome_counts``."""

    config: StationConfig
    source: Any  # reports.storage.store.LocalStore | reports.storage.mongo.MongoSink
    where: str  # for messages: the store's path, or "MongoDB host/db"
    #: every station's runs (MongoDB), not only this station's
    every_station: bool = False


@contextmanager
def reading_runs(args: argparse.Namespace) -> Iterator[RunsReading]:
    """Open what ``runs``, ``report`` and ``export`` read, for the ``with`` block.

    With MongoDB configured, the runs of every station that shipped to it:
    quality's view of a batch tested on several stations, from a desk with
    no store of its own. Without it, or with ``--local``, this station's
    store. When MongoDB cannot be reached, a station says so and reads its
    own store instead, as ``find`` does; a desk with no store cannot. A
    failure while reading is one line naming the database.
    """
    config = _config_for(args)
    settings = None if args.local else mongo_settings(config)
    if settings is not None:
        from reports.storage.mongo import MongoSink, MongoUnavailable, UnreadableRun

        sink = MongoSink(settings)
        try:
            sink.ping()
        except MongoUnavailable as exc:
            sink.close()
            if not config.store.exists():
                raise _Usage(f"MongoDB {settings.target} unreachable ({exc}), and no local store at"
                             f" {config.store}") from None
            Console(stderr=True, highlight=False).print(
                Text(f"sequencer: MongoDB {settings.target} unreachable ({exc}); reading this station's"
                     " local store", style="yellow"), soft_wrap=True)
        else:
            if config.store.exists():
                _warn_of_unshipped_runs(config.store, settings.target)
            try:
                yield RunsReading(config, sink, f"MongoDB {settings.target}", every_station=True)
            except MongoUnavailable as exc:
                raise _Usage(f"MongoDB {settings.target}: {exc}") from None
            except UnreadableRun as exc:
                raise _Usage(str(exc)) from None
            finally:
                sink.close()
            return
    from reports.storage.store import LocalStore

    store = LocalStore.open(require_store(config))
    try:
        yield RunsReading(config, store, str(store.path))
    finally:
        store.close()


def _warn_of_unshipped_runs(store: Path, target: str) -> None:
    """On a station, say when MongoDB lacks some of its runs: what MongoDB shows would silently leave them out."""
    from reports.storage.shipper import runs_not_in_mongodb

    missing = runs_not_in_mongodb(store, target)
    if missing:
        Console(stderr=True, highlight=False).print(Text(
            f"sequencer: {missing} of this station's run(s) are not in MongoDB {target} yet (`sequencer sync`"
            " ships them); reading MongoDB without them (--local reads this station's store)", style="yellow",
        ), soft_wrap=True)


def apply_mongo_options(config: StationConfig, args: argparse.Namespace) -> StationConfig:
    """Resolve the URI and database (option, environment, file) into ``config`` and check the URI.

    The error names where the bad value came from.
    """
    uri, where = config.mongo_uri, f"{config.source}: mongo.uri" if config.source else "mongo.uri"
    if os.environ.get(ENV_URI):
        uri, where = os.environ[ENV_URI], ENV_URI
    if getattr(args, "mongo", None):
        uri, where = args.mongo, "--mongo"
    database = getattr(args, "mongo_db", None) or os.environ.get(ENV_DB) or config.mongo_db
    config = attrs.evolve(config, mongo_uri=uri or "", mongo_db=database or "")
    if uri:
        _settings(config, where)
    return config


def mongo_settings(config: StationConfig, **timeouts: float) -> MongoSettings | None:
    """The station's MongoDB settings, or ``None`` for the local store alone."""
    if not config.mongo_uri:
        return None
    return _settings(config, "mongo", **timeouts)


def _settings(config: StationConfig, where: str, **timeouts: float) -> MongoSettings:
    from reports.storage.mongo import MongoConfigError, MongoSettings

    try:
        return MongoSettings.parse(config.mongo_uri, config.mongo_db or None, where=where, **timeouts)
    except MongoConfigError as exc:
        raise ConfigError(str(exc)) from None


def _config_for(args: argparse.Namespace) -> StationConfig:
    return apply_mongo_options(reading_config(args.station, args.store), args)


# -- the station ---------------------------------------------------------------


@asynccontextmanager
async def station_shipping(config: StationConfig, console: Console) -> AsyncIterator[Any]:
    """Ship the station's store to MongoDB while the block runs (nothing without a URI).

    The shipper runs in a child process (``reports.storage.shipper.shipping_process``)
    so that its work never competes with the slots for the GIL. Tells the
    operator the backlog at the start and the end, and once per outage that
    MongoDB is away (testing goes on; the records wait locally).
    """
    settings = mongo_settings(config)
    if settings is None:
        yield None
        return
    from reports.storage.shipper import ShipEvent, describe_backlog, shipping_process

    def tell(event: ShipEvent) -> None:
        styles = {"quarantined": "red", "unreachable": "yellow", "error": "red", "reset": "yellow"}
        style = styles.get(event.kind, "green")
        console.print(Text(event.message, style=style), soft_wrap=True)

    async with shipping_process(config.store, settings, final_drain=5.0, on_event=tell) as shipper:
        backlog = shipper.status().backlog
        console.print(Text(f"records also go to MongoDB {settings.target}"
                           + (f" ({backlog} run(s) from before waiting to ship)" if backlog else ""),
                           style="dim"), soft_wrap=True)
        yield shipper
    status = shipper.status()  # the child's final report, after its last drain
    if shipper.exit_message:
        console.print(Text(shipper.exit_message, style="red"), soft_wrap=True)
    console.print(Text(describe_backlog(status) + ("" if status.backlog == 0 else "; `sequencer sync` ships it"),
                       style="yellow" if status.backlog or status.quarantined else "dim"), soft_wrap=True)


# -- sync ----------------------------------------------------------------------


def cmd_sync(args: argparse.Namespace) -> int:
    import trio

    config = _config_for(args)
    settings = mongo_settings(config, server_selection_timeout_s=5.0)
    if settings is None:
        raise _Usage(f"sync: no MongoDB configured: give --mongo URI, set {ENV_URI}, or add [mongo] uri "
                     "to the station file")
    require_store(config)
    from sequencer.logs import configure_logging

    configure_logging(None)  # the shipper's log lines would repeat what sync prints
    return trio.run(_sync, args, config.store, settings)


async def _sync(args: argparse.Namespace, store: Path, settings: MongoSettings) -> int:
    from reports.storage.shipper import Shipper, describe_backlog

    out = OutputConsole(highlight=False)
    shipper = await Shipper.open(store, settings)
    try:
        if args.status:
            out.print(Text(describe_backlog(shipper.status())), soft_wrap=True)
            return EXIT_OK
        if args.quarantine:
            return _print_quarantine(out, await shipper.quarantine())
        retried = None
        if args.ship_all:
            await shipper.start_over()
        if args.retry_quarantined:
            retried = await shipper.retry_quarantined()
            if retried.error is None:
                out.print(Text(f"retried quarantined runs: {retried.shipped_runs} shipped, "
                               f"{len(retried.quarantined)} still refused"))
        report = retried if retried is not None and retried.error else await shipper.drain()
        status = await shipper.refresh()
    finally:
        await shipper.aclose()
    for r in report.quarantined:
        out.print(Text(f"quarantined run {r.run_id}: {printable(r.reason)}", style="red"), soft_wrap=True)
    out.print(Text(f"shipped {report.shipped_runs} run(s) ({report.shipped_measurements} measurements). "
                   + describe_backlog(status)), soft_wrap=True)
    return EXIT_OK if status.backlog == 0 and status.quarantined == 0 else EXIT_INCOMPLETE


def _print_quarantine(out: Console, rows: Sequence[Any]) -> int:
    if not rows:
        out.print("no quarantined runs")
        return EXIT_OK
    table = Table(header_style="bold")
    for col in ("run", "seq", "since (UTC)", "reason"):
        table.add_column(col)
    for q in rows:
        table.add_row(Text(q.run_id), str(q.seq), Text(q.at[:19].replace("T", " ")), Text(printable(q.reason)))
    out.print(table)
    out.print(f"{len(rows)} quarantined run(s); fix the cause, then `sequencer sync --retry-quarantined`")
    return EXIT_OK


# -- find ----------------------------------------------------------------------


def cmd_find(args: argparse.Namespace) -> int:
    from reports.storage.mongo import MongoUnavailable
    from sequencer.logs import configure_logging

    configure_logging(None)
    config = _config_for(args)
    key = {"serial": args.serial, "mac": args.mac, "imei": args.imei}
    settings = None if args.local else mongo_settings(config)
    err = Console(stderr=True, highlight=False)
    devices: list[dict[str, Any]] | None = None
    source = ""
    if settings is not None:
        try:
            devices = _find_in_mongo(settings, **key)
            source = f"MongoDB {settings.target}"
        except MongoUnavailable as exc:
            err.print(Text(f"sequencer: MongoDB {settings.target} unreachable ({exc}); showing this station's"
                           " local store", style="yellow"), soft_wrap=True)
    if devices is None:
        require_store(config)
        devices = find_local(config.store, **key)
        source = f"local store {config.store}"
    if args.json:
        print(json.dumps({"source": source, "devices": devices}, default=_json_default, indent=2))
    else:
        _print_devices(devices, source)
    if not devices:
        which = next(f"{k} {v!r}" for k, v in key.items() if v is not None)
        err.print(Text(f"sequencer: no device with {printable(which)} in {source}"), soft_wrap=True)
        return EXIT_INCOMPLETE
    return EXIT_OK


def _find_in_mongo(settings: MongoSettings, **key: str | None) -> list[dict[str, Any]]:
    from reports.storage.mongo import MongoSink

    sink = MongoSink(settings)
    try:
        devices = sink.find_devices(**key)
        for d in devices:
            d["history"] = sink.run_history(d["serial"])
        return devices
    finally:
        sink.close()


def find_local(store_path: Path, *, serial: str | None = None, mac: str | None = None,
               imei: str | None = None) -> list[dict[str, Any]]:
    """Devices from the station's own store, shaped like MongoDB's ``devices`` with a ``history``."""
    from reports.storage.store import LocalStore

    store = LocalStore.open(store_path)
    try:
        if serial is not None:
            serials = [serial]
        else:
            field, value = ("mac", mac) if mac is not None else ("imei", imei)
            conn = sqlite3.connect(f"file:{store_path}?mode=ro", uri=True)
            try:
                rows = conn.execute(
                    f"SELECT DISTINCT serial FROM runs WHERE serial IS NOT NULL"
                    f" AND lower(json_extract(header, '$.dut.{field}')) = lower(?) ORDER BY serial",
                    (value,),
                ).fetchall()
            finally:
                conn.close()
            serials = [r[0] for r in rows]
        devices = []
        for s in serials:
            runs = store.find_runs(serial=s)
            if runs:
                devices.append(device_from_runs(runs))
        return devices
    finally:
        store.close()


def device_from_runs(runs: Sequence[RunRecord]) -> dict[str, Any]:
    """A device as MongoDB's ``devices`` pipeline derives it, from the runs of one serial.

    The newest run by (started_at, run_id) gives the product, last outcome and
    the attributes that win; older runs only fill attributes it lacks.
    """
    ordered = sorted(runs, key=lambda r: (r.started_at, r.run_id))
    newest = ordered[-1]
    attributes: dict[str, str] = {}
    for r in ordered:
        attributes.update({k: v for k, v in r.dut.items() if k != "serial"})
    return {
        "serial": newest.serial,
        "product": newest.product,
        "first_tested_at": ordered[0].started_at,
        "last_tested_at": newest.started_at,
        "last_outcome": newest.outcome.value if newest.outcome else "RUNNING",
        "last_run_id": newest.run_id,
        "last_station": newest.station,
        "attributes": attributes,
        "runs": [
            {"run_id": r.run_id, "started_at": r.started_at, "outcome": r.outcome.value if r.outcome else "RUNNING",
             "product": r.product, "station": r.station,
             "attributes": {k: v for k, v in r.dut.items() if k != "serial"}}
            for r in ordered
        ],
        "history": [
            {"_id": r.run_id, "started_at": r.started_at, "ended_at": r.ended_at, "station": r.station,
             "batch": r.batch, "slot": r.slot, "product": r.product,
             "outcome": r.outcome.value if r.outcome else None, "marginal": r.marginal}
            for r in ordered
        ],
    }


def _print_devices(devices: list[dict[str, Any]], source: str) -> None:
    out = OutputConsole(highlight=False)
    for d in devices:
        out.print(Text(f"device {printable(d['serial'])}", style="bold") + Text(f"  ({source})", style="dim"),
                  soft_wrap=True)
        rows = [
            ("product", d.get("product", "")),
            ("first tested", _when(d.get("first_tested_at"))),
            ("last outcome", f"{d.get('last_outcome')}  (run {str(d.get('last_run_id', ''))[:12]}, "
                             f"{_when(d.get('last_tested_at'))}, station {d.get('last_station', '?')})"),
            *sorted((str(k), str(v)) for k, v in (d.get("attributes") or {}).items()),
        ]
        width = max(len(printable(k)) for k, _ in rows)
        for k, v in rows:
            out.print(Text(f"  {printable(k):<{width}}  {printable(v)}"))
        table = Table(header_style="bold")
        for col in ("run", "started (UTC)", "station", "batch", "slot", "outcome"):
            table.add_column(col)
        for r in d.get("history", []):
            outcome = r.get("outcome") or "RUNNING"
            table.add_row(Text(str(r["_id"])[:12]), _when(r.get("started_at")), Text(printable(r.get("station"))),
                          Text(printable(r.get("batch"))), str(r.get("slot", "")),
                          outcome + (" (marginal)" if r.get("marginal") else ""))
        out.print(table)
        out.print(f"{len(d.get('history', []))} run(s)")


def _when(t: Any) -> str:
    return f"{t:%Y-%m-%d %H:%M:%S}" if t is not None and hasattr(t, "strftime") else "-"


def _json_default(value: Any) -> Any:
    if hasattr(value, "isoformat"):
        return value.isoformat()
    return str(value)

