"""The portal, started: its app, the line board's feed and the webhook deliveries, in the caller's nursery."""

from __future__ import annotations

import logging
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import trio

from web.app import WebSettings, create_web_app
from web.auth import AuthStore, Role
from web.builds.app import MAX_UPLOAD, UPLOAD_PATH, build_routes
from web.builds.registry import BuildRegistry
from web.portal.app import portal_routes
from web.portal.board import BoardFeed, board_routes
from web.portal.exports import export_routes
from web.portal.webhooks import Webhooks, WebhookSettings
from web.server import serve_app

__all__ = ["create_portal", "serve_portal"]

GRACEFUL_TIMEOUT_S = 5.0
NAVIGATION = (("Line board", "/board", Role.VIEWER), ("Search", "/search", Role.VIEWER),
              ("Batches", "/batches", Role.VIEWER), ("Builds", "/builds", Role.VIEWER),
              ("Webhooks", "/admin/webhooks", Role.ADMIN))


def create_portal(data: Any, auth: AuthStore | None, *, cookie_secret: bytes, board: BoardFeed,
                  webhooks: Webhooks | None = None, builds: BuildRegistry | None = None,
                  https_only: bool = False) -> Any:
    """The portal's ASGI app over ``data`` (:mod:`web.portal.data`); ``auth`` None serves read-only without logins.

    ``builds``: the firmware build registry (:mod:`web.builds`), over MongoDB only.
    """
    settings = WebSettings(title="Sequencer portal", auth=auth, cookie_secret=cookie_secret,
                           template_packages=("web.portal", "web.builds"), static_packages=("web.portal", "web"),
                           https_only=https_only, navigation=NAVIGATION, large_bodies={UPLOAD_PATH: MAX_UPLOAD})
    return create_web_app(settings, [*board_routes(), *export_routes(), *portal_routes(), *build_routes()],
                          state={"data": data, "board": board, "webhooks": webhooks, "builds": builds})


@asynccontextmanager
async def serve_portal(data: Any, auth: AuthStore | None, host: str = "127.0.0.1", port: int = 0, *,
                       https_only: bool = False, poll_interval: float = 1.0,
                       webhook_settings: WebhookSettings | None = None) -> AsyncIterator[str]:
    """Serve the portal while the block runs; yields its base URL. ``data`` and ``auth`` stay the caller's to close.

    Over MongoDB, webhooks are found and delivered in the same nursery
    (:mod:`web.portal.webhooks`); a store served read-only has none.
    """
    await trio.to_thread.run_sync(data.ensure)
    if auth is not None:
        await trio.to_thread.run_sync(auth.ensure)
        cookie_secret = await trio.to_thread.run_sync(auth.cookie_secret)
    else:
        cookie_secret = secrets.token_bytes(32)
    board = BoardFeed(data, poll_interval=poll_interval)
    webhooks = Webhooks(data.db, webhook_settings) if data.writable else None
    builds = BuildRegistry(data.db) if data.writable else None
    if builds is not None:
        await trio.to_thread.run_sync(builds.ensure)
    async with trio.open_nursery() as nursery:
        await nursery.start(board.run)
        if webhooks is not None:
            await nursery.start(webhooks.run)
        app = create_portal(data, auth, cookie_secret=cookie_secret, board=board, webhooks=webhooks, builds=builds,
                            https_only=https_only)
        async with serve_app(app, host, port, graceful_timeout=GRACEFUL_TIMEOUT_S,
                             error_log=logging.getLogger("web.portal.http")) as url:
            yield url
        nursery.cancel_scope.cancel()
