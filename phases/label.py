"""The ``label`` phase: print the unit's QR label on the station's shared ZPL printer.

The QR code carries what a customer's phone app needs to claim the device --
serial, MAC and claim code -- as compact JSON (see :func:`qr_payload`). The
phase takes them from the DUT identity an earlier phase stamped on the run
(``ctx.identify(serial=..., mac=..., claim_code=...)``), so wire it after the
phases that read and provision them::

    label = label_phase().depends_on(identify, provision)
    product = Product(..., phases=[..., label], resources={"printer": "zpl-printer", ...})

Its record keeps the QR code as an SVG (``label-qr.svg``, shown in the HTML
report) and the exact ZPL sent (``label.zpl``), so a label found on a unit
can be matched with its test record, and a missing one explained.

Judging: ``label_verdict`` is ``"pass"`` or why no label was printed; it is
declared first, so that is the phase's reason when it FAILs. A DUT whose
identity is missing or unprintable (a ``^`` in a serial would inject ZPL)
FAILs; a printer that is off, wedged or out of paper raises, and the phase
ends in ERROR naming the printer's ``host:port`` -- a station problem, not
the unit's.
"""

from __future__ import annotations

import io
import json

import segno
import trio

from fixtures.label_printer import UnsafeZplText, zpl_label
from sequencer import Measurement, phase
from sequencer.phase import Phase

__all__ = ["IDENTITY_KEYS", "LABEL_MEASUREMENTS", "QR_ERROR", "label", "label_phase", "qr_payload", "qr_svg"]

#: DUT identity keys a label needs, in the order they are reported missing.
IDENTITY_KEYS = ("serial", "mac", "claim_code")
#: QR error-correction level of both the printed code and the SVG in the record.
QR_ERROR = "M"

LABEL_MEASUREMENTS = [
    # First, so that when it fails it is the phase's reason.
    Measurement("label_verdict").reported("pass").doc("'pass', or why no label was printed"),
    Measurement("label_printed").equals(True).doc("the printer read the label and reported itself ready after it"),
    Measurement("label_printer").doc("host:port of the printer that took the label"),
]


def qr_payload(serial: str, mac: str, claim_code: str) -> str:
    """The QR code's text: ``{"v":1,"sn":...,"mac":...,"cc":...}``, compact ASCII JSON.

    JSON so an app parses it with its standard library and a later version
    can add keys (``v`` says which); ASCII so it is the same bytes whatever
    the printer's code page.
    """
    return json.dumps({"v": 1, "sn": serial, "mac": mac, "cc": claim_code}, separators=(",", ":"), ensure_ascii=True)


def qr_svg(payload: str, *, scale: int = 4) -> str:
    """The QR code of ``payload`` as a standalone SVG (black on white, 4-module quiet zone).

    Always a full QR code (never Micro QR) at :data:`QR_ERROR`, as the printer
    encodes it, so the picture in the record matches the label.
    """
    qr = segno.make_qr(payload, error=QR_ERROR, boost_error=False)
    out = io.BytesIO()
    qr.save(out, kind="svg", scale=scale, border=4, dark="#000", light="#fff", xmldecl=False)
    return out.getvalue().decode("ascii")


def label_phase(
    *,
    name: str = "label",
    resource: str = "printer",
    product_name: str | None = None,
    timeout: float = 30.0,
    retries: int = 0,
) -> Phase:
    """A phase that prints the unit's label on the station resource ``resource``.

    ``product_name`` is the text at the top of the label; by default the
    run's product name. ``timeout`` must cover the queue for the printer:
    every slot of the station prints on it, one label at a time.
    """

    @phase(name=name, measurements=LABEL_MEASUREMENTS, timeout=timeout, retries=retries)
    async def label(ctx, resources):
        """Print the unit's QR label (serial, MAC, claim code) on the station's ZPL printer."""
        dut = ctx.dut
        missing = [key for key in IDENTITY_KEYS if not dut.get(key)]
        if missing:
            ctx.log.error("identity incomplete; no label", missing=",".join(missing))
            ctx.measurements.label_verdict = (
                f"the DUT identity has no {' or '.join(missing)}; a label needs serial, mac and claim_code"
            )
            ctx.measurements.label_printed = False
            return
        serial, mac, claim_code = (dut[key] for key in IDENTITY_KEYS)
        payload = qr_payload(serial, mac, claim_code)
        try:
            zpl = zpl_label(serial, mac, claim_code, product_name or ctx.record.product, payload, error=QR_ERROR)
        except UnsafeZplText as exc:
            ctx.log.error("identity unprintable; no label", field=exc.field, character=repr(exc.char))
            ctx.measurements.label_verdict = str(exc)
            ctx.measurements.label_printed = False
            return
        # Kept before printing, so a label that failed to print is still explained. Drawn in a
        # thread: choosing the QR mask is ~40 ms of Python, and every slot reaches its label at
        # about the same time, while the others are still registering and reading their ports.
        ctx.attach("label-qr.svg", await trio.to_thread.run_sync(qr_svg, payload), "image/svg+xml")
        ctx.attach("label.zpl", zpl, "text/plain")
        async with resources[resource] as printer:
            if not hasattr(printer, "print_zpl"):  # a plain lock, or another instrument
                raise TypeError(
                    f"station resource {resource!r} holds {type(printer).__name__}, not a label printer: "
                    f'declare it with instrument = "zpl-printer" and port = "host:9100"'
                )
            ctx.measurements.label_printer = printer.address
            status = await printer.print_zpl(zpl)
        ctx.log.info("label printed", printer=printer.address, queued=status.formats_queued)
        ctx.measurements.label_printed = True
        ctx.measurements.label_verdict = "pass"

    return label


#: The phase with its defaults: resource ``printer``, the run's product name on the label.
label = label_phase()
