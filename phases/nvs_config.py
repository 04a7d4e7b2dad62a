"""The ``nvs_config`` phase: build the DUT's NVS partition from layered settings and flash it.

For each DUT the phase merges the product's configuration layers
(:mod:`fixtures.device_config`: cluster < class < group < device), builds the
NVS partition image with Espressif's generator (:mod:`fixtures.nvs`), reads
it back key by key, writes it at the NVS partition's offset from the build's
partition table with the station's ``flasher`` (esptool verifies the flash
by MD5), and leaves the generated broker credentials in the slot's
``device_config`` fixture for the phases after it::

    from fixtures.device_config import device_config_store
    from phases import esp32
    from phases.nvs_config import nvs_config

    detect = esp32.detect
    configure = nvs_config(CONFIG_DIR, partition_table=IMAGES).depends_on(scan_label)
    flash = esp32.flash_images(IMAGES).depends_on(configure)
    ...
    product = Product(..., fixtures={"dut": ..., "device_config": device_config_store()})

Where it goes in the graph. The flasher talks to the ROM loader, so the
board must be in download mode. Either run the phase after ``detect`` and
before the phase that starts the app (``esp32.flash_images`` starts it),
when the identity already holds what the templates need (a serial from a
label scan or the MES); or, with ``from_app=True``, after the test firmware
has reported the serial and the cellular phase the ``apn``: the phase then
restarts the firmware into the jig's download mode and waits for it to boot
again afterwards (``products/lte_tracker.py`` does this).

Nothing secret reaches the record. Measurements are the image's SHA-256,
size, offset, key count and group; the attachment ``nvs_config.json`` lists
every key with its type and layer, and values only for keys that are not
secret; log lines carry names and hashes. The SHA-256 of the image says
nothing usable about the secrets in it: the image also holds a 144-bit
random password. The image exists on disk only while it is flashed, in a
private directory (``/dev/shm`` when there is one) that is removed whatever
happens.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import attrs
import trio

from fixtures.device_config import DeviceConfig, LayeredConfig, Secret, SecretSource
from fixtures.images import FlashImage, ImageSet
from fixtures.nvs import (
    NVS_KEYS,
    NvsEntry,
    NvsError,
    build_nvs_image,
    find_partition,
    load_partition_table,
    new_xts_key,
    nvs_keys_image,
    verify_nvs_image,
)
from fixtures.partition_table import DEVICE_KEYS, NVS, Partition, PartitionTable
from phases.esp32 import BOOT_WAIT_S, flash_failures, read_boot_banner, write_images
from sequencer import Measurement, phase
from sequencer.phase import Phase

__all__ = ["NVS_MEASUREMENTS", "NvsEncryption", "nvs_config"]


@attrs.frozen
class NvsEncryption:
    """NVS encryption with a key per device (ESP-IDF's flash-encryption based scheme).

    ``key`` makes the unit's 64-byte XTS key from its identity (a key
    service, an HSM); by default a fresh random key. The key goes to the
    ``keys_partition`` (data/nvs_keys) of the partition table, where
    ``nvs_flash_secure_init`` reads it; with ``keys_partition=None`` it is
    not written (the unit derives it, or a later phase provisions it) and is
    only kept in the ``device_config`` fixture (``store.nvs_key``).

    On hardware with flash encryption enabled the ``nvs_keys`` partition must
    itself be written encrypted, which the flasher does not do: use this
    with development boards, or with ``keys_partition=None``.
    """

    keys_partition: str | None = "nvs_keys"
    key: Callable[[Mapping[str, str]], bytes] | None = attrs.field(default=None, repr=False)

    def new_key(self, identity: Mapping[str, str]) -> bytes:
        return self.key(identity) if self.key is not None else new_xts_key()


NVS_MEASUREMENTS = [
    # First, so that when it fails it is the phase's reason.
    Measurement("nvs_verdict").reported("pass").doc("quality gates and flash verification; otherwise what failed"),
    Measurement("nvs_sha256").matches(r"[0-9a-f]{64}").doc(
        "SHA-256 of the NVS partition image written; of it with its secrets blanked when they are in the clear"
    ),
    Measurement("nvs_bytes", units="B").doc("size of the NVS partition image (the whole partition)"),
    Measurement("nvs_offset").doc("flash offset of the NVS partition, from the partition table"),
    Measurement("nvs_entries").doc("keys written"),
    Measurement("nvs_group").doc("the device group whose layer applied ('' for none)"),
]


@attrs.frozen
class _Built:
    """What a worker thread prepared for one DUT."""

    config: DeviceConfig
    images: ImageSet
    nvs: FlashImage
    key: Secret | None
    #: keys the generator added on its own (Wi-Fi derived keys)
    added: tuple[str, ...]
    #: what the record says the image's SHA-256 is (see :func:`_recorded_sha256`)
    recorded_sha256: str
    #: True when that is the image's own; False when of it with the secrets blanked
    sha256_is_the_image: bool


def nvs_config(
    layers: str | Path | LayeredConfig,
    *,
    partition_table: str | Path | PartitionTable | ImageSet,
    partition: str = "nvs",
    cluster: str | Path | None = None,
    secrets: SecretSource | None = None,
    encryption: NvsEncryption | None = None,
    name: str = "nvs_config",
    timeout: float = 60.0,
    retries: int = 1,
    from_app: bool = False,
    device_keys: str | None = DEVICE_KEYS,
) -> Phase:
    """A phase that builds, writes and verifies the DUT's NVS partition.

    ``layers`` is the product's configuration directory (``class.toml``,
    ``groups/``, and ``cluster.toml`` unless ``cluster`` names a station-wide
    file); ``partition_table`` the build's ``flasher_args.json``, its
    partition table ``.bin``, an image set or a table, where the phase finds
    the ``partition`` (type data, subtype nvs). Both are read and checked
    now, so a product with a broken configuration does not load. Secrets are
    looked up per DUT from ``secrets`` if given, else from the station's
    ``secrets`` fixture (its ``[secrets] file`` and ``SEQUENCER_SECRET_*``
    variables; throwaway values on a simulated station).

    With ``from_app`` the DUT is running its test firmware when the phase
    starts (the configuration needs what the firmware reported: serial, APN):
    the phase restarts it into the jig's download mode (``RESTART``; the jig
    holds GPIO0 low), writes the partition, and waits for the firmware to boot
    again, so later phases find it as they left it. Without it the board must
    still be in download mode (run it between ``detect`` and ``flash``).

    ``device_keys`` is the label of the partition where the firmware keeps
    the device's key (``KEYGEN``): the table must have it, and the phase
    never writes it, so that a configuration rewrite or a retest keeps the
    key the unit proved it holds. ``None`` for firmware that keeps no key.

    The phase FAILs (``nvs_verdict``) when a station quality gate refuses the
    image or the flash does not verify; it ends in ERROR, with a one-line
    reason naming the file, for a missing secret, an identity field a
    template needs, or two groups selecting the DUT.
    """
    config = layers if isinstance(layers, LayeredConfig) else LayeredConfig.load(layers, cluster=cluster)
    table = load_partition_table(partition_table)
    where = _describe(partition_table)
    target = find_partition(table, subtype=NVS, label=partition)
    if target is None:
        raise NvsError(f"{where}: no NVS partition {partition!r} (type data, subtype nvs) in the partition table")
    if device_keys is not None:
        _check_device_keys(table, where, device_keys, partition)
    keys_target = None
    if encryption is not None and encryption.keys_partition is not None:
        keys_target = find_partition(table, subtype=NVS_KEYS, label=encryption.keys_partition)
        if keys_target is None:
            raise NvsError(
                f"{where}: no partition {encryption.keys_partition!r} (type data, subtype nvs_keys) for the NVS "
                "encryption key; add one, or use NvsEncryption(keys_partition=None)"
            )

    pinned_secrets = secrets

    @phase(name=name, measurements=NVS_MEASUREMENTS, timeout=timeout, retries=retries)
    async def configure(ctx, flasher, dut, device_config, secrets):
        """Merge the configuration layers for this DUT, build its NVS image, write it at the NVS offset, verify."""
        source = pinned_secrets if pinned_secrets is not None else secrets
        identity = dict(ctx.dut)
        batch = ctx.record.batch
        workdir = await trio.to_thread.run_sync(_private_dir)
        try:
            built = await trio.to_thread.run_sync(
                _build, config, identity, batch, source, target, keys_target, encryption, workdir
            )
            group = built.config.group or ""
            ctx.measurements.nvs_sha256 = built.recorded_sha256
            ctx.measurements.nvs_bytes = built.nvs.size
            ctx.measurements.nvs_offset = built.nvs.offset
            ctx.measurements.nvs_entries = len(built.config.values)
            ctx.measurements.nvs_group = group
            ctx.log.info(
                "nvs image built", group=group or None, entries=len(built.config.values),
                secret_keys=", ".join(built.config.secret_keys), offset=f"{target.offset:#x}", bytes=target.size,
                sha256=built.recorded_sha256, encrypted=built.key is not None,
            )
            if built.added:
                ctx.log.info("the NVS generator added keys of its own", keys=", ".join(built.added))
            ctx.attach("nvs_config.json", _summary(built, target, keys_target), "application/json")

            if from_app:
                await dut.restart()
            with flash_failures(ctx, "nvs_verdict"):
                _, verdict = await write_images(ctx, flasher, dut.link, built.images)
                ctx.measurements.nvs_verdict = verdict
                if verdict != "pass":
                    return
                if from_app:
                    ctx.log.info("starting the app", how=await flasher.start_app(dut.link))
            if from_app:
                await read_boot_banner(dut.link, BOOT_WAIT_S)  # BootFailed / DeviceTimeout: ERROR
            # Only a configuration that is on the board is handed on: the
            # registration phase must not register a password the unit lacks.
            device_config.put(built.config, nvs_key=built.key)
        finally:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(shutil.rmtree, workdir, True)

    return configure


def _check_device_keys(table: PartitionTable, where: str, device_keys: str, partition: str) -> None:
    """Refuse a table that would put the device's key where this phase writes (NvsError, one line)."""
    if partition == device_keys:
        raise NvsError(f"{where}: partition {partition!r} is where the firmware keeps the device's key; the "
                       "configuration goes in a partition of its own")
    if table.find(device_keys) is None:
        raise NvsError(
            f"{where}: no partition {device_keys!r} for the device's key in the partition table: firmware without "
            f"one keeps its key in {partition!r}, which this phase rewrites (a config write or a retest would erase "
            f"it); add one (type data, subtype nvs, 0x3000 bytes; docs/device-config.md), or nvs_config(..., "
            "device_keys=None) for firmware that keeps no key"
        )


