"""``sequencer provision-server``: run the provisioning service.

Wired into ``sequencer/cli.py`` like ``reports/storage/mongo_cli.py``:
:func:`add_provision_commands` adds the subcommand to the parser and
:func:`cmd_provision_server` runs it.

Where devices are kept, first found wins: ``--mongo URI``; ``--db PATH``
(SQLite); the environment's ``SEQUENCER_MONGO_URI`` (the line's MongoDB, the
same one records ship to); else SQLite at ``<data dir>/provisioning.sqlite``.
The database name: ``--mongo-db``, ``SEQUENCER_MONGO_DB``, the URI's own,
``sequencer``. Prefer the environment for a URI with a password: a command
line is visible to every local user.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sqlite3
import sys
from pathlib import Path
from typing import Any

from sequencer.config import ConfigError, default_data_dir
from sequencer.terminal import sole_exception

__all__ = ["add_provision_commands", "cmd_provision_server"]

ENV_URI = "SEQUENCER_MONGO_URI"
ENV_DB = "SEQUENCER_MONGO_DB"
EXIT_ABORTED = 130


def add_provision_commands(sub: Any) -> None:
    """Add ``provision-server`` to the command's subparsers."""
    p = sub.add_parser("provision-server",
                       help="serve the device provisioning API (idempotent registration, claim codes)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=8080, help="port (default: 8080; 0 picks a free one)")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--mongo", metavar="URI", help=f"keep devices in this MongoDB (default: ${ENV_URI})")
    where.add_argument("--db", type=Path, metavar="PATH",
                       help="keep devices in this SQLite file (default without MongoDB: "
                            "<data dir>/provisioning.sqlite)")
    p.add_argument("--mongo-db", metavar="NAME", help=f"database name (default: ${ENV_DB}, the URI's, 'sequencer')")


def cmd_provision_server(args: argparse.Namespace) -> int:
    """Serve until Ctrl-C. A bad URI or port is a one-line ConfigError (exit 2, printed by the caller)."""
    import trio

    from web.provisioning.storage import MongoStorage, SqliteStorage, StorageUnavailable

    if not 0 <= args.port <= 65535:
        raise ConfigError(f"--port: {args.port} is not a port number")
    settings = _mongo_settings(args)
    from sequencer.logs import configure_logging

    # One line per registration (serial, key prefix, status; never a body) as
    # JSON on stderr, like a station's log; hypercorn's own messages as text.
    configure_logging(None, verbose=True)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(message)s")

    async def serve() -> None:
        from web.provisioning.server import serve_provisioning
        from web.provisioning.storage import ProvisioningStorage

        storage: ProvisioningStorage
        if settings is not None:
            storage = await trio.to_thread.run_sync(MongoStorage.open, settings)
        else:
            db = args.db or default_data_dir() / "provisioning.sqlite"
            try:
                storage = SqliteStorage.open(db)
            except OSError as exc:  # not the port's fault: say which file
                raise ConfigError(f"provision-server: cannot open the database {db}: {exc.strerror or exc}") from None
        # Ctrl-C and SIGTERM end the serving block like any return: the server
        # shuts down gracefully and the storage closes, rather than a
        # KeyboardInterrupt landing wherever hypercorn happens to be.
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as stop:
            async with storage, serve_provisioning(storage, args.host, args.port) as url:
                print(f"provisioning service on {url} (devices in {storage.description}); Ctrl-C stops it",
                      file=sys.stderr, flush=True)
                async for _ in stop:
                    return

    try:
        trio.run(serve)
        return EXIT_ABORTED  # serve() only returns when the operator stopped it
    except BaseException as exc:  # noqa: BLE001 - sorted below; nurseries wrap errors in groups
        leaf = sole_exception(exc)
        if isinstance(leaf, KeyboardInterrupt):
            return EXIT_ABORTED
        if isinstance(leaf, ConfigError):
            raise leaf from None
        if isinstance(leaf, OSError):  # the port is taken, the address is not this machine's
            raise ConfigError(f"provision-server: cannot listen on {args.host}:{args.port}: "
                              f"{leaf.strerror or leaf}") from None
        if isinstance(leaf, (StorageUnavailable, sqlite3.Error)):
            raise ConfigError(f"provision-server: {leaf}") from None
        raise


def _mongo_settings(args: argparse.Namespace) -> Any:
    uri, where = args.mongo, "--mongo"
    if uri is None and args.db is None and os.environ.get(ENV_URI):
        uri, where = os.environ[ENV_URI], ENV_URI
    if not uri:
        return None
    from reports.storage.mongo import MongoConfigError, MongoSettings

    try:
        return MongoSettings.parse(uri, args.mongo_db or os.environ.get(ENV_DB) or None, where=where)
    except MongoConfigError as exc:
        raise ConfigError(str(exc)) from None
