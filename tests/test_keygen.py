"""On-device key generation and proof of possession, over real ptys.

The simulated firmware makes each unit's key from its profile, so these tests
know the private key and can prove it never reaches the station's records.
"""

from __future__ import annotations

import base64
import hashlib
import secrets
from pathlib import Path
from typing import Any

import pytest
import trio
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fixtures.dut import TestFirmware, test_firmware
from fixtures.serial_link import DeviceError, ProtocolError, open_serial_link
from fixtures.nvs import NvsEntry, build_nvs_image, load_partition_table, read_nvs_image
from fixtures.partition_table import DEVICE_KEYS, PARTITION_TABLE_OFFSET, single_app_table
from fixtures.sim.device import DeviceProfile, Faults, VirtualDevice, device_private_key
from fixtures.sim.device_keys import FlashKeyStore
from fixtures.sim.firmware import KeyStorageError
from fixtures.sim.spi_flash import SpiNorFlash
from fixtures.sim.farm import open_farm
from fixtures.sim.pty import PtyEndpoint
from phases.evt import console_transcript
from phases.keygen import BAD_SIGNATURE, keygen
from sequencer import Product
from sequencer.records import Outcome, RunRecord, run_to_json
from tests.conftest import run_product

ROOT = Path(__file__).resolve().parent.parent
SPKI = serialization.PublicFormat.SubjectPublicKeyInfo


async def booted(link) -> TestFirmware:
    firmware = TestFirmware(link)
    await firmware.wait_boot(2)
    return firmware


def spki_der(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.DER, SPKI)


def private_key_forms(key: ec.EllipticCurvePrivateKey) -> list[bytes]:
    """Every way the private scalar could show up in a record or transcript."""
    scalar = key.private_numbers().private_value
    raw = scalar.to_bytes(32, "big")
    return [raw, raw.hex().encode(), raw.hex().upper().encode(), str(scalar).encode(), base64.b64encode(raw)]


# ------------------------------------------------------------------ client and simulator


async def test_pubkey_parses_and_signature_verifies_from_the_client():
    async with open_farm(1, seed=3) as (device,):
        async with open_serial_link(device.path) as link:
            firmware = await booted(link)
            assert await firmware.generate_key() is True
            der = await firmware.public_key_der()
            public_key = serialization.load_der_public_key(der)
            assert isinstance(public_key, ec.EllipticCurvePublicKey)
            assert isinstance(public_key.curve, ec.SECP256R1)
            assert der == spki_der(device_private_key(device.profile))
            for size in (16, 32, 64):
                nonce = secrets.token_bytes(size)
                public_key.verify(await firmware.sign(nonce), nonce, ec.ECDSA(hashes.SHA256()))


async def test_keygen_is_idempotent_and_the_key_outlives_a_reset():
    async with open_farm(1, seed=3) as (device,):
        async with open_serial_link(device.path) as link:
            firmware = await booted(link)
            assert await firmware.generate_key() is True
            first = await firmware.public_key_der()
            assert await firmware.generate_key() is False
            assert await firmware.public_key_der() == first
        async with open_serial_link(device.path) as link:  # closing the port reset the board
            firmware = await booted(link)
            assert device.boot_count == 2
            assert await firmware.generate_key() is False
            assert await firmware.public_key_der() == first


async def test_units_have_their_own_reproducible_keys():
    keys = [spki_der(device_private_key(DeviceProfile.generate(i, seed=3))) for i in range(4)]
    assert len(set(keys)) == 4
    assert keys == [spki_der(device_private_key(DeviceProfile.generate(i, seed=3))) for i in range(4)]
    assert keys[0] != spki_der(device_private_key(DeviceProfile.generate(0, seed=4)))


async def test_key_commands_refuse_before_keygen_and_bad_nonces():
    async with open_farm(1) as (device,):
        async with open_serial_link(device.path) as link:
            firmware = await booted(link)
            with pytest.raises(DeviceError, match="'PUBKEY' failed: no key"):
                await firmware.public_key_der()
            with pytest.raises(DeviceError, match="no key"):
                await firmware.sign(bytes(32))
            with pytest.raises(ValueError, match="16..64 bytes, not 8"):
                await firmware.sign(bytes(8))
            usage = "ERR usage: SIGN <hex nonce 16..64 bytes>"
            assert await link.request("SIGN") == usage
            assert await link.request("SIGN " + "ab" * 15) == usage
            assert await link.request("SIGN " + "ab" * 65) == usage
            assert await link.request("SIGN " + "zz" * 16) == usage
            assert await link.request("SIGN 0" + "a" * 32) == usage  # odd number of digits
            assert await link.request("KEYGEN now") == "ERR usage: KEYGEN"
            assert await link.request("PUBKEY der") == "ERR usage: PUBKEY"
            assert not device.has_key