def _describe(source: object) -> str:
    if isinstance(source, ImageSet):
        return str(source.source or "image set")
    if isinstance(source, PartitionTable):
        return "partition table"
    return str(source)


def _private_dir() -> Path:
    """A directory only this user can read, in memory when the system has /dev/shm."""
    shm = Path("/dev/shm")
    base = shm if shm.is_dir() and os.access(shm, os.W_OK) else None
    return Path(tempfile.mkdtemp(prefix="sequencer-nvs-", dir=base))


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _image(path: Path, offset: int, data: bytes) -> FlashImage:
    _write_private(path, data)
    return FlashImage(offset, path, len(data), hashlib.sha256(data).hexdigest())


def _build(
    layered: LayeredConfig,
    identity: Mapping[str, str],
    batch: str,
    secrets: SecretSource,
    target: Partition,
    keys_target: Partition | None,
    encryption: NvsEncryption | None,
    workdir: Path,
) -> _Built:
    """Resolve, build, read back and write the image files. Blocking: runs in a worker thread.

    The plain entries (secrets revealed) exist only inside this function.
    """
    config = layered.resolve(identity, batch=batch, secrets=secrets)
    key = Secret(encryption.new_key(identity)) if encryption is not None else None
    entries = config.nvs_entries()
    raw_key = key.reveal() if key is not None else None
    image = build_nvs_image(entries, target.size, key=raw_key)
    added = verify_nvs_image(image, entries, key=raw_key)
    del entries
    images = [_image(workdir / f"{target.label}.bin", target.offset, image)]
    if keys_target is not None:
        assert raw_key is not None
        images.append(_image(workdir / f"{keys_target.label}.bin", keys_target.offset, nvs_keys_image(raw_key)))
    recorded, own = _recorded_sha256(config, images[0], target, raw_key)
    return _Built(config, ImageSet(sorted(images, key=lambda i: i.offset)), images[0], key,
                  tuple(e.name for e in added), recorded, own)


