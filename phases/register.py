"""Register the tested device with the provisioning service: a device id and a claim code for its label.

The ``register`` phase sends the DUT's identity (serial, MAC, IMEI, IMSI,
ICCID, public key, firmware version), the run's product, station, batch and
outcome so far, and - when the product provides a ``device_config`` fixture
- the broker credentials the device was provisioned with, to
``POST /v1/devices`` of the provisioning service (``web/provisioning/``,
``docs/provisioning.md``). It records the ``device_id`` and ``claim_code``
the service answers as measurements and in the DUT identity (the claim code
is not a secret: it goes on the label).

Retrying is safe because every request carries an ``Idempotency-Key``
derived from the run id and the serial: the client's own retries (connection
refused, a timeout, a 5xx) and a retried phase attempt reuse it, so the
service answers them with the device it already created; a retest is a new
run, hence a new key, and the service recognises the unit by its serial, MAC
and public key and returns the same device. A serial the service knows with
another MAC or key is a FAIL ("registered elsewhere"), never retried.

The broker password is sent and nothing else: it is not logged, not measured,
not attached, not in any error message.

A product wires it up::

    from phases.register import register_phase

    register = register_phase(device_config=True).depends_on(write_nvs)
"""

from __future__ import annotations

import hashlib
import random
import ssl
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Protocol
from urllib.parse import quote, urlsplit, urlunsplit

import attrs
import httpx
import trio

from web.provisioning.model import CLAIM_PATTERN
from sequencer import Measurement, phase
from sequencer.phase import Phase
from sequencer.records import run_outcome

__all__ = [
    "BrokerCredentials",
    "DeviceConfig",
    "ProvisioningClient",
    "ProvisioningError",
    "ProvisioningUnavailable",
    "RegisteredElsewhere",
    "RegistrationRefused",
    "RegistrationResult",
    "idempotency_key",
    "register",
    "register_phase",
    "registration_body",
    "ClientOptions",
    "display_url",
]

REGISTERED = "registered"


# -- what the phase needs from other modules ------------------------------------


class BrokerCredentials(Protocol):
    """The device's MQTT broker account (``fixtures/nvs.py`` writes it into the device's NVS)."""

    @property
    def client_id(self) -> str: ...

    @property
    def username(self) -> str: ...

    @property
    def password(self) -> str: ...


class DeviceConfig(Protocol):
    """What the phase reads from the ``device_config`` fixture: the slot's broker credentials, or None."""

    @property
    def broker(self) -> BrokerCredentials | None: ...


# -- the client -----------------------------------------------------------------


class ProvisioningError(Exception):
    """Registration did not succeed; the message is one line for the operator (never a secret)."""


class ProvisioningUnavailable(ProvisioningError):
    """No usable answer after every attempt: unreachable, too slow, or failing (5xx)."""


class RegisteredElsewhere(ProvisioningError):
    """409: the serial is registered with another MAC, public key or product. Not retried."""


class RegistrationRefused(ProvisioningError):
    """Another 4xx: the service refused the request (the message is the service's). Not retried."""


@attrs.frozen
class RegistrationResult:
    """The service's answer. ``created``: a new device (not a retest); ``replayed``: an earlier answer repeated."""

    device_id: str
    claim_code: str
    created: bool
    replayed: bool
    status: int
    attempts: int


