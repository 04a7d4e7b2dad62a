"""Monitors: a function sampled at a period while a phase runs, into a series with limits (OpenHTF's ``monitors``).

::

    async def supply_current(dmm):
        return await dmm.measure_current()

    @phase(monitors=[Monitor(Measurement("current", units="A").in_range(0, 0.25), supply_current, period=0.1)])
    async def stress(ctx, dut):
        await dut.run_stress(seconds=5)

While ``stress`` runs, ``supply_current`` is called at once and then every
0.1 s (a call that takes longer skips the ticks it overran, as OpenHTF's
monitor thread does); each value is a point ``(t, value)`` of the series
``current``, ``t`` in seconds since the phase began. The series is judged
with the phase's other measurements: every point against its limits, and the
whole series against its ``check_series``. The sampling function's
parameters are filled by name as a phase's are (fixtures, ``slot``,
``resources``, ...). A sample that raises ends the phase ERROR naming the
monitor: a monitor that cannot read is not a pass.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from typing import Any

import attrs

from sequencer.measurements import Measurement

__all__ = ["Monitor", "MonitorFailed"]


class MonitorFailed(Exception):
    """A monitor's sample raised; the message names the monitor."""


def _series(measurement: Measurement) -> Measurement:
    if not isinstance(measurement, Measurement):
        raise TypeError(f"a monitor samples into a Measurement, got {measurement!r}")
    # Time since the phase began, unless the author named the axis.
    return measurement if measurement.dimensions else measurement.with_dimensions(("t", "s"))


@attrs.frozen
class Monitor:
    """Sample ``sample`` every ``period`` seconds while the phase runs, into ``measurement`` (a series over t)."""

    measurement: Measurement = attrs.field(converter=_series)
    sample: Callable[..., Any] = attrs.field(repr=False)
    period: float = attrs.field(default=1.0, kw_only=True)
    #: the sampling function's parameters, filled by name as a phase's are
    parameters: tuple[str, ...] = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        where = f"monitor {self.measurement.name!r}"
        if len(self.measurement.dimensions) != 1:
            raise ValueError(f"{where}: a monitor's series has one dimension, its time")
        if not callable(self.sample):
            raise TypeError(f"{where}: sample must be a function, got {self.sample!r}")
        if isinstance(self.period, bool) or not isinstance(self.period, (int, float)) \
                or not math.isfinite(self.period) or self.period <= 0:
            raise ValueError(f"{where}: period must be a positive number of seconds, got {self.period!r}")
        params = []
        for p in inspect.signature(self.sample).parameters.values():
            if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                raise TypeError(f"{where}: *args/**kwargs cannot be injected; name each fixture")
            if p.default is p.empty:
                params.append(p.name)
        object.__setattr__(self, "parameters", tuple(params))

    @property
    def name(self) -> str:
        return self.measurement.name


async def sample_until_cancelled(monitor: Monitor, series: Any, arguments: dict[str, Any], start: float) -> None:
    """Add a point to ``series`` now and every ``monitor.period`` seconds after ``start``, until cancelled."""
    import trio

    tick = 0
    while True:
        try:
            value = monitor.sample(**arguments)
            if inspect.isawaitable(value):
                value = await value
        except Exception as exc:
            raise MonitorFailed(f"monitor {monitor.name!r}: {type(exc).__name__}: {exc}") from exc
        now = trio.current_time()
        series[round(now - start, 6)] = value
        tick = max(tick + 1, math.floor((now - start) / monitor.period) + 1)  # overran ticks are skipped
        await trio.sleep_until(start + tick * monitor.period)
