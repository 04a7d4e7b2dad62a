"""Idempotent device registration against the real service: hypercorn on a free loopback port, in the test.

Faults are injected by :class:`FaultyMiddleware`, an ASGI wrapper around the
real app (the service's own code has no test hooks): a request can be failed
before the app sees it, *lost* (the app registers, the client gets a 500),
or delayed past the client's timeout. "Down" is a port nothing listens on.
Both storage backends run the same scenarios: SQLite, and MongoDB on the real
mongod of ``tests/mongo_support.py``.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import bson
import httpx
import pytest
import structlog
import trio
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fixtures.station import station_fixtures, station_services
from sequencer.config import ConfigError, StationConfig
from phases.register import (
    ProvisioningClient,
    ProvisioningError,
    ProvisioningUnavailable,
    RegisteredElsewhere,
    _broker_of,
    display_url,
    idempotency_key,
    register_phase,
    registration_body,
)
from web.provisioning.app import create_app
from web.provisioning.cli import add_provision_commands, cmd_provision_server
from web.provisioning.model import CLAIM_PATTERN, RegistrationRequest, public_key_fingerprint, verify_secret
from web.provisioning.server import serve_provisioning
from web.provisioning.storage import MongoStorage, ProvisioningStorage, SqliteStorage
from sequencer import Product, phase
from sequencer.phase import Phase
from sequencer.records import Outcome, RunRecord, run_to_json
from tests.conftest import run_product
from tests.mongo_support import database

ROOT = Path(__file__).resolve().parent.parent
#: The phase's client as tests run it: quick retries, short timeouts.
BRISK: dict[str, Any] = {"timeout": 2.0, "retries": 3, "backoff": 0.02, "backoff_max": 0.1}


# -- fixtures and helpers --------------------------------------------------------


def public_key() -> str:
    key = ec.generate_private_key(ec.SECP256R1()).public_key()
    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()


def identity(n: int, *, key: str | None = None, mac: str | None = None) -> dict[str, str]:
    """A DUT identity as earlier phases would have recorded it (``ctx.identify``)."""
    return {
        "serial": f"SN{n:09d}",
        "mac": mac or f"24:6F:28:00:{n // 256:02X}:{n % 256:02X}",
        "imei": f"3569380356{n:05d}",
        "imsi": f"21407{n:010d}",
        "iccid": f"894470{n:013d}",
        "public_key": key or public_key(),
        "firmware": "1.4.2",
    }


def body(ident: Mapping[str, str], password: str | None = "s3cret-broker-pw", **extra: Any) -> dict[str, Any]:
    b: dict[str, Any] = {k: v for k, v in ident.items() if k != "firmware"}
    b.update(firmware_version=ident.get("firmware", "1.0.0"), batch="B1", product="widget", station="st1",
             test_outcome="PASS")
    if password is not None:
        b["broker"] = {"client_id": f"dev-{ident['serial']}", "username": ident["serial"], "password": password}
    return {**b, **extra}


@pytest.fixture(params=["sqlite", "mongo"])
def storage(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ProvisioningStorage]:
    """Each backend in turn, empty; MongoDB: a database of this test's own on the session's mongod."""
    if request.param == "sqlite":
        s: Any = SqliteStorage.open(tmp_path / "provisioning.sqlite")
    else:
        s = MongoStorage.open(request.getfixturevalue("mongo"))
    try:
        yield s
    finally:
        s.close()


def stored_requests(storage: ProvisioningStorage) -> list[dict[str, Any]]:
    """Every kept registration (one per idempotency key), read around the code under test."""
    if isinstance(storage, SqliteStorage):
        import sqlite3

        conn = sqlite3.connect(storage.path)
        conn.row_factory = sqlite3.Row
        try:
            return [dict(r) for r in conn.execute("SELECT * FROM provisioning_requests")]
        finally:
            conn.close()
    assert isinstance(storage, MongoStorage)
    db = database(storage.settings)
    try:
        return [{**r, "serial": d["serial"]} for d in db.provisioned_devices.find() for r in d["requests"]]
    finally:
        db.client.close()


def stored_bytes(storage: ProvisioningStorage) -> bytes:
    """Everything the backend wrote: the SQLite file and its WAL, or every document as BSON."""
    if isinstance(storage, SqliteStorage):
        return b"".join(p.read_bytes() for p in storage.path.parent.glob(storage.path.name + "*"))
    assert isinstance(storage, MongoStorage)
    db = database(storage.settings)
    try:
        return b"".join(bson.encode(d) for d in db.provisioned_devices.find())
    finally:
        db.client.close()


class FaultyMiddleware:
    """Wraps the real app; does to each ``POST /v1/devices`` what ``script`` says, per idempotency key.

    The n-th request with a key gets ``script[n]`` (then ``ok``): ``ok``
    passes it on; ``fail`` answers 500 without the app seeing it; ``lose``
    lets the app register it, then answers 500 (a response lost on the way
    back); ``slow`` waits ``slow_s`` before the app sees it.
    """

    def __init__(self, app: Any, script: tuple[str, ...] = (), slow_s: float = 0.0) -> None:
        self.app = app
        self.script = script
        self.slow_s = slow_s
        self.seen: dict[str, int] = {}

    @property
    def posts(self) -> int:
        return sum(self.seen.values())

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        key = dict(scope["headers"]).get(b"idempotency-key", b"").decode()
        n = self.seen.get(key, 0)
        self.seen[key] = n + 1
        action = self.script[n] if n < len(self.script) else "ok"
        if action == "slow":
            await trio.sleep(self.slow_s)
        if action in ("ok", "slow"):
            return await self.app(scope, receive, send)
        if action == "lose":
            async def swallow(message: dict[str, Any]) -> None:
                pass

            await self.app(scope, receive, swallow)
        await send({"type": "http.response.start", "status": 500,
                    "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": b'{"error": "injected fault"}'})


@asynccontextmanager
async def serving(storage: ProvisioningStorage, **faults: Any) -> AsyncIterator[tuple[str, FaultyMiddleware]]:
    app = FaultyMiddleware(create_app(storage), **faults)
    async with serve_provisioning(app) as url:
        yield url, app


def identify_phase(identities: Mapping[int, Mapping[str, str]]) -> Phase:
    @phase(name="identify")
    async def identify(ctx, slot):
        ctx.identify(**identities[slot.index])

    return identify


@attrs.frozen
class Broker:
    client_id: str
    username: str
    password: str = attrs.field(repr=False)


@attrs.frozen
class DeviceConfig:
    """Stands in for fixtures/nvs.py's per-slot device configuration: only ``.broker`` is read."""

    broker: Broker | None


