"""QR labels: the ZPL, the printer client against the simulated printer, the phase, the report."""

from __future__ import annotations

import base64
import functools
import json
import struct
import zlib
from pathlib import Path

import pytest
import segno
import trio

from fixtures.label_printer import (
    LabelPrinter,
    PrinterNotReady,
    PrinterProtocolError,
    PrinterTimeout,
    PrinterUnreachable,
    UnsafeZplText,
    label_printer,
    open_label_printer,
    parse_address,
    parse_host_status,
    zpl_label,
)
from fixtures.sim.label_printer import SimLabelPrinter, open_sim_printer, open_simulated_printer
from phases.label import QR_ERROR, label_phase, qr_payload, qr_svg
from reports.render.html import render_run, write_html
from sequencer import Product, phase
from sequencer.fixtures import SlotInfo
from sequencer.records import Outcome, RunRecord
from sequencer.resources import SharedResource
from tests.conftest import outcomes, run_product
from tests.browser import chromium, chromium_args
from tests.htmltree import Element, parse

SERIAL, MAC, CLAIM = "SN000000042", "24:0A:C4:12:34:56", "K7QF-9X2M-P4TD"
HOSTILE_SVG = (b'<svg xmlns="http://www.w3.org/2000/svg" onload="alert(1)">'
               b"<script>alert(document.domain)</script></svg>")


def _label(serial: str = SERIAL, mac: str = MAC, claim: str = CLAIM) -> str:
    return zpl_label(serial, mac, claim, "esp32-sensor", qr_payload(serial, mac, claim))


# -- the ZPL --------------------------------------------------------------------


def test_zpl_is_one_format_with_a_qr_field_and_text_fields() -> None:
    payload = qr_payload(SERIAL, MAC, CLAIM)
    zpl = zpl_label(SERIAL, MAC, CLAIM, "esp32-sensor", payload)
    commands = zpl.replace("\n", "")
    assert commands.startswith("^XA") and commands.endswith("^XZ")
    assert commands.count("^XA") == 1 and commands.count("^XZ") == 1
    assert f"^BQN,2,5^FD{QR_ERROR}A,{payload}^FS" in commands
    assert "^CI28" in commands  # field data is UTF-8
    for value in (SERIAL, MAC, CLAIM, "esp32-sensor"):
        assert f"^A0N,28,28^FD{value}^FS" in commands or f"^A0N,34,34^FD{value}^FS" in commands
    # every field opened is closed
    assert commands.count("^FO") == commands.count("^FS") == commands.count("^FD")


def test_qr_payload_is_compact_json() -> None:
    payload = qr_payload(SERIAL, MAC, CLAIM)
    assert payload == '{"v":1,"sn":"SN000000042","mac":"24:0A:C4:12:34:56","cc":"K7QF-9X2M-P4TD"}'
    assert json.loads(qr_payload("SN\u00e9", MAC, CLAIM))["sn"] == "SN\u00e9"
    assert qr_payload("SN\u00e9", MAC, CLAIM).isascii()


@pytest.mark.parametrize("field", ["serial", "mac", "claim_code", "product", "qr_data"])
@pytest.mark.parametrize("char", ["^", "~", "\n", "\r", "\x00", "\x1b", "\x85"])
def test_zpl_refuses_command_and_control_characters_in_every_text(field: str, char: str) -> None:
    values = {"serial": SERIAL, "mac": MAC, "claim_code": CLAIM, "product": "esp32-sensor", "qr_data": "x"}
    values[field] = f"AB{char}XZ"
    with pytest.raises(UnsafeZplText) as caught:
        zpl_label(**values)
    assert caught.value.field == field and caught.value.char == char
    assert str(caught.value).startswith(f"{field} 'AB")
    assert "refusing to print" in str(caught.value)


def test_zpl_takes_printable_unicode() -> None:
    assert "^FDCapteur d'humidit\u00e9^FS" in zpl_label(SERIAL, MAC, CLAIM, "Capteur d'humidit\u00e9", "x")


@pytest.mark.parametrize(
    ("address", "expected"),
    [("10.0.0.5", ("10.0.0.5", 9100)), ("10.0.0.5:9101", ("10.0.0.5", 9101)),
     ("printer.line1", ("printer.line1", 9100)), ("[fd00::5]:9100", ("fd00::5", 9100)),
     ("fd00::5", ("fd00::5", 9100))],
)
def test_printer_addresses(address: str, expected: tuple[str, int]) -> None:
    assert parse_address(address) == expected


