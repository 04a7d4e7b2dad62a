"""The operator panel, served in the station's process: ``sequencer run ... --panel HOST:PORT``.

It runs in the station's own trio loop, beside the slots (hypercorn on
trio), so it shares the station's desk and control directly. It has no
logins: it is the station's screen, bound to loopback by default; the
station file's ``panel`` may bind it to the touch screen's network
(docs/operating.md). Every POST still needs the page's CSRF token.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

import attrs
import trio

from sequencer.control import StationControl
from sequencer.events import Event
from sequencer.operator import OperatorDesk
from web.app import WebSettings, create_web_app
from web.panel.app import panel_routes
from web.panel.state import PanelState
from web.server import serve_app

__all__ = ["Panel", "serve_panel"]

#: Browsers' streams are closed before the server stops; a request still open after this is cut.
GRACEFUL_TIMEOUT_S = 1.0


@attrs.frozen
class Panel:
    """A served panel: where it is, and what the station's session hands it (:class:`sequencer.session.Panel`)."""

    url: str
    state: PanelState

    async def follow(self, events: trio.MemoryReceiveChannel[Event], places: Sequence[str], phases_per_run: int,
                     *, continuous: bool) -> None:
        await self.state.follow(events, places, phases_per_run, continuous=continuous)


def create_panel(state: PanelState) -> object:
    """The panel's ASGI app over ``state``."""
    settings = WebSettings(title=f"{state.station} panel", auth=None, cookie_secret=secrets.token_bytes(32),
                           template_packages=("web.panel",), static_packages=("web.panel",))
    return create_web_app(settings, panel_routes(), state={"panel": state})


@asynccontextmanager
async def serve_panel(station: str, product: str, desk: OperatorDesk, control: StationControl, host: str = "127.0.0.1",
                      port: int = 0) -> AsyncIterator[Panel]:
    """Serve the panel of ``desk`` and ``control`` while the block runs."""
    state = PanelState(station, product, desk, control)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(state.watch_operator)
        try:
            async with serve_app(create_panel(state), host, port, graceful_timeout=GRACEFUL_TIMEOUT_S,
                                 error_log=logging.getLogger("web.panel.http")) as url:
                try:
                    yield Panel(url, state)
                finally:
                    state.close()  # every browser's stream ends, so the server stops without waiting
        finally:
            nursery.cancel_scope.cancel()
