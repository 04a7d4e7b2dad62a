"""The provisioning service's HTTP API (starlette, served by hypercorn on trio) and its rules.

::

    POST /v1/devices            Idempotency-Key: <key>     register a device
    GET  /v1/devices/{serial}                              the device, without secrets
    GET  /healthz                                          200 when the database answers

The registration rules, applied by :func:`register`:

1. The key was used before: the same request (same fingerprint, and the same
   broker password by the stored hash) gets the stored answer again, with
   ``replayed: true`` and the ``Idempotent-Replayed: true`` header; a
   different request under that key is ``422`` (the client has a bug: a new
   request needs a new key).
2. The serial is new: create the device (new device id and claim code), ``201``;
   unless its MAC is registered under another serial (the same board with a
   misread or reprinted serial): ``409``, "already registered as serial ...".
3. The serial is registered and its identity (MAC, public key, product)
   matches: a retest. Same device id and claim code, details updated, ``200``
   with ``created: false``.
4. The serial is registered with another MAC, public key or product:
   ``409``, "registered elsewhere". Nothing changes.

Answers to 1-3 are kept under the key; ``409`` and ``422`` are not (the same
request meets the same rule again). Errors are ``{"error": "..."}``; ``503``
means the database is away and a retry with the same key is safe.

Nothing here logs a request body: log lines name the serial, a prefix of the
key and the outcome.
"""

from __future__ import annotations

import hmac
import json
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import attrs
import structlog
import trio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from web.bodies import drain_refused_body
from web.provisioning.model import (
    IDEMPOTENCY_KEY_PATTERN,
    MAX_BODY_BYTES,
    Device,
    InvalidRequest,
    Registration,
    RegistrationRequest,
    Reply,
    error,
    hash_secret,
    normalize_mac,
    success,
    utcnow,
    verify_secret,
)
from web.provisioning.storage import DuplicateKey, ProvisioningStorage, StorageUnavailable

__all__ = ["create_app", "register"]

#: How often the rules are re-applied after a concurrent request won a race.
#: Each round trip means another request *completed* a write meanwhile, so a
#: handful only runs out under a pathological storm; it is then a 503, retried.
MAX_ROUNDS = 8

REPLAYED_HEADER = "Idempotent-Replayed"


async def register(
    storage: ProvisioningStorage,
    req: RegistrationRequest,
    key: str,
    *,
    clock: Callable[[], Any] = utcnow,
    hashing: trio.CapacityLimiter | None = None,
) -> Reply:
    """Apply the registration rules (module docstring) to ``req`` sent under idempotency key ``key``.

    Optimistic: read, decide, write; a write refused by a unique constraint
    means a concurrent request got there first, so decide again. Raises
    :class:`StorageUnavailable` when the database is away. ``hashing``
    bounds how many password hashes run at once (each is 16 MiB and a core
    for ~0.1 s; a storm of retries must not take all of either).
    """
    fingerprint = req.fingerprint()
    password_hash: str | None = None
    for _ in range(MAX_ROUNDS):
        earlier = await storage.find_request(key)
        if earlier is not None:
            return await _replay(earlier, req, fingerprint, key, hashing)
        device = await storage.get_device(req.serial)
        if device is not None and (differ := device.conflicts(req)):
            return _conflict(device, req, differ)
        if device is None:
            # A unit is registered once: its MAC under another serial is the
            # same board with a misread or reprinted serial, not a new unit.
            same_board = [d for d in await storage.find_by_mac(req.mac) if d.serial != req.serial]
            if same_board:
                return _registered_as(same_board[0], req)
        if req.broker is not None and password_hash is None:
            password_hash = await trio.to_thread.run_sync(hash_secret, req.broker.password, limiter=hashing)
        now = clock()
        try:
            if device is None:
                device = Device.new(req, password_hash, now)
                reg = Registration(key, req.serial, fingerprint, password_hash, 201, True, device.device_id,
                                   device.claim_code, now)
                await storage.insert_device(device, reg)
            else:
                reg = Registration(key, req.serial, fingerprint, password_hash, 200, False, device.device_id,
                                   device.claim_code, now)
                await storage.add_registration(device.retested(req, password_hash, now), reg)
        except DuplicateKey:
            continue  # someone else registered this serial, key or claim code meanwhile: look again
        return success(reg, replayed=False)
    raise StorageUnavailable(f"too many concurrent registrations of serial {req.serial}; try again")


