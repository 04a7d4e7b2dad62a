"""What the commands print to: rich's console, with a reader that went away handled as this CLI means it.

Also the small helpers every command needs to say one line: text made safe
for a terminal, and the one error inside trio's exception groups.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from rich.console import Console


def printable(value: object) -> str:
    """Text from a device or a record, safe for a terminal: control characters shown escaped, never sent.

    The serial link already refuses lines with control characters, but a
    record can come from elsewhere (another station's MongoDB document, an
    operator's scanned batch id), and an escape sequence printed raw can
    clear the operator's screen or retitle the window. A newline is escaped
    too, so one value stays on its one line.
    """
    text = "" if value is None else str(value)
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def silence_stdout() -> None:
    """Point stdout at /dev/null: its reader is gone, and later writes must not fail again.

    The interpreter's own flush at exit is one of them.
    """
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


class OutputConsole(Console):
    """rich's console; a reader that went away (stdout a closed pipe) does not mean exit 1.

    rich's own handling exits 1, which here means "a DUT did not pass" (or,
    for ``find``, "no such device"). A station's console (``keep_going``)
    goes quiet instead and testing goes on: the units' outcome is the exit
    code. Any other command, whose output is the point, raises
    :exc:`BrokenPipeError`, which ``sequencer.cli.main`` ends as SIGPIPE
    would (141).
    """

    def __init__(self, *args: Any, keep_going: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._keep_going = keep_going

    def on_broken_pipe(self) -> None:
        if not self._keep_going:
            raise BrokenPipeError
        self.quiet = True
        silence_stdout()


def sole_exception(exc: BaseException) -> BaseException:
    """The one exception inside nested single-exception groups (trio's nurseries wrap what they re-raise)."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc
