"""The station's clock: deadlines wake the event loop through a timer, not at trio's millisecond timeout.

Stations run on Linux (as the rest of the suite assumes), where the timer is a timerfd.
"""

from __future__ import annotations

import ctypes
import math
import time

import trio

from sequencer.clock import StationClock, _Itimerspec, run_on_station_clock, wake_at_deadlines

def remaining(clock: StationClock) -> float:
    """Seconds until the clock's timer fires (0.0: disarmed), from the kernel."""
    libc = ctypes.CDLL(None, use_errno=True)
    spec = _Itimerspec()
    assert libc.timerfd_gettime(clock.fd, ctypes.byref(spec)) == 0
    return spec.it_value.tv_sec + spec.it_value.tv_nsec / 1e9


def test_the_timer_is_armed_at_the_next_deadline_and_disarmed_when_there_is_none() -> None:
    clock = StationClock()
    clock.start_clock()
    try:
        assert clock.fd >= 0
        deadline = clock.current_time() + 5.0
        assert 4.9 < clock.deadline_to_sleep_time(deadline) <= 5.0
        assert 4.9 < remaining(clock) <= 5.0
        later = clock.current_time() + 30.0
        clock.deadline_to_sleep_time(later)
        assert 29.9 < remaining(clock) <= 30.0
        assert clock.deadline_to_sleep_time(math.inf) == math.inf
        assert remaining(clock) == 0.0
    finally:
        clock.close()
    assert clock.fd == -1


def test_the_clock_is_the_monotonic_clock() -> None:
    clock = StationClock()
    before = time.monotonic()
    now = clock.current_time()
    assert before <= now <= time.monotonic()


def test_each_sleep_wakes_the_loop_through_the_timer() -> None:
    async def main() -> tuple[StationClock, list[float]]:
        clock = trio.lowlevel.current_clock()
        assert isinstance(clock, StationClock)
        late = []
        for _ in range(20):
            # Not a whole number of milliseconds; far enough ahead that a busy machine's stall between
            # this line and the loop's wait does not pass the deadline before the timer is armed.
            deadline = trio.current_time() + 0.0103
            await trio.sleep_until(deadline)
            late.append(trio.current_time() - deadline)
        return clock, late

    clock, late = run_on_station_clock(main)
    assert clock.fired >= 20  # one per deadline, at least
    assert all(x >= 0 for x in late)  # never early
    assert clock.fd == -1  # closed with the run


async def test_without_the_station_clock_the_waker_has_nothing_to_do() -> None:
    with trio.fail_after(5):
        await wake_at_deadlines()  # returns at once under trio's own clock


def test_sleeps_and_timeouts_keep_their_meaning_on_the_station_clock() -> None:
    # Not the order the sleepers wake in: a machine that stalls the process
    # for longer than their differences makes trio wake them in one batch,
    # in an order trio randomises on purpose.
    async def main() -> tuple[list[tuple[float, float]], bool]:
        woke: list[tuple[float, float]] = []

        async def sleeper(seconds: float) -> None:
            deadline = trio.current_time() + seconds
            await trio.sleep_until(deadline)
            woke.append((deadline, trio.current_time()))

        async with trio.open_nursery() as nursery:
            for seconds in (0.03, 0.01, 0.02):
                nursery.start_soon(sleeper, seconds)
        with trio.move_on_after(0.005) as scope:
            await trio.sleep_forever()
        return woke, scope.cancelled_caught

    woke, timed_out = run_on_station_clock(main)
    assert len(woke) == 3
    assert all(at >= deadline for deadline, at in woke)  # never before its deadline
    assert timed_out


def test_a_deadline_further_than_a_timespec_holds_arms_the_timer_a_day_ahead() -> None:
    clock = StationClock()
    clock.start_clock()
    try:
        for far in (clock.current_time() + 1e7, 1e19, 1e300):
            clock.deadline_to_sleep_time(far)
            assert 86_399 < remaining(clock) <= 86_400  # a harmless early wake-up, never a wrapped time
        near = clock.current_time() + 2.0
        clock.deadline_to_sleep_time(near)
        assert 1.9 < remaining(clock) <= 2.0
    finally:
        clock.close()


def test_a_timer_the_kernel_refuses_leaves_the_millisecond_wakeups() -> None:
    clock = StationClock()
    clock.start_clock()
    try:
        libc = clock._libc
        assert libc is not None

        class Refusing:
            def __getattr__(self, name: str):
                return getattr(libc, name)

            def timerfd_settime(self, *args) -> int:
                return -1

        clock._libc = Refusing()  # type: ignore[assignment]
        deadline = clock.current_time() + 5.0
        assert 4.9 < clock.deadline_to_sleep_time(deadline) <= 5.0  # still a clock: no exception in trio's loop
        assert clock._failed and clock.fd >= 0  # not armed again; the descriptor trio watches stays open
    finally:
        clock.close()