async def _replay(earlier: Registration, req: RegistrationRequest, fingerprint: str, key: str,
                  hashing: trio.CapacityLimiter | None) -> Reply:
    same = earlier.fingerprint == fingerprint
    if same and req.broker is not None:
        same = earlier.password_hash is not None and await trio.to_thread.run_sync(
            verify_secret, req.broker.password, earlier.password_hash, limiter=hashing)
    if not same:
        return error(422, f"Idempotency-Key {key[:16]}... was already used for a different request (serial "
                          f"{earlier.serial}); a new request needs a new key")
    return success(earlier, replayed=True)


def _conflict(device: Device, req: RegistrationRequest, differ: list[str]) -> Reply:
    what = {"mac": "MAC", "public_key": "public key", "product": "product"}
    where = ", ".join(bit for bit in (
        f"product {device.product}",
        f"station {device.station}" if device.station else "",
        f"batch {device.batch}" if device.batch else "",
        f"first registered {device.first_registered_at:%Y-%m-%d %H:%M:%S} UTC",
    ) if bit)
    details = {"mac": device.mac, "public_key": f"sha256 {device.public_key_sha256[:16]}...",
               "product": device.product}
    registered = "; ".join(f"registered {what[d]} {details[d]}" for d in differ)
    return error(409, f"serial {req.serial} is registered elsewhere with a different "
                      f"{'/'.join(what[d] for d in differ)} ({registered}; {where})",
                 conflict=differ)


def _registered_as(device: Device, req: RegistrationRequest) -> Reply:
    return error(409, f"MAC {device.mac} is already registered as serial {device.serial} (product {device.product}, "
                      f"first registered {device.first_registered_at:%Y-%m-%d %H:%M:%S} UTC); a unit is registered "
                      f"once: check the serial {req.serial}", conflict=["serial"])


@attrs.define
class _Pending:
    """A registration being worked on: its request, and its answer once there is one."""

    req: RegistrationRequest
    done: trio.Event = attrs.field(factory=trio.Event)
    reply: Reply | None = None


class _InFlight:
    """Registrations being worked on, by idempotency key, so that a retry that comes meanwhile waits for them.

    A client that gave up waiting (its timeout) sends the same request again
    under the same key. Worked on from the start, the retry queued behind
    every other request to hash the password again -- scrypt, the one
    expensive step -- while the first was still queued to hash it: under a
    burst each retry added to the work that had made the first one late,
    and lost the place the first had, until no answer came in time (a
    64-slot station on two busy cores registered 16 of 64). The retry now
    waits for the first and, when it is the same request (the same
    fingerprint and, compared in memory, the same password), gets the
    first's answer as a replay. Holds only the requests in progress.
    """

    def __init__(self) -> None:
        self._by_key: dict[str, _Pending] = {}

    async def earlier_answer(self, key: str, req: RegistrationRequest) -> Reply | None:
        """The answer to the same request under ``key`` if one is being worked on (waits for it); else None."""
        pending = self._by_key.get(key)
        if pending is None:
            return None
        await pending.done.wait()
        reply = pending.reply
        if reply is None or reply.status >= 300 or not _same_request(pending.req, req):
            return None  # it failed, or it is another request: the rules decide, as for any request
        return Reply(reply.status, {**reply.body, "replayed": True}, replayed=True)

    @contextmanager
    def working(self, key: str, req: RegistrationRequest) -> Iterator[_Pending]:
        pending = _Pending(req)
        first = key not in self._by_key
        if first:
            self._by_key[key] = pending
        try:
            yield pending
        finally:
            if first:
                del self._by_key[key]
            pending.done.set()


def _same_request(a: RegistrationRequest, b: RegistrationRequest) -> bool:
    if a.fingerprint() != b.fingerprint():
        return False
    if a.broker is None or b.broker is None:
        return a.broker is b.broker
    return hmac.compare_digest(a.broker.password.encode(), b.broker.password.encode())


