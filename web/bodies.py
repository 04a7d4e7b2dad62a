"""Refusing a request body that is too large, so that the client reads why.

A server that answers 413 while the client is still sending closes the
connection on unread data: the kernel sends a TCP reset, which can throw
away the 413 before the client has read it, and the client reports "server
disconnected without sending a response" instead of the reason. So a body
refused for its size is read to its end and dropped first, when that is
cheap (up to :data:`DRAIN_REFUSED_BODY`); a larger one is answered at once,
as an abuse the server will not spend its time on.
"""

from __future__ import annotations

from starlette.types import Receive

#: The most of a refused body that is read (and dropped) before the 413 goes out.
DRAIN_REFUSED_BODY = 1024 * 1024


async def drain_refused_body(receive: Receive, *, declared: int | None, read: int = 0) -> None:
    """Read what is left of a refused body (``read`` bytes of it taken already), if it is small enough.

    ``declared``: its Content-Length, if it had one; without, it is read up
    to :data:`DRAIN_REFUSED_BODY` in all and no further.
    """
    if declared is not None and declared > DRAIN_REFUSED_BODY:
        return
    while read <= DRAIN_REFUSED_BODY:
        message = await receive()
        read += len(message.get("body", b""))
        if not message.get("more_body", False):
            return
