"""Server-sent events for a page that shows something live (the portal's line board, the operator panel).

The page renders the current version and asks for what comes after it
(``?version=N``); the stream sends the page's fragment each time it
changes, and a comment now and then so that proxies and browsers keep it
open.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from starlette.requests import Request
from starlette.responses import StreamingResponse

__all__ = ["HEARTBEAT_S", "event_stream", "version_asked"]

#: A comment this often keeps a quiet stream open.
HEARTBEAT_S = 15.0


def version_asked(request: Request) -> int:
    """The version the page has (``?version=``; 0 when missing or not a number): the stream sends what is newer."""
    try:
        return int(request.query_params.get("version", "0"))
    except ValueError:
        return 0


def event_stream(events: AsyncIterator[str]) -> StreamingResponse:
    """``text/event-stream`` of ``events``, never cached nor buffered on the way."""
    return StreamingResponse(events, media_type="text/event-stream",
                             headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})
