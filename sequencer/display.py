"""What the operator sees while a station runs.

On a terminal: one live line per slot (port, serial, current phase, progress,
outcome), redrawn a few times a second from the trio loop (no refresh thread).
Elsewhere (CI, a pipe, a log file): one plain line per finished run and per
failed phase, which reads well in a log.

The display is an ordinary event-bus subscriber: if it falls behind, events
are dropped for it alone and testing goes on at full speed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TextIO

import attrs
import trio
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from sequencer.events import (
    DutIdentified,
    Event,
    PhaseFinished,
    PhaseProgress,
    PhaseStarted,
    RunFinished,
    RunStarted,
)
from sequencer.records import Outcome, RunRecord

OUTCOME_STYLE = {
    Outcome.PASS: "bold green",
    Outcome.FAIL: "bold red",
    Outcome.ERROR: "bold magenta",
    Outcome.TIMEOUT: "bold yellow",
    Outcome.ABORTED: "bold bright_black",
    Outcome.SKIPPED: "bright_black",
    Outcome.INTERRUPTED: "bold bright_black",
}


@attrs.define
class SlotView:
    index: int
    port: str
    serial: str = ""
    phase: str = "waiting"
    detail: str = ""
    done: int = 0
    total: int = 0
    outcome: Outcome | None = None
    marginal: bool = False
    failure: str = ""


class StationDisplay:
    """Keeps a :class:`SlotView` per slot up to date from events and renders it."""

    def __init__(self, ports: Sequence[str], phases_per_run: int) -> None:
        self.slots = [SlotView(i, p, total=phases_per_run) for i, p in enumerate(ports)]

    def apply(self, event: Event) -> str | None:
        """Update the views; return a plain-text line worth printing, if any."""
        if isinstance(event, RunStarted):
            view = self.slots[event.run.slot]
            view.phase = "starting"
        elif isinstance(event, DutIdentified):
            self.slots[event.slot].serial = event.dut.get("serial", "")
        elif isinstance(event, PhaseStarted):
            view = self.slots[event.slot]
            view.phase = event.phase if event.attempt == 1 else f"{event.phase} (attempt {event.attempt})"
            view.detail = ""
        elif isinstance(event, PhaseProgress):
            view = self.slots[event.slot]
            view.detail = f"{event.fraction:4.0%} {event.detail}".rstrip()
        elif isinstance(event, PhaseFinished):
            view = self.slots[event.slot]
            view.done += 1
            rec = event.phase
            if rec.outcome.is_failure and not view.failure:
                view.failure = f"{rec.name}: {rec.reason or rec.outcome.value}"
                return f"slot {event.slot} {view.port} {view.serial or '-'}: {rec.name} {rec.outcome.value}: {rec.reason}"
        elif isinstance(event, RunFinished):
            view = self.slots[event.run.slot]
            view.outcome = event.run.outcome
            view.marginal = event.run.marginal
            view.phase = "done"
            view.detail = ""
            marginal = " (marginal)" if event.run.marginal else ""
            return (
                f"slot {view.index} {view.port} {view.serial or '-'}: "
                f"{event.run.outcome.value if event.run.outcome else '?'}{marginal}"
            )
        return None

    def table(self) -> Table:
        table = Table(expand=False, header_style="bold")
        for col in ("slot", "port", "serial", "phase", "progress", "outcome"):
            table.add_column(col)
        for v in self.slots:
            outcome = Text("running", style="cyan") if v.outcome is None else Text(
                v.outcome.value + (" (marginal)" if v.marginal else ""), style=OUTCOME_STYLE[v.outcome]
            )
            progress = f"{v.done}/{v.total}" + (f"  {v.detail}" if v.detail else "")
            # Text, not str: a cell's string would be read as console markup, and
            # a serial or a reason is whatever the DUT sent ("[/]" must not crash the display).
            table.add_row(str(v.index), Text(v.port), Text(v.serial or "-"), Text(v.phase), Text(progress), outcome)
        return table


async def show_live(display: StationDisplay, events: trio.MemoryReceiveChannel[Event], console: Console) -> None:
    """Redraw the slot table from events until the bus closes."""
    with Live(display.table(), console=console, auto_refresh=False, transient=False) as live:
        dirty = True
        async with events:
            while True:
                with trio.move_on_after(0.25):
                    try:
                        event = await events.receive()
                    except trio.EndOfChannel:
                        break
                    display.apply(event)
                    dirty = True
                    # Take everything already queued before redrawing once.
                    while True:
                        try:
                            display.apply(events.receive_nowait())
                        except (trio.WouldBlock, trio.EndOfChannel):
                            break
                if dirty:
                    live.update(display.table(), refresh=True)
                    dirty = False
        live.update(display.table(), refresh=True)


async def show_plain(display: StationDisplay, events: trio.MemoryReceiveChannel[Event], out: TextIO) -> None:
    async with events:
        async for event in events:
            line = display.apply(event)
            if line:
                print(line, file=out, flush=True)


def station_summary(runs: Sequence[RunRecord]) -> Group:
    """The end-of-station summary: one short row per slot, then each first failure in full.

    The failures are printed under the table, not in a column of it: a reason
    (a port, an exception, the bytes a DUT sent) is often longer than a
    terminal is wide, and squeezed into a column it would wrap every row into a
    dozen lines at 80 columns. Below the table it wraps at the full width.
    """
    rows: list[tuple[str, Text, Text, Text, str]] = []
    failures: list[Text] = []
    for r in sorted(runs, key=lambda r: r.slot):
        failed = next((p for p in r.phases if p.outcome.is_failure), None)
        outcome = r.outcome or Outcome.ABORTED
        if failed is None and outcome is not Outcome.PASS:
            # Not passed, yet no phase failed (the run was stopped before its
            # phases ran): the first phase that says why it did not run.
            failed = next((p for p in r.phases if p.reason), None)
        rows.append((
            str(r.slot),
            Text(r.port),
            Text(r.serial or "-"),
            Text(outcome.value + (" (marginal)" if r.marginal else ""), style=OUTCOME_STYLE[outcome]),
            f"{r.duration_s:.1f} s" if r.duration_s is not None else "-",
        ))
        if failed is not None:
            line = Text(f"slot {r.slot} {r.port}", style="bold")
            line.append(f" {failed.name}: ", style=OUTCOME_STYLE[failed.outcome])
            line.append(failed.reason or failed.outcome.value)
            failures.append(line)
    table = Table(title="Summary", header_style="bold")
    # Slot, port, serial and outcome are what an operator acts on: never
    # wrapped or cut short.
    for i, col in enumerate(("slot", "port", "serial", "outcome", "duration")):
        width = max([len(col), *(len(str(row[i])) for row in rows)])
        table.add_column(col, no_wrap=True, min_width=width)
    for row in rows:
        table.add_row(*row)
    if failures:
        failures.insert(0, Text("First failure of each slot that did not pass:", style="bold"))
    return Group(table, *failures)
