"""The ``sequencer`` command.

Exit codes: 0 every DUT passed (or the command succeeded), 1 a DUT did not
pass, 2 a usage or configuration error (one line on stderr naming the file,
phase, port or option), 130 after Ctrl-C.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import signal
import sys
from collections.abc import Sequence
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any, NoReturn

import attrs
import trio
from rich.console import Console
from rich.markup import escape
from rich.text import Text

from fixtures.station import STATION_FIXTURES  # what the station provides every product
from reports.export import TABLES as EXPORT_TABLES
from sequencer.config import ConfigError, StationConfig, load_station_config
from sequencer.engine import RunSettings
from sequencer.events import EventBus
from sequencer.operator import NoOperator, OperatorDesk, Question
from sequencer.product import LoadedProduct, ProductError, layers, load_product
from sequencer.records import Outcome, RunRecord, run_to_json
from sequencer.station import StationResult
from sequencer.terminal import OutputConsole, printable, silence_stdout
from sequencer.version import SEQUENCER_VERSION

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


def _rounds(text: str) -> int:
    value = _count(text)
    if value == 0:
        raise argparse.ArgumentTypeError("a station runs at least one round")
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
    run.add_argument("--sim", type=int, metavar="N", help="run on N simulated DUTs")
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
    run.add_argument("--rounds", type=_rounds, default=1, metavar="N",
                     help="test N sets of boards, one after another: after each round the operator puts the next "
                          "boards in and presses Enter (or types stop)")
    run.add_argument("--faults", type=Path, metavar="PROFILE",
                     help="with --sim: inject the faults a profile (TOML) describes, per slot or by probability")
    from reports.mongo_cli import add_mongo_commands, add_mongo_options, add_reading_options

    add_mongo_options(run)

    report = sub.add_parser("report", help="write the HTML report of a run or a batch")
    target = report.add_mutually_exclusive_group(required=True)
    target.add_argument("--run", metavar="ID", help="run id (a unique prefix is enough)")
    target.add_argument("--batch", metavar="B", help="every run of batch B: units, yields, failure Pareto")
    report.add_argument("-o", "--output", type=Path, metavar="FILE",
                        help="file to write (default: where `sequencer run` puts it: <reports>/<batch>/index.html "
                        "for a batch, <reports>/<batch>/<run id>.html for a run; read from MongoDB, a batch's "
                        f"page is <reports>/<batch>/{BATCH_PAGE_EVERY_STATION})")
    report.add_argument("--store", type=Path, metavar="PATH", help="local store (SQLite) path")
    report.add_argument("--station", type=Path, metavar="FILE",
                        help="station file (for its store and reports directory)")
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

    export = sub.add_parser("export", help="write runs as a spreadsheet (.xlsx) or a CSV table, for analysis")
    _add_run_filters(export)
    export.add_argument("-o", "--output", metavar="FILE",
                        help="FILE.xlsx: a summary and every table; FILE.csv or - (stdout): one table"
                             " (default with --batch: <reports>/<batch>/<batch>.xlsx)")
    export.add_argument("--table", choices=EXPORT_TABLES,
                        help="the table a CSV holds (default: runs, one row per run, a column per measurement)")
    export.add_argument("--store", type=Path, metavar="PATH", help="local store (SQLite) path")
    export.add_argument("--station", type=Path, metavar="FILE", help="station file (for its store and reports)")
    add_reading_options(export)
    add_mongo_commands(sub)  # sync, find
    from reports.provisioning.cli import add_provision_commands

    add_provision_commands(sub)  # provision-server
    return parser


#: A station machine names its station file once, here, so an operator's command needs no --station.
STATION_ENV = "SEQUENCER_STATION"


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    err = Console(stderr=True, highlight=False)
    try:
        if getattr(args, "station", False) is None and os.environ.get(STATION_ENV):
            args.station = Path(os.environ[STATION_ENV])
            if not args.station.is_file():
                raise UsageError(f"{STATION_ENV}={args.station}: no such station file")
        from reports.mongo_cli import cmd_find, cmd_sync
        from reports.provisioning.cli import cmd_provision_server

        handler = {"check": cmd_check, "run": cmd_run, "report": cmd_report, "runs": cmd_runs, "export": cmd_export,
                   "sync": cmd_sync, "find": cmd_find, "provision-server": cmd_provision_server}[args.command]
        return handler(args)
    except (UsageError, ConfigError, ProductError) as exc:
        err.print(f"sequencer: error: {exc}", markup=False, soft_wrap=True)
        return EXIT_USAGE
    except _store_error() as exc:
        err.print(f"sequencer: error: {exc}", markup=False, soft_wrap=True)
        return EXIT_USAGE
    except BrokenPipeError:
        # The reader went away (`sequencer runs --json | head -1`): not an
        # error worth a traceback; exit as a process killed by SIGPIPE would.
        silence_stdout()
        return EXIT_BROKEN_PIPE


def _store_error() -> type[Exception]:
    from reports.store import StoreError

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
    resources = station.resources.keys() if station is not None else None
    loaded = load_product(_product_file(args, station), limits=args.limits, station_fixtures=STATION_FIXTURES,
                          station_resources=resources)
    print(describe_product(loaded))
    return EXIT_OK


def describe_product(loaded: LoadedProduct) -> str:
    p = loaded.product
    out = [f"product {p.name}" + (f" {p.version}" if p.version else "") + f"  ({loaded.source})"
           + (f"  sha256 {loaded.source_sha256}" if loaded.source_sha256 else "")]
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
    if asks_operator(loaded):
        out.append("operator: asked questions; answers from the keyboard or standard input (under --sim, the "
                   "simulated operator)")

    def line(name: str) -> str:
        ph = p.phase(name)
        bits = []
        if ph.after:
            bits.append("after " + ", ".join(ph.after))
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
        return f"    {name}" + (f"  ({'; '.join(bits)})" if bits else "")

    for i, layer in enumerate(layers(p.main_phases)):
        out.append(f"  layer {i}" + ("  (concurrent)" if len(layer) > 1 else ""))
        out.extend(line(n) for n in layer)
    if p.teardowns:
        out.append("  teardown (always runs, in order)")
        out.extend(line(t.name) for t in p.teardowns)
    return "\n".join(out)


# -- run ---------------------------------------------------------------------


def cmd_run(args: argparse.Namespace) -> int:
    from reports.store import LocalStore
    from sequencer.logs import configure_logging
    from sequencer.station import tune_garbage_collector

    config = load_station_config(args.station) if args.station else StationConfig()
    product = _product_file(args, config)
    if args.sim is None and not args.ports and not args.station:
        raise UsageError(f"say where the DUTs are: --sim N, --port PATH, or --station FILE (or set {STATION_ENV})")
    config = config.with_overrides(
        sim=args.sim, ports=tuple(args.ports) if args.ports else None, store=args.store, reports=args.reports,
        batch=args.batch, operator=args.operator, seed=args.seed,
    )
    from reports.mongo_cli import apply_mongo_options

    config = apply_mongo_options(config, args)  # --mongo, SEQUENCER_MONGO_URI, [mongo]
    config.check()
    from fixtures.station import detected_ports, load_faults

    config = detected_ports(config)  # [detect]: USB serial ports by VID/PID/serial/location
    if not config.sim:
        for port in config.ports:
            check_port(port)
    loaded = load_product(product, limits=args.limits, station_fixtures=STATION_FIXTURES, station_resources=None)
    faults = load_faults(args.faults, config, loaded)
    if not config.sim:
        from fixtures.station import station_services

        station_services(config, loaded, config.ports)  # a product's needs the station file lacks: fail now
    _raise_open_file_limit()
    if config.sim:
        _check_free_ptys(config.sim)
    store = LocalStore.open(config.store, station=True)
    # soft_wrap: a path or a batch id is never broken across lines (it would
    # not paste back); markup is only ever in this module's own literals, and
    # every value put into it goes through escape().
    console = OutputConsole(highlight=False, soft_wrap=True, keep_going=True)
    if store.interrupted_on_open:
        console.print(f"[yellow]{store.interrupted_on_open} run(s) left open by a previous station were marked "
                      "INTERRUPTED[/yellow]")
    log_handle = configure_logging(config.store.parent / "station.log", verbose=args.verbose)
    tune_garbage_collector()
    try:
        result = trio.run(_run_station, loaded, config, store, console, not args.plain, faults, args.rounds)
        # The batch page covers the whole batch, earlier sessions and retests included.
        batch_runs = store.find_runs(batch=config.batch_or_default)
    finally:
        store.close()
        if log_handle is not None:
            log_handle.close()
            if log_handle.dropped:
                console.print(
                    f"[yellow]{log_handle.dropped} line(s) could not be written to {escape(str(log_handle.path))}"
                    "[/yellow]"
                )
    return _finish_run(result, batch_runs, config, console)


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


def check_port(port: str) -> None:
    """Fail early, with the port named, if a DUT port is missing or busy."""
    import serial

    if not os.path.exists(port):
        raise UsageError(f"port {port}: does not exist")
    try:
        serial.Serial(port, exclusive=True).close()
    except serial.SerialException as exc:
        reason = str(exc).split(":")[-1].strip() or "cannot be opened"
        raise UsageError(f"port {port}: busy or not usable ({reason})") from None


async def _run_station(
    loaded: LoadedProduct, config: StationConfig, store: Any, console: Console, live: bool, faults: Any = None,
    rounds: int = 1,
) -> StationResult:
    """The station session: set up once, then ``rounds`` rounds of every slot, the operator saying when to go on.

    What lasts the whole session is opened once: the store's writer, the
    MongoDB shipper, the flash workers, the operator's input. Each round gets
    its own slots (under ``--sim``, a fresh farm: new boards, new serials),
    instruments and display. The runs of every round come back as one result.
    """
    from fixtures.station import flashes

    bus = EventBus()
    settings = RunSettings(station=config.station, operator=config.operator, batch=config.batch_or_default)
    interactive = live and console.is_terminal
    desk = OperatorDesk(bus) if rounds > 1 or asks_operator(loaded) else None
    results: list[StationResult] = []
    stopped = False
    async with AsyncExitStack() as stack:
        from reports.mongo_cli import station_shipping

        # Entered first so it exits last: its final drain sees the writer's final flush.
        await stack.enter_async_context(station_shipping(config, console))
        await stack.enter_async_context(store.writer())
        flash_workers = None
        if flashes(loaded):
            from fixtures.flasher import FlashWorkers

            # One process imports esptool; every slot's worker is forked from it.
            flash_workers = await stack.enter_async_context(FlashWorkers.open())
        async with trio.open_nursery() as answering:
            if desk is not None:
                answering.start_soon(_answer_operator_questions, desk, config, faults, console, interactive)
            try:
                for number in range(1, rounds + 1):
                    # New simulated boards each round: the same slots, other units.
                    round_config = attrs.evolve(config, seed=config.seed + 1000 * (number - 1))
                    result = await _run_round(loaded, round_config, store, console, bus, settings, desk, faults,
                                              flash_workers, interactive, f" (round {number} of {rounds})"
                                              if rounds > 1 else "")
                    results.append(result)
                    if number == rounds or result.aborted or result.write_error is not None:
                        break
                    go_on = await _next_round(desk, bus, result, number, rounds, console, interactive)
                    if go_on != "next":
                        stopped = go_on == "interrupted"
                        break
            finally:
                answering.cancel_scope.cancel()
    return StationResult(
        tuple(r for result in results for r in result.runs),
        aborted=stopped or any(result.aborted for result in results),
        write_error=next((result.write_error for result in results if result.write_error is not None), None),
    )


async def _run_round(
    loaded: LoadedProduct, config: StationConfig, store: Any, console: Console, bus: EventBus,
    settings: RunSettings, desk: OperatorDesk | None, faults: Any, flash_workers: Any, interactive: bool,
    which: str,
) -> StationResult:
    """One round: every slot runs the product once, shown live (or as plain lines)."""
    from fixtures.station import station_fixtures
    from sequencer.display import StationDisplay, show_live, show_plain
    from sequencer.station import run_station

    async with AsyncExitStack() as stack:
        ports = list(config.ports)
        devices: list[Any] = []
        if config.sim:
            from fixtures.station import open_sim_services, open_station_farm

            # ESP32 boards in download mode if the product flashes; --faults applied.
            devices = await stack.enter_async_context(open_station_farm(loaded, config, faults))
            if faults is not None:
                console.print(f"faults ({escape(str(faults.source))}): {escape(faults.summary() or 'none drawn')}")
            ports = [d.path for d in devices]
            services = await stack.enter_async_context(open_sim_services(loaded, config, devices))
            if services.provisioning_url and not config.provisioning_url:
                console.print(f"provisioning: simulated service at {escape(services.provisioning_url)}")
        else:
            from fixtures.station import station_services

            services = station_services(config, loaded, ports)
        resources = await _open_resources(stack, loaded, config, devices)
        display = StationDisplay(ports, len(loaded.product.phases))
        events = bus.subscribe("display", buffer=4096)
        console.print(f"[bold]{escape(loaded.name)}[/bold] on {len(ports)} slot(s), batch {escape(settings.batch)}, "
                      f"station {escape(settings.station)}{which}")
        async with trio.open_nursery() as nursery:
            if interactive:
                nursery.start_soon(show_live, display, events, console, desk)
            else:
                nursery.start_soon(show_plain, display, events, sys.stdout)
            try:
                def tell_operator(aborts: int) -> None:
                    try:
                        if aborts == 1:
                            console.print("[yellow]aborting: running teardowns and recording every run "
                                          "(Ctrl-C again to skip teardowns)[/yellow]")
                        else:
                            console.print("[yellow]skipping remaining teardowns; writing records[/yellow]")
                    except OSError:
                        pass  # the terminal is gone (it may be why we abort); the abort goes on

                return await run_station(
                    loaded, ports, settings=settings, store=store, bus=bus, resources=resources,
                    on_abort=tell_operator, fixtures=station_fixtures(config, services, flash_workers), desk=desk,
                )
            finally:
                bus.close()  # ends the display; the next round subscribes anew


async def _next_round(
    desk: OperatorDesk | None, bus: EventBus, result: StationResult, number: int, rounds: int, console: Console,
    interactive: bool,
) -> str:
    """Between two rounds: this round's summary, then the operator says go on (Enter) or stop.

    ``"next"``; ``"stop"`` when the operator says so or nobody is left to
    answer (standard input ended); ``"interrupted"`` after Ctrl-C (no run is
    open now, so nothing is aborted).
    """
    from sequencer.display import StationDisplay, show_plain, show_question_live, station_summary

    assert desk is not None
    passed = sum(r.outcome is Outcome.PASS for r in result.runs)
    console.print(station_summary(result.runs))
    console.print(f"round {number} of {rounds}: {passed}/{len(result.runs)} passed")
    question = Question(-1, "", "", f"round {number + 1} of {rounds}: put the next boards in, then press Enter",
                        ("next", "stop"), default="next")
    answer = "interrupted"
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
        async with trio.open_nursery() as printing:
            if not interactive:
                # Ends when the bus closes, after printing what the desk published (the answer too).
                printing.start_soon(show_plain, StationDisplay([], 0), bus.subscribe("between rounds"), sys.stdout)
            try:
                async with trio.open_nursery() as asking:

                    async def stop_on_signal() -> None:
                        async for _ in signals:
                            asking.cancel_scope.cancel()
                            return

                    asking.start_soon(stop_on_signal)
                    if interactive:
                        asking.start_soon(show_question_live, desk, console)
                    try:
                        answer = await desk.ask(question)
                    except NoOperator as exc:
                        console.print(f"[yellow]{escape(str(exc))}: stopping after round {number}[/yellow]")
                        answer = "stop"
                    asking.cancel_scope.cancel()
            finally:
                bus.close()
    return answer


def asks_operator(loaded: LoadedProduct) -> bool:
    """Whether any phase of the product asks the operator something (has an ``operator`` parameter)."""
    return any("operator" in p.parameters for p in loaded.product.phases)


async def _answer_operator_questions(
    desk: OperatorDesk, config: StationConfig, faults: Any, console: Console, interactive: bool
) -> None:
    """Feed the desk answers for the whole session: the simulated operator, the keyboard, or standard input."""
    from sequencer.keyboard import answer_from_keyboard, answer_from_lines

    if config.sim:
        from fixtures.sim.operator import simulated_operator

        console.print("operator: the simulated operator answers the station's questions")
        says_no = faults.operator_says_no() if faults is not None else frozenset()
        await simulated_operator(desk, says_no=says_no, seed=config.seed)
    elif interactive and os.isatty(0):
        console.print("operator: questions appear below the slots; type the answer, then Enter")
        await answer_from_keyboard(desk)
    else:
        console.print("operator: each line of standard input answers the oldest open question")
        await answer_from_lines(desk)


async def _open_resources(
    stack: AsyncExitStack, loaded: LoadedProduct, config: StationConfig, devices: list[Any]
) -> dict[str, Any]:
    """Open every shared instrument the product needs, simulated or from the station file."""
    from sequencer.resources import SharedResource

    resources: dict[str, SharedResource] = {}
    for name, kind in loaded.product.resources.items():
        declared = config.resources.get(name)
        if declared is not None and declared.instrument is not None:
            kind = declared.instrument
        if config.sim:
            from fixtures.sim.instruments import open_simulated_instrument

            instrument = await stack.enter_async_context(
                open_simulated_instrument(kind, devices, seed=config.seed)
            )
        elif declared is None:
            raise UsageError(
                f"product {loaded.name!r} needs station resource {name!r}: declare [resources.{name}] in the "
                "station file"
            )
        elif kind is None:
            instrument = None
        elif kind == "zpl-printer":
            from fixtures.label_printer import LabelPrinterError, open_label_printer

            where = f"{config.source or 'station'}: resources.{name}"
            if not declared.port:
                raise UsageError(f'{where}: a zpl-printer needs port = "host:9100"')
            try:
                instrument = await stack.enter_async_context(open_label_printer(declared.port))
            except (ValueError, LabelPrinterError) as exc:
                raise UsageError(f"{where}: {exc}") from None
        else:
            raise UsageError(
                f"{config.source or 'station'}: resources.{name}: instrument {kind!r} needs a switch-matrix "
                "driver to share it across slots, and none is configured yet"
            )
        capacity = declared.capacity if declared is not None else 1
        resources[name] = SharedResource(name, capacity, instrument)
    return resources


def _finish_run(
    result: StationResult,
    batch_runs: list[RunRecord],
    config: StationConfig,
    console: Console,
) -> int:
    from reports.html import batch_dir, batch_title, render_batch, render_run, write_html
    from sequencer.display import station_summary

    runs = list(result.runs)
    if result.write_error is not None:
        # No reports: they would show runs the store does not hold in full.
        console.print(station_summary(runs))
        raise UsageError(
            f"{result.write_error}; testing stopped on every slot (phases committed before that are in "
            f"{config.store}; retest these units once the store can be written)"
        )
    passed = sum(r.outcome is Outcome.PASS for r in runs)
    report_dir = batch_dir(config.reports_dir, config.batch_or_default)
    batch_path = report_dir / "index.html"
    # The reports before the summary: they are what quality reads, and a
    # terminal that went away (stdout a closed pipe) must not cost them.
    report_error: Exception | None = None
    try:
        report_dir.mkdir(parents=True, exist_ok=True)
        for r in runs:
            write_html(report_dir / f"{r.run_id}.html", render_run(r))
        write_html(batch_path, render_batch(batch_runs, title=batch_title(config.batch_or_default, batch_runs)))
    except Exception as exc:
        report_error = exc
    console.print(station_summary(runs))
    if report_error is not None:
        # The records are safe in the store; a report can be written later
        # with `sequencer report`. Say so rather than lose the exit code.
        console.print(f"[red]could not write the HTML report in {escape(str(report_dir))}: "
                      f"{type(report_error).__name__}: {escape(str(report_error))}[/red]"
                      f"  (records are in {escape(str(config.store))}; retry with `sequencer report --batch ...`)")
        console.print(f"{passed}/{len(runs)} passed.")
    else:
        console.print(f"{passed}/{len(runs)} passed.  Report: {escape(str(batch_path))}  (per-run reports beside it)")
    if result.aborted:
        # Runs that had ended before the abort keep their outcome.
        cut = sum(r.outcome is Outcome.ABORTED for r in runs)
        if cut or not runs:
            console.print(f"[yellow]aborted by the operator; {cut} unfinished run(s) recorded ABORTED[/yellow]")
        else:
            console.print("[yellow]stopped by the operator between rounds[/yellow]")
        return EXIT_ABORTED
    return EXIT_OK if runs and passed == len(runs) else EXIT_FAILED


# -- report and runs ---------------------------------------------------------


def cmd_report(args: argparse.Namespace) -> int:
    from reports.html import batch_dir, batch_title, render_batch, render_run, write_html
    from reports.mongo_cli import reading_runs

    with reading_runs(args) as reading:
        if args.run:
            matches = reading.source.find_runs(run_id_prefix=args.run, limit=2)
            if not matches:
                raise UsageError(f"run {args.run!r}: not in {reading.where}")
            if len(matches) > 1:
                raise UsageError(f"run {args.run!r}: the prefix matches several runs; give more of the id")
            run = matches[0]
            output = args.output or batch_dir(reading.config.reports_dir, run.batch) / f"{run.run_id}.html"
            html = render_run(run)
        else:
            runs = reading.source.find_runs(batch=args.batch)
            if not runs:
                raise UsageError(f"batch {args.batch!r}: no runs in {reading.where}")
            # `sequencer run` keeps index.html, this station's page, up to date; the
            # page of every station's runs is another file, so neither overwrites the other.
            page = BATCH_PAGE_EVERY_STATION if reading.every_station else "index.html"
            output = args.output or batch_dir(reading.config.reports_dir, args.batch) / page
            html = render_batch(runs, title=batch_title(args.batch, runs))
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
    from reports.mongo_cli import reading_runs

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
    table = Table(header_style="bold", box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
    for col, shown in columns.items():
        if shown:
            table.add_column(col, no_wrap=col != "batch", overflow="fold")
    for r in runs:
        outcome = r.outcome.value if r.outcome else "RUNNING"
        # Text, not str: batch ids, serials and station names are not console markup
        cells = {"run": r.run_id[:12], "started (UTC)": f"{r.started_at:%Y-%m-%d %H:%M:%S}",
                 "batch": Text(printable(r.batch)), "serial": Text(printable(r.serial or "-")),
                 "station": Text(printable(r.station)), "slot": str(r.slot),
                 "outcome": outcome + (" (marginal)" if r.marginal else "")}
        table.add_row(*(cells[col] for col, shown in columns.items() if shown))
    OutputConsole(highlight=False).print(table)
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
    from reports.export import ExportError, export_tables, write_csv, write_csv_file, write_xlsx
    from reports.html import batch_dir, batch_title
    from reports.mongo_cli import reading_runs

    if args.output is None and args.batch is None:
        raise UsageError("export: give -o FILE (.xlsx or .csv), or --batch B to write B.xlsx beside its reports")
    named = args.output or "export"  # how messages name the output
    kind = "xlsx" if args.output is None else "csv" if args.output == "-" else Path(args.output).suffix.lower()[1:]
    if kind not in ("csv", "xlsx"):
        raise UsageError(f"{named}: an export is .xlsx (a summary and every table) or .csv (one table)")
    if kind == "xlsx" and args.table:
        raise UsageError(f"{named}: --table picks the one table a CSV holds; an .xlsx file holds them all")
    filters = _run_filters(args)
    with reading_runs(args) as reading:
        runs = reading.source.find_runs(**filters)
    if not runs:
        raise UsageError(_no_runs(filters, reading.where))
    tables = export_tables(runs)
    table = tables[args.table or "runs"]
    if args.output == "-":
        write_csv(table, sys.stdout)
        return EXIT_OK
    if args.output is None:
        folder = batch_dir(reading.config.reports_dir, args.batch)
        output = folder / f"{folder.name}.xlsx"
    else:
        output = Path(args.output)
    title = batch_title(args.batch, runs) if args.batch is not None else "Runs" + _described(filters, ", ")
    try:
        if kind == "csv":
            write_csv_file(output, table)
        else:
            write_xlsx(output, tables, runs, title=title)
    except ExportError as exc:
        raise UsageError(f"{output}: {exc}") from None
    except OSError as exc:
        raise UsageError(f"{output}: cannot write the export: {_os_reason(exc, output)}") from None
    print(output)
    return EXIT_OK


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
