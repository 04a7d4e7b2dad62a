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
    # A reply may take long here: a period report aggregates every run of the period in the server.
    settings = None if args.local else mongo_settings(config, timeout_s=READ_TIMEOUT_S)
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
    store = open_store_to_read(config)
    try:
        yield RunsReading(config, store, str(store.path))
    finally:
        store.close()


def open_store_to_read(config: StationConfig) -> Any:
    """The station's store, opened read-only (so reading works on a full disk); says what it cannot show yet."""
    from reports.storage.store import LocalStore

    store = LocalStore.open_readonly(require_store(config))
    if store.unrestored or store.left_open:
        journal = f", and {store.unrestored} record(s) in its journal are not shown" if store.unrestored else ""
        Console(stderr=True, highlight=False).print(Text(
            f"sequencer: {store.path}: the station that last tested here stopped without closing its runs: "
            f"{store.left_open} show as RUNNING{journal}; the next `sequencer run` on this store restores them and"
            " marks them INTERRUPTED", style="yellow"), soft_wrap=True)
    return store


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


#: How long ``runs``, ``report`` and ``export`` wait for one reply from MongoDB. A station's writes
#: keep the short default (an outage must be noticed quickly); a period report's aggregation over a
#: hundred thousand runs on a busy server took longer than that, and failed as a network timeout.
READ_TIMEOUT_S = 300.0


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
    key, value = next((k, v) for k, v in (("serial", args.serial), ("mac", args.mac), ("imei", args.imei))
                      if v is not None)
    settings = None if args.local else mongo_settings(config)
    err = Console(stderr=True, highlight=False)
    devices: list[dict[str, Any]] | None = None
    source = ""
    if settings is not None:
        from reports.storage.mongo import MongoSink

        sink = MongoSink(settings)
        try:
            devices = find_devices(sink, key, value)
            _attach_notes(sink, devices)
            source = f"MongoDB {settings.target}"
        except MongoUnavailable as exc:
            err.print(Text(f"sequencer: MongoDB {settings.target} unreachable ({exc}); showing this station's"
                           " local store", style="yellow"), soft_wrap=True)
        finally:
            sink.close()
    if devices is None:
        devices = find_local(config, key, value)
        source = f"local store {config.store}"
    if args.json:
        print(json.dumps({"source": source, "devices": devices}, default=_json_default, indent=2))
    else:
        _print_devices(devices, source)
    if not devices:
        err.print(Text(f"sequencer: no device with {printable(key)} {printable(repr(value))} in {source}"),
                  soft_wrap=True)
        return EXIT_INCOMPLETE
    return EXIT_OK


#: How many runs ``find`` gathers for one search at most (a MAC shared by every board is a fault, not a device).
FIND_MAX_RUNS = 2000


def _attach_notes(sink: Any, devices: list[dict[str, Any]]) -> None:
    """Each device's notes and disposition from MongoDB's ``notes`` (the portal's; append-only)."""
    from reports.storage.mongo import MongoUnavailable, describe_failure
    from reports.storage.notes import disposition, notes_for

    try:
        notes = notes_for(sink.db, [d["serial"] for d in devices if d.get("serial")])
    except Exception as exc:  # noqa: BLE001 - any driver error, as reading the runs reports it
        raise MongoUnavailable(describe_failure(exc)) from None
    for d in devices:
        mine = notes.get(d.get("serial") or "", [])
        d["notes"] = [n.as_json() for n in mine]
        d["disposition"] = disposition(mine)


def find_devices(source: Any, key: str, value: str) -> list[dict[str, Any]]:
    """The units (one per product) that ``dut[key] == value`` names, each with every run that tested it.

    ``source`` is a :class:`~reports.storage.store.LocalStore` or a
    :class:`~reports.storage.mongo.MongoSink`. The runs that match are gathered with
    the runs that share an identity value with them (the failed run that
    knew only its MAC, the retest that knew its serial too;
    :func:`~reports.storage.unit_history.gather_units`), then grouped
    into units as yields group them (:mod:`reports.quality.units`), so a
    unit here is a unit in the batch report.
    """
    from reports.quality.units import group_units, normal_value
    from reports.storage.unit_history import gather_units

    gathered = gather_units(source.find_runs_by_identities, [(key, value)], limit=FIND_MAX_RUNS)
    runs = {r.run_id: r for r in gathered.runs}
    units = group_units(gathered.runs)
    target = normal_value(key, value)
    matched = [u for u in units.units
               if any(normal_value(key, runs[rid].dut.get(key, "")) == target for rid in u.run_ids)]
    return [device_of_unit(u, [runs[rid] for rid in u.run_ids]) for u in matched]


