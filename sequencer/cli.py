"""The ``sequencer`` command.

Exit codes: 0 every DUT passed (or the command succeeded), 1 a DUT did not
pass, 2 a usage or configuration error (one line on stderr naming the file,
phase, port or option), 130 after Ctrl-C.
"""

from __future__ import annotations

import argparse
import datetime as dt
import errno
import os
import sys
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import attrs
import trio
from rich.console import Console
from rich.markup import escape
from rich.text import Text

from fixtures.station import STATION_FIXTURES  # what the station provides every product
from reports.render.export import TABLES as EXPORT_TABLES
from sequencer.clock import run_on_station_clock
from sequencer.config import SIM_BOARDS, ConfigError, SerialLines, StationConfig, load_station_config, panel_address
from sequencer.fixtures import with_settings
from sequencer.product import LoadedProduct, ProductError, layers, load_product
from sequencer.records import Outcome, RunRecord, run_to_json
from sequencer.session import SessionResult, StopSignals, run_session
from sequencer.station import StationResult
from sequencer.terminal import OutputConsole, printable, silence_stdout, sole_exception
from sequencer.version import SEQUENCER_VERSION

if TYPE_CHECKING:
    from reports.storage.store import LocalStore

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_ABORTED = 0, 1, 2, 130
#: 128 + SIGPIPE, what `cat` or `grep` exit with when their reader is gone
EXIT_BROKEN_PIPE = 141


#: The batch page `sequencer report` writes from MongoDB (every station's runs), beside the station's index.html.
BATCH_PAGE_EVERY_STATION = "every-station.html"

#: How many runs `sequencer runs` lists unless told otherwise: a station's
#: store holds every run it ever took, and the latest are what an operator wants.
RUNS_SHOWN = 50


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is negative")
    return value


def _moment(text: str) -> dt.datetime:
    """A date (``2026-11-23``, midnight UTC) or an ISO time (UTC unless it names its offset)."""
    try:
        when = dt.datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a date (YYYY-MM-DD) or an ISO time") from None
    return when.replace(tzinfo=dt.timezone.utc) if when.tzinfo is None else when.astimezone(dt.timezone.utc)


def _add_run_filters(parser: argparse.ArgumentParser) -> None:
    """The filters every command that reads runs takes; a run must match all that are given."""
    parser.add_argument("--batch", metavar="B", help="the runs of batch B")
    parser.add_argument("--serial", metavar="S", help="the runs of the unit with serial S")
    parser.add_argument("--outcome", choices=[o.value for o in Outcome], help="the runs that ended so")
    parser.add_argument("--since", type=_moment, metavar="WHEN",
                        help="runs started at or after WHEN (YYYY-MM-DD or ISO time; UTC unless given)")
    parser.add_argument("--until", type=_moment, metavar="WHEN", help="runs started before WHEN")


def _run_filters(args: argparse.Namespace) -> dict[str, Any]:
    return {"batch": args.batch, "serial": args.serial, "outcome": args.outcome, "since": args.since,
            "until": args.until}


