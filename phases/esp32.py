"""Phases for ESP32 boards in a flashing jig: detect the chip, flash the image set, boot the test firmware.

They use two fixtures: ``dut`` (the slot's console, a
:class:`~fixtures.dut.TestFirmware`, opened without waiting for a boot banner)
and ``flasher`` (an :class:`~fixtures.flasher.EspFlasher`, which the station
provides from the ``[flash]`` table of its configuration). The flasher
borrows the console's open port for each command, so the board is never reset
between detect, flash and boot; see ``docs/flashing.md``.

A product wires them up::

    detect = esp32.detect
    flash = esp32.flash_images("data/build/flasher_args.json").depends_on(detect)
    boot = esp32.boot.depends_on(flash)
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import trio

from fixtures.builds import image_set_digest
from fixtures.flasher import EspFlasher, FlashError, FlashImagesRefused, FlashReport, FlashVerifyFailed
from fixtures.images import ImageSet, load_image_set
from fixtures.serial_link import DeviceTimeout, ProtocolError, SerialLink
from phases.evt import BOOT_MEASUREMENTS
from sequencer import Measurement, phase
from sequencer.phase import Phase

__all__ = [
    "BOOT_WAIT_S", "BootFailed", "boot", "detect", "flash_failures", "flash_images", "read_boot_banner", "write_images",
]

MAC_PATTERN = r"([0-9A-F]{2}:){5}[0-9A-F]{2}"

#: How long the test firmware may take from leaving the loader to READY. A
#: real ESP32 app is up in well under a second.
BOOT_WAIT_S = 5.0

# What a board that cannot start its app prints: the ROM ("invalid header",
# "flash read err", "ets_main.c") or ESP-IDF's bootloader ("E (48) boot: ...").
_BOOT_ERROR = re.compile(r"^(E \(\d+\) |invalid header|flash read err|ets_main\.c)")


class BootFailed(Exception):
    """The board left the loader but its boot chain refused the image; the message quotes it."""


@phase(
    measurements=[
        # First, so that when it fails it is the phase's reason.
        Measurement("mac_verdict").reported("pass").doc(
            "'pass', or why the MAC cannot be a unit's: all zeros or ones, multicast, on another slot of the round"
        ),
        Measurement("chip").doc("chip model, as the ROM's eFuses say (e.g. ESP32-D0WD-V3)"),
        Measurement("chip_revision").matches(r"v\d+\.\d+").doc("silicon revision"),
        Measurement("mac").matches(MAC_PATTERN).doc("factory MAC from eFuse"),
        Measurement("loader_entry").doc(
            "how the station put the board into its serial loader: the esptool reset sequence that worked and the "
            "[flash] before that chose it (ClassicReset (default-reset)), or no-reset (a jig holds GPIO0)"
        ),
    ],
    timeout=30,
)
async def detect(ctx, flasher, dut):
    """Put the board in its ROM loader as the station's wiring says; read the chip's model, revision and factory MAC,
    and check the MAC."""
    chip = await flasher.detect(dut.link)
    problem = flasher.mac_problem()
    # A MAC no unit can have is not made the unit's identity: every unburned board reads all zeros, and
    # taken as one unit they would be each other's retests (and a retest cap would send new boards to rework).
    ctx.identify(chip=chip.model, chip_revision=chip.revision, flash_size=chip.flash_size,
                 **({"mac": chip.mac} if problem is None else {}))
    reset = flasher.reset
    ctx.log.info("chip detected", description=chip.description, features=", ".join(chip.features),
                 console=chip.console, loader_entry=reset.how, reset_attempts=reset.attempts,
                 connect_seconds=reset.seconds)
    ctx.measurements.chip = chip.model
    ctx.measurements.chip_revision = chip.revision
    ctx.measurements.mac = chip.mac
    ctx.measurements.loader_entry = reset.how
    ctx.measurements.mac_verdict = problem or "pass"
    if problem is not None:
        ctx.log.error("MAC refused", reason=problem)
        ctx.no_retry("the board's eFuses stay what they are")


FLASH_MEASUREMENTS = [
    # First, so that when it fails it is the phase's reason.
    Measurement("flash_verdict").reported("pass").doc("quality gates and verification; otherwise what failed"),
    Measurement("flash_seconds", units="s").doc("writing and verifying every image"),
    Measurement("flash_bytes", units="B").doc("bytes of all images"),
    Measurement("flash_throughput", units="B/s").doc("image bytes written and verified per second"),
    Measurement("app_sha256").matches(r"[0-9a-f]{64}").doc("SHA-256 of the app image written"),
    Measurement("build").doc("the firmware build written: PRODUCT@TAG from the portal's registry, or 'product' "
                             "for the product's own image set"),
    Measurement("build_sha256").matches(r"[0-9a-f]{64}").doc(
        "the build's manifest digest (SHA-256 over every file's path, size and SHA-256)"),
]


def flash_images(
    images: ImageSet | str | Path | Mapping[int | str, str | Path],
    *,
    name: str = "flash",
    timeout: float = 180.0,
    retries: int = 1,
    station_build: bool = True,
) -> Phase:
    """A phase that writes ``images``, verifies them, judges them and starts the app.

    ``images`` is ESP-IDF's ``build/flasher_args.json`` (or an
    :class:`~fixtures.images.ImageSet`, or an offset -> file map); it is
    loaded and checked now, so a product with a broken image set does not
    load. ``retries`` re-flashes after a failed attempt: a board that dropped
    off the line mid-write usually takes the second one.

    The phase FAILs (``flash_verdict``) when a station quality gate refuses
    the images or the time taken, or when verification finds the flash does
    not hold what was written; it ends in ERROR when the board cannot be
    reached or the link drops. ``flash_verdict`` is ``"pass"`` only for a
    flash that was written, verified, judged and started. Failures a retry
    cannot change (a board the build does not fit, a port that is gone, a
    reset the port cannot do) are not retried.

    With ``station_build`` (the default), a station whose file names a build
    (``build = "esp32-sensor@stable"``, docs/flashing.md) writes that build,
    downloaded and checked against the registry's manifest, instead of
    ``images``. Either way the record says which: ``build`` and
    ``build_sha256``.
    """
    image_set = images if isinstance(images, ImageSet) else load_image_set(images)
    own_digest = image_set_digest(image_set)

    @phase(name=name, measurements=FLASH_MEASUREMENTS, timeout=timeout, retries=retries)
    async def flash(ctx, flasher, dut):
        """Write the image set with esptool (ROM or stub loader, per the station), verify, start the app."""
        build = flasher.build if station_build else None
        images = build.images if build is not None else image_set
        ctx.measurements.build = build.label if build is not None else "product"
        ctx.measurements.build_sha256 = build.manifest.digest if build is not None else own_digest
        with flash_failures(ctx, "flash_verdict"):
            report, verdict = await write_images(ctx, flasher, dut.link, images)
            ctx.measurements.flash_verdict = verdict
            if report is not None:
                ctx.attach("flash.json", report.to_json(), "application/json")
                ctx.measurements.flash_seconds = round(report.write_seconds, 3)
                ctx.measurements.flash_bytes = report.bytes
                ctx.measurements.flash_throughput = round(report.throughput)
                app = images.app or images.images[-1]
                ctx.measurements.app_sha256 = next(i.sha256 for i in report.images if i.offset == app.offset)
            if verdict == "pass" and (clone := flasher.mac_problem()):
                # Another slot showed this board's MAC while it was being written.
                ctx.log.error("MAC refused", reason=clone)
                ctx.no_retry("the board's eFuses stay what they are")
                ctx.measurements.flash_verdict = verdict = clone
            if verdict == "pass":
                ctx.log.info("starting the app", how=await flasher.start_app(dut.link))
            # Otherwise left in its loader, where a retry can flash it again.

    return flash


@contextmanager
def flash_failures(ctx: Any, verdict: str) -> Iterator[None]:
    """Record a :class:`~fixtures.flasher.FlashError` raised inside as the ``verdict`` measurement, then re-raise it.

    So that no failed flash's record says ``"pass"`` (a flash judged and
    then refused by the board when started had said so), and so that a
    failure a retry cannot change is not retried (``ctx.no_retry``).
    """
    try:
        yield
    except FlashError as exc:
        ctx.measurements[verdict] = exc.message
        if not exc.retryable:
            ctx.no_retry(exc.message)
        raise


async def write_images(
    ctx: Any, flasher: EspFlasher, link: SerialLink, images: ImageSet
) -> tuple[FlashReport | None, str]:
    """Write ``images`` through the station's quality gates and verify them; the board stays in its loader.

    Returns the flasher's report (None if nothing was written) and the
    verdict: ``"pass"``, or why not -- a gate refused the images or the time
    taken, or the flash does not hold what was written. A board that cannot
    be reached, or drops off the line, raises (the phase ends in ERROR).
    """
    chip = flasher.chip or await flasher.detect(link)
    # A MAC no unit can have (detect said so), or one another slot has shown since.
    refused = [problem] if (problem := flasher.mac_problem()) else flasher.image_gate(images, chip)
    if refused:
        ctx.log.error("images refused by a quality gate", reasons="; ".join(refused))
        ctx.no_retry("the images and the board stay what they are")
        return None, "; ".join(refused)
    config = flasher.config
    ctx.log.info("flashing", images=images.describe(), baud=config.baud, loader="stub" if config.stub else "rom",
                 before=config.before, boot=config.boot)
    try:
        report = await flasher.flash(link, images, progress=lambda p: ctx.progress(p.fraction, p.detail))
    except (FlashVerifyFailed, FlashImagesRefused) as exc:
        ctx.log.error("verify failed" if isinstance(exc, FlashVerifyFailed) else "images refused", error=str(exc))
        if not exc.retryable:
            ctx.no_retry(exc.message)
        return None, exc.message
    for image in report.images:
        rewritten = {"file_sha256": image.file_sha256} if image.file_sha256 != image.sha256 else {}
        ctx.log.info("image written", name=image.name, offset=f"{image.offset:#x}", bytes=image.size,
                     wire_bytes=image.wire_bytes, seconds=round(image.seconds, 3), sha256=image.sha256, **rewritten)
    refused = flasher.report_gate(report)
    if refused:
        ctx.log.error("flash refused by a quality gate", reasons="; ".join(refused))
    return report, "; ".join(refused) or "pass"


@phase(measurements=BOOT_MEASUREMENTS, timeout=BOOT_WAIT_S + 5)
async def boot(ctx, dut):
    """Wait for the test firmware the flash phase started; if the boot chain refuses it, fail at once, quoting it.

    Reads the console directly rather than through the firmware client: at
    this point nothing else uses the console (every console phase depends on
    this one), and the boot chain's complaints are not firmware protocol.
    """
    banner = await read_boot_banner(dut.link, BOOT_WAIT_S)
    ctx.measurements.model = banner["model"]
    ctx.measurements.firmware_version = banner["fw"]
    ctx.identify(hardware_rev=banner["hw"])


_BOOT_LINE = re.compile(r"BOOT (\S+) fw=(\S+) hw=(\S+)")


async def read_boot_banner(link: SerialLink, timeout: float) -> dict[str, str]:
    """Read the boot log up to ``READY``; return the BOOT line's model, fw and hw.

    Raises :class:`BootFailed` as soon as a line says the boot chain gave up,
    and :class:`~fixtures.serial_link.DeviceTimeout` if nothing ends in READY.
    """
    boot_line = None
    with trio.move_on_after(timeout):
        while True:
            try:
                line = await link.read_line(math.inf)
            except ProtocolError:
                continue  # a UART settling out of reset
            if _BOOT_ERROR.match(line):
                raise BootFailed(f"{link.path}: the board cannot start the test firmware: {line.strip()!r}")
            if line == "READY":
                if boot_line is None:
                    raise ProtocolError(link.path, "READY without a BOOT line before it")
                return {"model": boot_line.group(1), "fw": boot_line.group(2), "hw": boot_line.group(3)}
            boot_line = _BOOT_LINE.fullmatch(line) or boot_line
    raise DeviceTimeout(link.path, "the boot banner to end in READY", timeout)
