"""The build registry's routes on the portal: the API CI uploads to and stations download from, and its page.

``/api/v1/builds`` (see ``docs/portal.md``):

* ``POST /api/v1/builds``: a multipart form: ``manifest`` (the build's JSON
  manifest, :class:`web.builds.model.Manifest`), one part per file named by
  its path, and optionally ``channel`` to point at the new tag. Quality role.
* ``PUT /api/v1/builds/{product}/channels/{channel}``: JSON ``{"tag": ...}``. Quality role.
* ``GET /api/v1/builds/{product}/channels/{channel}``: the manifest the channel points at.
* ``GET /api/v1/builds/{product}/{tag}``: a build's manifest.
* ``GET /api/v1/builds/{product}/{tag}/files/{path}``: one file's bytes.

The page ``/builds`` lists builds, channels and which station flashed which.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import trio
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response, StreamingResponse
from starlette.routing import BaseRoute, Route

from web.app import csrf_form, render, require
from web.auth import Role
from web.builds.model import MAX_FILES, Manifest, ManifestError, check_name, check_path
from web.builds.registry import BuildConflict, BuildRegistry, UnknownBuild

__all__ = ["MAX_UPLOAD", "UPLOAD_PATH", "build_routes"]

UPLOAD_PATH = "/api/v1/builds"
#: Largest upload: every image of a 16 MB flash, and room for the JSON.
MAX_UPLOAD = 20 * 1024 * 1024
_READ = 256 * 1024


def _registry(request: Request) -> BuildRegistry:
    registry = getattr(request.app.state, "builds", None)
    if registry is None:
        raise HTTPException(405, "this portal reads a station's store: the build registry needs the factory's MongoDB")
    return registry


def _name(request: Request, key: str, what: str) -> str:
    try:
        return check_name(request.path_params[key], what)
    except ManifestError as exc:
        raise HTTPException(400, str(exc)) from None


async def upload(request: Request) -> Response:
    """A new build from CI: its manifest, its files, maybe a channel to point at it."""
    principal = require(request, Role.QUALITY)
    if principal.via != "token":
        raise HTTPException(403, "builds are uploaded by scripts with an API token (sequencer builds upload)")
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise HTTPException(415, "post a multipart form: manifest, then one part per file named by its path")
    try:
        form = await request.form(max_files=MAX_FILES, max_fields=8, max_part_size=64 * 1024)
    except HTTPException:
        raise
    except Exception as exc:  # noqa: BLE001 - python-multipart's errors: a malformed body, one line
        raise HTTPException(400, f"the form cannot be read: {exc}") from None
    try:
        text = form.get("manifest")
        if not isinstance(text, str):
            raise ManifestError("no \"manifest\" field (the build's JSON manifest)")
        try:
            manifest = Manifest.from_json(json.loads(text))
        except json.JSONDecodeError as exc:
            raise ManifestError(f"manifest: not JSON: {exc.msg}") from None
        channel = form.get("channel")
        if channel is not None:
            channel = check_name(channel, "channel")
        files = {}
        for key, value in form.multi_items():
            if isinstance(value, UploadFile):
                if key in files:
                    raise ManifestError(f"{key} is sent twice")
                files[check_path(key)] = value.file
        registry = _registry(request)
        stored, new = await trio.to_thread.run_sync(lambda: registry.upload(manifest, files, by=principal.name))
        moved = None
        if channel is not None:
            moved = await trio.to_thread.run_sync(
                lambda: registry.set_channel(manifest.product, channel, manifest.tag, by=principal.name))
    except ManifestError as exc:
        raise HTTPException(400, str(exc)) from None
    except BuildConflict as exc:
        raise HTTPException(409, str(exc)) from None
    finally:
        await form.close()
    body = {**stored.to_json(), "new": new, "channel": moved["channel"] if moved else None}
    return JSONResponse(body, status_code=201 if new else 200)


async def move_channel(request: Request) -> Response:
    """``PUT /api/v1/builds/{product}/channels/{channel}`` with ``{"tag": "v1.2.3"}``."""
    principal = require(request, Role.QUALITY)
    product, channel = _name(request, "product", "product"), _name(request, "channel", "channel")
    if principal.via != "token":
        raise HTTPException(403, "use the builds page's form, or an API token")
    try:
        body = await request.json()
    except ValueError:
        raise HTTPException(400, "the body is not JSON") from None
    if not isinstance(body, dict) or set(body) != {"tag"}:
        raise HTTPException(400, 'give {"tag": "..."}')
    return JSONResponse(_channel_json(await _set_channel(request, product, channel, body["tag"], principal.name)))


async def _set_channel(request: Request, product: str, channel: str, tag: Any, by: str) -> dict[str, Any]:
    registry = _registry(request)
    try:
        tag = check_name(tag, "tag")
        return await trio.to_thread.run_sync(lambda: registry.set_channel(product, channel, tag, by=by))
    except ManifestError as exc:
        raise HTTPException(400, str(exc)) from None
    except UnknownBuild as exc:
        raise HTTPException(404, str(exc)) from None


def _channel_json(doc: dict[str, Any]) -> dict[str, Any]:
    return {"product": doc["product"], "channel": doc["channel"], "tag": doc["tag"],
            "moved_by": doc.get("moved_by"), "moved_at": doc["moved_at"].isoformat() if doc.get("moved_at") else None}


async def channel_manifest(request: Request) -> Response:
    require(request, Role.VIEWER)
    product, channel = _name(request, "product", "product"), _name(request, "channel", "channel")
    registry = _registry(request)
    try:
        manifest = await trio.to_thread.run_sync(registry.channel_manifest, product, channel)
    except UnknownBuild as exc:
        raise HTTPException(404, str(exc)) from None
    return JSONResponse({**manifest.to_json(), "channel": channel})


async def build_manifest(request: Request) -> Response:
    require(request, Role.VIEWER)
    product, tag = _name(request, "product", "product"), _name(request, "tag", "tag")
    try:
        manifest = await trio.to_thread.run_sync(_registry(request).manifest, product, tag)
    except UnknownBuild as exc:
        raise HTTPException(404, str(exc)) from None
    return JSONResponse(manifest.to_json())


async def build_file(request: Request) -> Response:
    """One file of a build, streamed from GridFS a block at a time."""
    require(request, Role.VIEWER)
    product, tag = _name(request, "product", "product"), _name(request, "tag", "tag")
    try:
        path = check_path(request.path_params["path"])
        entry, stream = await trio.to_thread.run_sync(_registry(request).open_file, product, tag, path)
    except ManifestError as exc:
        raise HTTPException(400, str(exc)) from None
    except UnknownBuild as exc:
        raise HTTPException(404, str(exc)) from None

    async def blocks() -> AsyncIterator[bytes]:
        try:
            while block := await trio.to_thread.run_sync(stream.read, _READ):
                yield block
        finally:
            stream.close()

    return StreamingResponse(blocks(), media_type="application/octet-stream",
                             headers={"Content-Length": str(entry.size), "X-Sequencer-SHA256": entry.sha256})


async def builds_page(request: Request) -> Response:
    """Builds, channels, and which station flashed which build in the last days."""
    principal = require(request, Role.VIEWER)
    registry = _registry(request)
    builds = await trio.to_thread.run_sync(registry.builds)
    channels = await trio.to_thread.run_sync(registry.channels)
    flashed = await trio.to_thread.run_sync(registry.flashed)
    return render(request, "builds.html", builds=builds, channels=channels, flashed=flashed,
                  may_move=principal.may(Role.QUALITY))


async def move_channel_form(request: Request) -> Response:
    principal = require(request, Role.QUALITY)
    form = await csrf_form(request)
    try:
        product = check_name(str(form.get("product") or ""), "product")
        channel = check_name(str(form.get("channel") or ""), "channel")
    except ManifestError as exc:
        raise HTTPException(400, str(exc)) from None
    await _set_channel(request, product, channel, str(form.get("tag") or ""), principal.name)
    return RedirectResponse("/builds", status_code=303)


def build_routes() -> list[BaseRoute]:
    return [
        Route("/builds", builds_page),
        Route("/builds/channels", move_channel_form, methods=["POST"]),
        Route(UPLOAD_PATH, upload, methods=["POST"]),
        Route("/api/v1/builds/{product}/channels/{channel}", channel_manifest),
        Route("/api/v1/builds/{product}/channels/{channel}", move_channel, methods=["PUT"]),
        Route("/api/v1/builds/{product}/{tag}", build_manifest),
        Route("/api/v1/builds/{product}/{tag}/files/{path:path}", build_file),
    ]