def _recorded_sha256(
    config: DeviceConfig, written: FlashImage, target: Partition, raw_key: bytes | None
) -> tuple[str, bool]:
    """The SHA-256 a record may hold for the image written, and whether it is that image's own.

    An image that holds secrets in the clear is not hashed as written:
    with the record's list of keys, types and public values, anyone could
    rebuild it for each guess of a short secret (a SIM PIN: ten thousand
    tries, half a second) and compare. The record then holds the hash of the
    same image with every secret value blanked (zeros of the same type and
    length), which still tells two configurations apart. An encrypted image
    is hashed as written: its key is random and never recorded.
    """
    if raw_key is not None or not config.secret_keys:
        return written.sha256, True
    secret = set(config.secret_keys)
    blanked = [
        NvsEntry(e.namespace, e.key, e.type, _blank(e.value)) if e.name in secret else e
        for e in config.nvs_entries()
    ]
    return hashlib.sha256(build_nvs_image(blanked, target.size)).hexdigest(), False


def _blank(value: int | str | bytes) -> int | str | bytes:
    if isinstance(value, bytes):
        return bytes(len(value))
    if isinstance(value, str):
        return "0" * len(value)
    return 0


def _summary(built: _Built, target: Partition, keys_target: Partition | None) -> str:
    summary: dict[str, Any] = {
        "partition": {"label": target.label, "offset": target.offset, "size": target.size},
        "sha256": built.recorded_sha256,
        "sha256_of": "the image written" if built.sha256_is_the_image else "the image with its secrets blanked",
        "encrypted": built.key is not None,
        "keys_partition": (
            {"label": keys_target.label, "offset": keys_target.offset, "size": keys_target.size}
            if keys_target is not None else None
        ),
        **built.config.redacted(),
        "added_by_generator": list(built.added),
    }
    return json.dumps(summary, indent=2)