@pytest.mark.parametrize("address", ["", ":9100", "10.0.0.5:0", "10.0.0.5:http", "[fd00::5", "10.0.0.5:70000"])
def test_bad_printer_addresses_are_refused(address: str) -> None:
    with pytest.raises(ValueError, match="label printer address|empty"):
        parse_address(address)


def test_host_status_answers_are_parsed_and_malformed_ones_refused() -> None:
    ready = (b"\x02030,0,0,0305,000,0,0,0,000,0,0,0\x03\r\n\x02001,0,0,1,0,2,6,0,00000000,1,000\x03\r\n"
             b"\x021234,0\x03\r\n")
    status = parse_host_status(ready)
    assert status.problems == ()  # ribbon out on a direct-thermal printer is not a problem
    out = parse_host_status(ready.replace(b"030,0,0", b"030,1,1").replace(b"001,0,0,1,0", b"001,0,1,1,1"))
    assert out.problems == ("paper out", "print head open", "ribbon out", "paused")
    with pytest.raises(ValueError, match="three STX"):
        parse_host_status(b"\x02030,0,0\x03")
    with pytest.raises(ValueError, match="12 and 11 fields"):
        parse_host_status(b"\x02a\x03\x02b\x03\x02c\x03")


# -- the client against the simulated printer ---------------------------------------------


async def test_printer_receives_one_label_with_qr_payload_and_texts() -> None:
    async with open_sim_printer() as sim:
        status = await sim.client().print_zpl(_label())
        assert status.problems == ()
        [received] = sim.labels
    assert received.printed and received.problems == ()
    assert received.qr_error == QR_ERROR
    assert json.loads(received.qr_data) == {"v": 1, "sn": SERIAL, "mac": MAC, "cc": CLAIM}
    assert received.texts == ("esp32-sensor", "S/N", SERIAL, "MAC", MAC, "CLAIM", CLAIM)
    assert received.zpl == _label().replace("\n", "")
    assert sim.status_queries == 2 and sim.connections == 1 and sim.problems == []


async def test_sim_parses_a_label_that_arrives_one_byte_at_a_time() -> None:
    async with open_sim_printer() as sim:
        stream = await trio.open_tcp_stream(sim.host, sim.port)
        async with stream:
            for byte in (_label() + "~HS").encode():
                await stream.send_all(bytes([byte]))
            answer = b""
            while answer.count(b"\x03") < 3:
                answer += await stream.receive_some(512)
        assert parse_host_status(answer).problems == ()
        [received] = sim.labels
        assert received.texts[2] == SERIAL and json.loads(received.qr_data)["cc"] == CLAIM


async def test_sim_keeps_a_format_cut_short_and_says_so() -> None:
    async with open_sim_printer() as sim:
        stream = await trio.open_tcp_stream(sim.host, sim.port)
        async with stream:
            await stream.send_all(b"^XA^FO1,1^A0N,20,20^FDwhole^FS^FO1,30^A0N,20,20^FDhal")
        with trio.fail_after(2):
            while not sim.labels:
                await trio.sleep(0.01)
    [cut] = sim.labels
    assert cut.texts == ("whole",) and cut.problems == ("connection closed inside a format (no ^XZ)",)


async def test_an_unchecked_serial_would_forge_a_second_label() -> None:
    # Why zpl_label refuses '^': the printer reads it as a command, ends the
    # label early and prints whatever follows as another one.
    serial = "SN1^FS^XZ^XA^FO0,0^A0N,50,50^FDFORGED"
    zpl = _label().replace(SERIAL, serial)
    async with open_sim_printer() as sim:
        await sim.client().print_zpl(zpl)
    # The serial is in the QR payload and in a text field: each copy forges a label.
    assert len(sim.labels) == 3
    assert all(label.texts[0].startswith("FORGED") for label in sim.labels[1:])


async def test_refused_connection_names_host_and_port() -> None:
    async with open_sim_printer(refuse=True) as sim:
        with pytest.raises(PrinterUnreachable) as caught:
            await sim.client().print_zpl(_label())
        assert str(caught.value) == f"label printer at 127.0.0.1:{sim.port} refused the connection"
        await sim.accept_connections()  # switched back on: prints again
        await sim.client().print_zpl(_label())
        assert len(sim.labels) == 1


