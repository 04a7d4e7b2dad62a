"""A pseudo-terminal for end-to-end tests of what an operator sees and types at a station."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import struct
import termios
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import trio

#: Terminal control sequences rich writes (cursor moves, colours, erasures), and carriage returns.
_CONTROL = re.compile(rb"\x1b\[[0-9;?]*[A-Za-z]|\x1b[()][A-Z0-9]|\r")


class Terminal:
    """The operator's side of a pty: what has been drawn on it, and keys to type into it."""

    def __init__(self, master: int, slave: int) -> None:
        self.master = master
        self.slave = slave
        self.output = bytearray()

    def text(self, since: int = 0) -> str:
        """What has been written since byte ``since``, without control sequences."""
        return _CONTROL.sub(b"", bytes(self.output[since:])).decode(errors="replace")

    async def shown(self, pattern: str, since: int = 0, timeout: float = 30) -> re.Match[str]:
        """Wait until ``pattern`` (a regular expression) appears in :meth:`text` since ``since``."""
        with trio.fail_after(timeout):
            while (match := re.search(pattern, self.text(since))) is None:
                await trio.sleep(0.02)
        return match

    def type(self, keys: bytes) -> int:
        """Type ``keys``; return where the output stood, for :meth:`shown` to look after it."""
        mark = len(self.output)
        os.write(self.master, keys)
        return mark

    def modes(self) -> int:
        """The terminal's echo and canonical-input flags, as a station should leave them."""
        return termios.tcgetattr(self.slave)[3] & (termios.ECHO | termios.ICANON)

    async def station(self, args: Sequence[str], cwd: Path, *, controlling: bool = False) -> trio.Process:
        """Start ``args`` with this terminal as its stdin, stdout and stderr.

        ``controlling``: in a session of its own with this terminal as its
        controlling terminal, as a login shell has it, so that Ctrl-C typed
        here becomes SIGINT.
        """
        return await trio.lowlevel.open_process(
            list(args), stdin=self.slave, stdout=self.slave, stderr=self.slave, cwd=cwd,
            env={**os.environ, "TERM": "xterm-256color"}, preexec_fn=_controlling_terminal if controlling else None)

    async def _read(self) -> None:
        while True:
            await trio.lowlevel.wait_readable(self.master)
            try:
                self.output.extend(os.read(self.master, 65536))
            except OSError:  # EIO: every process on the terminal has exited
                return


def _controlling_terminal() -> None:
    os.setsid()
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


@asynccontextmanager
async def open_terminal(rows: int = 30, columns: int = 120) -> AsyncIterator[Terminal]:
    """A ``rows`` x ``columns`` pty whose output is collected while the block runs."""
    master, slave = pty.openpty()
    try:
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, columns, 0, 0))
        terminal = Terminal(master, slave)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(terminal._read)
            yield terminal
            nursery.cancel_scope.cancel()
    finally:
        os.close(master)
        os.close(slave)