async def test_faults_corrupt_the_key_and_the_signature():
    async with open_farm(1) as (device,):
        async with open_serial_link(device.path) as link:
            firmware = await booted(link)
            await firmware.generate_key()
            good = await firmware.public_key_der()
            public_key = serialization.load_der_public_key(good)
            nonce = secrets.token_bytes(32)

            device.faults = Faults(bad_signature=True)
            signature = await firmware.sign(nonce)
            with pytest.raises(InvalidSignature):
                public_key.verify(signature, nonce, ec.ECDSA(hashes.SHA256()))

            device.faults = Faults(bad_pubkey=True)
            with pytest.raises(ValueError):
                serialization.load_der_public_key(await firmware.public_key_der())

            device.faults = Faults()  # the key itself was never touched
            assert await firmware.public_key_der() == good
            public_key.verify(await firmware.sign(nonce), nonce, ec.ECDSA(hashes.SHA256()))


@pytest.mark.parametrize(
    "call, answer, message",
    [
        (lambda fw: fw.generate_key(), b"KEYGEN created=yes", "lacks created=0 or created=1"),
        (lambda fw: fw.generate_key(), b"KEYGEN", "lacks created=0 or created=1"),
        (lambda fw: fw.public_key_der(), b"PUBKEY der=30590", "der= is not whole bytes of hex"),
        (lambda fw: fw.public_key_der(), b"PUBKEY key=3059", "lacks der="),
        (lambda fw: fw.sign(bytes(16)), b"SIGN sig=zz", "sig= is not whole bytes of hex"),
        (lambda fw: fw.sign(bytes(16)), b"SIGNATURE 3045", "does not echo it"),
    ],
)
async def test_malformed_key_responses_are_protocol_errors(call, answer, message):
    with PtyEndpoint() as endpoint:

        async def device():
            await endpoint.read()
            await endpoint.write(answer + b"\r\n")

        async with open_serial_link(endpoint.path) as link, trio.open_nursery() as nursery:
            nursery.start_soon(device)
            with pytest.raises(ProtocolError, match=message):
                await call(TestFirmware(link))


# ------------------------------------------------------------------ the phase, end to end


KEYGEN_PRODUCT = Product(
    "keygen-widget",
    phases=[keygen, console_transcript],
    fixtures={"dut": test_firmware(boot_timeout=2)},
)


async def run_on(device: VirtualDevice, store_path: Path) -> RunRecord:
    (run,) = await run_product(KEYGEN_PRODUCT, store_path, ports=[device.path])
    return run