def widget(url: str, identities: Mapping[int, Mapping[str, str]], *, passwords: Mapping[int, str] | None = None,
           **client: Any) -> Product:
    """identify -> register; with ``passwords``, a ``device_config`` fixture carries broker credentials."""
    ident = identify_phase(identities)
    reg = register_phase(url, device_config=passwords is not None, **{**BRISK, **client}).depends_on(ident)
    fixtures: dict[str, Any] = {}
    if passwords is not None:
        @asynccontextmanager
        async def device_config(slot: Any) -> AsyncIterator[DeviceConfig]:
            n = slot.index
            yield DeviceConfig(Broker(f"dev-{identities[n]['serial']}", identities[n]["serial"], passwords[n]))

        fixtures["device_config"] = device_config
    return Product("widget", [ident, reg], fixtures=fixtures)


def register_record(run: RunRecord) -> Any:
    rec = run.phase("register")
    assert rec is not None
    return rec


def values(run: RunRecord) -> dict[str, Any]:
    return {m.name: m.value for m in register_record(run).attempts[-1].measurements}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- the service, over HTTP ---------------------------------------------------------


async def test_create_then_retry_same_key_is_the_same_device_and_no_second_row(
        storage: ProvisioningStorage) -> None:
    ident = identity(1)
    async with serving(storage) as (url, _), httpx.AsyncClient(base_url=url) as http:
        headers = {"Idempotency-Key": "key-one-00000001"}
        first = await http.post("/v1/devices", json=body(ident), headers=headers)
        again = await http.post("/v1/devices", json=body(ident), headers=headers)
        shown = await http.get(f"/v1/devices/{ident['serial']}")
        health = await http.get("/healthz")
    assert first.status_code == 201
    created = first.json()
    assert created["created"] is True and created["replayed"] is False
    assert again.status_code == 201 and again.headers["Idempotent-Replayed"] == "true"
    assert again.json() == {**created, "replayed": True}
    import re

    assert re.fullmatch(CLAIM_PATTERN, created["claim_code"])
    assert await storage.count_devices() == 1
    assert len(stored_requests(storage)) == 1
    device = shown.json()
    assert device["device_id"] == created["device_id"] and device["claim_code"] == created["claim_code"]
    assert device["mac"] == ident["mac"] and device["public_key_sha256"] == public_key_fingerprint(
        ident["public_key"])
    assert device["broker"] == {"client_id": f"dev-{ident['serial']}", "username": ident["serial"]}
    assert "password" not in shown.text and "scrypt" not in shown.text
    assert health.status_code == 200 and health.json()["status"] == "ok"


