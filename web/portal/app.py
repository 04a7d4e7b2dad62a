"""The portal's pages and its JSON API (``docs/portal.md``), on the web stack of :mod:`web.app`.

Every route reads through the data object (:mod:`web.portal.data`) in a
worker thread, so the event loop never waits on MongoDB. Query parameters
go through :func:`web.portal.query.parse_run_query` first: an unknown or
malformed one is a 400 before anything is read.
"""

from __future__ import annotations

import datetime as dt
import re
from typing import Any

import trio
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Route

from reports.render.html import render_batch, render_run
from reports.storage.notes import DISPOSITIONS, Note
from sequencer.records import run_to_json
from web.app import csrf_form, render, require
from web.auth import Role
from web.portal.data import page_marker, row_json
from web.portal.query import IDENTITY_KEYS, BadQuery, RunQuery, parse_run_query

__all__ = ["portal_routes"]

#: Most runs a batch or product page (or its statistics) is computed over; a wider filter is narrowed first.
MAX_REPORT_RUNS = 20_000
MAX_ID = 128
_RUN_ID = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")


def _data(request: Request) -> Any:
    return request.app.state.data


def _query(request: Request, *, allowed: tuple[str, ...] = ()) -> RunQuery:
    try:
        return parse_run_query(request.query_params, allowed=allowed)
    except BadQuery as exc:
        raise HTTPException(400, str(exc)) from None


def _path_text(value: str, what: str) -> str:
    if not value or len(value) > MAX_ID or any(ord(c) < 32 for c in value):
        raise HTTPException(400, f"{what}: not a valid {what}")
    return value


def _run_id(value: str) -> str:
    if not _RUN_ID.match(value):
        raise HTTPException(400, "run id: letters, digits and . _ : - only")
    return value


# -- pages -------------------------------------------------------------------------


async def search_page(request: Request) -> Response:
    """Search runs by any identity, with filters; newest first, a page at a time."""
    require(request, Role.VIEWER)
    params = dict(request.query_params)
    # The search box: one value and what it is (serial, MAC, ...), as the filters' parameter.
    find, by = params.get("find", "").strip(), params.get("by", "serial")
    q = _query(request, allowed=("find", "by"))
    if find:
        if by not in (*IDENTITY_KEYS, "batch"):
            raise HTTPException(400, f"by: {by[:40]!r} is not something to search by")
        try:
            q = parse_run_query({**q.params(), by: find, "limit": str(q.limit)})
        except BadQuery as exc:
            raise HTTPException(400, str(exc)) from None
    rows = await trio.to_thread.run_sync(_data(request).search_runs, q) if not q.empty else []
    marker = page_marker(rows, q.limit)
    return render(request, "search.html", q=q, rows=rows, find=find, by=by, identity_keys=list(IDENTITY_KEYS),
                  outcomes=["PASS", "FAIL", "ERROR", "TIMEOUT", "ABORTED", "INTERRUPTED", "RUNNING"],
                  next_params=q.params(before=marker) if marker else None, export_params=q.params())


async def device_page(request: Request) -> Response:
    """A device: identity, provisioning, disposition and notes, every run, and one run's full report."""
    require(request, Role.VIEWER)
    serial = _path_text(request.path_params["serial"], "serial")
    device = await trio.to_thread.run_sync(_data(request).device, serial)
    if device is None:
        raise HTTPException(404, f"no device with serial {serial!r}")
    shown = request.query_params.get("run") or (device["runs"][0]["run_id"] if device["runs"] else None)
    if shown is not None and shown not in {r["run_id"] for r in device["runs"]}:
        raise HTTPException(404, f"run {shown[:MAX_ID]!r} is not one of this device's")
    return render(request, "device.html", device=device, shown=shown, dispositions=DISPOSITIONS,
                  writable=_data(request).writable)


