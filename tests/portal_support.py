"""A real portal on a real mongod for the portal tests: seeding runs, logging in, reading forms.

``portal`` (a pytest fixture, loaded by ``tests/conftest.py``) serves the
portal in the test's own trio loop over the test's own database, with
one user per role (password ``pw-<role>``). Runs are seeded the way a
station ships them: through :class:`reports.storage.mongo.MongoSink`.
"""

from __future__ import annotations

import datetime as dt
import re
from contextlib import asynccontextmanager
from collections.abc import AsyncIterator, Sequence
from typing import Any

import attrs
import httpx
import pytest
import trio

from reports.storage.mongo import MongoSettings, MongoSink
from sequencer.records import RunRecord
from web.auth import AuthStore, Role
from web.portal.data import MongoData
from web.portal.server import serve_portal
from web.portal.webhooks import WebhookSettings

ROLES = ("viewer", "operator", "quality", "admin")
#: Webhook times a test can wait for: retries after 50 ms doubling to 200 ms, a lease of two seconds.
FAST_WEBHOOKS = WebhookSettings(first_retry=dt.timedelta(milliseconds=50), max_retry=dt.timedelta(milliseconds=200),
                                lease=dt.timedelta(seconds=2), poll_interval_s=0.05, fpy_window=4, fpy_threshold=0.75,
                                slot_failures=3)
_CSRF = re.compile(r'name="csrf" value="([^"]+)"')


@attrs.define
class Portal:
    url: str
    data: MongoData
    auth: AuthStore
    settings: MongoSettings
    seq: int = 0

    def ship(self, runs: Sequence[RunRecord]) -> None:
        """Write ``runs`` as a station's shipper would (each a newer change than the last)."""
        sink = MongoSink(self.settings)
        try:
            changes = []
            for run in runs:
                self.seq += 1
                changes.append((self.seq, run))
            report = sink.write_runs(changes)
            assert not report.rejected, report.rejected
        finally:
            sink.close()

    async def aship(self, runs: Sequence[RunRecord]) -> None:
        await trio.to_thread.run_sync(self.ship, runs)

    def client(self, **kw: Any) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.url, follow_redirects=False, timeout=30, **kw)

    @asynccontextmanager
    async def logged_in(self, role: str) -> AsyncIterator[httpx.AsyncClient]:
        """A client holding ``role``'s session cookie."""
        async with self.client() as http:
            page = await http.get("/login")
            response = await http.post("/login",
                                       data={"name": role, "password": f"pw-{role}", "csrf": csrf_of(page.text)})
            assert response.status_code == 303, response.text
            yield http


def csrf_of(html: str) -> str:
    match = _CSRF.search(html)
    assert match, "no CSRF token in the page"
    return match.group(1)


@pytest.fixture
async def portal(mongo: MongoSettings) -> AsyncIterator[Portal]:
    data = MongoData(mongo)
    auth = AuthStore(data.db)
    await trio.to_thread.run_sync(auth.ensure)
    for role in ROLES:
        await trio.to_thread.run_sync(auth.add_user, role, Role.parse(role), f"pw-{role}")
    try:
        async with serve_portal(data, auth, poll_interval=0.1, webhook_settings=FAST_WEBHOOKS) as url:
            yield Portal(url, data, auth, mongo)
    finally:
        data.close()