class UsageError(Exception):
    """Bad input from the operator; printed as one line, exit 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One line, naming the problem, instead of argparse's usage dump.
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="sequencer",
        description="Test and provision devices: run a product's phases on every slot of a station, "
        "keep every record, write HTML reports.",
        epilog="examples:\n"
        "  sequencer run products/esp32_sensor.py --sim 8     8 simulated DUTs, no hardware\n"
        "  sequencer run --station station.toml              the product, ports and store from one file\n"
        "  sequencer run --station station.toml --rounds 10  ten sets of boards, Enter between them\n"
        "  sequencer run products/esp32_sensor.py --sim 8 --continuous   boards come and go, until Ctrl-C\n"
        "  sequencer runs --batch B                          what the store holds for batch B\n"
        "  sequencer report --batch B                        yield and failure Pareto (prints its path)\n"
        "  sequencer export --batch B                        the same as a spreadsheet (.xlsx; or -o F.csv)\n"
        "\n"
        "A station machine can name its station file once in SEQUENCER_STATION; every command\n"
        "that takes --station then uses it unless given another.\n"
        "\n"
        "exit codes: 0 every DUT passed (or the command succeeded), 1 a DUT did not pass,\n"
        "2 a usage or configuration error, 130 after Ctrl-C.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--version", action="version", version=f"%(prog)s {SEQUENCER_VERSION or '(not installed)'}"
    )
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    check = sub.add_parser("check", help="validate a product file and print its phase graph")
    check.add_argument("product", type=Path, nargs="?", help="product file (default: the station file's product)")
    check.add_argument("--limits", type=Path, help="limits file (default: <product>.limits.toml beside it)")
    check.add_argument("--station", type=Path, help="station file, to check the resources it declares")

    run = sub.add_parser("run", help="run a product on every slot of the station")
    run.add_argument("product", type=Path, nargs="?", help="product file (default: the station file's product)")
    run.add_argument("--station", type=Path, metavar="FILE", help="station file (TOML; default: $SEQUENCER_STATION)")
    run.add_argument("--sim", type=_count, metavar="N", help="run on N simulated DUTs")
    run.add_argument("--bench", type=_count, metavar="N",
                     help="run N slots with no board and no port (instrument-only products, OpenHTF-style tests)")
    run.add_argument("--port", action="append", dest="ports", metavar="PATH", help="a DUT port (repeatable)")
    run.add_argument("--store", type=Path, help="local store (SQLite) path")
    run.add_argument("--reports", type=Path,
                     help="directory for HTML reports (default: `reports` beside the store)")
    run.add_argument("--batch", help="batch id stamped on every run")
    run.add_argument("--operator", help="operator name stamped on every run")
    run.add_argument("--limits", type=Path, help="limits file (default: <product>.limits.toml beside it)")
    run.add_argument("--seed", type=int, help="seed for simulated devices' variation")
    run.add_argument("--plain", action="store_true", help="plain progress lines instead of the live table")
    run.add_argument("-v", "--verbose", action="store_true", help="also print the station log to stderr")
    run.add_argument("--rounds", type=_count, metavar="N",
                     help="test N sets of boards, one after another: after each round the operator puts the next "
                          "boards in and presses Enter (or types stop); 0: until the operator types stop; "
                          "default 1, or the station file's rounds")
    run.add_argument("--panel", metavar="HOST:PORT",
                     help="serve the operator panel (a browser page per station: tiles, questions, start and stop) "
                          "there, e.g. 127.0.0.1:8081; the station file's panel otherwise")
    run.add_argument("--continuous", action="store_true",
                     help="each slot tests a board whenever one is put in, until Ctrl-C; slots are stable ports "
                          "(/dev/serial/by-path/ links) or [detect] locations (or continuous = true)")
    run.add_argument("--faults", type=Path, metavar="PROFILE",
                     help="with --sim: inject the faults a profile (TOML) describes, per slot or by probability")
    run.add_argument("--sim-board", choices=SIM_BOARDS, metavar="KIND",
                     help="with --sim: the simulated boards: jig (GPIO0 held, the default), devkitc (DTR/RTS "
                          "auto-reset over RFC 2217), esp32s3-usb (an ESP32-S3 on its USB-Serial/JTAG)")
    from reports.storage.mongo_cli import add_mongo_commands, add_mongo_options, add_reading_options

    add_mongo_options(run)

    report = sub.add_parser("report", help="write the HTML report of a run, a batch, or a product over a period")
    target = report.add_mutually_exclusive_group(required=True)
    target.add_argument("--run", metavar="ID", help="run id (a unique prefix is enough)")
    target.add_argument("--batch", metavar="B", help="every run of batch B: units, yields, failure Pareto")
    target.add_argument("--product", metavar="P",
                        help="product P over a period (--since, --until): yield by day or hour, station, slot and "
                        "operator, Paretos, measurement statistics")
    report.add_argument("--since", type=_moment, metavar="WHEN", help="with --product: from WHEN (YYYY-MM-DD or ISO)")
    report.add_argument("--until", type=_moment, metavar="WHEN", help="with --product: up to WHEN (default: now)")
    report.add_argument("-o", "--output", type=Path, metavar="FILE",
                        help="file to write (default: where `sequencer run` puts it: <reports>/<batch>/index.html "
                        "for a batch, <reports>/<batch>/<run id>.html for a run; read from MongoDB, a batch's "
                        f"page is <reports>/<batch>/{BATCH_PAGE_EVERY_STATION})")
    report.add_argument("--store", type=Path, metavar="PATH", help="local store (SQLite) path")
    report.add_argument("--station", metavar="FILE|NAME",
                        help="station file (for its store and reports directory); with --product, a station's name "
                        "keeps the period to its runs (a file that exists is the station file)")
    add_reading_options(report)

    runs = sub.add_parser("runs", help="list runs (the local store, or MongoDB when configured)")
    _add_run_filters(runs)
    runs.add_argument("--store", type=Path, metavar="PATH", help="local store (SQLite) path")
    runs.add_argument("--station", type=Path, metavar="FILE", help="station file (for its store)")
    runs.add_argument("--limit", type=_count, metavar="N",
                      help=f"the N most recent matching runs; 0 for all (default: {RUNS_SHOWN} in the table, "
                      "all with --json)")
    runs.add_argument("--json", action="store_true", help="one JSON record per line")
    add_reading_options(runs)

    export = sub.add_parser("export", help="write runs as a spreadsheet (.xlsx), a CSV table or JUnit XML (.xml)")
    _add_run_filters(export)
    export.add_argument("-o", "--output", metavar="FILE",
                        help="FILE.xlsx: a summary and every table; FILE.csv or - (stdout): one table; FILE.xml: JUnit XML"
                             " (default with --batch: <reports>/<batch>/<batch>.xlsx)")
    export.add_argument("--table", choices=EXPORT_TABLES,
                        help="the table a CSV holds (default: runs, one row per run, a column per measurement)")
    export.add_argument("--store", type=Path, metavar="PATH", help="local store (SQLite) path")
    export.add_argument("--station", type=Path, metavar="FILE", help="station file (for its store and reports)")
    add_reading_options(export)
    add_mongo_commands(sub)  # sync, find
    from web.provisioning.cli import add_provision_commands

    add_provision_commands(sub)  # provision-server
    from web.portal.cli import add_portal_commands

    add_portal_commands(sub)  # portal, portal add-user, portal add-token
    from fixtures.builds_cli import add_builds_commands

    add_builds_commands(sub)  # builds upload, builds channel
    return parser


#: A station machine names its station file once, here, so an operator's command needs no --station.
STATION_ENV = "SEQUENCER_STATION"


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    err = Console(stderr=True, highlight=False)
    try:
        _check_text_options(args)
        if getattr(args, "station", False) is None and os.environ.get(STATION_ENV):
            args.station = Path(os.environ[STATION_ENV])
            if not args.station.is_file():
                raise UsageError(f"{STATION_ENV}={args.station}: no such station file")
        from reports.storage.mongo_cli import cmd_find, cmd_sync
        from fixtures.builds_cli import cmd_builds
        from web.portal.cli import cmd_portal
        from web.provisioning.cli import cmd_provision_server

        handler = {"check": cmd_check, "run": cmd_run, "report": cmd_report, "runs": cmd_runs, "export": cmd_export,
                   "sync": cmd_sync, "find": cmd_find, "provision-server": cmd_provision_server,
                   "portal": cmd_portal, "builds": cmd_builds}[args.command]
        try:
            return handler(args)
        except BaseExceptionGroup as group:
            # An error raised inside a nursery comes wrapped (trio's strict
            # groups): one configuration error is still one line.
            raise sole_exception(group) from None
    except (UsageError, ConfigError, ProductError) as exc:
        err.print(f"sequencer: error: {exc}", markup=False, soft_wrap=True)
        return EXIT_USAGE
    except _store_error() as exc:
        err.print(f"sequencer: error: {exc}", markup=False, soft_wrap=True)
        return EXIT_USAGE
    except KeyboardInterrupt:
        # Ctrl-C before a station started (importing a product, a long report):
        # nothing to record, nothing to say beyond the exit status.
        return EXIT_ABORTED
    except BrokenPipeError:
        # The reader went away (`sequencer runs --json | head -1`): not an
        # error worth a traceback; exit as a process killed by SIGPIPE would.
        silence_stdout()
        return EXIT_BROKEN_PIPE


def _check_text_options(args: argparse.Namespace) -> None:
    """Refuse option values that are not text: they go into every record, and no store could take them back.

    Bytes that are not UTF-8 on the command line arrive as lone surrogates
    (``--batch $'bad\xff'``); a record holding one could not be written
    into SQLite, nor read back. Paths are left alone: a file name may be
    any bytes.
    """
    for name, value in vars(args).items():
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                shown = value.encode("utf-8", "backslashreplace").decode()
                raise UsageError(f"--{name.replace('_', '-')}: not valid UTF-8 text ({shown})") from None


def _store_error() -> type[Exception]:
    from reports.storage.store import StoreError

    return StoreError


# -- check -------------------------------------------------------------------


def _product_file(args: argparse.Namespace, config: StationConfig | None) -> Path:
    """The product named on the command line, else the station file's ``product``."""
    product = args.product or (config.product if config is not None else None)
    if product is None:
        raise UsageError(f"say which product: sequencer {args.command} PRODUCT, or product = \"...\" in the "
                         "station file")
    return product


