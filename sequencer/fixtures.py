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

import functools
import inspect
from collections.abc import Callable, Iterable, Mapping
from contextlib import AbstractAsyncContextManager
from typing import Any, TypeAlias

import attrs

from sequencer.config import SerialLines


@attrs.frozen
class SlotInfo:
    """What a fixture factory may know about the slot it serves."""

    index: int
    port: str
    station: str
    #: the slot's logger. A fixture's factory gets its own (a :class:`~sequencer.fixture_log.FixtureLog`): what
    #: it logs goes to the station log and the run's record (``slot.log.info("relay closed", channel=3)``);
    #: a phase's ``slot`` parameter has the run's structlog logger (station log only; a phase has ``ctx.log``).
    #: None when nobody logs (a factory called outside a run)
    log: Any = attrs.field(eq=False, repr=False, default=None)
    #: the station runs under ``--sim``: open the simulated twin of the hardware, not the hardware
    simulated: bool = False
    #: DTR/RTS as the slot's port must hold them while open, set before it opens (the
    #: board's reset wiring, from the station's ``[flash] before``); None: as pyserial opens it
    lines: SerialLines | None = None


#: Builds one fixture for one slot. The context manager's value is what the
#: phase receives; its exit releases the hardware (closes the port). A factory
#: may take settings after the slot, as keyword parameters: the station file's
#: ``[fixtures.NAME]`` table gives them (``def relay_board(slot, *, port,
#: baudrate=9600)``).
FixtureFactory: TypeAlias = Callable[..., AbstractAsyncContextManager[Any]]


def with_settings(
    fixtures: Mapping[str, FixtureFactory], tables: Mapping[str, Mapping[str, Any]], where: str,
    others: Iterable[str] = (),
) -> dict[str, FixtureFactory]:
    """``fixtures`` with each ``[fixtures.NAME]`` table's settings passed to that fixture's factory.

    Every mistake is a :class:`ValueError` of one line naming the file and the
    key: a table for a fixture the product has not (``others`` are the
    station's own fixtures, configured by their own tables), a key the factory
    does not take, a setting the factory needs and no table gives.
    """
    bound = dict(fixtures)
    for name in tables:
        if name not in fixtures:
            if name in others:
                raise ValueError(f"{where}: fixtures.{name}: the station's {name!r} fixture is configured by its "
                                 "own table, not [fixtures]")
            raise ValueError(f"{where}: fixtures.{name}: the product has no fixture {name!r} "
                             f"(its fixtures: {', '.join(sorted(fixtures)) or 'none'})")
    for name, factory in fixtures.items():
        settings = dict(tables.get(name, {}))
        try:
            params = list(inspect.signature(factory).parameters.values())[1:]  # after the slot
        except (TypeError, ValueError):
            params = []
        takes_any = any(p.kind is p.VAR_KEYWORD for p in params)
        known = [p.name for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)]
        for key in settings:
            if key not in known and not takes_any:
                raise ValueError(f"{where}: fixtures.{name}: unknown key {key!r} "
                                 f"(the fixture takes: {', '.join(known) or 'no settings'})")
        for p in params:
            if p.name in known and p.default is p.empty and p.name not in settings:
                raise ValueError(f"{where}: fixtures.{name}: needs {p.name} (the fixture's setting; give it in "
                                 f"[fixtures.{name}] of the station file)")
        if settings:
            bound[name] = functools.partial(factory, **settings)
    return bound