async def test_hung_printer_times_out_naming_host_and_port() -> None:
    async with open_sim_printer(hang=True) as sim:
        with trio.fail_after(5):
            with pytest.raises(PrinterTimeout) as caught:
                await sim.client(timeout=0.2).print_zpl(_label())
        assert str(caught.value) == f"label printer at {sim.address} did not answer ~HS before the label within 0.2 s"
        assert sim.labels == []


@pytest.mark.parametrize(("fault", "problem"), [("paper_out", "paper out"), ("head_open", "print head open"),
                                                 ("paused", "paused")])
async def test_printer_that_cannot_print_is_not_sent_the_label(fault: str, problem: str) -> None:
    async with open_sim_printer() as sim:
        setattr(sim, fault, True)
        with pytest.raises(PrinterNotReady) as caught:
            await sim.client().print_zpl(_label())
        assert str(caught.value) == f"label printer at {sim.address} is not ready: {problem}"
        assert sim.labels == []


async def test_a_peer_that_is_not_a_printer_is_a_protocol_error() -> None:
    async def chatter(stream: trio.SocketStream) -> None:
        async with stream:
            await stream.send_all(b"HTTP/1.1 400 Bad Request\r\n" * 100)

    async with trio.open_nursery() as nursery:
        [listener] = await nursery.start(functools.partial(trio.serve_tcp, chatter, 0, host="127.0.0.1"))
        port = listener.socket.getsockname()[1]
        with pytest.raises(PrinterProtocolError, match=rf"^label printer at 127\.0\.0\.1:{port} sent"):
            await LabelPrinter("127.0.0.1", port, timeout=1).print_zpl(_label())
        nursery.cancel_scope.cancel()


async def test_open_label_printer_checks_the_printer_is_there() -> None:
    async with open_sim_printer() as sim:
        async with open_label_printer(sim.address, timeout=1) as printer:
            assert printer == LabelPrinter("127.0.0.1", sim.port, timeout=1)
        assert sim.status_queries == 1
        await sim.refuse_connections()
        with pytest.raises(PrinterUnreachable, match="refused the connection"):
            async with open_label_printer(sim.address, timeout=1):
                pass


async def test_simulated_station_printer_and_fixture_factory() -> None:
    async with open_simulated_printer() as printer:
        assert (await printer.status()).problems == ()
    factory = label_printer("10.0.0.5", timeout=1)
    async with factory(SlotInfo(0, "/dev/sim0", "st")) as slot_printer:
        assert slot_printer.address == "10.0.0.5:9100"


# -- the phase, through the engine -------------------------------------------------------


def identity_phase(**fixed: str):  # type: ignore[no-untyped-def]
    """A stand-in for the phases that read and provision identity: per-slot serial, MAC and claim code."""

    @phase(name="identify")
    async def identify(ctx, slot) -> None:
        ident = {"serial": f"SN{slot.index:09d}", "mac": f"24:0A:C4:00:00:{slot.index:02X}",
                 "claim_code": f"CLAIM-{slot.index:04d}", **fixed}
        ctx.identify(**{k: v for k, v in ident.items() if v})

    return identify


def labelled_product(**fixed: str) -> Product:
    identify = identity_phase(**fixed)
    return Product("labelled", [identify, label_phase().depends_on(identify)], resources={"printer": "zpl-printer"})


async def run_labelled(sim: SimLabelPrinter, store_path: Path, *, slots: int = 1, timeout: float = 2.0,
                       **fixed: str) -> list[RunRecord]:
    printer = SharedResource("printer", 1, sim.client(timeout=timeout))
    return await run_product(labelled_product(**fixed), store_path, slots=slots, resources={"printer": printer})


def attachment(run: RunRecord, name: str) -> bytes:
    [found] = [a for a in run.phase("label").attachments if a.name == name]
    return found.data