def cmd_check(args: argparse.Namespace) -> int:
    station = load_station_config(args.station) if args.station else None
    # A simulated station simulates every instrument a product needs, as `run` does.
    resources = station.resources.keys() if station is not None and not station.sim else None
    loaded = load_product(_product_file(args, station), limits=args.limits, station_fixtures=STATION_FIXTURES,
                          station_resources=resources)
    if station is not None:
        with_fixture_settings(loaded, station)
    print(describe_product(loaded))
    return EXIT_OK


def with_fixture_settings(loaded: LoadedProduct, config: StationConfig) -> LoadedProduct:
    """``loaded`` with the station file's ``[fixtures.NAME]`` settings given to its fixtures' factories."""
    if not config.fixture_settings and not loaded.product.fixtures:
        return loaded
    try:
        bound = with_settings(loaded.product.fixtures, config.fixture_settings, str(config.source or "station"),
                              others=STATION_FIXTURES)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    return attrs.evolve(loaded, product=attrs.evolve(loaded.product, fixtures=bound))


def describe_product(loaded: LoadedProduct) -> str:
    p = loaded.product
    out = [f"product {p.name}" + (f" {p.version}" if p.version else "") + f"  ({loaded.source})"
           + (f"  sha256 {loaded.source_sha256}" if loaded.source_sha256 else "")]
    if len(loaded.source_files) > 1:
        # What the hash above covers: the product file and the modules it imports from its own folder.
        out.extend(f"  file  {f.path}  sha256 {f.sha256}" for f in loaded.source_files)
    if loaded.limits_file:
        out.append(f"limits  {loaded.limits_file}  sha256 {loaded.limits_sha256}")
    # What every record of a run will name as the code that produced it.
    dirty = "  (uncommitted changes: records will say .dirty)" if SEQUENCER_VERSION.endswith(".dirty") else ""
    out.append(f"code    sequencer {SEQUENCER_VERSION or '(not installed)'}{dirty}")
    if p.fixtures:
        out.append("fixtures  " + ", ".join(sorted(p.fixtures)))
    if p.resources:
        out.append("resources " + ", ".join(sorted(p.resources)))
    out.append(f"stop on failure: {'yes' if p.stop_on_failure else 'no'}")
    if p.max_retests is not None:
        out.append(f"retests: at most {p.max_retests} after a unit's first test; then it goes to rework untested")
    if p.sequential:
        out.append("sequential: each phase follows the one before, whatever its outcome")
    plan = p.plan
    for group in reversed(plan.groups):  # outermost first, as written
        parts = [f"setup {', '.join(group.setup)}"] if group.setup else []
        parts += [f"teardown {', '.join(group.teardown)}"] if group.teardown else []
        parts += ["stops on its first failure"] if group.stop_on_failure else []
        out.append(f"group {group.name}" + (": " + "; ".join(parts) if parts else ""))
    if p.uses("operator"):
        out.append("operator: asked questions; answers from the keyboard or standard input (under --sim, the "
                   "simulated operator)")

    def line(name: str) -> str:
        ph = p.phase(name)
        step = plan.steps.get(name)
        bits = []
        if step is not None and step.tears_down is not None:
            bits.append(f"teardown of group {step.tears_down.name}")
        elif step is not None and step.group is not None:
            role = "setup of" if name in step.group.setup else "in"
            bits.append(f"{role} group {step.group.name}")
        if ph.after:
            bits.append("after " + ", ".join(ph.after))
        if ph.follows:
            bits.append("follows " + ", ".join(ph.follows))
        if ph.timeout or ph.teardown:
            bits.append(f"timeout {ph.effective_timeout:g} s")
        if ph.retries:
            bits.append(f"retries {ph.retries}")
        if ph.run_if:
            bits.append("conditional")
        if ph.measurements:
            bits.append(f"{len(ph.measurements)} measurement" + ("s" if len(ph.measurements) > 1 else ""))
        if "operator" in ph.parameters:
            bits.append("asks the operator")
        if ph.rendezvous is not None:
            bits.append(f"rendezvous {ph.rendezvous!r}: every slot meets here, waiting up to "
                        f"{ph.rendezvous_timeout:g} s")
        head = f"    {name}" + (f"  ({'; '.join(bits)})" if bits else "")
        summary = ph.description.strip().splitlines()[0] if ph.description.strip() else ""
        text = head + (f"\n        {summary}" if summary else "")  # the docstring's first line
        said = [m for m in ph.measurements if m.on_fail or m.disposition is not None]
        for who, what in ([(None, ph)] if ph.on_fail or ph.disposition is not None else []) + [(m.name, m) for m in said]:
            bin_ = what.disposition.value if what.disposition is not None else "retest"
            text += f"\n        on fail{f' of {who}' if who else ''}: {bin_}" + (f": {what.on_fail}" if what.on_fail else "")
        return text

    for i, layer in enumerate(layers(p)):
        out.append(f"  layer {i}" + ("  (concurrent)" if len(layer) > 1 else ""))
        out.extend(line(n) for n in layer)
    if p.teardowns:
        out.append("  teardown (always runs, in order)")
        out.extend(line(t.name) for t in p.teardowns)
    return "\n".join(out)