def find_local(config: StationConfig, key: str, value: str) -> list[dict[str, Any]]:
    """:func:`find_devices` in the station's own store."""
    store = open_store_to_read(config)
    try:
        return find_devices(store, key, value)
    finally:
        store.close()


def device_of_unit(unit: Any, runs: Sequence[RunRecord]) -> dict[str, Any]:
    """What ``find`` shows of one unit: its identity, its newest state, and each run with why it failed."""
    from reports.quality.yields import failure_summary

    device = device_from_runs(runs)
    device.update(
        serial=unit.serial,
        label=unit.label,
        identity=dict(unit.identity),
        conflict=unit.conflict,
        product_version=runs[-1].product_version,
    )
    for entry, r in zip(device["history"], runs, strict=True):
        entry.update(product_version=r.product_version, limits_sha256=r.limits_sha256,
                     failure=failure_summary(r))
    return device


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
        out.print(Text(f"device {printable(d.get('label') or d['serial'])}", style="bold")
                  + Text(f"  ({source})", style="dim"), soft_wrap=True)
        history = d.get("history", [])
        attributes = d.get("attributes") or {}
        blocks = {k: v for k, v in attributes.items() if _is_pem(v)}
        rows = [
            ("product", f"{d.get('product', '')} {d.get('product_version') or ''}".strip()),
            ("first tested", _when(d.get("first_tested_at"))),
            ("last outcome", f"{d.get('last_outcome')}  (run {str(d.get('last_run_id', ''))[:12]}, "
                             f"{_when(d.get('last_tested_at'))}, station {d.get('last_station', '?')})"),
            *sorted((str(k), str(v)) for k, v in attributes.items() if k not in blocks),
            *([("disposition", d["disposition"])] if d.get("disposition") else []),
        ]
        width = max(len(printable(k)) for k, _ in rows)
        for k, v in rows:
            out.print(Text(f"  {printable(k):<{width}}  {printable(v)}"), soft_wrap=True)
        if d.get("conflict"):
            out.print(Text(f"  identity conflict: {printable(d['conflict'])}", style="yellow"), soft_wrap=True)
        table = Table(header_style="bold")
        # version and limits only where the runs differ: a widened limit explains a changed verdict
        varies = {c: len({r.get(c) for r in history}) > 1 for c in ("product_version", "limits_sha256")}
        columns = ["run", "started (UTC)", "station", "batch", "slot",
                   *(["version"] if varies["product_version"] else []),
                   *(["limits"] if varies["limits_sha256"] else []), "outcome"]
        for col in columns:
            table.add_column(col, overflow="fold")
        for r in history:
            outcome = r.get("outcome") or "RUNNING"
            table.add_row(
                Text(str(r["_id"])[:12]), _when(r.get("started_at")), Text(printable(r.get("station"))),
                Text(printable(r.get("batch"))), str(r.get("slot", "")),
                *([Text(printable(r.get("product_version")))] if varies["product_version"] else []),
                *([Text(str(r.get("limits_sha256") or "-")[:12])] if varies["limits_sha256"] else []),
                outcome + (" (marginal)" if r.get("marginal") else ""),
            )
        out.print(table)
        out.print(f"{len(history)} run(s)")
        # Why each failed run failed, whole, below the table: a table cell would fold it.
        for r in history:
            if r.get("failure"):
                out.print(Text(f"  {str(r['_id'])[:12]}  {printable(r['failure'])}"), soft_wrap=True)
        for k, v in sorted(blocks.items()):
            # As a block, line by line, nothing folded: copied from the terminal it is the key.
            out.print(Text(f"{printable(k)}:", style="bold"))
            for line in str(v).strip().splitlines():
                out.print(Text(printable(line)), soft_wrap=True, crop=False)
        for n in d.get("notes", []):
            about = f", run {n['run_id'][:12]}" if n.get("run_id") else ""
            set_to = f" [{n['disposition']}]" if n.get("disposition") else ""
            out.print(Text(f"  note {n['created_at'][:19].replace('T', ' ')} {printable(n['author'])} "
                           f"({n['role']}{about}){set_to}: ") + Text(printable(n["text"])), soft_wrap=True)


def _is_pem(value: Any) -> bool:
    text = str(value).strip()
    return text.startswith("-----BEGIN ") and text.rstrip().endswith("-----")


def _when(t: Any) -> str:
    return f"{t:%Y-%m-%d %H:%M:%S}" if t is not None and hasattr(t, "strftime") else "-"


def _json_default(value: Any) -> Any:
    if hasattr(value, "isoformat"):
        return value.isoformat()
    return str(value)