class ProvisioningClient:
    """An HTTP client of the provisioning service that retries what is safe to retry.

    Each attempt is bounded by ``timeout`` seconds as a whole (connect, send,
    answer). Connection errors, timeouts, 5xx and 429 are retried up to
    ``retries`` times, waiting ``backoff`` seconds doubling to
    ``backoff_max``, each wait +-25 % so a line of stations that lost the
    service together does not come back in lockstep. That is safe only
    because every request carries an idempotency key: a retry of a request
    that did land gets the same answer, not a second device.

    Use as an async context manager (it owns an ``httpx.AsyncClient``).
    ``on_retry(attempt, reason, delay)`` is told about each retry. ``tls``
    is a TLS context to share (the station's, see
    :class:`fixtures.station.ProvisioningService`): a client that makes its
    own spends tens of milliseconds of CPU loading CA certificates.
    """

    def __init__(
        self,
        base_url: str,
        *,
        timeout: float = 5.0,
        retries: int = 3,
        backoff: float = 0.5,
        backoff_max: float = 5.0,
        on_retry: Callable[[int, str, float], None] | None = None,
        rng: random.Random | None = None,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        if timeout <= 0 or retries < 0 or backoff < 0:
            raise ValueError("timeout must be > 0, retries and backoff >= 0")
        self.base_url = base_url.rstrip("/")
        #: The URL as messages show it: without any user:password it may carry.
        self.shown_url = display_url(self.base_url)
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self.backoff_max = backoff_max
        self._on_retry = on_retry
        self._rng = rng or random.Random()
        self._http = httpx.AsyncClient(base_url=self.base_url, timeout=timeout, verify=tls if tls is not None else True,
                                       headers={"User-Agent": "sequencer-register/1"})

    async def __aenter__(self) -> ProvisioningClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    def delays(self) -> list[float]:
        """The nominal wait before each retry (without jitter)."""
        return _delays(self.retries, self.backoff, self.backoff_max)

    async def register(self, body: Mapping[str, Any], idempotency_key: str) -> RegistrationResult:
        """POST ``body`` to ``/v1/devices`` under ``idempotency_key``, retrying what is retryable."""
        response, attempt = await self._send(lambda: self._http.post(
            "/v1/devices", json=dict(body), headers={"Idempotency-Key": idempotency_key}))
        status = response.status_code
        if status in (200, 201):
            return _result(response, attempt)
        message = _message(response)
        if status == 409:
            raise RegisteredElsewhere(message)
        raise RegistrationRefused(f"provisioning service refused the registration (HTTP {status}): {message}")

    async def _send(self, request: Callable[[], Awaitable[httpx.Response]]) -> tuple[httpx.Response, int]:
        """Send until an answer that is not worth retrying; return it and the attempt that got it.

        Raises :class:`ProvisioningUnavailable` when every attempt failed to
        connect, timed out, or got 5xx/429.
        """
        attempts = self.retries + 1
        last = ""
        unreachable = True
        for attempt in range(1, attempts + 1):
            response: httpx.Response | None = None
            with trio.move_on_after(self.timeout) as scope:
                try:
                    response = await request()
                except httpx.UnsupportedProtocol:
                    raise ProvisioningError(f"provisioning service URL {self.shown_url!r} is not an http(s) URL") \
                        from None
                except httpx.TimeoutException:
                    last, unreachable = f"no answer within {self.timeout:g} s", True
                except httpx.TransportError as exc:
                    last, unreachable = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__, True
            if scope.cancelled_caught:
                last, unreachable = f"no answer within {self.timeout:g} s", True
            if response is not None:
                status = response.status_code
                if status != 429 and status < 500:
                    return response, attempt
                last, unreachable = f"HTTP {status}: {_message(response)}", False
            if attempt < attempts:
                delay = self.delays()[attempt - 1] * self._rng.uniform(0.75, 1.25)
                if self._on_retry is not None:
                    self._on_retry(attempt, last, delay)
                await trio.sleep(delay)
        if unreachable:
            raise ProvisioningUnavailable(f"provisioning service unreachable at {self.shown_url} after {attempts} "
                                          f"attempt(s) (last: {last})")
        raise ProvisioningUnavailable(f"provisioning service at {self.shown_url} still failing after {attempts} "
                                      f"attempt(s) (last: {last})")

    async def find_by_mac(self, mac: str) -> list[dict[str, Any]]:
        """The devices the service has registered with ``mac`` (no secrets); retried, as it changes nothing."""
        response, _ = await self._send(lambda: self._http.get("/v1/devices", params={"mac": mac}))
        if response.status_code != 200:
            raise RegistrationRefused(f"provisioning service refused the lookup of MAC {mac}: {_message(response)}")
        return [dict(d) for d in response.json()["devices"]]

    async def get_device(self, serial: str) -> dict[str, Any] | None:
        """The device the service has for ``serial`` (no secrets), or None. Not retried."""
        response = await self._http.get(f"/v1/devices/{quote(serial, safe='')}")
        if response.status_code == 404:
            return None
        response.raise_for_status()
        return dict(response.json())


def display_url(url: str) -> str:
    """``url`` without the ``user:password@`` part, for messages and logs."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc="***@" + parts.netloc.rsplit("@", 1)[1]))


def _delays(retries: int, backoff: float, backoff_max: float) -> list[float]:
    return [min(backoff * 2**i, backoff_max) for i in range(retries)]


@attrs.frozen
class ClientOptions:
    """How the phase's :class:`ProvisioningClient` waits and retries (fixed when the phase is declared)."""

    timeout: float = 5.0
    retries: int = 3
    backoff: float = 0.5
    backoff_max: float = 5.0

    def worst_case_s(self) -> float:
        """The longest :meth:`ProvisioningClient.register` can take: every attempt timing out, every wait longest."""
        return (self.retries + 1) * self.timeout + 1.25 * sum(_delays(self.retries, self.backoff, self.backoff_max))

    def client(self, base_url: str, on_retry: Callable[[int, str, float], None] | None = None,
               tls: ssl.SSLContext | None = None) -> ProvisioningClient:
        return ProvisioningClient(base_url, timeout=self.timeout, retries=self.retries, backoff=self.backoff,
                                  backoff_max=self.backoff_max, on_retry=on_retry, tls=tls)


def _message(response: httpx.Response) -> str:
    """The service's one-line error (``{"error": ...}``), else the start of the body."""
    try:
        data = response.json()
    except ValueError:
        data = None
    text = data.get("error") if isinstance(data, dict) and isinstance(data.get("error"), str) else response.text
    text = " ".join(str(text).split())
    return text[:500] or response.reason_phrase


def _result(response: httpx.Response, attempts: int) -> RegistrationResult:
    try:
        data = response.json()
        return RegistrationResult(device_id=str(data["device_id"]), claim_code=str(data["claim_code"]),
                                  created=bool(data.get("created")), replayed=bool(data.get("replayed")),
                                  status=response.status_code, attempts=attempts)
    except (ValueError, KeyError, TypeError):
        raise ProvisioningError(f"provisioning service answered HTTP {response.status_code} without a device_id "
                                "and claim_code") from None


# -- the request ----------------------------------------------------------------


def idempotency_key(run_id: str, serial: str) -> str:
    """The key of a run's registration of ``serial``: the same for every retry in the run, new for a retest."""
    return hashlib.sha256(f"sequencer-register\x00{run_id}\x00{serial}".encode()).hexdigest()


#: DUT identity keys the body takes, with the identity names they may come under (first found wins).
_IDENTITY = {
    "serial": ("serial",),
    "mac": ("mac",),
    "imei": ("imei",),
    "imsi": ("imsi",),
    "iccid": ("iccid",),
    "public_key": ("public_key",),
    "public_key_sha256": ("public_key_sha256",),
    "firmware_version": ("firmware_version", "firmware"),
}
_REQUIRED = ("serial", "mac", "public_key")


def registration_body(
    dut: Mapping[str, str],
    *,
    product: str,
    station: str = "",
    batch: str = "",
    test_outcome: str | None = None,
    broker: BrokerCredentials | None = None,
) -> dict[str, Any]:
    """The ``POST /v1/devices`` body for a DUT identity. Raises ProvisioningError naming missing fields."""
    body: dict[str, Any] = {}
    for field, names in _IDENTITY.items():
        value = next((dut[n] for n in names if dut.get(n)), None)
        if value is not None:
            body[field] = value
    missing = [f for f in _REQUIRED if f not in body]
    if missing:
        raise ProvisioningError(f"the DUT identity has no {', '.join(missing)}: a phase before this one must "
                                "identify the device (ctx.identify)")
    body["product"] = product
    if station:
        body["station"] = station
    if batch:
        body["batch"] = batch
    if test_outcome:
        body["test_outcome"] = test_outcome
    if broker is not None:
        body["broker"] = {"client_id": broker.client_id, "username": broker.username, "password": broker.password}
    return body


def _broker_of(config: Any) -> BrokerCredentials | None:
    """``config.broker`` of the ``device_config`` fixture (an object or a mapping), or None."""
    if config is None:
        return None
    broker = config.get("broker") if isinstance(config, Mapping) else getattr(config, "broker", None)
    if isinstance(broker, Mapping):
        return _Broker(str(broker["client_id"]), str(broker["username"]), str(broker["password"]))
    return broker


@attrs.frozen
class _Broker:
    client_id: str
    username: str
    password: str = attrs.field(repr=False)


# -- the phase ------------------------------------------------------------------


REGISTER_MEASUREMENTS = [
    # First, so that when registration fails its message is the phase's reason.
    Measurement("registration").reported(REGISTERED)
    .doc("'registered', or why not (unreachable, registered elsewhere, refused)"),
    Measurement("device_id").matches(r"\S{1,128}").doc("the device's id at the provisioning service"),
    Measurement("claim_code").matches(CLAIM_PATTERN).doc("claim code for the label (not a secret)"),
    Measurement("registration_kind").one_of(["new", "retest"])
    .doc("'new': first registration of this serial; 'retest': the device it already had"),
]


def register_phase(
    base_url: str | None = None,
    *,
    device_config: bool = False,
    name: str = "register",
    timeout: float = 5.0,
    retries: int = 3,
    backoff: float = 0.5,
    backoff_max: float = 5.0,
) -> Phase:
    """A phase that registers the DUT with the provisioning service at ``base_url``.

    ``base_url`` None: the station's service, from the ``provisioning``
    fixture (``[provisioning] url``, ``$SEQUENCER_PROVISIONING_URL``, or the
    simulated station's own), so a product file stays station-independent.
    ``device_config``: ask
    for the ``device_config`` fixture and send its ``.broker`` credentials
    (no broker block when it is None); leave it False for a product without
    that fixture - the engine injects only fixtures a phase names, and a
    product must provide every fixture its phases name.

    ``timeout``/``retries``/``backoff`` configure the client
    (:class:`ProvisioningClient`); the phase's own timeout is set above the
    client's worst case so that the phase ends with the client's clear
    reason, not an anonymous TIMEOUT. The phase itself is not retried: the
    client already retried everything worth retrying.
    """
    options = ClientOptions(timeout=timeout, retries=retries, backoff=backoff, backoff_max=backoff_max)
    phase_timeout = options.worst_case_s() + 10.0

    # The station says where the service is (the ``provisioning`` fixture,
    # fixtures/station.py) unless the product pins a URL.
    if device_config and base_url is None:

        @phase(name=name, measurements=REGISTER_MEASUREMENTS, timeout=phase_timeout)
        async def register_at_station_service_with_config(ctx, provisioning, device_config):
            """Register the device with the station's provisioning service, with the broker credentials of ``device_config``."""
            await _register(ctx, provisioning.url, _broker_of(device_config), options, provisioning.tls)

        return register_at_station_service_with_config

    if device_config:

        @phase(name=name, measurements=REGISTER_MEASUREMENTS, timeout=phase_timeout)
        async def register_with_config(ctx, device_config):
            """Register the device, with the broker credentials of ``device_config``; record id and claim code."""
            await _register(ctx, base_url, _broker_of(device_config), options)

        return register_with_config

    if base_url is None:

        @phase(name=name, measurements=REGISTER_MEASUREMENTS, timeout=phase_timeout)
        async def register_at_station_service(ctx, provisioning):
            """Register the device with the station's provisioning service; record its device id and claim code."""
            await _register(ctx, provisioning.url, None, options, provisioning.tls)

        return register_at_station_service

    @phase(name=name, measurements=REGISTER_MEASUREMENTS, timeout=phase_timeout)
    async def register(ctx):
        """Register the device with the provisioning service; record its device id and claim code."""
        await _register(ctx, base_url, None, options)

    return register


async def _register(ctx: Any, base_url: str, broker: BrokerCredentials | None,
                    options: ClientOptions, tls: ssl.SSLContext | None = None) -> None:
    url = base_url
    record = ctx.record
    try:
        body = registration_body(
            ctx.dut, product=record.product, station=record.station, batch=record.batch,
            test_outcome=run_outcome(tuple(p for p in record.phases if not p.teardown)).value, broker=broker,
        )
    except ProvisioningError as exc:
        ctx.log.error("cannot register", error=str(exc))
        ctx.measurements.registration = str(exc)
        return
    key = idempotency_key(record.run_id, body["serial"])

    def retrying(attempt: int, reason: str, delay: float) -> None:
        ctx.log.warning("provisioning attempt failed; retrying", attempt=attempt, reason=reason,
                        retry_in_s=round(delay, 2))

    ctx.log.info("registering", url=display_url(url), serial=body["serial"], key=key[:16], broker=broker is not None)
    try:
        async with options.client(url, on_retry=retrying, tls=tls) as client:
            result = await client.register(body, key)
    except ProvisioningError as exc:
        ctx.log.error("registration failed", error=str(exc))
        ctx.measurements.registration = str(exc)
        return
    ctx.identify(device_id=result.device_id, claim_code=result.claim_code)
    ctx.log.info("registered", device_id=result.device_id, claim_code=result.claim_code, created=result.created,
                 replayed=result.replayed, attempts=result.attempts)
    ctx.measurements.registration = REGISTERED
    ctx.measurements.device_id = result.device_id
    ctx.measurements.claim_code = result.claim_code
    ctx.measurements.registration_kind = "new" if result.created else "retest"


#: The phase with the defaults: the station's provisioning service, no broker credentials.
register = register_phase()