# -- run ---------------------------------------------------------------------


def cmd_run(args: argparse.Namespace) -> int:
    from reports.storage.store import LocalStore
    from reports.storage.unit_history import StoreUnitHistory
    from sequencer.logs import configure_logging
    from sequencer.station import tune_garbage_collector

    config = load_station_config(args.station) if args.station else StationConfig()
    if args.panel is not None:
        panel_address(args.panel, "--panel")
    product = _product_file(args, config)
    if args.sim is None and not args.ports and not args.station and args.bench is None:
        raise UsageError(f"say where the DUTs are: --sim N, --port PATH, --bench N, or --station FILE (or set "
                         f"{STATION_ENV})")
    if args.bench == 0:
        raise UsageError("--bench: give the number of slots, 1 or more")
    if sum(x is not None and x != () for x in (args.sim, args.ports, args.bench)) > 1:
        raise UsageError("give one of --sim N, --port PATH and --bench N")
    config = config.with_overrides(
        sim=args.sim, bench=args.bench, ports=tuple(args.ports) if args.ports else None, store=args.store,
        reports=args.reports,
        batch=args.batch, operator=args.operator, seed=args.seed, rounds=args.rounds, sim_board=args.sim_board,
        continuous=True if args.continuous else None, panel=args.panel,
    )
    from reports.storage.mongo_cli import apply_mongo_options, station_shipping

    config = apply_mongo_options(config, args)  # --mongo, SEQUENCER_MONGO_URI, [mongo]
    config.check()
    if args.sim_board and not config.sim:
        raise UsageError("--sim-board: says what the simulated boards are; give --sim N too")
    from fixtures.station import detected_ports, load_faults, open_hardware

    config = detected_ports(config)  # [detect]: USB serial ports by VID/PID/serial/location
    if not config.sim and not config.continuous:  # a continuous station's slots may be empty now
        for port in config.ports:
            check_port(port, config.flash.for_port(port).console_lines)
    loaded = load_product(product, limits=args.limits, station_fixtures=STATION_FIXTURES, station_resources=None)
    loaded = with_fixture_settings(loaded, config)
    _check_scans(config, loaded)
    faults = load_faults(args.faults, config, loaded)
    if not config.sim:
        from fixtures.station import station_services

        station_services(config, loaded, config.ports)  # a product's needs the station file lacks: fail now
    _raise_open_file_limit()
    if config.panel:
        _check_panel_address(config)
    if config.sim:
        _check_free_ptys(config.sim)
    reports = _RoundReports(config)
    reports.check_writable()
    store = LocalStore.open(config.store, station=True)
    # soft_wrap: a path or a batch id is never broken across lines (it would
    # not paste back); markup is only ever in this module's own literals, and
    # every value put into it goes through escape().
    console = OutputConsole(highlight=False, soft_wrap=True, keep_going=True)
    if store.interrupted_on_open:
        console.print(f"[yellow]{store.interrupted_on_open} run(s) left open by a previous station were marked "
                      "INTERRUPTED[/yellow]")
    if store.damaged_on_open:
        console.print(f"[yellow]{store.damaged_on_open} line(s) of {escape(str(config.store))}'s journal could not "
                      "be restored (cut short by a crash or a full disk) and were skipped[/yellow]")
    log_handle = configure_logging(config.store.parent / "station.log", verbose=args.verbose)
    tune_garbage_collector()
    # From here to the exit code, Ctrl-C (SIGTERM, SIGHUP) only ever stops
    # testing: the records, the summary and the report always follow.
    with StopSignals().held() as stops:
        try:
            result = run_on_station_clock(partial(
                run_session, loaded, config, store, console, not args.plain,
                open_hardware=partial(open_hardware, loaded, config, faults),
                open_shipping=partial(station_shipping, config, console),
                round_ended=reports.write, history=StoreUnitHistory(store), stops=stops,
                open_panel=partial(_open_panel, config, loaded) if config.panel else None,
            ))
            # The batch page covers the whole batch, earlier sessions and retests included; a work order scanned
            # mid-shift started another batch, which gets its page too. Each is read from the store as it is
            # written (a batch of any size, never held whole), before the summary, as each round's reports were.
            batches = list(reports.batches or [config.batch_or_default])
            if _reports_due(result):
                for batch in batches:
                    reports.write_batch(batch, store)
        finally:
            store.close()
            if log_handle is not None:
                log_handle.close()
                if log_handle.dropped:
                    console.print(
                        f"[yellow]{log_handle.dropped} line(s) could not be written to "
                        f"{escape(str(log_handle.path))}[/yellow]"
                    )
        return _finish_run(result, batches, reports, config, console)


