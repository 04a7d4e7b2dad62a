"""The operator panel's pages: a tile per slot, live; buttons and scans that start, stop and answer.

Routes, on the web stack (:mod:`web.app`: session cookie, CSRF on every
POST, security headers):

* ``GET /``: the station, a large tile per slot;
* ``GET /events``: ``text/event-stream``, the tiles' HTML each time they change;
* ``POST /answer``: answer one open question (``question``: its number, ``answer``);
* ``POST /start``, ``POST /stop``: a slot (``slot``), or ``/start`` alone every slot waiting;
* ``POST /scan``: a line scanned or typed (a keyboard-wedge scanner on the panel's screen),
  which the station's control takes as any other scan.

A POST from the page's script asks for JSON and gets what the station said
(``{"taken": true, "said": "slot 2: starting"}``); a plain form post is sent
back to the page. Every action goes through the station's own desk and
control, so the panel can do nothing the keyboard cannot.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import trio
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Route

from web.app import csrf_form, render, require
from web.auth import Role
from web.panel.state import COALESCE_S, PanelState
from web.sse import HEARTBEAT_S, event_stream, version_asked

__all__ = ["panel_routes"]

#: Who the station's records say pressed a button or scanned on the panel.
SOURCE = "the panel"


def _context(state: PanelState) -> dict[str, Any]:
    return {"panel": state, "tiles": state.tiles(), "station_questions": state.station_questions()}


async def panel_page(request: Request) -> Response:
    require(request, Role.VIEWER)
    state: PanelState = request.app.state.panel
    return render(request, "panel.html", version=state.version, **_context(state))


async def panel_events(request: Request) -> Response:
    """The tiles' HTML each time they change (at most every :data:`COALESCE_S`), and a comment now and then."""
    require(request, Role.VIEWER)
    state: PanelState = request.app.state.panel
    templates = request.app.state.templates
    seen = version_asked(request)

    def render_tiles(s: PanelState) -> str:
        # One rendering for every browser, so no session's CSRF token in it: the page's script
        # sends its own with each form (static/panel.js).
        return str(templates.get_template("_tiles.html").render(csrf="", **_context(s)))

    async def events() -> AsyncIterator[str]:
        nonlocal seen
        while True:
            with trio.move_on_after(HEARTBEAT_S) as waited:
                await state.next(seen)
                await trio.sleep(COALESCE_S)  # what changes together is sent together
            if state.closed:
                return  # the station is stopping: the server need not wait for this stream
            if waited.cancelled_caught:
                yield ": still here\n\n"
                continue
            seen, data = state.rendered(render_tiles)
            yield f"event: tiles\nid: {seen}\ndata: {data}\n\n"

    return event_stream(events())


def _slot(form: Any) -> int | None:
    text = str(form.get("slot") or "").strip()
    if not text:
        return None
    try:
        return int(text)
    except ValueError:
        return -1  # refused by the control, which names the slots it has


def _said(request: Request, taken: bool, said: str) -> Response:
    if "application/json" in request.headers.get("accept", ""):
        return JSONResponse({"taken": taken, "said": said})
    return RedirectResponse("/", status_code=303)


async def answer(request: Request) -> Response:
    require(request, Role.VIEWER)
    form = await csrf_form(request)
    state: PanelState = request.app.state.panel
    try:
        number = int(str(form.get("question") or ""))
    except ValueError:
        return _said(request, False, "not taken: which question? reload the page")
    text = str(form.get("answer") or "")
    if not any(n == number for n, _ in state.desk.open_questions):
        return _said(request, False, "not taken: that question was answered already")
    taken = state.desk.answer(text, number)
    return _said(request, taken, "answered" if taken else f"not taken: {state.desk.hint}")


async def start(request: Request) -> Response:
    require(request, Role.VIEWER)
    form = await csrf_form(request)
    state: PanelState = request.app.state.panel
    taken = state.control.start(_slot(form), SOURCE)
    return _said(request, taken, state.control.said)


async def stop(request: Request) -> Response:
    require(request, Role.VIEWER)
    form = await csrf_form(request)
    state: PanelState = request.app.state.panel
    slot = _slot(form)
    taken = state.control.stop(-1 if slot is None else slot, SOURCE)
    return _said(request, taken, state.control.said)


async def scan(request: Request) -> Response:
    require(request, Role.VIEWER)
    form = await csrf_form(request)
    state: PanelState = request.app.state.panel
    text = str(form.get("code") or "")
    before = state.control.version
    taken = state.control.take(text, SOURCE)
    if state.control.version != before:  # a scan: the control says what it did
        return _said(request, taken, state.control.said)
    return _said(request, taken, "answered" if taken else f"not taken: {state.desk.hint or 'no question is open'}")


def panel_routes() -> list[BaseRoute]:
    return [Route("/", panel_page), Route("/events", panel_events),
            Route("/answer", answer, methods=["POST"]), Route("/start", start, methods=["POST"]),
            Route("/stop", stop, methods=["POST"]), Route("/scan", scan, methods=["POST"])]
