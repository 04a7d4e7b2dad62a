"""What the provisioning service accepts, stores and answers: validation, secrets, records.

Everything here is pure (no I/O), so both storage backends and the ASGI app
share one definition of a valid request, of "the same request" (its
fingerprint) and of "the same device" (its identity).

Two rules shape this module:

* **The broker password never leaves the request.** It is hashed with scrypt
  (salted, memory-hard) before anything is stored, it is not part of the
  request fingerprint (a plain SHA-256 over text that includes a password
  would be a fast, unsalted hash of it), it is never in a reply, a log line
  or an error message. Whether a retry carries *the same* password is checked
  against the stored scrypt hash instead.
* **DUT-supplied text is hostile.** Every field has a length bound and a
  pattern; error messages name the field, never echo a secret.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
import json
import re
import secrets
import uuid
from collections.abc import Mapping
from typing import Any

import attrs

from sequencer.records import Outcome, utcnow

#: The claim code alphabet: upper-case letters and digits without the ones an
#: operator confuses on a label (0/O, 1/I/L). 31 symbols, 8 of them: ~40 bits,
#: enough that a guessed code is worthless without the device in hand.
CLAIM_ALPHABET = "23456789ABCDEFGHJKMNPQRSTUVWXYZ"
CLAIM_LENGTH = 8
CLAIM_PATTERN = rf"[{CLAIM_ALPHABET}]{{{CLAIM_LENGTH}}}"

#: scrypt cost: 16 MiB and ~50 ms per hash. A broker password is machine
#: generated and long, so this is defence in depth for a leaked database, and
#: cheap enough for a line registering a device every few seconds.
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**14, 8, 1

#: An idempotency key: what a client may use (a hex digest, a UUID, ...).
IDEMPOTENCY_KEY_PATTERN = re.compile(r"[A-Za-z0-9._:-]{8,200}")

MAX_BODY_BYTES = 64 * 1024

_SERIAL = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:+-]{0,127}")
_TEXT = re.compile(r"[^\x00-\x1f\x7f]*")
_MAC_HEX = re.compile(r"[0-9A-Fa-f]{12}")
_SHA256 = re.compile(r"[0-9a-f]{64}")

_OUTCOMES = frozenset(o.value for o in Outcome)

__all__ = ["BrokerCredentials", "Device", "InvalidRequest", "Registration", "RegistrationRequest", "Reply", "utcnow"]


class InvalidRequest(ValueError):
    """The request body is not a valid registration; the message names the field (never a secret)."""


# -- secrets ------------------------------------------------------------------


def hash_secret(secret: str) -> str:
    """A salted scrypt hash of ``secret``, self-describing: ``scrypt$n$r$p$salt$hash`` (base64).

    Blocking for ~50 ms: call it through ``trio.to_thread.run_sync``.
    """
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(secret.encode("utf-8"), salt=salt, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P, dklen=32)
    b64 = base64.b64encode
    return f"scrypt${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${b64(salt).decode()}${b64(digest).decode()}"


def verify_secret(secret: str, stored: str) -> bool:
    """Whether ``secret`` is the one ``stored`` (from :func:`hash_secret`) was made from.

    Reads the cost from ``stored``, so hashes made under older parameters
    still verify. Constant-time comparison. Blocking, like :func:`hash_secret`.
    """
    try:
        scheme, n, r, p, salt, digest = stored.split("$")
        if scheme != "scrypt":
            return False
        want = base64.b64decode(digest)
        got = hashlib.scrypt(secret.encode("utf-8"), salt=base64.b64decode(salt), n=int(n), r=int(r), p=int(p),
                             dklen=len(want))
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(got, want)


def new_claim_code() -> str:
    return "".join(secrets.choice(CLAIM_ALPHABET) for _ in range(CLAIM_LENGTH))


def new_device_id() -> str:
    return str(uuid.uuid4())


# -- the request --------------------------------------------------------------


@attrs.frozen
class BrokerCredentials:
    """The MQTT broker account the device was provisioned with. ``password`` is plain text here only."""

    client_id: str
    username: str
    password: str = attrs.field(repr=False)


def public_key_fingerprint(pem: str) -> str:
    """SHA-256 (hex) of the key's DER SubjectPublicKeyInfo: the key's identity, whatever its PEM layout.

    The same number ``openssl pkey -pubin -outform DER | sha256sum`` prints.
    Raises :class:`InvalidRequest` if ``pem`` is not a public key.
    """
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    try:
        key = serialization.load_pem_public_key(pem.encode("ascii"))
    except (ValueError, UnicodeEncodeError, TypeError, UnsupportedAlgorithm):
        raise InvalidRequest("public_key: not a PEM public key") from None
    # What the devices make (keygen: ECDSA P-256) and what signs their proofs.
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
        raise InvalidRequest("public_key: not an ECDSA P-256 (secp256r1) key")
    der = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).hexdigest()


def normalize_mac(mac: str) -> str:
    """``24:6f:28:35:25:bf``, ``246F283525BF`` and ``24-6F-...`` are one MAC: ``24:6F:28:35:25:BF``."""
    bare = mac.replace(":", "").replace("-", "")
    if len(mac) not in (12, 17) or not _MAC_HEX.fullmatch(bare):
        raise InvalidRequest("mac: not a MAC address (six hex octets)")
    bare = bare.upper()
    return ":".join(bare[i:i + 2] for i in range(0, 12, 2))


#: Fields of a registration: name -> (required, max length, pattern or None for any printable text).
_FIELDS: dict[str, tuple[bool, int, re.Pattern[str] | None]] = {
    "serial": (True, 128, _SERIAL),
    "mac": (True, 17, None),
    # [0-9], not \d: \d also takes the digits of other scripts.
    "imei": (False, 16, re.compile(r"[0-9]{14,16}")),
    "imsi": (False, 15, re.compile(r"[0-9]{6,15}")),
    "iccid": (False, 22, re.compile(r"[0-9]{18,21}F?")),
    "public_key": (True, 8192, None),
    "public_key_sha256": (False, 64, _SHA256),
    "firmware_version": (False, 64, None),
    "batch": (False, 128, None),
    "product": (True, 128, None),
    "station": (False, 128, None),
    "test_outcome": (False, 16, None),
}
_BROKER_FIELDS = ("client_id", "username", "password")


def _text(data: Mapping[str, Any], name: str, where: str, required: bool, limit: int,
          pattern: re.Pattern[str] | None, *, secret: bool = False) -> str | None:
    value = data.get(name)
    label = f"{where}{name}"
    if value is None or value == "":
        if required:
            raise InvalidRequest(f"{label}: required")
        return None
    if not isinstance(value, str):
        raise InvalidRequest(f"{label}: must be text")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate ("\ud800" in the JSON): no text can be stored
        raise InvalidRequest(f"{label}: not valid Unicode text") from None
    if len(value) > limit:
        raise InvalidRequest(f"{label}: longer than {limit} characters")
    if secret:
        return value  # any characters; never quoted back
    if pattern is not None and not pattern.fullmatch(value):
        raise InvalidRequest(f"{label}: {value!r} does not match /{pattern.pattern}/")
    if pattern is None and name != "public_key" and not _TEXT.fullmatch(value):
        raise InvalidRequest(f"{label}: control characters are not allowed")
    return value


@attrs.frozen
class RegistrationRequest:
    """A validated ``POST /v1/devices`` body."""

    serial: str
    mac: str
    public_key: str
    public_key_sha256: str
    product: str
    imei: str | None = None
    imsi: str | None = None
    iccid: str | None = None
    firmware_version: str | None = None
    batch: str | None = None
    station: str | None = None
    test_outcome: str | None = None
    broker: BrokerCredentials | None = None

    @classmethod
    def parse(cls, data: Any) -> RegistrationRequest:
        """Validate a decoded JSON body. Unknown fields are errors: a typo must not silently drop data."""
        if not isinstance(data, Mapping):
            raise InvalidRequest("the body must be a JSON object")
        unknown = sorted(set(data) - set(_FIELDS) - {"broker"})
        if unknown:
            raise InvalidRequest(f"unknown field(s): {', '.join(map(str, unknown))[:200]}")
        values = {name: _text(data, name, "", *spec) for name, spec in _FIELDS.items()}
        values["mac"] = normalize_mac(values["mac"])
        pem = values["public_key"].strip()
        if "-----BEGIN" not in pem:
            raise InvalidRequest("public_key: not a PEM public key")
        values["public_key"] = pem + "\n"
        fingerprint = public_key_fingerprint(pem)
        given = values["public_key_sha256"]
        if given is not None and given != fingerprint:
            raise InvalidRequest("public_key_sha256: is not the SHA-256 of the public key's DER "
                                 f"SubjectPublicKeyInfo (that is {fingerprint})")
        values["public_key_sha256"] = fingerprint
        if values["test_outcome"] is not None and values["test_outcome"] not in _OUTCOMES:
            raise InvalidRequest(f"test_outcome: must be one of {', '.join(sorted(_OUTCOMES))}")
        broker = data.get("broker")
        if broker is not None:
            if not isinstance(broker, Mapping):
                raise InvalidRequest("broker: must be an object with client_id, username, password")
            unknown = sorted(set(broker) - set(_BROKER_FIELDS))
            if unknown:
                raise InvalidRequest(f"broker: unknown field(s): {', '.join(map(str, unknown))[:200]}")
            values["broker"] = BrokerCredentials(
                client_id=_text(broker, "client_id", "broker.", True, 128, None) or "",
                username=_text(broker, "username", "broker.", True, 128, None) or "",
                password=_text(broker, "password", "broker.", True, 1024, None, secret=True) or "",
            )
        return cls(**values)

    def fingerprint(self) -> str:
        """SHA-256 of the request without its password: what makes two requests "the same".

        The password is left out on purpose (see the module docstring); a
        retry's password is checked against the stored scrypt hash instead.
        """
        body = attrs.asdict(self, recurse=True)
        if self.broker is not None:
            body["broker"] = {"client_id": self.broker.client_id, "username": self.broker.username,
                              "password": True}
        return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


# -- what is stored -----------------------------------------------------------


@attrs.frozen
class Device:
    """One registered device, as stored (one row / document per serial).

    ``serial``, ``mac``, ``public_key_sha256`` and ``product`` are its
    identity and never change; the rest is updated by each retest. Only a
    hash of the broker password is kept.
    """

    device_id: str
    claim_code: str
    serial: str
    mac: str
    public_key: str
    public_key_sha256: str
    product: str
    imei: str | None
    imsi: str | None
    iccid: str | None
    firmware_version: str | None
    batch: str | None
    station: str | None
    test_outcome: str | None
    broker_client_id: str | None
    broker_username: str | None
    broker_password_hash: str | None = attrs.field(repr=False)
    first_registered_at: dt.datetime
    last_registered_at: dt.datetime
    registrations: int = 1

    @classmethod
    def new(cls, req: RegistrationRequest, password_hash: str | None, now: dt.datetime) -> Device:
        return cls(
            device_id=new_device_id(), claim_code=new_claim_code(), serial=req.serial, mac=req.mac,
            public_key=req.public_key, public_key_sha256=req.public_key_sha256, product=req.product,
            first_registered_at=now, last_registered_at=now, registrations=1,
            **_mutable(req, password_hash),
        )

    def retested(self, req: RegistrationRequest, password_hash: str | None, now: dt.datetime) -> Device:
        """This device after a retest registered it again: same id and claim code, the retest's details."""
        return attrs.evolve(self, last_registered_at=now, registrations=self.registrations + 1,
                            **_mutable(req, password_hash))

    def conflicts(self, req: RegistrationRequest) -> list[str]:
        """What of ``req``'s identity differs from this device's: ``mac``, ``public_key``, ``product``."""
        differ = []
        if req.mac != self.mac:
            differ.append("mac")
        if req.public_key_sha256 != self.public_key_sha256:
            differ.append("public_key")
        if req.product != self.product:
            differ.append("product")
        return differ

    def public(self) -> dict[str, Any]:
        """The device as ``GET /v1/devices/{serial}`` shows it: no password, no hash of it.

        The claim code is included: it is printed on the device's label.
        """
        return {
            "device_id": self.device_id, "claim_code": self.claim_code, "serial": self.serial, "mac": self.mac,
            "imei": self.imei, "imsi": self.imsi, "iccid": self.iccid, "public_key": self.public_key,
            "public_key_sha256": self.public_key_sha256, "product": self.product,
            "firmware_version": self.firmware_version, "batch": self.batch, "station": self.station,
            "test_outcome": self.test_outcome,
            "broker": None if self.broker_client_id is None
            else {"client_id": self.broker_client_id, "username": self.broker_username},
            "first_registered_at": self.first_registered_at.isoformat(),
            "last_registered_at": self.last_registered_at.isoformat(),
            "registrations": self.registrations,
        }