async def test_same_key_with_a_different_body_is_422_and_changes_nothing(storage: ProvisioningStorage) -> None:
    ident = identity(2)
    async with serving(storage) as (url, _), httpx.AsyncClient(base_url=url) as http:
        headers = {"Idempotency-Key": "key-two-00000002"}
        first = await http.post("/v1/devices", json=body(ident), headers=headers)
        other_fw = await http.post("/v1/devices", json=body(ident, firmware_version="9.9.9"), headers=headers)
        # The password is not in the fingerprint, but a different one under the same key is still caught.
        other_pw = await http.post("/v1/devices", json=body(ident, password="another-password"), headers=headers)
        missing_key = await http.post("/v1/devices", json=body(ident))
        bad = await http.post("/v1/devices", json=body(ident, mac="not-a-mac"), headers={"Idempotency-Key": "k" * 20})
    assert first.status_code == 201
    assert other_fw.status_code == 422 and "different request" in other_fw.json()["error"]
    assert other_pw.status_code == 422
    assert "another-password" not in other_pw.text
    assert missing_key.status_code == 400 and "Idempotency-Key" in missing_key.json()["error"]
    assert bad.status_code == 400 and bad.json()["error"].startswith("mac:")
    assert await storage.count_devices() == 1 and len(stored_requests(storage)) == 1


async def test_serial_with_another_mac_or_key_is_409_registered_elsewhere(storage: ProvisioningStorage) -> None:
    ident = identity(3)
    async with serving(storage) as (url, _), httpx.AsyncClient(base_url=url) as http:
        await http.post("/v1/devices", json=body(ident), headers={"Idempotency-Key": "station-a-00000003"})
        other_mac = await http.post("/v1/devices", json=body({**ident, "mac": "02:00:00:00:00:99"}, station="st9"),
                                    headers={"Idempotency-Key": "station-b-00000003"})
        other_key = await http.post("/v1/devices", json=body({**ident, "public_key": public_key()}),
                                    headers={"Idempotency-Key": "station-c-00000003"})
    assert other_mac.status_code == 409
    assert other_mac.json()["error"].startswith(f"serial {ident['serial']} is registered elsewhere with a "
                                                "different MAC")
    assert other_mac.json()["conflict"] == ["mac"]
    assert other_key.status_code == 409 and other_key.json()["conflict"] == ["public_key"]
    assert await storage.count_devices() == 1
    assert len(stored_requests(storage)) == 1  # refusals are not kept under their keys


async def test_a_board_registered_once_cannot_come_back_under_another_serial(storage: ProvisioningStorage) -> None:
    ident = identity(4)
    async with serving(storage) as (url, _), httpx.AsyncClient(base_url=url) as http:
        first = await http.post("/v1/devices", json=body(ident), headers={"Idempotency-Key": "station-a-00000004"})
        misread = await http.post("/v1/devices", json=body({**ident, "serial": "SN999999999"}),
                                  headers={"Idempotency-Key": "station-a-00000005"})
    assert first.status_code == 201
    assert misread.status_code == 409 and misread.json()["conflict"] == ["serial"]
    assert misread.json()["error"].startswith(f"MAC {ident['mac']} is already registered as serial {ident['serial']}")
    assert await storage.count_devices() == 1


