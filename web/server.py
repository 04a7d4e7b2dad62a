"""Serving an ASGI app with hypercorn on trio, in the caller's own nursery.

Every service of the web stack (the provisioning service, the portal)
starts this way: bind (port 0 picks a free port), yield the base URL
actually bound, and shut down gracefully when the block ends.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import trio
from hypercorn.config import Config
from hypercorn.trio import serve

__all__ = ["serve_app"]


@asynccontextmanager
async def serve_app(
    app: Any,
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    graceful_timeout: float,
    error_log: logging.Logger,
) -> AsyncIterator[str]:
    """Serve the ASGI ``app`` on ``host:port`` while the block runs; yields ``http://host:port``.

    ``port=0`` binds a free port; the URL yielded has the real one.
    hypercorn's own messages go to ``error_log``; it keeps no access log,
    so no request line (a query string may hold a serial or a token) is
    written anywhere the service did not choose.
    """
    config = Config()
    config.bind = [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
    config.accesslog = None
    config.errorlog = error_log
    config.graceful_timeout = graceful_timeout
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        binds: list[str] = await nursery.start(partial(serve, app, config, shutdown_trigger=stop.wait))
        try:
            yield binds[0]
        finally:
            stop.set()