async def _the_run(request: Request) -> Any:
    """The run the path names (to a viewer), or 404."""
    require(request, Role.VIEWER)
    run_id = _run_id(request.path_params["run_id"])
    run = await trio.to_thread.run_sync(_data(request).run, run_id)
    if run is None:
        raise HTTPException(404, f"no run {run_id!r}")
    return run


async def run_page(request: Request) -> Response:
    """The run's report, the very page ``sequencer report --run`` writes (same template, attachments included)."""
    run = await _the_run(request)
    html = await trio.to_thread.run_sync(render_run, run)
    # The report forbids scripts itself; here it may only be framed by the portal's own pages.
    return HTMLResponse(html)


async def attachment(request: Request) -> Response:
    """One attachment's bytes, always as a download (never rendered by the browser)."""
    phase, index = request.path_params["phase"], request.path_params["index"]
    run = await _the_run(request)
    if not 0 <= phase < len(run.phases) or not 0 <= index < len(run.phases[phase].attachments):
        raise HTTPException(404, "no such attachment")
    a = run.phases[phase].attachments[index]
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", a.name)[:100] or "attachment"
    return Response(a.data, media_type="application/octet-stream",
                    headers={"Content-Disposition": f'attachment; filename="{safe}"'})


async def report_page(request: Request) -> Response:
    """Yields, Paretos and statistics over any filter: the batch report's own page and arithmetic."""
    require(request, Role.VIEWER)
    q = _query(request)
    if q.empty:
        raise HTTPException(400, "give a filter: batch, product, station, a period or an identity")
    runs = await trio.to_thread.run_sync(lambda: list(_data(request).iter_runs(q, MAX_REPORT_RUNS + 1)))
    if not runs:
        raise HTTPException(404, "no runs match")
    if len(runs) > MAX_REPORT_RUNS:
        raise HTTPException(400, f"more than {MAX_REPORT_RUNS} runs match: narrow the filter (a period, a batch)")
    described = ", ".join(f"{k} {v}" for k, v in q.params().items())
    html = await trio.to_thread.run_sync(lambda: render_batch(runs, title=f"Runs: {described}"))
    return HTMLResponse(html)


async def batches_page(request: Request) -> Response:
    """Batches and products of the last days, each linking to its yields, Paretos and statistics."""
    require(request, Role.VIEWER)
    text = request.query_params.get("days", "7")
    if not text.isdigit() or not 1 <= int(text) <= 366:
        raise HTTPException(400, "days: a whole number from 1 to 366")
    since = dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=int(text))
    rows = await trio.to_thread.run_sync(_data(request).batches, since)
    return render(request, "batches.html", rows=rows, days=int(text))


async def add_note(request: Request) -> Response:
    """A note on the device (or one of its runs), maybe setting its disposition. Operators note; quality disposes."""
    principal = require(request, Role.OPERATOR)
    serial = _path_text(request.path_params["serial"], "serial")
    form = await csrf_form(request)
    note = await _note_from(request, principal, serial, dict(form))
    if request.url.path.startswith("/api/"):
        return JSONResponse(note.as_json(), status_code=201)
    return RedirectResponse(f"/devices/{_quote(serial)}#notes", status_code=303)


