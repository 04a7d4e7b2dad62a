"""Shared station resources: instruments that several slots queue for.

A station declares each shared instrument with a capacity (how many slots may
use it at once, usually 1). A phase holds it with ``async with
resources["dmm"] as dmm:``; the time it spent queueing is added to its record,
so a slow station shows where slots wait.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

import attrs
import trio


@attrs.define(eq=False)
class SharedResource:
    """One station-wide instrument (or any capacity-limited thing) and its queue.

    ``instrument`` is what holders receive; it may be ``None`` for a resource
    that is only a lock (a single RF shield box, say).
    """

    name: str
    capacity: int = 1
    instrument: Any = None
    _semaphore: trio.Semaphore = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        if self.capacity < 1:
            raise ValueError(f"resource {self.name!r}: capacity must be >= 1")
        self._semaphore = trio.Semaphore(self.capacity)

    @property
    def in_use(self) -> int:
        return self.capacity - self._semaphore.value


class ResourceAccess(Mapping[str, Any]):
    """The view of the station's resources one phase attempt gets.

    Indexing returns an async context manager; the wait before it is entered
    accumulates in :attr:`waited_s` for the phase record.
    """

    def __init__(self, resources: Mapping[str, SharedResource]) -> None:
        self._resources = resources
        self.waited_s = 0.0

    def __getitem__(self, name: str) -> Any:
        try:
            resource = self._resources[name]
        except KeyError:
            raise KeyError(f"the station declares no resource {name!r}") from None
        return self._hold(resource)

    def __iter__(self) -> Any:
        return iter(self._resources)

    def __len__(self) -> int:
        return len(self._resources)

    @asynccontextmanager
    async def _hold(self, resource: SharedResource) -> AsyncIterator[Any]:
        start = trio.current_time()
        async with resource._semaphore:
            self.waited_s += trio.current_time() - start
            yield resource.instrument