def _mutable(req: RegistrationRequest, password_hash: str | None) -> dict[str, Any]:
    broker = req.broker
    return {
        "imei": req.imei, "imsi": req.imsi, "iccid": req.iccid, "firmware_version": req.firmware_version,
        "batch": req.batch, "station": req.station, "test_outcome": req.test_outcome,
        "broker_client_id": broker.client_id if broker else None,
        "broker_username": broker.username if broker else None,
        "broker_password_hash": password_hash if broker else None,
    }


@attrs.frozen
class Registration:
    """One accepted request, kept under its idempotency key so a retry gets the same answer.

    ``password_hash`` is the scrypt hash of *this request's* password (None
    without a broker block): a retry's password is verified against it.
    """

    key: str
    serial: str
    fingerprint: str
    password_hash: str | None = attrs.field(repr=False)
    status: int
    created: bool
    device_id: str
    claim_code: str
    at: dt.datetime


@attrs.frozen
class Reply:
    """An HTTP answer: status and JSON body (``replayed``: the stored answer to an earlier request)."""

    status: int
    body: dict[str, Any]
    replayed: bool = False


def success(reg: Registration, *, replayed: bool) -> Reply:
    return Reply(reg.status, {"device_id": reg.device_id, "claim_code": reg.claim_code, "serial": reg.serial,
                              "created": reg.created, "replayed": replayed}, replayed=replayed)


def error(status: int, message: str, **extra: Any) -> Reply:
    return Reply(status, {"error": message, **extra})
