"""The retest gate: before a unit is flashed, ask whether it has already passed and been registered.

A unit that comes back to the station -- sent round again by mistake, or
pulled from the line for rework -- must not silently become a second device,
and must not have its identity overwritten. The gate looks the board up by
the MAC ``detect`` read from its eFuses (the serial is not known until the
test firmware runs) at the station's provisioning service, which knows every
unit that passed and was registered, whichever station tested it.

What happens to a unit found there is the product's policy:

* ``"refuse"`` -- the phase FAILs with a sentence naming the device, so the
  operator puts the unit aside; nothing after the gate (flashing included)
  runs.
* ``"allow"`` -- a retest: the phase passes and says so in the record
  (``retest = True``, the device id it already has). The unit keeps its
  identity: its key stays on the device (``KEYGEN`` keeps an existing key),
  and registration with the same serial, MAC and key returns the same device
  id and claim code (``registration_kind = "retest"``).

Wire it between ``detect`` and ``flash``::

    gate = retest_gate("allow").depends_on(detect)
    flash = esp32.flash_images(IMAGES).depends_on(gate)
"""

from __future__ import annotations

from typing import Any

from phases.register import ClientOptions, ProvisioningError
from sequencer import Measurement, phase
from sequencer.phase import Phase

__all__ = ["RETEST_POLICIES", "retest_gate"]

RETEST_POLICIES = ("refuse", "allow")

RETEST_MEASUREMENTS = [
    # First, so that a refusal is the phase's reason, in the gate's own words.
    Measurement("retest_verdict").reported("pass").doc("'pass', or why this unit may not be tested again"),
    Measurement("retest").doc("whether the unit has passed and been registered before"),
    Measurement("registered_device_id").doc("the device id it already has ('' for a new unit)"),
]


def retest_gate(
    policy: str = "refuse",
    *,
    name: str = "retest_gate",
    timeout: float = 5.0,
    retries: int = 3,
) -> Phase:
    """A phase that looks the unit up by MAC at the station's provisioning service; see the module docstring.

    ``policy`` is ``"refuse"`` or ``"allow"``. The lookup is retried like a
    registration (``timeout`` per attempt, ``retries``); a service that stays
    away ends the phase in ERROR, since nobody can tell whether the unit is
    new.
    """
    if policy not in RETEST_POLICIES:
        raise ValueError(f"retest_gate: policy must be one of {', '.join(RETEST_POLICIES)}, got {policy!r}")
    options = ClientOptions(timeout=timeout, retries=retries)

    @phase(name=name, measurements=RETEST_MEASUREMENTS, timeout=options.worst_case_s() + 10.0)
    async def gate(ctx: Any, provisioning: Any) -> None:
        """Refuse or flag a unit that already passed and was registered (looked up by its eFuse MAC)."""
        mac = ctx.dut.get("mac")
        if not mac:
            raise LookupError("the retest gate needs the unit's MAC: run it after detect")
        try:
            async with options.client(provisioning.url, tls=provisioning.tls) as client:
                devices = await client.find_by_mac(mac)
        except ProvisioningError as exc:
            raise ProvisioningError(f"retest gate: cannot tell whether {mac} is new: {exc}") from None
        if not devices:
            ctx.log.info("new unit: not registered before", mac=mac)
            ctx.measurements.retest = False
            ctx.measurements.registered_device_id = ""
            ctx.measurements.retest_verdict = "pass"
            return
        device = devices[0]
        ctx.measurements.retest = True
        ctx.measurements.registered_device_id = device["device_id"]
        described = (f"unit {mac} already passed and is registered as device {device['device_id']} "
                     f"(serial {device['serial']}, first registered {device['first_registered_at']})")
        if policy == "refuse":
            ctx.log.warning("retest refused", mac=mac, device_id=device["device_id"], serial=device["serial"])
            ctx.measurements.retest_verdict = f"{described}; {ctx.record.product} does not allow retests"
            return
        ctx.log.info("retest: the unit keeps its identity and device id", mac=mac, device_id=device["device_id"],
                     serial=device["serial"])
        ctx.identify(device_id=device["device_id"])
        ctx.measurements.retest_verdict = "pass"

    return gate
