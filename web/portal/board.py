"""The line board: every station and slot now, pushed to browsers as server-sent events.

One :class:`BoardFeed` per portal process watches the runs collection: a
MongoDB change stream on a replica set (a change shows within moments),
else a poll of the newest ``shipped_at`` every ``poll_interval`` seconds on
a single node, which has no change streams. When something changed it
recomputes the board once and wakes every browser waiting on it; a
browser that is slow only ever misses intermediate states, never the
latest, and holds no buffer that could grow. How long ago a silent station
was last heard is recomputed every few seconds even when nothing ships.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

import attrs
import pymongo.errors
import trio
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from web.app import render, require
from web.auth import Role
from web.sse import HEARTBEAT_S, event_stream, version_asked

__all__ = ["BoardFeed", "board_routes", "line_board"]

log = logging.getLogger("web.portal.board")

#: Runs older than this are not on the board (a slot idle longer shows its last run from within it).
WINDOW = dt.timedelta(hours=24)
#: A station is shown silent when nothing of it shipped for this long.
SILENT_AFTER = dt.timedelta(minutes=5)
#: Recompute at least this often, so "last heard 7 min ago" moves on while nothing ships.
REFRESH_S = 5.0
#: Read the whole board again this often (runs leave the window; nothing missed stays missed).
RESYNC = dt.timedelta(minutes=10)
#: How far back of the newest shipment each read goes again (what shipped in the same instant is not lost).
SHIPPED_MARGIN = dt.timedelta(seconds=2)


@attrs.frozen
class Station:
    name: str
    slots: tuple[Mapping[str, Any], ...]  # the newest run of each slot (a run row), by slot
    last_heard: dt.datetime | None
    silent_for: dt.timedelta | None  # None while the station ships

    @property
    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for s in self.slots:
            key = s["outcome"] or "RUNNING"
            out[key] = out.get(key, 0) + 1
        return out


def line_board(rows: Sequence[Mapping[str, Any]], heard: Mapping[str, dt.datetime], now: dt.datetime,
               silent_after: dt.timedelta = SILENT_AFTER) -> list[Station]:
    """Each station with the newest run of each of its slots (``rows``: one per slot) and when it was last heard."""
    newest = {(r["station"], r["slot"]): r for r in rows}
    stations = sorted({s for s, _ in newest} | set(heard))
    board = []
    for name in stations:
        slots = tuple(r for (s, _), r in sorted(newest.items(), key=lambda kv: kv[0][1]) if s == name)
        last = heard.get(name)
        silent = now - last if last is not None and now - last > silent_after else None
        board.append(Station(name, slots, last, silent))
    return board


def _ago(delta: dt.timedelta | None) -> str:
    if delta is None:
        return ""
    minutes = int(delta.total_seconds() // 60)
    if minutes < 60:
        return f"{minutes} min"
    hours = minutes // 60
    return f"{hours} h {minutes % 60} min" if hours < 48 else f"{hours // 24} days"


class BoardFeed:
    """The board, kept current as runs ship, and a way to wait for the next version of it.

    Read whole once (each slot's newest run of the window, each station's
    last shipment), then kept by what shipped since (an indexed query on
    ``shipped_at``), so a change costs the runs that changed, not a day of a
    busy line; read whole again every :data:`RESYNC` to let old runs go.
    """

    def __init__(self, data: Any, *, poll_interval: float = 1.0, window: dt.timedelta = WINDOW) -> None:
        self.data = data
        self.poll_interval = poll_interval
        self.window = window
        self.version = 0
        self.board: list[Station] = []
        self.mode = "starting"
        self._changed = trio.Event()
        self._slots: dict[tuple[str, int], Mapping[str, Any]] = {}
        self._heard: dict[str, dt.datetime] = {}
        self._since: dt.datetime | None = None  # the newest shipped_at read so far
        self._synced: float | None = None  # trio.current_time() of the last whole read
        self._rendered: tuple[int, str] | None = None

    async def next(self, seen: int) -> tuple[int, list[Station]]:
        """The board once its version is past ``seen`` (at once if it already is)."""
        while self.version <= seen:
            await self._changed.wait()
        return self.version, self.board

    def rendered(self, render: Any) -> tuple[int, str]:
        """The current board as one event's data, rendered once per version however many browsers wait."""
        if self._rendered is None or self._rendered[0] != self.version:
            html = render(self.board)
            self._rendered = (self.version, json.dumps({"version": self.version, "html": html}))
        return self._rendered

    async def refresh(self) -> None:
        now = dt.datetime.now(dt.timezone.utc)
        whole = (self._synced is None or trio.current_time() - self._synced >= RESYNC.total_seconds()
                 or not hasattr(self.data, "shipped_since"))
        if whole:
            rows, heard = await trio.to_thread.run_sync(
                lambda: (self.data.board_rows(now - self.window), self.data.last_heard()))
            self._slots = {(r["station"], r["slot"]): r for r in rows}
            self._heard = dict(heard)
            self._since = max(heard.values(), default=None)
            self._synced = trio.current_time()
        else:
            # Never past this machine's now: one run shipped with a time ahead (a clock put right
            # since) would otherwise hide every shipment until the next whole read.
            since = min(self._since or now - self.window, now - SHIPPED_MARGIN)
            for r in await trio.to_thread.run_sync(self.data.shipped_since, since):
                key = (r["station"], r["slot"])
                old = self._slots.get(key)
                if old is None or (r["started_at"], r["run_id"]) >= (old["started_at"], old["run_id"]):
                    self._slots[key] = r
                shipped = r["shipped_at"]
                if shipped is not None:
                    self._heard[r["station"]] = max(shipped, self._heard.get(r["station"], shipped))
                    self._since = max(shipped, self._since or shipped)
        recent = [r for r in self._slots.values() if r["started_at"] >= now - self.window]
        board = line_board(recent, self._heard, now)
        if board != self.board or self.version == 0:
            self.board = board
            self.version += 1
            self._changed.set()
            self._changed = trio.Event()

    async def run(self, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Keep the board current until cancelled (started in the portal's nursery)."""
        await self.refresh()
        task_status.started()
        stream = await trio.to_thread.run_sync(self._open_stream)
        self.mode = "change stream" if stream is not None else "polling"
        try:
            while True:
                if stream is not None:
                    changed = await trio.to_thread.run_sync(self._wait_for_change, stream, abandon_on_cancel=True)
                else:
                    changed = await self._poll()
                if changed is None:  # the change stream broke (a failover): poll until it can be reopened
                    stream = await trio.to_thread.run_sync(self._open_stream)
                try:
                    await self.refresh()
                except Exception as exc:  # noqa: BLE001 - MongoDB away: the board waits, the portal stays up
                    log.warning("line board: cannot read the runs: %s", exc)
                    await trio.sleep(self.poll_interval)
        finally:
            if stream is not None:
                stream.close()

    def _open_stream(self) -> Any:
        db = getattr(self.data, "db", None)
        if db is None:
            return None
        try:
            return db["runs"].watch([{"$project": {"_id": 1}}], max_await_time_ms=int(REFRESH_S * 1000))
        except pymongo.errors.PyMongoError:  # a single node (no change streams), or not allowed
            return None

    @staticmethod
    def _wait_for_change(stream: Any) -> bool | None:
        """True after a change, False after REFRESH_S without one, None if the stream broke."""
        try:
            return stream.try_next() is not None
        except pymongo.errors.PyMongoError:
            return None

    async def _poll(self) -> bool:
        with trio.move_on_after(REFRESH_S):
            marker = await trio.to_thread.run_sync(self._marker)
            while True:
                await trio.sleep(self.poll_interval)
                if await trio.to_thread.run_sync(self._marker) != marker:
                    return True
        return False

    def _marker(self) -> Any:
        """Something that changes whenever a run is shipped: the newest shipped_at and the runs count."""
        db = getattr(self.data, "db", None)
        try:
            if db is None:
                rows = self.data.board_rows(dt.datetime.now(dt.timezone.utc) - self.window)
                return tuple(sorted((r["run_id"], str(r["outcome"]), r["phases_done"]) for r in rows))
            newest = db["runs"].find_one({}, {"shipped_at": 1}, sort=[("shipped_at", -1)])
            return newest.get("shipped_at") if newest else None
        except Exception:  # noqa: BLE001 - unreachable: no change seen
            return None


def board_context(feed: BoardFeed, board: list[Station]) -> dict[str, Any]:
    return {"stations": board, "ago": _ago, "mode": feed.mode}


async def board_page(request: Request) -> Response:
    require(request, Role.VIEWER)
    feed: BoardFeed = request.app.state.board
    return render(request, "board.html", version=feed.version, **board_context(feed, feed.board))


async def board_events(request: Request) -> Response:
    """``text/event-stream``: the board's HTML each time it changes, and a comment now and then to keep it open."""
    require(request, Role.VIEWER)
    feed: BoardFeed = request.app.state.board
    templates = request.app.state.templates
    seen = version_asked(request)

    def render_board(board: list[Station]) -> str:
        return templates.get_template("_board.html").render(**board_context(feed, board))

    async def events() -> AsyncIterator[str]:
        nonlocal seen
        while True:
            with trio.move_on_after(HEARTBEAT_S):
                await feed.next(seen)
                seen, data = feed.rendered(render_board)
                yield f"event: board\nid: {seen}\ndata: {data}\n\n"
                continue
            yield ": still here\n\n"

    return event_stream(events())


def board_routes() -> list[BaseRoute]:
    return [Route("/board", board_page), Route("/board/events", board_events)]