def _check_scans(config: StationConfig, loaded: LoadedProduct) -> None:
    """A station that reads labels must know one when it sees it; a serial scanner's port must be there."""
    from sequencer.scans import ScanRules

    where = config.source or "station"
    if config.scan.label and not ScanRules.of(config.scan, loaded.product.serial_pattern, loaded.name).reads_labels:
        raise ConfigError(f"{where}: scan: label = true, and {loaded.name!r} has no serial_pattern: give the labels' "
                          'pattern as [scan] serial = "re:..." (or Product(serial_pattern=...))')
    if config.scan.port:
        try:
            check_port(config.scan.port)
        except UsageError as exc:
            raise ConfigError(f"{where}: scan: the scanner's {exc}") from None


def _check_panel_address(config: StationConfig) -> None:
    """The panel's address can be listened on: said now, in one line, before any board is tested."""
    import socket

    host, port = config.panel_address
    try:
        socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET).close()
    except OSError as exc:
        raise ConfigError(f"panel {config.panel}: cannot listen there: {exc.strerror or exc}") from None


def _open_panel(config: StationConfig, loaded: LoadedProduct, desk: Any, control: Any) -> Any:
    """The operator panel over the session's desk and control, served in the station's process (``web/panel``)."""
    from web.panel.server import serve_panel

    host, port = config.panel_address
    return serve_panel(config.station, loaded.name, desk, control, host, port)


def _raise_open_file_limit() -> None:
    """Each open port costs several descriptors; 256 slots exceed the usual soft limit of 1024."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard if hard != resource.RLIM_INFINITY else 65536, hard))


def _check_free_ptys(sim: int) -> None:
    """A simulated DUT sits on a pty: say so now if the kernel has too few, before any run is recorded."""
    from fixtures.sim.farm import free_ptys

    free = free_ptys()
    if free is not None and sim > free:
        raise UsageError(f"sim {sim}: a simulated DUT needs a pty, and only {free} are free "
                         "(/proc/sys/kernel/pty/max)")


def check_port(port: str, lines: SerialLines | None = None) -> None:
    """Fail early, with the port named, if a DUT port is missing or busy.

    Opened as its links will open it (``lines``: DTR/RTS set before the open),
    so the check does not reset a board whose reset lines are wired. An
    ``rfc2217://`` port is checked for its form only: its server takes one
    client at a time, and the station connects soon enough.
    """
    import serial

    from fixtures.rfc2217 import is_rfc2217, rfc2217_address

    if is_rfc2217(port):
        try:
            rfc2217_address(port)
        except ValueError as exc:
            raise UsageError(f"port {port}: {exc}") from None
        return
    if "://" in port:
        raise UsageError(f"port {port}: the only port URLs are rfc2217://host:port")
    if not os.path.exists(port):
        raise UsageError(f"port {port}: does not exist")
    if os.path.isdir(port):
        raise UsageError(f"port {port}: is a directory, not a serial port")
    probe = serial.Serial(None, exclusive=True)
    probe.port = port
    if lines is not None:
        probe.dtr, probe.rts = lines.dtr, lines.rts
    try:
        probe.open()
        probe.close()
    except serial.SerialException as exc:
        if getattr(exc, "errno", None) == errno.ENOTTY or "Inappropriate ioctl" in str(exc):
            raise UsageError(f"port {port}: not a serial port (a terminal device is needed)") from None
        reason = str(exc).split(":")[-1].strip() or "cannot be opened"
        raise UsageError(f"port {port}: busy or not usable ({reason})") from None


class _RoundReports:
    """Each round's per-run reports, written as the round ends, so a session of many rounds holds no old run.

    The reports come before the round's summary: they are what quality
    reads, and a terminal that went away (stdout a closed pipe) must not
    cost them. After the first failure nothing more is written (the
    records are safe in the store; ``sequencer report`` writes them later).
    Each run's report goes to its own batch's folder: a work order scanned
    mid-shift starts another batch (:attr:`batches`, in the order first seen).
    """

    def __init__(self, config: StationConfig) -> None:
        self.reports_dir = config.reports_dir
        self.folder = self.folder_of(config.batch_or_default)
        self.cpk_threshold = config.quality.cpk_threshold
        self.error: Exception | None = None
        self.batches: dict[str, None] = {}

    def folder_of(self, batch: str) -> Path:
        from reports.render.html import batch_dir

        return batch_dir(self.reports_dir, batch)

    def check_writable(self) -> None:
        """Refuse, before any unit is tested, a reports folder nothing can be written in.

        A read-only folder (or a file where the folder should be) used to
        surface only at the end, as a red line under a batch that went on
        testing and exited 0. The batch's folder is not made here (a session
        stopped before testing leaves none): the nearest folder that exists
        must take a new file, and it is deleted as it is made.
        """
        import tempfile

        existing = self.folder
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        try:
            if not existing.is_dir():
                raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(existing))
            tempfile.TemporaryFile(dir=existing).close()
        except OSError as exc:
            reason = exc.strerror or str(exc)
            if existing != self.reports_dir:
                reason = f"{existing}: {reason}"
            raise UsageError(f"{self.reports_dir}: the HTML reports cannot be written there: {reason} (give "
                             "--reports DIR)") from None

    async def write(self, result: StationResult) -> None:
        if result.write_error is not None or self.error is not None:
            return  # no reports of a round the store does not hold in full
        try:
            await trio.to_thread.run_sync(self._write_runs, result.runs)
        except Exception as exc:
            self.error = exc

    def _write_runs(self, runs: Sequence[RunRecord]) -> None:
        from reports.render.html import render_run, write_html

        for r in runs:
            self.batches.setdefault(r.batch)
            folder = self.folder_of(r.batch)
            folder.mkdir(parents=True, exist_ok=True)
            write_html(folder / f"{r.run_id}.html", render_run(r))

    def write_batch(self, batch: str, store: LocalStore) -> None:
        """The batch page; and the pages of every retested unit's runs, which now link to each other."""
        from reports.render.html import batch_title, write_batch, write_retested_runs

        if self.error is not None:
            return
        folder = self.folder = self.folder_of(batch)
        try:
            folder.mkdir(parents=True, exist_ok=True)
            page = write_batch(folder / "index.html", lambda: store.iter_runs(batch=batch),
                               headers=lambda: store.iter_runs(batch=batch, phases=False),
                               title=partial(batch_title, batch), cpk_threshold=self.cpk_threshold)
            write_retested_runs(folder, page.units, store.get_run)
        except Exception as exc:
            self.error = exc