async def test_malformed_bodies_are_400_or_413_never_500_and_never_read_whole(storage: ProvisioningStorage) -> None:
    from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

    def pem(key: Any) -> str:
        return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()

    unknown_algorithm = (  # a SubjectPublicKeyInfo with the made-up algorithm OID 1.2.3.4
        "-----BEGIN PUBLIC KEY-----\nMBIwBwYDKgMEBQADBwAEAQIDBAU=\n-----END PUBLIC KEY-----\n"
    )
    keys = {
        "RSA": pem(rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key()),
        "Ed25519": pem(ed25519.Ed25519PrivateKey.generate().public_key()),
        "P-384": pem(ec.generate_private_key(ec.SECP384R1()).public_key()),
        "unknown algorithm": unknown_algorithm,
    }
    async with serving(storage) as (url, _), httpx.AsyncClient(base_url=url) as http:
        for n, (name, key) in enumerate(keys.items()):
            reply = await http.post("/v1/devices", json=body(identity(50 + n, key=key)),
                                    headers={"Idempotency-Key": f"station-a-0000005{n}"})
            assert reply.status_code == 400, name
            assert reply.json()["error"].startswith("public_key: not"), name
        for n, bad in enumerate([{"product": "\ud800"}, {"broker": {"client_id": "c", "username": "u",
                                                                      "password": "pw\ud800"}}]):
            raw = json.dumps(body(identity(60 + n), **bad))  # the JSON escape of a lone surrogate
            reply = await http.post("/v1/devices", content=raw, headers={
                "Idempotency-Key": f"station-a-0000006{n}", "Content-Type": "application/json"})
            assert reply.status_code == 400 and "not valid Unicode text" in reply.json()["error"]
            assert "ud800" not in reply.text.lower().replace("\\ud800", "")  # nothing quoted back
        # 64 MiB announced, a few bytes sent: refused on the header, before any of it is waited for.
        host, port = httpx.URL(url).host, httpx.URL(url).port
        async with await trio.open_tcp_stream(host, port) as raw:
            await raw.send_all(b"POST /v1/devices HTTP/1.1\r\nHost: x\r\nIdempotency-Key: station-a-00000070\r\n"
                               b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n{" % (64 << 20))
            with trio.fail_after(5):
                head = await raw.receive_some(4096)
        declared_status = int(head.split(b" ", 2)[1])

        async def streamed() -> AsyncIterator[bytes]:
            for _ in range(1024):  # 64 MiB, chunked: no length announced
                yield b" " * 65536

        chunked = await http.post("/v1/devices", content=streamed(), headers={"Idempotency-Key": "station-a-00000071"})
    assert declared_status == 413 and chunked.status_code == 413
    assert await storage.count_devices() == 0


async def test_concurrent_identical_requests_create_one_device(storage: ProvisioningStorage) -> None:
    """The race the retry storm relies on: the same key twelve times at once, and one device."""
    ident = identity(4)
    answers: list[httpx.Response] = []
    # twelve at once queue for the password hashing (a thread per core): more than httpx's 5 s on a busy machine
    async with serving(storage) as (url, _), httpx.AsyncClient(base_url=url, timeout=60) as http:
        async def post() -> None:
            answers.append(await http.post("/v1/devices", json=body(ident),
                                           headers={"Idempotency-Key": "storm-key-00000004"}))

        async with trio.open_nursery() as nursery:
            for _ in range(12):
                nursery.start_soon(post)
    assert {a.status_code for a in answers} == {201}
    assert len({a.json()["device_id"] for a in answers}) == 1
    assert sum(not a.json()["replayed"] for a in answers) == 1
    assert await storage.count_devices() == 1 and len(stored_requests(storage)) == 1


async def test_a_retry_after_the_client_gave_up_gets_the_first_requests_answer(storage: ProvisioningStorage) -> None:
    # Under a burst, requests queue for the hashing threads and a client times out.
    hashing = trio.CapacityLimiter(1)
    busy = object()
    await hashing.acquire_on_behalf_of(busy)  # every hashing thread busy
    request = body(identity(5))
    async with serve_provisioning(create_app(storage, hashing=hashing)) as url:
        async with httpx.AsyncClient(base_url=url, timeout=0.5) as http:
            with pytest.raises(httpx.ReadTimeout):
                await http.post("/v1/devices", json=request, headers={"Idempotency-Key": "gave-up-00000005"})
        hashing.release_on_behalf_of(busy)
        async with httpx.AsyncClient(base_url=url, timeout=30) as http:
            retried = await http.post("/v1/devices", json=request, headers={"Idempotency-Key": "gave-up-00000005"})
    assert retried.status_code == 201 and retried.json()["replayed"] is True  # the first one's device
    assert await storage.count_devices() == 1


async def test_a_retry_while_the_first_request_is_worked_on_gets_its_answer_without_hashing_again() -> None:
    from web.provisioning.app import _InFlight
    from web.provisioning.model import Reply

    ident = identity(6)
    first = RegistrationRequest.parse(body(ident))
    in_flight = _InFlight()
    answers: list[Reply | None] = []

    async def retry(req: RegistrationRequest) -> None:
        answers.append(await in_flight.earlier_answer("key-00000006", req))

    assert await in_flight.earlier_answer("key-00000006", first) is None  # nothing in flight
    async with trio.open_nursery() as nursery:
        with in_flight.working("key-00000006", first) as pending:
            nursery.start_soon(retry, RegistrationRequest.parse(body(ident)))
            nursery.start_soon(retry, RegistrationRequest.parse(body(ident, password="another-password")))
            await trio.testing.wait_all_tasks_blocked()
            assert answers == []  # they wait for the first
            pending.reply = Reply(201, {"device_id": "D1", "replayed": False})
    same, other = sorted(answers, key=lambda a: a is None)
    assert same == Reply(201, {"device_id": "D1", "replayed": True}, replayed=True)
    assert other is None  # another password under the key: the rules decide (a 422)
    assert await in_flight.earlier_answer("key-00000006", first) is None  # it holds only what is in progress


# -- the phase against the service --------------------------------------------------


async def test_phase_registers_and_a_retest_gets_the_same_device(storage: ProvisioningStorage,
                                                                 store_path: Path) -> None:
    idents = {0: identity(10)}
    async with serving(storage) as (url, app):
        [first] = await run_product(widget(url, idents), store_path)
        [retest] = await run_product(widget(url, idents), store_path)
    assert first.outcome is Outcome.PASS, register_record(first).reason
    assert retest.outcome is Outcome.PASS, register_record(retest).reason
    got = values(first)
    assert got["registration"] == "registered" and got["registration_kind"] == "new"
    assert first.dut["device_id"] == got["device_id"] and first.dut["claim_code"] == got["claim_code"]
    again = values(retest)
    assert again["registration_kind"] == "retest"
    assert (again["device_id"], again["claim_code"]) == (got["device_id"], got["claim_code"])
    assert retest.dut["claim_code"] == got["claim_code"]
    assert app.posts == 2  # one request per run, no retries needed
    assert await storage.count_devices() == 1
    keys = {r["key"] for r in stored_requests(storage)}
    assert keys == {idempotency_key(first.run_id, "SN000000010"), idempotency_key(retest.run_id, "SN000000010")}
    device = await storage.get_device("SN000000010")
    assert device is not None and device.registrations == 2 and device.station == "test-station"
    assert device.batch == "B1" and device.test_outcome == "PASS" and device.firmware_version == "1.4.2"
    assert device.broker_client_id is None  # the product has no device_config: no broker block


async def test_phase_fails_clearly_when_the_serial_is_registered_elsewhere(
        storage: ProvisioningStorage, store_path: Path) -> None:
    async with serving(storage) as (url, app):
        [first] = await run_product(widget(url, {0: identity(11)}), store_path)
        [clash] = await run_product(widget(url, {0: identity(11, mac="24:6F:28:AA:BB:CC")}), store_path)
    assert first.outcome is Outcome.PASS
    assert clash.outcome is Outcome.FAIL
    reason = register_record(clash).reason
    assert "serial SN000000011 is registered elsewhere with a different MAC" in reason, reason
    assert app.seen[idempotency_key(clash.run_id, "SN000000011")] == 1  # a 409 is not retried
    assert "device_id" not in clash.dut


async def test_phase_fails_after_retries_when_nothing_listens(store_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    [run] = await run_product(widget(url, {0: identity(12)}, retries=2), store_path)
    rec = register_record(run)
    assert run.outcome is Outcome.FAIL and rec.outcome is Outcome.FAIL
    assert f"provisioning service unreachable at {url} after 3 attempt(s)" in rec.reason, rec.reason
    assert sum("retrying" in line.message for line in rec.logs) == 2


async def test_slow_service_is_retried_then_fails_clearly(storage: ProvisioningStorage, store_path: Path) -> None:
    async with serving(storage, script=("slow",) * 3, slow_s=0.8) as (url, app):
        [run] = await run_product(widget(url, {0: identity(13)}, timeout=0.25, retries=2), store_path)
    reason = register_record(run).reason
    assert run.outcome is Outcome.FAIL
    assert f"provisioning service unreachable at {url} after 3 attempt(s) (last: no answer within 0.25 s)" in reason
    assert app.posts == 3


async def test_slow_then_answering_service_gives_one_device(storage: ProvisioningStorage, store_path: Path) -> None:
    """The first request reaches the app only after the client gave up on it: it and the retry race."""
    async with serving(storage, script=("slow",), slow_s=1.2) as (url, app):
        [run] = await run_product(widget(url, {0: identity(14)}, timeout=1.0), store_path)
        await trio.sleep(1.3)  # let the abandoned first request reach the app too
    assert run.outcome is Outcome.PASS, register_record(run).reason
    assert app.posts >= 2
    assert await storage.count_devices() == 1 and len(stored_requests(storage)) == 1


@pytest.mark.parametrize("fault", ["fail", "lose"])
async def test_a_500_once_then_success_gives_exactly_one_device(storage: ProvisioningStorage, store_path: Path,
                                                                fault: str) -> None:
    """``fail``: the app never saw the first request. ``lose``: it registered, the answer was lost."""
    async with serving(storage, script=(fault,)) as (url, app):
        [run] = await run_product(widget(url, {0: identity(15)}), store_path)
    assert run.outcome is Outcome.PASS, register_record(run).reason
    assert app.posts == 2
    assert values(run)["registration_kind"] == "new"  # the replayed answer of the lost creation
    assert await storage.count_devices() == 1 and len(stored_requests(storage)) == 1


async def test_twenty_devices_through_a_retry_storm_are_exactly_twenty(storage: ProvisioningStorage,
                                                                       store_path: Path) -> None:
    """Each key: a request delayed past the client's timeout, then a lost answer, then the replay."""
    idents = {n: identity(100 + n) for n in range(20)}
    async with serving(storage, script=("slow", "lose"), slow_s=1.2) as (url, app):
        runs = await run_product(widget(url, idents, timeout=1.0, retries=5), store_path, slots=20)
        await trio.sleep(1.3)  # the abandoned slow requests land too
    assert [r.outcome for r in runs] == [Outcome.PASS] * 20, [register_record(r).reason for r in runs]
    # At least: the slow one, the lost one, the replay (more if a loaded machine made one time out).
    assert all(n >= 3 for n in app.seen.values()) and len(app.seen) == 20
    assert await storage.count_devices() == 20
    kept = stored_requests(storage)
    assert len(kept) == 20 and {r["serial"] for r in kept} == {i["serial"] for i in idents.values()}
    assert len({values(r)["device_id"] for r in runs}) == 20
    assert len({values(r)["claim_code"] for r in runs}) == 20


async def test_the_broker_password_is_only_ever_a_hash(storage: ProvisioningStorage, store_path: Path,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    """Not in the database (only its scrypt hash), the run record, the station's store, any log, any answer."""
    password = "pw-Zq8vN3kT7yXw2-UNIQUE"
    events: list[dict[str, Any]] = []

    def keep(_: Any, __: str, event: dict[str, Any]) -> str:
        events.append(dict(event))
        return json.dumps(event, default=str)

    structlog.configure(processors=[keep], wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG),
                        logger_factory=structlog.ReturnLoggerFactory(), cache_logger_on_first_use=False)
    caplog.set_level(logging.DEBUG)
    idents = {0: identity(20)}
    async with serving(storage, script=("lose",)) as (url, _):
        [run] = await run_product(widget(url, idents, passwords={0: password}), store_path)
        [retest] = await run_product(widget(url, idents, passwords={0: password + "-rotated"}), store_path)
        async with httpx.AsyncClient(base_url=url) as http:
            shown = (await http.get("/v1/devices/SN000000020")).text
    assert run.outcome is Outcome.PASS and retest.outcome is Outcome.PASS
    assert any(e.get("event") == "registration" for e in events)  # the server's log was captured too
    assert any(e.get("event") == "registered" for e in events)
    device = await storage.get_device("SN000000020")
    assert device is not None and device.broker_username == "SN000000020"
    assert device.broker_password_hash.startswith("scrypt$")
    assert verify_secret(password + "-rotated", device.broker_password_hash)  # the retest's credentials
    secret = password.encode()
    assert secret not in stored_bytes(storage)
    assert all(secret not in json.dumps(r, default=str).encode() for r in stored_requests(storage))
    for r in (run, retest):
        assert password not in run_to_json(r)
    assert all(secret not in p.read_bytes() for p in store_path.parent.glob(store_path.name + "*"))
    assert password not in json.dumps(events, default=str)
    assert password not in caplog.text
    assert password not in shown and "password" not in shown


# -- pieces ---------------------------------------------------------------------------


async def test_client_tells_registered_elsewhere_and_unavailable_apart(storage: ProvisioningStorage) -> None:
    ident = identity(30)
    async with serving(storage) as (url, app), ProvisioningClient(url, **BRISK) as client:
        made = await client.register(body(ident), "client-key-0000030")
        with pytest.raises(RegisteredElsewhere, match="registered elsewhere with a different MAC"):
            await client.register(body({**ident, "mac": "02:00:00:00:00:01"}), "client-key-0000031")
    assert made.created and not made.replayed and made.attempts == 1
    assert app.seen["client-key-0000031"] == 1
    async with serving(storage, script=("fail",) * 2) as (url, app):
        async with ProvisioningClient(url, timeout=2.0, retries=1, backoff=0.01) as client:
            with pytest.raises(ProvisioningUnavailable, match=r"still failing after 2 attempt\(s\).*HTTP 500"):
                await client.register(body(identity(31)), "client-key-0000032")
    assert await storage.get_device("SN000000031") is None


def test_request_validation_and_fingerprint() -> None:
    ident = identity(40)
    req = RegistrationRequest.parse(body({**ident, "mac": "24-6f-28-00-00-28"}))
    assert req.mac == "24:6F:28:00:00:28"
    assert req.public_key_sha256 == public_key_fingerprint(ident["public_key"])
    assert "password" not in repr(req)
    same = RegistrationRequest.parse(body({**ident, "mac": "246F28000028"}, password="other"))
    assert req.fingerprint() == same.fingerprint()  # the password is not part of it...
    assert req.fingerprint() != RegistrationRequest.parse(body(ident, password=None)).fingerprint()  # ...its presence is
    for bad, field in [({"serial": "SN 1"}, "serial"), ({"public_key": "x"}, "public_key"),
                       ({"public_key_sha256": "0" * 64}, "public_key_sha256"), ({"seriall": "x"}, "unknown"),
                       ({"test_outcome": "GREAT"}, "test_outcome"), ({"imei": "12"}, "imei"),
                       ({"imei": "\u0663" * 15}, "imei")]:  # Arabic-Indic digits are digits to \\d, not an IMEI
        with pytest.raises(ValueError, match=field):
            RegistrationRequest.parse({**body(ident), **bad})
    with pytest.raises(ValueError) as info:
        RegistrationRequest.parse(body(ident, password="x" * 2000))
    assert "xxxx" not in str(info.value)  # a secret is never quoted back


def test_idempotency_key_is_per_run_and_serial() -> None:
    assert idempotency_key("run1", "SN1") == idempotency_key("run1", "SN1")
    assert idempotency_key("run1", "SN1") != idempotency_key("run2", "SN1")
    assert idempotency_key("run1", "SN1") != idempotency_key("run1", "SN2")


def test_registration_body_from_the_identity_and_the_device_config() -> None:
    ident = identity(45)
    plain = registration_body(ident, product="widget", station="st1", batch="B7", test_outcome="PASS",
                              broker=_broker_of(DeviceConfig(None)))
    assert "broker" not in plain  # a device_config without broker credentials: no broker block
    assert plain["firmware_version"] == "1.4.2" and plain["batch"] == "B7" and plain["serial"] == ident["serial"]
    RegistrationRequest.parse(plain)  # what the phase sends, the service accepts
    with_broker = registration_body(ident, product="widget",
                                    broker=_broker_of({"broker": {"client_id": "c", "username": "u", "password": "p"}}))
    assert with_broker["broker"] == {"client_id": "c", "username": "u", "password": "p"}
    assert "password" not in repr(_broker_of({"broker": {"client_id": "c", "username": "u", "password": "p"}}))
    with pytest.raises(ProvisioningError, match="no mac, public_key"):
        registration_body({"serial": "SN1"}, product="widget")
    assert display_url("http://svc:pw@host:8080/x") == "http://***@host:8080/x"
    assert display_url("http://host:8080") == "http://host:8080"


async def test_phase_without_a_url_fails_saying_how_to_configure_it(store_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SEQUENCER_PROVISIONING_URL", raising=False)
    station = station_fixtures(StationConfig(), station_services(StationConfig()))
    [run] = await run_product(widget(None, {0: identity(50)}), store_path, fixtures=station)  # type: ignore[arg-type]
    assert run.outcome is Outcome.ERROR
    assert "[provisioning] url" in register_record(run).reason
    assert "SEQUENCER_PROVISIONING_URL" in register_record(run).reason


async def test_phase_uses_the_station_service_named_by_the_environment(
    storage: ProvisioningStorage, store_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with serving(storage) as (url, _):
        monkeypatch.setenv("SEQUENCER_PROVISIONING_URL", url)
        station = station_fixtures(StationConfig(), station_services(StationConfig()))
        [run] = await run_product(widget(None, {0: identity(51)}), store_path, fixtures=station)  # type: ignore[arg-type]
    assert run.outcome is Outcome.PASS, register_record(run).reason


async def test_every_slot_of_a_round_shares_one_tls_context_made_off_the_stations_thread() -> None:
    # Each client making its own loaded the CA certificates in the station's
    # one thread: 20-300 ms a slot, twice a unit, while no slot read its port.
    import ssl

    from sequencer.fixtures import SlotInfo

    factory = station_fixtures(StationConfig(provisioning_url="https://provisioning.line1.example"))["provisioning"]
    async with factory(SlotInfo(0, "/dev/ttyUSB0", "t")) as first, factory(SlotInfo(1, "/dev/ttyUSB1", "t")) as second:
        assert first.url == "https://provisioning.line1.example"
        assert isinstance(first.tls, ssl.SSLContext) and first.tls is second.tls
        assert first.tls.verify_mode == ssl.CERT_REQUIRED and first.tls.check_hostname  # verified, as before
    async with station_fixtures(StationConfig(provisioning_url="http://x"))["provisioning"](
        SlotInfo(0, "/dev/ttyUSB0", "t")
    ) as next_round:
        assert next_round.tls is not first.tls  # made per round: nothing lasts longer than it


def test_provision_server_command(tmp_path: Path) -> None:
    """The command as the operator runs it: prints its URL, serves, stops on Ctrl-C with 130."""
    import argparse

    parser = argparse.ArgumentParser(prog="sequencer")
    add_provision_commands(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["provision-server", "--port", "0", "--db", str(tmp_path / "p.sqlite")])
    assert (args.host, args.port, args.mongo, args.db) == ("127.0.0.1", 0, None, tmp_path / "p.sqlite")
    code = ("import argparse, sys; from web.provisioning.cli import add_provision_commands, cmd_provision_server;"
            "p = argparse.ArgumentParser(); add_provision_commands(p.add_subparsers(dest='command'));"
            "sys.exit(cmd_provision_server(p.parse_args(sys.argv[1:])))")
    env = {k: v for k, v in os.environ.items() if k != "SEQUENCER_MONGO_URI"}
    proc = subprocess.Popen([sys.executable, "-c", code, "provision-server", "--port", "0", "--db",
                             str(tmp_path / "p.sqlite")], cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stderr is not None
        for line in proc.stderr:
            if line.startswith("provisioning service on "):
                url = line.split()[3]
                break
        else:
            pytest.fail("the server never said where it listens")
        health = httpx.get(f"{url}/healthz", timeout=5)
        assert health.status_code == 200 and health.json()["storage"] == f"sqlite:{tmp_path / 'p.sqlite'}"
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=10) == 130
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()
    (tmp_path / "a-file").write_text("")
    bad_db = tmp_path / "a-file" / "p.sqlite"
    with pytest.raises(ConfigError, match=f"^provision-server: cannot open the database {bad_db}: "):
        cmd_provision_server(parser.parse_args(["provision-server", "--port", "0", "--db", str(bad_db)]))