async def _note_from(request: Request, principal: Any, serial: str, fields: dict[str, Any]) -> Note:
    data = _data(request)
    if not data.writable:
        raise HTTPException(405, "this portal reads a station's store: notes need the factory's MongoDB")
    text = str(fields.get("text") or "").replace("\r\n", "\n")
    disposition = str(fields.get("disposition") or "").strip().lower() or None
    run_id = str(fields.get("run_id") or "").strip() or None
    if disposition is not None:
        if disposition not in DISPOSITIONS:
            raise HTTPException(400, f"disposition: one of {', '.join(DISPOSITIONS)}")
        require(request, Role.QUALITY)
    if run_id is not None:
        _run_id(run_id)
    if not text.strip() and disposition is None:
        raise HTTPException(400, "a note needs text or a disposition")
    device = await trio.to_thread.run_sync(data.device, serial)
    if device is None:
        raise HTTPException(404, f"no device with serial {serial!r}")
    if run_id is not None and run_id not in {r["run_id"] for r in device["runs"]}:
        raise HTTPException(400, f"run {run_id!r} is not one of this device's")
    note = Note(serial=serial, author=principal.name, role=principal.role.label, text=text,
                created_at=dt.datetime.now(dt.timezone.utc), run_id=run_id, disposition=disposition)
    try:
        stored = await trio.to_thread.run_sync(data.add_note, note)
    except ValueError as exc:
        raise HTTPException(400, str(exc)) from None
    webhooks = getattr(request.app.state, "webhooks", None)
    if webhooks is not None:
        event = webhooks.note_event(stored, device)
        if await trio.to_thread.run_sync(webhooks.enqueue, [event]):
            webhooks.wake()
    return stored


def _quote(text: str) -> str:
    from urllib.parse import quote

    return quote(text, safe="")


# -- the JSON API (/api/v1) ------------------------------------------------------------


async def api_devices(request: Request) -> Response:
    """``GET /api/v1/devices?serial=S`` (or mac=, imei=, imsi=, iccid=, claim_code=): the devices, with runs."""
    require(request, Role.VIEWER)
    q = _query(request)
    if not q.identity:
        raise HTTPException(400, f"give one of {', '.join(IDENTITY_KEYS)}")
    data = _data(request)

    def devices() -> list[dict[str, Any]]:
        found = [data.device(s) for s in data.device_serials(q)]
        return [_device_json(d) for d in found if d is not None]

    return JSONResponse({"devices": await trio.to_thread.run_sync(devices)})


def _device_json(d: dict[str, Any]) -> dict[str, Any]:
    return {**{k: v for k, v in d.items() if k not in ("runs", "notes", "provisioning")},
            "first_tested_at": d["first_tested_at"].isoformat() if d["first_tested_at"] else None,
            "last_tested_at": d["last_tested_at"].isoformat() if d["last_tested_at"] else None,
            "runs": [row_json(r) for r in d["runs"]], "notes": [n.as_json() for n in d["notes"]],
            "provisioning": _jsonable(d["provisioning"])}


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    if isinstance(value, dt.datetime):
        return value.isoformat()
    return value if value is None or isinstance(value, (str, int, float, bool)) else str(value)


async def api_runs(request: Request) -> Response:
    """``GET /api/v1/runs?batch=B`` (any filter): run summaries, newest first, a page at a time."""
    require(request, Role.VIEWER)
    q = _query(request)
    rows = await trio.to_thread.run_sync(_data(request).search_runs, q)
    marker = page_marker(rows, q.limit)
    return JSONResponse({"runs": [row_json(r) for r in rows], "next": q.params(before=marker) if marker else None})


async def api_run(request: Request) -> Response:
    """``GET /api/v1/runs/{run_id}``: the whole run record, as ``sequencer runs --json`` prints it."""
    run = await _the_run(request)
    return Response(run_to_json(run), media_type="application/json")


async def api_note(request: Request) -> Response:
    """``POST /api/v1/devices/{serial}/notes`` with JSON ``{"text", "disposition", "run_id"}``."""
    principal = require(request, Role.OPERATOR)
    serial = _path_text(request.path_params["serial"], "serial")
    if principal.via != "token":
        await csrf_form(request)  # a browser session posts forms, with their token
        raise HTTPException(415, "post JSON with a bearer token")
    try:
        body = await request.json()
    except ValueError:
        raise HTTPException(400, "the body is not JSON") from None
    if not isinstance(body, dict) or not all(isinstance(v, (str, type(None))) for v in body.values()) \
            or set(body) - {"text", "disposition", "run_id"}:
        raise HTTPException(400, 'a note is {"text": "...", "disposition": "...", "run_id": "..."}, strings only')
    note = await _note_from(request, principal, serial, body)
    return JSONResponse(note.as_json(), status_code=201)


