"""Serving the provisioning app (:func:`web.server.serve_app`: hypercorn on trio, in the caller's nursery).

:func:`serve_provisioning` is what the CLI, the tests and a demo use: it
binds (port 0 picks a free port), yields the base URL actually bound, and
shuts the server down gracefully when the block ends.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from web.provisioning.app import create_app
from web.provisioning.storage import ProvisioningStorage
from web.server import serve_app

__all__ = ["serve_provisioning"]

#: How long open connections get to finish when the server stops. Short: a
#: registration is one small request, and a station retries anyway.
GRACEFUL_TIMEOUT_S = 2.0


@asynccontextmanager
async def serve_provisioning(
    app_or_storage: Any,
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    graceful_timeout: float = GRACEFUL_TIMEOUT_S,
    error_log: logging.Logger | None = None,
) -> AsyncIterator[str]:
    """Serve ``app_or_storage`` on ``host:port`` while the block runs; yields ``http://host:port``.

    ``app_or_storage`` is a :class:`ProvisioningStorage` (served by
    :func:`create_app`) or any ASGI app - a test wraps the app in a
    fault-injecting middleware. ``port=0`` binds a free port; the URL
    yielded has the real one. The storage stays the caller's to close.

    hypercorn's own messages go to ``error_log`` (default: the standard
    logger ``web.provisioning.http``, which the caller configures); it
    keeps no access log. Neither ever sees a request body.
    """
    app = create_app(app_or_storage) if isinstance(app_or_storage, ProvisioningStorage) else app_or_storage
    async with serve_app(app, host, port, graceful_timeout=graceful_timeout,
                         error_log=error_log or logging.getLogger("web.provisioning.http")) as url:
        yield url