def _reports_due(result: SessionResult) -> bool:
    """Whether the session ends with its batch page: not when the store could not hold every record, nor when
    the operator stopped it before any run."""
    return result.write_error is None and not (not result.runs and result.stopped is not None)


def _finish_run(
    result: SessionResult,
    batches: list[str],
    reports: _RoundReports,
    config: StationConfig,
    console: Console,
) -> int:
    from sequencer.display import station_summary

    runs = result.last_round
    if result.write_error is not None:
        # No reports: they would show runs the store does not hold in full.
        console.print(station_summary(runs))
        raise UsageError(
            f"{result.write_error}; testing stopped on every slot (phases committed before that are in "
            f"{config.store}; retest these units once the store can be written)"
        )
    if not result.runs and result.stopped is not None:
        console.print(f"[yellow]stopped by the operator {result.stopped}[/yellow]")
        return EXIT_ABORTED
    passed, total = result.passed, result.runs
    # The batch pages were written before the summary (cmd_run); the last batch's page is named.
    report_dir = reports.folder
    batch_path = report_dir / "index.html"
    others = f" (and batch {', '.join(batches[:-1])}'s beside it)" if len(batches) > 1 else ""
    report_error = reports.error
    # The last round's runs: the earlier rounds' summaries were shown as they ended.
    console.print(station_summary(runs))
    for line in result.crashed:
        console.print(f"[red]{escape(line)} (a bug: the run has no complete record; see the station log)[/red]")
    if report_error is not None:
        # The records are safe in the store; a report can be written later
        # with `sequencer report`. Say so rather than lose the exit code.
        console.print(f"[red]could not write the HTML report in {escape(str(report_dir))}: "
                      f"{type(report_error).__name__}: {escape(str(report_error))}[/red]"
                      f"  (records are in {escape(str(config.store))}; retry with `sequencer report --batch ...`)")
        console.print(f"{passed}/{total} passed.")
    else:
        console.print(f"{passed}/{total} passed.  Report: {escape(str(batch_path))}{escape(printable(others))}  "
                      "(per-run reports beside it)")
    if result.aborted:
        # Runs that had ended before the abort keep their outcome.
        if result.stopped is not None:
            console.print(f"[yellow]stopped by the operator {result.stopped}[/yellow]")
        else:
            cut = result.outcomes.get(Outcome.ABORTED, 0)
            console.print(f"[yellow]aborted by the operator; {cut} unfinished run(s) recorded ABORTED[/yellow]")
        return EXIT_ABORTED
    return EXIT_OK if total and passed == total and not result.crashed else EXIT_FAILED


# -- report and runs ---------------------------------------------------------