async def test_label_phase_prints_exactly_one_label_with_the_dut_identity(store_path: Path) -> None:
    async with open_sim_printer() as sim:
        [run] = await run_labelled(sim, store_path)
    assert outcomes(run) == {"identify": "PASS", "label": "PASS"}
    [received] = sim.labels
    serial, mac, claim = "SN000000000", "24:0A:C4:00:00:00", "CLAIM-0000"
    assert json.loads(received.qr_data) == {"v": 1, "sn": serial, "mac": mac, "cc": claim}
    assert {serial, mac, claim} <= set(received.texts) and "labelled" in received.texts
    # What the printer will encode is what we meant to encode...
    payload = qr_payload(serial, mac, claim)
    assert (segno.make_qr(received.qr_data, error=received.qr_error, boost_error=False).matrix
            == segno.make_qr(payload, error=QR_ERROR, boost_error=False).matrix)
    # ...and the SVG in the record is that same code; the ZPL in the record is what was sent.
    assert attachment(run, "label-qr.svg").decode() == qr_svg(received.qr_data)
    assert attachment(run, "label.zpl").decode().replace("\n", "") == received.zpl
    values = {m.name: m.value for m in run.phase("label").measurements}
    assert values == {"label_verdict": "pass", "label_printed": True, "label_printer": sim.address}


async def test_slots_queue_for_the_one_printer_and_each_gets_its_own_label(store_path: Path) -> None:
    async with open_sim_printer() as sim:
        runs = await run_labelled(sim, store_path, slots=4)
    assert all(r.outcome is Outcome.PASS for r in runs)
    assert sorted(json.loads(label.qr_data)["sn"] for label in sim.labels) == [f"SN{i:09d}" for i in range(4)]
    assert len({label.connection for label in sim.labels}) == 4


async def test_missing_claim_code_fails_with_a_clear_reason_and_prints_nothing(store_path: Path) -> None:
    async with open_sim_printer() as sim:
        [run] = await run_labelled(sim, store_path, claim_code="")
    label = run.phase("label")
    assert label.outcome is Outcome.FAIL
    assert "the DUT identity has no claim_code" in label.reason
    assert sim.labels == [] and sim.connections == 0
    assert not label.attachments


async def test_refusing_printer_is_an_error_naming_host_and_port(store_path: Path) -> None:
    async with open_sim_printer(refuse=True) as sim:
        [run] = await run_labelled(sim, store_path)
    label = run.phase("label")
    assert label.outcome is Outcome.ERROR
    assert label.reason == f"PrinterUnreachable: label printer at 127.0.0.1:{sim.port} refused the connection"
    # The label that could not be printed is still in the record.
    assert {a.name for a in label.attachments} == {"label-qr.svg", "label.zpl"}


async def test_hung_printer_is_an_error_naming_host_and_port(store_path: Path) -> None:
    async with open_sim_printer(hang=True) as sim:
        [run] = await run_labelled(sim, store_path, timeout=0.2)
    assert run.phase("label").outcome is Outcome.ERROR
    assert f"label printer at {sim.address} did not answer ~HS" in run.phase("label").reason


async def test_zpl_injection_in_a_serial_is_refused(store_path: Path) -> None:
    async with open_sim_printer() as sim:
        [run] = await run_labelled(sim, store_path, serial="SN1^XZ^XA^FO0,0^A0N,50,50^FDFORGED^FS^XZ")
    label = run.phase("label")
    assert label.outcome is Outcome.FAIL
    assert "serial 'SN1^XZ^XA" in label.reason and "'^', which starts a ZPL command" in label.reason
    assert sim.labels == [] and sim.connections == 0


async def test_a_resource_without_a_printer_is_a_clear_error(store_path: Path) -> None:
    [run] = await run_product(labelled_product(), store_path, resources={"printer": SharedResource("printer")})
    assert run.phase("label").outcome is Outcome.ERROR
    assert 'instrument = "zpl-printer"' in run.phase("label").reason


# -- the HTML report -------------------------------------------------------------------


def label_section(root: Element) -> Element:
    for s in root.find_all("section", "phase"):
        if s.find("h2").find("span").clean_text.endswith(". label"):
            return s
    raise AssertionError("no label section")


def attachment_boxes(section: Element) -> dict[str, Element]:
    return {b.find("span", "aname").text: b for b in section.find_all("div", "attachment")}


async def test_report_shows_the_qr_code_as_an_embedded_image(store_path: Path) -> None:
    async with open_sim_printer() as sim:
        [run] = await run_labelled(sim, store_path)
    html = render_run(run)
    boxes = attachment_boxes(label_section(parse(html)))
    img = boxes["label-qr.svg"].find("img")
    prefix = "data:image/svg+xml;base64,"
    assert img.attrs["src"].startswith(prefix)
    assert base64.b64decode(img.attrs["src"].removeprefix(prefix)) == attachment(run, "label-qr.svg")
    assert img.attrs["alt"] == "label-qr.svg"
    # an image, never inline markup: the page's own <svg>s are only its plots and gauges
    assert 'class="segno"' not in html and "qrline" not in html
    assert "^BQN,2,5" in boxes["label.zpl"].find("pre").text


