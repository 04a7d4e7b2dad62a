"""What a portal page or API call asks for, checked: the same filters for search, the API and exports.

Query parameters are untrusted text. Each known parameter is taken as one
plain string (so ``serial[$ne]=`` is an unknown parameter, and a value such
as ``{"$ne": ""}`` is only ever compared as text), with a length limit;
anything else is a :class:`BadQuery`, which the routes answer with 400.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from typing import Any

import attrs

from reports.storage.mongo import mac_spellings
from sequencer.records import Outcome

__all__ = ["BadQuery", "IDENTITY_KEYS", "RunQuery", "parse_run_query"]

#: What a unit can be found by: the parameter, and the run document field it is matched against.
IDENTITY_KEYS: dict[str, str] = {
    "serial": "serial",
    "mac": "dut.mac",
    "imei": "dut.imei",
    "imsi": "dut.imsi",
    "iccid": "dut.iccid",
    "claim_code": "dut.claim_code",
}
FILTERS = ("batch", "product", "station", "outcome", "since", "until")
PAGING = ("before", "limit")
MAX_VALUE = 256
MAX_LIMIT = 500
DEFAULT_LIMIT = 50


class BadQuery(ValueError):
    """A parameter the portal does not take, or a value it cannot use; the message names it."""


@attrs.frozen
class RunQuery:
    """Runs matching every given filter, newest first; ``before`` continues a page (``started|run_id``)."""

    identity: tuple[tuple[str, str], ...] = ()  # (parameter, value)
    batch: str | None = None
    product: str | None = None
    station: str | None = None
    outcome: str | None = None
    since: dt.datetime | None = None
    until: dt.datetime | None = None
    before: tuple[dt.datetime, str] | None = None
    limit: int = DEFAULT_LIMIT

    @property
    def empty(self) -> bool:
        return not self.identity and all(
            v is None for v in (self.batch, self.product, self.station, self.outcome, self.since, self.until))

    def params(self, **changes: Any) -> dict[str, str]:
        """The query as parameters again (for links to the next page or an export of the same view)."""
        out: dict[str, str] = dict(self.identity)
        for name in ("batch", "product", "station", "outcome"):
            if getattr(self, name) is not None:
                out[name] = getattr(self, name)
        for name in ("since", "until"):
            if getattr(self, name) is not None:
                out[name] = getattr(self, name).isoformat()
        out.update({k: v for k, v in changes.items() if v is not None})
        return out


def _moment(name: str, text: str) -> dt.datetime:
    try:
        when = dt.datetime.fromisoformat(text)
    except ValueError:
        raise BadQuery(f"{name}: {text[:40]!r} is not a date (YYYY-MM-DD) or an ISO time") from None
    return when.replace(tzinfo=dt.timezone.utc) if when.tzinfo is None else when.astimezone(dt.timezone.utc)


def parse_run_query(params: Any, *, allowed: tuple[str, ...] = ()) -> RunQuery:
    """A :class:`RunQuery` from request parameters (a starlette ``QueryParams`` or a mapping of lists).

    ``allowed`` names further parameters the caller handles itself.
    """
    items = params.multi_items() if hasattr(params, "multi_items") else [
        (k, v) for k, vs in params.items() for v in (vs if isinstance(vs, list) else [vs])]
    known = {*IDENTITY_KEYS, *FILTERS, *PAGING, *allowed}
    seen: dict[str, str] = {}
    for name, value in items:
        if name not in known:
            raise BadQuery(f"unknown parameter {name[:60]!r} (known: {', '.join(sorted(known))})")
        if name in seen:
            raise BadQuery(f"{name}: given twice")
        if not isinstance(value, str):
            raise BadQuery(f"{name}: not text")
        if len(value) > MAX_VALUE:
            raise BadQuery(f"{name}: longer than {MAX_VALUE} characters")
        if any(ord(c) < 32 for c in value):
            raise BadQuery(f"{name}: control characters are not allowed")
        seen[name] = value.strip()
    given = {k: v for k, v in seen.items() if v != "" and k not in allowed}
    outcome = given.get("outcome")
    if outcome is not None:
        outcome = outcome.upper()
        if outcome not in {o.value for o in Outcome} | {"RUNNING"}:
            raise BadQuery(f"outcome: {outcome[:40]!r} is not an outcome")
    limit = DEFAULT_LIMIT
    if "limit" in given:
        if not given["limit"].isdigit() or not 1 <= int(given["limit"]) <= MAX_LIMIT:
            raise BadQuery(f"limit: a whole number from 1 to {MAX_LIMIT}")
        limit = int(given["limit"])
    before = None
    if "before" in given:
        when, sep, run_id = given["before"].partition("|")
        if not sep or not run_id:
            raise BadQuery("before: not a page marker")
        before = (_moment("before", when), run_id)
    return RunQuery(
        identity=tuple((k, given[k]) for k in IDENTITY_KEYS if k in given),
        batch=given.get("batch"), product=given.get("product"), station=given.get("station"), outcome=outcome,
        since=_moment("since", given["since"]) if "since" in given else None,
        until=_moment("until", given["until"]) if "until" in given else None,
        before=before, limit=limit,
    )


def mongo_filter(q: RunQuery) -> dict[str, Any]:
    """The ``runs`` filter for ``q``: every value a plain string or date, compared for equality or range."""
    query: dict[str, Any] = {}
    for name, value in q.identity:
        field = IDENTITY_KEYS[name]
        # Stations write MACs in either case, with colons, dashes or neither.
        query[field] = {"$in": mac_spellings(value)} if name == "mac" else value
    for name in ("batch", "product", "station"):
        if getattr(q, name) is not None:
            query[name] = getattr(q, name)
    if q.outcome is not None:
        query["outcome"] = None if q.outcome == "RUNNING" else q.outcome
    started: dict[str, Any] = {}
    if q.since is not None:
        started["$gte"] = q.since
    if q.until is not None:
        started["$lt"] = q.until
    if started:
        query["started_at"] = started
    if q.before is not None:
        when, run_id = q.before
        query["$or"] = [{"started_at": {"$lt": when}}, {"started_at": when, "_id": {"$lt": run_id}}]
    return query


def matches(q: RunQuery, run: Mapping[str, Any]) -> bool:
    """Whether a run summary (:func:`web.portal.data.run_row`) matches ``q``, for a store without query support."""
    for name, value in q.identity:
        have = run.get("serial") if name == "serial" else (run.get("dut") or {}).get(name)
        if have is None or (str(have) not in mac_spellings(value) if name == "mac" else str(have) != value):
            return False
    for name in ("batch", "product", "station"):
        if getattr(q, name) is not None and run.get(name) != getattr(q, name):
            return False
    if q.outcome is not None and (run.get("outcome") or "RUNNING") != q.outcome:
        return False
    started = run["started_at"]
    if q.since is not None and started < q.since or q.until is not None and started >= q.until:
        return False
    if q.before is not None and (started, run["run_id"]) >= q.before:
        return False
    return True