def cmd_report(args: argparse.Namespace) -> int:
    from reports.quality.units import group_units
    from reports.render.html import batch_dir, batch_title, render_run, write_batch, write_html
    from reports.storage.mongo_cli import reading_runs
    from sequencer.station import tune_garbage_collector

    tune_garbage_collector()

    station_name = None
    if args.station is not None and args.product is not None and not Path(args.station).is_file():
        station_name, args.station = args.station, None
    elif args.station is not None:
        args.station = Path(args.station)
    if args.product is not None:
        return _period_report(args, station_name)
    if args.since is not None or args.until is not None:
        raise UsageError("--since/--until: a period is reported per product: give --product P")
    with reading_runs(args) as reading:
        threshold = reading.config.quality.cpk_threshold
        source = reading.source
        if args.run is not None:
            if not args.run.strip():
                raise UsageError("--run: give a run id (or the start of one)")
            matches = source.find_runs(run_id_prefix=args.run, limit=2)
            if not matches:
                raise UsageError(f"run {args.run!r}: not in {reading.where}")
            if len(matches) > 1:
                raise UsageError(f"run {args.run!r}: the prefix matches several runs; give more of the id")
            run = matches[0]
            output = args.output or batch_dir(reading.config.reports_dir, run.batch) / f"{run.run_id}.html"
            # The unit's other runs in its batch, as the batch page groups them: from the batch's headers.
            unit = group_units(source.iter_runs(batch=run.batch, phases=False)).of(run)
            unit_runs = [r for rid in unit.run_ids if (r := source.get_run(rid)) is not None]
            _write_report(output, lambda path: write_html(path, render_run(run, unit_runs=unit_runs)))
        else:
            if not source.find_runs(batch=args.batch, limit=1):
                raise UsageError(f"batch {args.batch!r}: no runs in {reading.where}")
            # `sequencer run` keeps index.html, this station's page, up to date; the
            # page of every station's runs is another file, so neither overwrites the other.
            page = BATCH_PAGE_EVERY_STATION if reading.every_station else "index.html"
            output = args.output or batch_dir(reading.config.reports_dir, args.batch) / page
            # Read once, then its headers as it is written (reports/render/html.py BatchPage): any size of batch.
            _write_report(output, lambda path: write_batch(
                path, lambda: source.iter_runs(batch=args.batch),
                headers=lambda: source.iter_runs(batch=args.batch, phases=False),
                title=partial(batch_title, args.batch), cpk_threshold=threshold))
    print(output)
    return EXIT_OK


def _write_report(output: Path, write: Any) -> None:
    """``write(output)``; a file that cannot be written is a one-line usage error naming why."""
    try:
        write(output)
    except OSError as exc:
        raise UsageError(f"{output}: cannot write the report: {_os_reason(exc, output)}") from None


def _period_report(args: argparse.Namespace, station: str | None) -> int:
    """``sequencer report --product P --since D [--until D] [--station NAME]``: the trend report of a period."""
    from reports.quality.period import period_from_runs
    from reports.render.html import batch_dir, render_period, write_html
    from reports.storage.mongo_cli import reading_runs

    if args.since is None:
        raise UsageError("--product: give the period's start with --since WHEN (and its end with --until WHEN)")
    if args.until is not None and args.until <= args.since:
        raise UsageError(f"--until {args.until:%Y-%m-%d %H:%M} is not after --since {args.since:%Y-%m-%d %H:%M}")
    with reading_runs(args) as reading:
        if reading.every_station:
            report = reading.source.period_report(product=args.product, since=args.since, until=args.until,
                                                  station=station)
        else:
            # one reading, oldest first, a page of runs at a time: a week of a station's runs is never in memory
            runs = reading.source.iter_runs(product=args.product, since=args.since, until=args.until, station=station)
            report = period_from_runs(runs, product=args.product, station=station, since=args.since,
                                      until=args.until)
        if not report.runs:
            raise UsageError(f"product {args.product!r}: no runs" + _described(
                {"since": args.since, "until": args.until}, " ") + f"{' on station ' + station if station else ''}"
                f" in {reading.where}")
        end = f"{args.until:%Y-%m-%d %H:%M}" if args.until else "now"
        period = f"{args.since:%Y-%m-%d %H:%M} – {end} UTC"
        name = f"{args.product}_{args.since:%Y%m%dT%H%M}_{f'{args.until:%Y%m%dT%H%M}' if args.until else 'now'}"
        output = args.output or batch_dir(reading.config.reports_dir / "periods", name) / "index.html"
        html = render_period(report, title=f"{args.product} — {period}", period=period, source=reading.where,
                             cpk_threshold=reading.config.quality.cpk_threshold)
    try:
        write_html(output, html)
    except OSError as exc:
        raise UsageError(f"{output}: cannot write the report: {_os_reason(exc, output)}") from None
    print(output)
    return EXIT_OK


def _os_reason(exc: OSError, path: Path) -> str:
    """Why ``path`` could not be written, naming the folder at fault if it is not the file itself."""
    reason = exc.strerror or str(exc)
    if exc.filename and Path(exc.filename) != path and path.is_relative_to(exc.filename):
        reason += f": {exc.filename}"
    return reason