def create_app(
    storage: ProvisioningStorage, *, logger: Any = None, hashing: trio.CapacityLimiter | None = None
) -> Starlette:
    """The ASGI app serving ``storage``. The caller owns ``storage`` (opens and closes it).

    ``logger`` is a structlog logger (default: ``provisioning``); it gets one
    line per registration, never a body or a password. ``hashing`` bounds
    the password hashes that run at once (default: one per core, at least 2).
    """
    log = logger if logger is not None else structlog.get_logger("provisioning")
    hashing = hashing if hashing is not None else trio.CapacityLimiter(max(2, os.cpu_count() or 2))
    in_flight = _InFlight()

    async def post_device(request: Request) -> JSONResponse:
        key = request.headers.get("idempotency-key")
        if not key:
            return _json(error(400, "the Idempotency-Key header is required: the same key on every retry of a"
                                    " request, a new key for a new request"))
        if not IDEMPOTENCY_KEY_PATTERN.fullmatch(key):
            return _json(error(400, f"Idempotency-Key: must match /{IDEMPOTENCY_KEY_PATTERN.pattern}/"))
        body = await _body_at_most(request, MAX_BODY_BYTES)
        if body is None:
            return _json(error(413, f"the body is larger than {MAX_BODY_BYTES} bytes"))
        try:
            req = RegistrationRequest.parse(json.loads(body))
        except (ValueError, RecursionError) as exc:  # InvalidRequest, or not JSON
            message = str(exc) if isinstance(exc, InvalidRequest) else "the body is not JSON"
            return _json(error(400, message))
        try:
            # A retry of a request still being worked on (its client gave up
            # waiting) waits for it, keeping its place in the queue for the
            # hashes, rather than starting again behind everyone else.
            reply = await in_flight.earlier_answer(key, req)
            if reply is None:
                with in_flight.working(key, req) as pending:
                    reply = pending.reply = await register(storage, req, key, hashing=hashing)
        except StorageUnavailable as exc:
            log.warning("registration failed: storage unavailable", serial=req.serial, key=key[:16],
                        error=str(exc))
            return _json(error(503, f"storage unavailable ({exc}); retry with the same Idempotency-Key"))
        (log.info if reply.status < 400 else log.warning)(
            "registration", serial=req.serial, key=key[:16], status=reply.status,
            device_id=reply.body.get("device_id"), replayed=reply.replayed, station=req.station)
        return _json(reply)

    async def get_device(request: Request) -> JSONResponse:
        serial = request.path_params["serial"]
        try:
            device = await storage.get_device(serial)
        except StorageUnavailable as exc:
            return _json(error(503, f"storage unavailable ({exc})"))
        if device is None:
            return _json(error(404, f"no device with serial {serial!r}"))
        return JSONResponse(device.public())

    async def find_devices(request: Request) -> JSONResponse:
        # A station's retest gate asks by MAC before it flashes: the serial is
        # not known until the test firmware runs.
        if set(request.query_params) != {"mac"}:
            return _json(error(400, "give exactly one query parameter: mac"))
        try:
            mac = normalize_mac(request.query_params["mac"])
        except InvalidRequest as exc:
            return _json(error(400, str(exc)))
        try:
            devices = await storage.find_by_mac(mac)
        except StorageUnavailable as exc:
            return _json(error(503, f"storage unavailable ({exc})"))
        return JSONResponse({"devices": [d.public() for d in devices]})

    async def healthz(request: Request) -> JSONResponse:
        try:
            await storage.ping()
        except StorageUnavailable as exc:
            return JSONResponse({"status": "unavailable", "storage": storage.description, "error": str(exc)},
                                status_code=503)
        return JSONResponse({"status": "ok", "storage": storage.description})

    return Starlette(routes=[
        Route("/v1/devices", post_device, methods=["POST"]),
        Route("/v1/devices", find_devices, methods=["GET"]),
        Route("/v1/devices/{serial}", get_device, methods=["GET"]),
        Route("/healthz", healthz, methods=["GET"]),
    ])



async def _body_at_most(request: Request, limit: int) -> bytes | None:
    """The request's body, or None as soon as it is known to exceed ``limit`` bytes.

    Read as it streams in: ``request.body()`` took a 256 MiB body whole
    before it could be refused, and a few of those at once would take the
    server's memory.
    """
    declared = request.headers.get("content-length", "")
    length = int(declared) if declared.isdigit() else None
    if length is not None and length > limit:
        await drain_refused_body(request.receive, declared=length)  # so the client reads the 413
        return None
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            await drain_refused_body(request.receive, declared=length, read=size)
            return None
        chunks.append(chunk)
    return b"".join(chunks)

def _json(reply: Reply) -> JSONResponse:
    headers = {REPLAYED_HEADER: "true"} if reply.replayed else None
    return JSONResponse(reply.body, status_code=reply.status, headers=headers)
