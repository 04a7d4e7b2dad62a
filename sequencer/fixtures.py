"""How phases get the hardware they talk to.

A *fixture* is test hardware seen from one slot: the DUT's serial console, a
flasher, a label printer. A phase asks for one by naming a parameter; the
engine builds it for that slot on first use, from a :data:`FixtureFactory`
the product or the station declares, and closes it when the slot's run ends.

Unlike OpenHTF plugs, a fixture is never a class-level singleton: the factory
is called once per slot with that slot's :class:`SlotInfo`, so the same phase
code drives ``/dev/ttyUSB3`` on slot 3 and a simulated pty on slot 4.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from typing import Any, TypeAlias

import attrs


@attrs.frozen
class SlotInfo:
    """What a fixture factory may know about the slot it serves."""

    index: int
    port: str
    station: str
    #: structlog logger bound to this slot (slot, port, run id)
    log: Any = attrs.field(eq=False, repr=False, default=None)


#: Builds one fixture for one slot. The context manager's value is what the
#: phase receives; its exit releases the hardware (closes the port).
FixtureFactory: TypeAlias = Callable[[SlotInfo], AbstractAsyncContextManager[Any]]