async def home(request: Request) -> Response:
    return RedirectResponse("/search", status_code=303)


def portal_routes() -> list[BaseRoute]:
    return [
        Route("/", home),
        Route("/search", search_page),
        Route("/devices/{serial:path}/notes", add_note, methods=["POST"]),
        Route("/devices/{serial:path}", device_page),
        Route("/runs/{run_id}", run_page),
        Route("/runs/{run_id}/attachments/{phase:int}/{index:int}", attachment),
        Route("/report", report_page),
        Route("/batches", batches_page),
        Route("/api/v1/devices", api_devices),
        Route("/api/v1/devices/{serial:path}/notes", api_note, methods=["POST"]),
        Route("/api/v1/runs", api_runs),
        Route("/api/v1/runs/{run_id}", api_run),
        *webhook_routes(),
    ]


# -- webhooks (admins) -------------------------------------------------------------------------


def _webhooks(request: Request) -> Any:
    hooks = getattr(request.app.state, "webhooks", None)
    if hooks is None:
        raise HTTPException(405, "this portal reads a station's store: webhooks need the factory's MongoDB")
    return hooks


async def webhooks_page(request: Request) -> Response:
    require(request, Role.ADMIN)
    hooks = _webhooks(request)
    from web.portal.webhooks import EVENTS

    return render(request, "webhooks.html", endpoints=await trio.to_thread.run_sync(hooks.endpoints),
                  events=EVENTS, created=None)


async def add_webhook(request: Request) -> Response:
    principal = require(request, Role.ADMIN)
    hooks = _webhooks(request)
    form = await csrf_form(request)
    from web.portal.webhooks import EVENTS

    fields = {k: str(form.get(k) or "").strip() for k in ("url", "product", "group", "secret")}
    try:
        _, secret = await trio.to_thread.run_sync(lambda: hooks.add_endpoint(
            fields["url"], [str(e) for e in form.getlist("events")], secret=fields["secret"],
            product=fields["product"] or None, group=fields["group"] or None, created_by=principal.name))
    except ValueError as exc:
        raise HTTPException(400, str(exc)) from None
    return render(request, "webhooks.html", status_code=201, endpoints=await trio.to_thread.run_sync(hooks.endpoints),
                  events=EVENTS, created=secret)


async def set_webhook(request: Request) -> Response:
    require(request, Role.ADMIN)
    hooks = _webhooks(request)
    await csrf_form(request)
    endpoint_id = _path_text(request.path_params["endpoint_id"], "endpoint")
    if not await trio.to_thread.run_sync(hooks.set_active, endpoint_id, request.path_params["action"] == "enable"):
        raise HTTPException(404, "no such endpoint")
    return RedirectResponse("/admin/webhooks", status_code=303)


async def webhook_page(request: Request) -> Response:
    require(request, Role.ADMIN)
    hooks = _webhooks(request)
    endpoint_id = _path_text(request.path_params["endpoint_id"], "endpoint")
    endpoint = next((e for e in await trio.to_thread.run_sync(hooks.endpoints) if e["_id"] == endpoint_id), None)
    if endpoint is None:
        raise HTTPException(404, "no such endpoint")
    outbox = await trio.to_thread.run_sync(hooks.outbox, endpoint_id)
    return render(request, "webhook.html", endpoint=endpoint,
                  deliveries=await trio.to_thread.run_sync(hooks.deliveries, endpoint_id),
                  pending=sum(e["state"] == "pending" for e in outbox),
                  failed=sum(e["state"] == "failed" for e in outbox))


def webhook_routes() -> list[BaseRoute]:
    return [
        Route("/admin/webhooks", webhooks_page),
        Route("/admin/webhooks", add_webhook, methods=["POST"]),
        Route("/admin/webhooks/{endpoint_id}", webhook_page),
        Route("/admin/webhooks/{endpoint_id}/{action:str}", set_webhook, methods=["POST"]),
    ]
