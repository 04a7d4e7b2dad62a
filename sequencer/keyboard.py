"""How the operator's answers reach the :class:`~sequencer.operator.OperatorDesk`.

Two ways, chosen by what standard input is:

* :func:`answer_from_keyboard` -- a terminal under the live display. The
  terminal is put in cbreak mode without echo for the run, and every key goes
  to the desk's draft, which the display draws under the question. Echoed
  keys would land wherever the live display last left the cursor and be
  wiped at its next redraw; this way the operator sees what they type.
  Ctrl-C still interrupts (cbreak keeps signals). Keys pressed while no
  question is open are dropped, so a stray Enter cannot answer the next one.
* :func:`answer_from_lines` -- anything else (a pipe, a file, a terminal
  under ``--plain``): each line answers the oldest open question, waiting for
  one if none is open yet, so a script can feed answers ahead. The end of
  input closes the desk: later questions end their phase ERROR, saying why.

Given a ``submit`` (the station's :class:`~sequencer.control.StationControl`),
a line goes there instead of straight to the desk: it may be a scan (a
keyboard-wedge scanner types its code and Enter), and keys are then taken
while no question is open too.

Both read standard input on the trio thread when it can be waited for, and
restore everything they change (terminal modes) however they end.
"""

from __future__ import annotations

import codecs
import os
import stat
import termios
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from sequencer.operator import OperatorDesk

__all__ = ["answer_from_keyboard", "answer_from_lines"]

_BACKSPACE = ("\x7f", "\b")
_ERASE_LINE = ("\x15", "\x17")  # Ctrl-U, Ctrl-W
_ENTER = ("\r", "\n")


async def answer_from_keyboard(
    desk: OperatorDesk, fd: int = 0, *, submit: Callable[[str], Any] | None = None
) -> None:
    """Type answers (or scans) at a terminal: the draft is shown by the display, Enter answers (or ``submit``s)."""
    saved = termios.tcgetattr(fd)
    try:
        mode = termios.tcgetattr(fd)
        # Keys one at a time and not echoed (cbreak); ISIG stays, so Ctrl-C still interrupts.
        mode[3] &= ~(termios.ECHO | termios.ICANON)
        mode[6][termios.VMIN], mode[6][termios.VTIME] = 1, 0
        termios.tcsetattr(fd, termios.TCSANOW, mode)
        read = _reader(fd)
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        keys = _Keys(desk, submit)
        while True:
            data = await read()
            if not data:
                return  # the terminal hung up; the station's own handling of SIGHUP aborts
            for char in decoder.decode(data):
                keys.press(char)
    finally:
        # TCSANOW: a station that exits must leave a usable shell behind
        # even if output is still draining.
        try:
            termios.tcsetattr(fd, termios.TCSANOW, saved)
        except termios.error:
            pass  # the terminal is gone


class _Keys:
    """Line editing of the draft: printable keys, backspace, Ctrl-U, Enter; escape sequences dropped."""

    def __init__(self, desk: OperatorDesk, submit: Callable[[str], Any] | None = None) -> None:
        self._desk = desk
        #: where Enter sends the draft; None: it answers the open question, and keys wait for one
        self._submit = submit
        #: inside an escape sequence (an arrow key): "esc" after ESC, "csi" after ESC [, "ss3" after ESC O
        self._escape = ""

    def press(self, char: str) -> None:
        desk = self._desk
        if self._escape == "esc":
            self._escape = {"[": "csi", "O": "ss3"}.get(char, "")
            return
        if self._escape == "csi":
            if "@" <= char <= "~":  # a control sequence's final byte
                self._escape = ""
            return
        if self._escape == "ss3":
            self._escape = ""
            return
        if char == "\x1b":
            self._escape = "esc"
            return
        if desk.current is None and self._submit is None:
            return
        if char in _ENTER:
            if self._submit is None:
                desk.answer(desk.draft)
            else:
                line = desk.draft
                desk.type("")
                self._submit(line)
        elif char in _BACKSPACE:
            desk.type(desk.draft[:-1])
        elif char in _ERASE_LINE:
            desk.type("")
        elif char.isprintable():
            desk.type(desk.draft + char)


async def answer_from_lines(
    desk: OperatorDesk, fd: int = 0, *, submit: Callable[[str], Awaitable[None]] | None = None,
    close_at_end: bool = True,
) -> None:
    """Each line of ``fd`` answers the oldest open question (or goes to ``submit``); the end of input closes the desk.

    Unless ``close_at_end`` is False: someone else still answers (the operator panel).
    """

    async def answer(line: str) -> None:
        await desk.wait_question()
        desk.answer(line)

    take = submit or answer
    read = _reader(fd)
    pending = b""
    while True:
        data = await read()
        if not data:
            break
        pending += data
        while b"\n" in pending:
            line, pending = pending.split(b"\n", 1)
            await take(line.decode("utf-8", errors="replace"))
    if pending.strip():
        await take(pending.decode("utf-8", errors="replace"))
    if close_at_end:
        desk.close("standard input ended: nobody is left to answer the operator's questions")


def _reader(fd: int) -> Callable[[], Awaitable[bytes]]:
    """``await read()`` gives the next bytes of ``fd`` (none at its end) without blocking the trio thread.

    A terminal, a pipe or a socket is waited for on the trio thread. A
    regular file or ``/dev/null`` cannot be polled (epoll refuses them), but
    reading one never waits for anybody, so a worker thread reads it.
    """
    mode = os.fstat(fd).st_mode
    if os.isatty(fd) or stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode):

        async def polled() -> bytes:
            while True:
                await trio.lowlevel.wait_readable(fd)
                try:
                    return os.read(fd, 4096)
                except BlockingIOError:  # another reader took it first
                    continue

        return polled

    async def threaded() -> bytes:
        return await trio.to_thread.run_sync(os.read, fd, 4096, abandon_on_cancel=True)

    return threaded
