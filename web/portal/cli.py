"""``sequencer portal``: serve the factory portal; ``portal add-user`` and ``portal add-token``: who may use it.

Wired into ``sequencer/cli.py`` like the provisioning service's command.
Where the records are: ``--mongo URI`` (or ``SEQUENCER_MONGO_URI``, or the
station file's ``[mongo]``), every station's runs; or ``--store PATH``, one
station's local store, read-only and without logins, which is why it binds
loopback only. ``[portal]`` in the station file may set ``host`` and ``port``.
"""

from __future__ import annotations

import argparse
import getpass
import ipaddress
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any

from sequencer.config import ConfigError

__all__ = ["add_portal_commands", "cmd_portal"]

EXIT_OK, EXIT_ABORTED = 0, 130
DEFAULT_PORT = 8080


def _mongo_options(parser: argparse.ArgumentParser, default: Any = None) -> None:
    parser.add_argument("--mongo", metavar="URI", default=default,
                        help="the factory's MongoDB (default: $SEQUENCER_MONGO_URI, then the station file)")
    parser.add_argument("--mongo-db", metavar="NAME", default=default,
                        help="database name (default: $SEQUENCER_MONGO_DB, the station file, the URI's, 'sequencer')")
    parser.add_argument("--station", type=Path, metavar="FILE", default=default,
                        help="station file, for its [mongo] and [portal] tables")


def add_portal_commands(sub: Any) -> None:
    """Add ``portal`` (with ``add-user`` and ``add-token``) to the command's subparsers."""
    p = sub.add_parser("portal", help="serve the factory portal: line board, device search, notes, webhooks, exports")
    p.add_argument("--host", help="address to listen on (default: 127.0.0.1)")
    p.add_argument("--port", type=int, help=f"port (default: {DEFAULT_PORT}; 0 picks a free one)")
    p.add_argument("--store", type=Path, metavar="PATH",
                   help="serve this station's local store, read-only and without logins (loopback only)")
    p.add_argument("--https-only", action="store_true",
                   help="mark the session cookie Secure (behind a TLS-terminating proxy)")
    _mongo_options(p)
    users = p.add_subparsers(dest="portal_command", metavar="{add-user,add-token}")
    for name, text in (("add-user", "create a user, or set an existing user's role and password"),
                       ("add-token", "make an API token for scripts (printed once, as the last line)")):
        u = users.add_parser(name, help=text)
        u.add_argument("name", help="the user's (or the script's) name")
        u.add_argument("--role", required=True, help="viewer, operator, quality or admin")
        _mongo_options(u, default=argparse.SUPPRESS)


def _settings(args: argparse.Namespace) -> Any:
    from reports.storage.mongo_cli import apply_mongo_options, mongo_settings
    from sequencer.config import StationConfig, load_station_config

    config = load_station_config(args.station) if getattr(args, "station", None) else StationConfig()
    config = apply_mongo_options(config, args)
    settings = mongo_settings(config)
    if settings is None:
        raise ConfigError("portal: say where the records are: --mongo URI (or $SEQUENCER_MONGO_URI, or [mongo] in "
                          "the station file), or --store PATH for one station's store")
    return settings, config


def cmd_portal(args: argparse.Namespace) -> int:
    if args.portal_command in ("add-user", "add-token"):
        return _add(args)
    import trio

    from sequencer.terminal import sole_exception

    host = args.host or "127.0.0.1"
    port = args.port if args.port is not None else DEFAULT_PORT
    if args.station:
        from sequencer.config import load_station_config

        table = load_station_config(args.station).portal
        host = args.host or table.get("host", host)
        port = args.port if args.port is not None else table.get("port", port)
    if not 0 <= port <= 65535:
        raise ConfigError(f"--port: {port} is not a port number")
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    if args.store is not None:
        if args.mongo:
            raise ConfigError("portal: --store and --mongo are two places: give one")
        if not _loopback(host):
            raise ConfigError(f"--host {host}: a portal on a station's store has no logins, so it binds loopback only")
        if not args.store.is_file():
            raise ConfigError(f"--store {args.store}: no such store")
        from web.portal.data import StoreData

        data: Any = StoreData(args.store)
        auth = None
        where = f"{args.store} (read-only)"
    else:
        from web.auth import AuthStore
        from web.portal.data import MongoData

        settings, _ = _settings(args)
        data = MongoData(settings)
        auth = AuthStore(data.db)
        where = f"MongoDB {settings.target}"

    async def serve() -> None:
        from reports.storage.mongo import MongoUnavailable
        from web.portal.server import serve_portal

        try:
            async with serve_portal(data, auth, host, port, https_only=args.https_only) as url:
                print(f"portal: {url} over {where}; Ctrl-C stops it", flush=True)
                await trio.sleep_forever()
        except (MongoUnavailable, OSError) as exc:
            raise ConfigError(f"portal: cannot serve on {host}:{port} over {where}: {exc}") from None

    try:
        trio.run(_until_signal, serve)
    except BaseExceptionGroup as group:
        raise sole_exception(group) from None
    except KeyboardInterrupt:
        return EXIT_ABORTED
    finally:
        data.close()
    return EXIT_OK


async def _until_signal(serve: Any) -> None:
    import trio

    async with trio.open_nursery() as nursery:
        async def stop_on_signal() -> None:
            with trio.open_signal_receiver(signal.SIGTERM) as signals:
                async for _ in signals:
                    nursery.cancel_scope.cancel()

        nursery.start_soon(stop_on_signal)
        await serve()
        nursery.cancel_scope.cancel()


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _add(args: argparse.Namespace) -> int:
    from reports.storage.mongo import MongoSink, MongoUnavailable
    from web.auth import AuthStore, Role

    try:
        role = Role.parse(args.role)
    except ValueError as exc:
        raise ConfigError(f"--role: {exc}") from None
    from web.auth import valid_user_name

    try:
        valid_user_name(args.name)
    except ValueError as exc:
        raise ConfigError(f"portal {args.portal_command}: {exc}") from None
    settings, _ = _settings(args)
    password = _password(args.name) if args.portal_command == "add-user" else None
    sink = MongoSink(settings)
    try:
        auth = AuthStore(sink.db)
        auth.ensure()
        if password is not None:
            new = auth.add_user(args.name, role, password)
            print(f"portal: {'added' if new else 'updated'} user {args.name} ({role.label})")
        else:
            token = auth.add_token(args.name, role)
            print(f"portal: API token for {args.name} ({role.label}); it is shown only now:")
            print(token)
    except MongoUnavailable as exc:
        raise ConfigError(f"portal: MongoDB {settings.target}: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - a driver error: one line naming the database
        import pymongo.errors

        if isinstance(exc, pymongo.errors.PyMongoError):
            raise ConfigError(f"portal: MongoDB {settings.target}: {exc}") from None
        raise
    finally:
        sink.close()
    return EXIT_OK


def _password(name: str) -> str:
    """From the terminal (asked twice), or the first line of standard input when that is not a terminal."""
    if sys.stdin is not None and os.isatty(sys.stdin.fileno()):
        first = getpass.getpass(f"password for {name}: ")
        if first != getpass.getpass("again: "):
            raise ConfigError("portal add-user: the passwords differ")
    else:
        line = sys.stdin.readline() if sys.stdin is not None else ""
        first = line.rstrip("\r\n")
    if not first:
        raise ConfigError("portal add-user: the password is empty")
    return first