async def test_hostile_svg_attachment_is_an_img_never_markup(store_path: Path) -> None:
    @phase
    async def label(ctx) -> None:
        ctx.attach("label-qr.svg", HOSTILE_SVG, "image/svg+xml")

    [run] = await run_product(Product("p", [label]), store_path)
    html = render_run(run)
    assert "<script" not in html.lower() and "onload" not in html
    img = attachment_boxes(label_section(parse(html)))["label-qr.svg"].find("img")
    assert base64.b64decode(img.attrs["src"].split(",", 1)[1]) == HOSTILE_SVG


# -- a real browser --------------------------------------------------------------------


def _png_pixels(data: bytes) -> tuple[int, int, int, bytes]:
    """(width, height, bytes per pixel, raw pixels) of an 8-bit, non-interlaced RGB(A) PNG."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, idat = 8, b""
    width = height = bpp = 0
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        body = data[pos + 8 : pos + 8 + length]
        if kind == b"IHDR":
            width, height, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", body)
            assert depth == 8 and colour in (2, 6) and interlace == 0, (depth, colour, interlace)
            bpp = 3 if colour == 2 else 4
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    raw, stride = zlib.decompress(idat), width * bpp
    out, previous = bytearray(), bytearray(stride)
    for row in range(height):
        kind, line = raw[row * (stride + 1)], bytearray(raw[row * (stride + 1) + 1 : (row + 1) * (stride + 1)])
        for i in range(stride):
            left = line[i - bpp] if i >= bpp else 0
            up, corner = previous[i], previous[i - bpp] if i >= bpp else 0
            if kind == 1:
                line[i] = (line[i] + left) & 0xFF
            elif kind == 2:
                line[i] = (line[i] + up) & 0xFF
            elif kind == 3:
                line[i] = (line[i] + (left + up) // 2) & 0xFF
            elif kind == 4:
                p = left + up - corner
                pa, pb, pc = abs(p - left), abs(p - up), abs(p - corner)
                line[i] = (line[i] + (left if pa <= pb and pa <= pc else up if pb <= pc else corner)) & 0xFF
        out += line
        previous = line
    return width, height, bpp, bytes(out)


def _black_pixels(png: bytes) -> int:
    _, _, bpp, pixels = _png_pixels(png)
    return sum(1 for i in range(0, len(pixels), bpp) if max(pixels[i : i + 3]) < 40)


@pytest.mark.slow
async def test_chromium_draws_the_qr_code(store_path: Path, tmp_path: Path) -> None:
    binary = chromium()
    async with open_sim_printer() as sim:
        [run] = await run_labelled(sim, store_path)
    svg = attachment(run, "label-qr.svg")
    # The same page with the picture swapped for bytes no browser can draw: the
    # difference in black pixels is the QR code the browser drew.
    html = render_run(run)
    encoded = base64.b64encode(svg).decode()
    pages = {"qr": html, "broken": html.replace(encoded, base64.b64encode(b"not an image").decode())}
    shots = {}
    for name, html in pages.items():
        page = write_html(tmp_path / f"{name}.html", html)
        shot = tmp_path / f"{name}.png"
        args = [*chromium_args(binary, tmp_path / f"profile-{name}"),
                f"--screenshot={shot}", "--window-size=1000,2400", "--hide-scrollbars", page.resolve().as_uri()]
        result = await trio.run_process(args, capture_stdout=True, capture_stderr=True, check=False)
        assert result.returncode == 0, result.stderr.decode(errors="replace")[-2000:]
        shots[name] = shot.read_bytes()
    dark = sum(sum(row) for row in segno.make_qr(
        qr_payload("SN000000000", "24:0A:C4:00:00:00", "CLAIM-0000"), error=QR_ERROR, boost_error=False).matrix)
    drawn = _black_pixels(shots["qr"]) - _black_pixels(shots["broken"])
    # Each dark module is a 4x4 block at scale 4; allow for anti-aliased edges.
    assert drawn > 0.8 * dark * 16, (drawn, dark)
