"""A clock for the station's event loop that wakes it at deadlines, not at the next whole millisecond.

trio waits for I/O and timers in one ``epoll_wait``, whose timeout is in whole
milliseconds: CPython rounds it up. So every ``trio.sleep`` and every timeout
ends up to a millisecond late, and, worse for a station, every slot whose
deadline falls in the same millisecond wakes at the same instant: slots that
drifted apart are pulled back into lockstep at each sleep, and the last of
them waits for all the others to be handled before it runs. With sixteen
slots that is most of a millisecond per phase, on every phase.

:class:`StationClock` arms a Linux ``timerfd`` at the exact next deadline
whenever trio is about to wait; the event loop watches that descriptor (see
:func:`wake_at_deadlines`), so ``epoll_wait`` returns when the deadline
passes, to the timer slack of the kernel (about 50 µs), and the millisecond
timeout becomes a backstop. Elsewhere (no ``timerfd``, or the kernel refuses
one) it is a plain monotonic clock, and deadlines wake the loop at trio's
millisecond timeout as before; the station log says so once.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import math
import os
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import structlog
import trio

T = TypeVar("T")

log = structlog.get_logger("sequencer.clock")

#: Deadlines further away than this arm the timer this far ahead (a harmless early wake-up) rather
#: than at a time a ``timespec`` may not hold; trio itself never waits longer than a day at once.
_FURTHEST_S = 86_400.0

_CLOCK_MONOTONIC = 1
_TFD_CLOEXEC = 0o2000000
_TFD_NONBLOCK = 0o4000
_TFD_TIMER_ABSTIME = 1


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class _Itimerspec(ctypes.Structure):
    _fields_ = [("it_interval", _Timespec), ("it_value", _Timespec)]


def _libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.timerfd_create.argtypes = [ctypes.c_int, ctypes.c_int]
        libc.timerfd_settime.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.POINTER(_Itimerspec), ctypes.c_void_p]
    except (OSError, AttributeError):
        return None
    return libc


class StationClock(trio.abc.Clock):
    """A monotonic clock (``time.monotonic``: ``CLOCK_MONOTONIC``), plus a timer armed at the next deadline.

    (trio's default clock is ``perf_counter`` with a random offset; deadlines
    compare within one run only, so which monotonic clock does not matter.)

    Pass it to ``trio.run(..., clock=StationClock())`` and start
    :func:`wake_at_deadlines` inside the run; without that task it is just a
    monotonic clock.
    """

    def __init__(self) -> None:
        self._libc = _libc()
        self._fd = -1
        self._armed = math.inf
        #: the kernel refused to arm the timer once: it is not used again
        self._failed = False
        self._spec = _Itimerspec()
        #: how many times a deadline woke the loop through the timer
        self.fired = 0

    @property
    def fd(self) -> int:
        """The timer's descriptor (``-1`` where there is none)."""
        return self._fd

    def start_clock(self) -> None:
        if self._libc is not None and self._fd < 0:
            fd = self._libc.timerfd_create(_CLOCK_MONOTONIC, _TFD_NONBLOCK | _TFD_CLOEXEC)
            if fd >= 0:
                self._fd = fd
            else:
                log.warning("no deadline timer: sleeps and timeouts end at the next whole millisecond",
                            error=os.strerror(ctypes.get_errno()))

    def current_time(self) -> float:
        return time.monotonic()

    def deadline_to_sleep_time(self, deadline: float) -> float:
        # Called by trio's run loop each time it is about to wait, with the
        # earliest deadline: re-arm only when that changed (one syscall).
        if deadline != self._armed and self._fd >= 0 and not self._failed:
            self._arm(deadline)
        return deadline - time.monotonic()

    def _arm(self, deadline: float) -> None:
        value = self._spec.it_value
        if math.isinf(deadline):
            value.tv_sec, value.tv_nsec = 0, 0  # disarm
        else:
            at = min(deadline, time.monotonic() + _FURTHEST_S)
            seconds = math.floor(at)
            # Rounded up: never before the deadline. A zero it_value would
            # disarm: a deadline at 0 s is long past anyway.
            value.tv_sec, value.tv_nsec = seconds, min(999_999_999, max(1, math.ceil((at - seconds) * 1e9)))
        assert self._libc is not None
        if self._libc.timerfd_settime(self._fd, _TFD_TIMER_ABSTIME, ctypes.byref(self._spec), None) == 0:
            self._armed = deadline
            return
        # Called from inside trio's run loop, where raising would end the run:
        # go on without the timer instead (millisecond wake-ups, as trio's
        # own). The descriptor stays open: the loop is watching it.
        error = os.strerror(ctypes.get_errno())
        self._failed = True
        log.warning("the deadline timer failed; sleeps and timeouts now end at the next whole millisecond",
                    error=error)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


async def wake_at_deadlines() -> None:
    """Watch the run's :class:`StationClock` timer, so a deadline wakes the loop on time.

    Runs until cancelled (start it in the station's nursery, or as a system
    task). Does nothing when the run's clock is another one, or has no timer.
    Reading the timer only resets it: the deadline's own tasks are woken by
    trio, which checks deadlines after every wait.
    """
    clock = trio.lowlevel.current_clock()
    if not isinstance(clock, StationClock) or clock.fd < 0:
        return
    fd = clock.fd
    while True:
        await trio.lowlevel.wait_readable(fd)
        try:
            os.read(fd, 8)
            clock.fired += 1
        except BlockingIOError:
            pass  # re-armed (or disarmed) between the wake-up and this read
        except OSError:
            return  # deadlines then wake the loop at trio's millisecond timeout, as without this clock


def run_on_station_clock(async_fn: Callable[..., Awaitable[T]], *args: Any) -> T:
    """``trio.run(async_fn, *args)`` on a :class:`StationClock` whose timer the loop watches.

    What ``sequencer run`` runs a station session on.
    """
    clock = StationClock()

    async def main() -> T:
        # A system task: cancelled when ``async_fn`` returns, never waited for.
        trio.lowlevel.spawn_system_task(wake_at_deadlines)
        return await async_fn(*args)

    try:
        return trio.run(main, clock=clock)
    finally:
        clock.close()