def cmd_runs(args: argparse.Namespace) -> int:
    from reports.storage.mongo_cli import reading_runs

    filters = _run_filters(args)
    # A person reads the table: the latest runs. A script reads the JSON: all
    # of them unless it says otherwise, never silently cut short.
    limit = args.limit if args.limit is not None else (0 if args.json else RUNS_SHOWN)
    with reading_runs(args) as reading:
        runs = reading.source.find_runs(**filters, last=limit or None)
        if args.json:
            for r in runs:
                print(run_to_json(r))
            return EXIT_OK
        counts = reading.source.outcome_counts(**filters)
    if not runs:
        print(_no_runs(filters, reading.where))
        return EXIT_OK
    from rich import box
    from rich.table import Table

    # No vertical rules, so the six columns fit 80 characters; identifiers and
    # times are never split across lines (a split serial reads as two units).
    # Runs read from MongoDB may come from several stations: a slot alone
    # then names no place, so the station is shown too, and the batch column,
    # which --batch makes the same on every row, makes room for it.
    several_stations = len({r.station for r in runs}) > 1
    columns = {"run": True, "started (UTC)": True, "batch": args.batch is None, "serial": True,
               "station": several_stations, "slot": True, "outcome": True}
    rows = []
    for r in runs:
        outcome = r.outcome.value if r.outcome else "RUNNING"
        # Text, not str: batch ids, serials and station names are not console markup
        rows.append({"run": Text(r.run_id[:12]), "started (UTC)": Text(f"{r.started_at:%Y-%m-%d %H:%M:%S}"),
                     "batch": Text(printable(r.batch)), "serial": Text(printable(r.serial or "-")),
                     "station": Text(printable(r.station)), "slot": Text(str(r.slot)),
                     "outcome": Text(outcome + (" (marginal)" if r.marginal else ""))})
    table = Table(header_style="bold", box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
    needed = -3  # the gaps: three characters between columns
    for col, shown in columns.items():
        if not shown:
            continue
        width = max([len(col), *(row[col].cell_len for row in rows)])
        if col in ("batch", "station"):
            table.add_column(col, overflow="fold")  # these give way, onto further lines if need be
            width = min(width, 4)
        else:
            # Never narrowed: a serial cut short is another unit's serial.
            table.add_column(col, no_wrap=True, min_width=width)
        needed += width + 3
    for row in rows:
        table.add_row(*(row[col] for col, shown in columns.items() if shown))
    console = OutputConsole(highlight=False)
    if needed > console.width:
        # Wider than the terminal rather than a column dropped or cut: a long line wraps, a cut one lies.
        console = OutputConsole(highlight=False, width=needed)
    console.print(table)
    # How every matching run ended, not just those listed: a batch's tally at a glance.
    total = sum(counts.values())
    print(f"{total} run(s): " + " · ".join(f"{n} {name}" for name, n in counts.items()))
    if total > len(runs):
        print(f"showing the {len(runs)} most recent (--limit N for more, --limit 0 for all)")
    return EXIT_OK


def _no_runs(filters: dict[str, Any], source: str | Path) -> str:
    return f"no runs{_described(filters, ' with ')} in {source}"


def _described(filters: dict[str, Any], prefix: str = "") -> str:
    """The filters given, as a person would read them: ``batch 'B', since 2026-11-23 00:00 UTC``."""
    given = [f"{k} {v:%Y-%m-%d %H:%M:%S UTC}" if isinstance(v, dt.datetime) else f"{k} {v!r}"
             for k, v in filters.items() if v is not None]
    return prefix + ", ".join(given) if given else ""


def cmd_export(args: argparse.Namespace) -> int:
    from reports.render.export import Export, ExportError, write_csv_file, write_csv_rows, write_xlsx
    from reports.render.html import batch_dir, batch_title
    from reports.storage.mongo_cli import reading_runs
    from sequencer.station import tune_garbage_collector

    tune_garbage_collector()

    if args.output is None and args.batch is None:
        raise UsageError("export: give -o FILE (.xlsx, .csv or .xml), or --batch B to write B.xlsx beside its reports")
    named = args.output or "export"  # how messages name the output
    kind = "xlsx" if args.output is None else "csv" if args.output == "-" else Path(args.output).suffix.lower()[1:]
    if kind not in ("csv", "xlsx", "xml"):
        raise UsageError(f"{named}: an export is .xlsx (a summary and every table), .csv (one table) or .xml "
                         "(JUnit XML: a testsuite per run, a testcase per phase)")
    if kind != "csv" and args.table:
        raise UsageError(f"{named}: --table picks the one table a CSV holds; an .{kind} file holds every run whole")
    filters = _run_filters(args)
    with reading_runs(args) as reading:
        source = reading.source
        if not source.find_runs(**filters, limit=1):
            raise UsageError(_no_runs(filters, reading.where))

        # Read as it is written, twice (the tables' columns, units and totals first): an export of any size.
        def passes() -> Any:
            return source.iter_runs(**filters)

        if args.batch is not None:
            title = batch_title(args.batch, {r.product for r in source.iter_runs(**filters, phases=False)})
        else:
            title = "Runs" + _described(filters, ", ")
        if args.output is None:
            folder = batch_dir(reading.config.reports_dir, args.batch)
            output = folder / f"{folder.name}.xlsx"
        else:
            output = Path(args.output)
        try:
            if kind == "xml":
                from reports.render.junit import write_junit

                write_junit(output, passes, name=title)
            else:
                export = Export(passes, cpk_threshold=reading.config.quality.cpk_threshold)
                table = args.table or "runs"
                if args.output == "-":
                    write_csv_rows(export.columns(table), export.rows(table), sys.stdout)
                    return EXIT_OK
                if kind == "csv":
                    write_csv_file(output, (export.columns(table), export.rows(table)))
                else:
                    write_xlsx(output, export, title=title)
        except ExportError as exc:
            raise UsageError(f"{output}: {exc}") from None
        except OSError as exc:
            raise UsageError(f"{output}: cannot write the export: {_os_reason(exc, output)}") from None
    print(output)
    return EXIT_OK


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