def assert_no_private_key(run: RunRecord, store_path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    record = run_to_json(run).encode()
    transcript = run.phase("console_transcript").attachments[0].data
    stored = store_path.read_bytes()
    for form in private_key_forms(key):
        assert form not in record
        assert form not in transcript
        assert form not in stored


async def test_phase_passes_and_records_the_public_key_in_the_identity(store_path: Path):
    async with open_farm(1, seed=9) as (device,):
        run = await run_on(device, store_path)
        private_key = device_private_key(device.profile)
        assert run.outcome is Outcome.PASS, run.phase("keygen").reason
        der = spki_der(private_key)
        fingerprint = hashlib.sha256(der).hexdigest()
        assert run.dut["public_key_sha256"] == fingerprint
        recorded = serialization.load_pem_public_key(run.dut["public_key"].encode())
        assert recorded.public_bytes(serialization.Encoding.DER, SPKI) == der
        assert run.dut["public_key"].startswith("-----BEGIN PUBLIC KEY-----\n")
        values = {m.name: m.value for m in run.phase("keygen").measurements}
        assert values == {"key_problem": "", "key_verified": True, "public_key_sha256": fingerprint,
                          "key_created": True}
        transcript = run.phase("console_transcript").attachments[0].data
        assert b"KEYGEN created=1" in transcript and b"SIGN sig=" in transcript
        assert_no_private_key(run, store_path, private_key)

        # A retest of the same unit keeps its key: same identity, key_created False.
        again = await run_on(device, store_path.with_name("retest.sqlite"))
        assert again.outcome is Outcome.PASS
        assert again.dut["public_key_sha256"] == fingerprint
        assert {m.name: m.value for m in again.phase("keygen").measurements}["key_created"] is False


@pytest.mark.parametrize(
    "fault, reason",
    [
        (Faults(bad_signature=True), BAD_SIGNATURE),
        (Faults(bad_pubkey=True), "public key from the device does not parse: "),
    ],
    ids=["bad_signature", "bad_pubkey"],
)
async def test_a_bad_key_fails_the_phase_with_its_reason(store_path: Path, fault: Faults, reason: str):
    async with open_farm(1, seed=9, faults={0: fault}) as (device,):
        run = await run_on(device, store_path)
    failed = run.phase("keygen")
    assert run.outcome is Outcome.FAIL
    assert failed.outcome is Outcome.FAIL
    assert failed.reason.startswith(f"measurement 'key_problem': {reason}")
    values = {m.name: m.value for m in failed.measurements}
    assert values["key_verified"] is False
    # A key the device could not prove it holds is never recorded as its key.
    assert "public_key" not in run.dut and "public_key_sha256" not in run.dut
    assert_no_private_key(run, store_path, device_private_key(device.profile))


# -- where an ESP32 board keeps its key ---------------------------------------------


def flash_with(table: Any) -> SpiNorFlash:
    flash = SpiNorFlash()
    if table is not None:
        flash.program(PARTITION_TABLE_OFFSET, table.to_bytes())
    return flash


def test_the_key_lives_in_its_own_partition_and_a_config_rewrite_keeps_it() -> None:
    table = load_partition_table(ROOT / "products" / "data" / "esp32_sensor" / "build" / "flasher_args.json")
    flash = flash_with(table)
    store = FlashKeyStore(flash)
    assert store.load() is None
    store.save(b"\x07" * 32)
    keys, nvs = table.find(DEVICE_KEYS), table.find("nvs")
    assert store.load() == b"\x07" * 32 and not flash.is_erased(keys.offset, keys.size)
    assert flash.is_erased(nvs.offset, nvs.size)
    flash.erase_range(nvs.offset, nvs.size)  # nvs_config writes the whole partition
    flash.program(nvs.offset, build_nvs_image([NvsEntry("mqtt", "username", "string", "SN1")], nvs.size))
    assert store.load() == b"\x07" * 32


def test_firmware_without_a_key_partition_keeps_its_key_in_nvs_and_loses_it_with_a_config_write() -> None:
    # What the simulator does for a table without dev_keys, as firmware built before it did.
    table = single_app_table()
    flash = flash_with(table)
    nvs = table.find("nvs")
    flash.program(nvs.offset, build_nvs_image([NvsEntry("mqtt", "username", "string", "SN1")], nvs.size))
    store = FlashKeyStore(flash)
    store.save(b"\x07" * 32)
    assert {e.name for e in read_nvs_image(flash.read(nvs.offset, nvs.size))} == {"mqtt.username", "devkey.p256"}
    flash.erase_range(nvs.offset, nvs.size)
    flash.program(nvs.offset, build_nvs_image([NvsEntry("mqtt", "username", "string", "SN1")], nvs.size))
    assert store.load() is None
    with pytest.raises(KeyStorageError):
        FlashKeyStore(flash_with(None)).save(b"\x07" * 32)  # no partition table: nowhere to keep it


def test_a_unit_that_lost_its_key_makes_a_different_one() -> None:
    device = VirtualDevice(DeviceProfile.generate(3, seed=5))
    try:
        table = load_partition_table(ROOT / "products" / "data" / "esp32_sensor" / "build" / "flasher_args.json")
        flash = flash_with(table)
        device.keys = FlashKeyStore(flash)
        assert device.generate_key() is True and device.generate_key() is False
        first = device.public_key_der()
        assert first == spki_der(device_private_key(device.profile))
        flash.erase_range(table.find(DEVICE_KEYS).offset, 0x3000)
        assert not device.has_key and device.generate_key() is True
        assert device.public_key_der() not in (None, first)  # a real unit's RNG would not repeat itself
    finally:
        device.close()
