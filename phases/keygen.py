"""Per-device key generation with proof of possession.

The DUT makes its own ECDSA P-256 key pair (``KEYGEN``) and keeps the private
key; the station only ever sees the public key and signatures. Reading a
public key proves nothing about the unit, so the phase has the device sign a
fresh random nonce and verifies that signature against the key it reported:
only a device holding the matching private key can answer. Only then is the
public key stamped on the DUT identity (``public_key`` as PEM,
``public_key_sha256`` as the hex SHA-256 of its DER), where a later phase or
the back end can issue a certificate for it.

A key that does not parse, or a signature that does not verify, is a FAIL of
the unit (a test verdict with its reason in the report), not an ERROR of the
station: the ``key_problem`` measurement carries the reason.
"""

from __future__ import annotations

import hashlib
import secrets
from typing import TYPE_CHECKING

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from sequencer import Measurement, phase
from sequencer.context import PhaseContext

if TYPE_CHECKING:
    from fixtures.dut import TestFirmware

__all__ = ["BAD_SIGNATURE", "KEYGEN_MEASUREMENTS", "NONCE_BYTES", "keygen", "public_key_fingerprint"]

#: Nonce size: 256 bits cannot be guessed or replayed from an earlier run.
NONCE_BYTES = 32

BAD_SIGNATURE = "device signature over the nonce does not verify against its public key"
_UNPARSEABLE = "public key from the device does not parse"


KEYGEN_MEASUREMENTS = [
    # Declared first: the phase's reason is its first failing measurement's.
    Measurement("key_problem").reported("", "no problem with the device's key").doc("why the device's key was refused; empty if not"),
    Measurement("key_verified").equals(True).doc("the device signed a fresh nonce with the key it reported"),
    Measurement("public_key_sha256").matches(r"[0-9a-f]{64}").doc("SHA-256 of the public key's DER"),
    Measurement("key_created").doc("True if the key was made in this run, False if the unit already had one"),
]


def public_key_fingerprint(public_key: ec.EllipticCurvePublicKey) -> str:
    """Hex SHA-256 of the key's SubjectPublicKeyInfo DER, the usual key fingerprint."""
    der = public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).hexdigest()


def _load_p256(der: bytes) -> ec.EllipticCurvePublicKey:
    """The P-256 public key in *der*; ValueError saying why not."""
    try:
        key = serialization.load_der_public_key(der)
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise ValueError(f"{_UNPARSEABLE}: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
        kind = key.curve.name if isinstance(key, ec.EllipticCurvePublicKey) else type(key).__name__
        raise ValueError(f"public key from the device is not an EC P-256 key: {kind}")
    return key


def _refuse(ctx: PhaseContext, problem: str) -> None:
    ctx.measurements.key_problem = problem
    ctx.measurements.key_verified = False
    ctx.log.error("device key refused", problem=problem)


@phase(measurements=KEYGEN_MEASUREMENTS, timeout=15)
async def keygen(ctx: PhaseContext, dut: TestFirmware) -> None:
    """Have the DUT make its key pair, prove it holds the private key, and record the public key."""
    ctx.measurements.key_created = await dut.generate_key()
    der = await dut.public_key_der()
    try:
        public_key = _load_p256(der)
    except ValueError as exc:
        _refuse(ctx, str(exc))
        return
    # Fingerprint the canonical encoding, so it always matches the PEM kept
    # in the identity (for a well-formed SubjectPublicKeyInfo it is the DER
    # the device sent).
    fingerprint = public_key_fingerprint(public_key)
    ctx.measurements.public_key_sha256 = fingerprint
    nonce = secrets.token_bytes(NONCE_BYTES)
    signature = await dut.sign(nonce)
    try:
        public_key.verify(signature, nonce, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        _refuse(ctx, BAD_SIGNATURE)
        return
    pem = public_key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    ctx.identify(public_key=pem.decode("ascii"), public_key_sha256=fingerprint)
    ctx.measurements.key_problem = ""
    ctx.measurements.key_verified = True
    ctx.log.info("device key verified", public_key_sha256=fingerprint)
