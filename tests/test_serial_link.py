"""SerialLink against real pyserial on real ptys, with a scripted device end."""

from __future__ import annotations

import math
import unicodedata

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from fixtures.serial_link import (
    DeviceTimeout,
    PortLost,
    PortUnavailable,
    ProtocolError,
    open_serial_link,
)
from fixtures.sim.pty import PtyEndpoint


@pytest.fixture
def device():
    """The device end of a pty, driven by the test itself."""
    with PtyEndpoint() as endpoint:
        yield endpoint


async def test_read_line_strips_terminators(device):
    async with open_serial_link(device.path) as link:
        await device.write(b"hello\r\nworld\n\n\xc3\xa9t\xc3\xa9\n")
        assert [await link.read_line() for _ in range(4)] == ["hello", "world", "", "été"]


async def test_every_carriage_return_before_the_newline_is_a_terminator(device):
    # ESP-IDF's console translates LF to CRLF, so firmware printing "\r\n" sends "\r\r\n".
    async with open_serial_link(device.path) as link:
        await device.write(b"READY\r\r\nIDENT x=1\r\n")
        assert [await link.read_line(), await link.read_line()] == ["READY", "IDENT x=1"]


async def test_a_port_that_goes_away_while_lent_is_port_lost_unless_the_borrower_said_why():
    class BorrowerFailed(Exception):
        pass

    endpoint = PtyEndpoint()
    async with open_serial_link(endpoint.path) as link:
        with pytest.raises(BorrowerFailed):  # what the borrower ran into is what the caller hears
            with link.lend():
                endpoint.close()
                raise BorrowerFailed("no answer from the bootloader")
    endpoint = PtyEndpoint()
    async with open_serial_link(endpoint.path) as link:
        with pytest.raises(PortLost, match=f"^{endpoint.path}: the port went away while it was lent"):
            with link.lend():
                endpoint.close()


async def test_input_the_borrower_read_and_gave_back_comes_before_what_the_port_still_holds(device):
    async with open_serial_link(device.path) as link:
        await device.write(b"before\n")
        assert await link.read_line() == "before"
        with pytest.raises(RuntimeError, match="only be returned while the port is lent"):
            link.return_input(b"x\n")
        with link.lend():
            link.return_input(b"ets Jun  8\r\nBOO")
            await device.write(b"T esp32\r\nREADY\r\n")
        assert [await link.read_line() for _ in range(3)] == ["ets Jun  8", "BOOT esp32", "READY"]
        assert [e.text for e in link.transcript][-3:] == ["ets Jun  8", "BOOT esp32", "READY"]


async def test_a_port_whose_device_went_away_is_port_lost_naming_it_for_every_call():
    # Unplugging a USB adapter hangs its tty up: reads see end of file, writes
    # and termios calls fail with EIO -- the flush raising termios.error, which
    # is not even an OSError.
    endpoint = PtyEndpoint()
    async with open_serial_link(endpoint.path) as link:
        endpoint.close()
        with pytest.raises(PortLost, match=f"^{endpoint.path}: the port went away while flushing its input: "
                                           "Input/output error$"):
            link.reset_input()
        with pytest.raises(PortLost, match=f"^{endpoint.path}: "):
            await link.request("IDENT")  # a command flushes stale input first
        with pytest.raises(PortLost, match=f"^{endpoint.path}: "):
            await link.read_line()


async def test_send_line_reaches_device(device):
    async with open_serial_link(device.path) as link:
        await link.send_line("IDENT")
        await link.write(b"\x00raw")
        received = b""
        while len(received) < len(b"IDENT\n\x00raw"):  # a pty may hand the bytes over in parts
            received += await device.read()
        assert received == b"IDENT\n\x00raw"
        with pytest.raises(ValueError, match="line break"):
            await link.send_line("A\nB")


async def test_request_discards_stale_input_and_skips_empty_lines(device):
    async def answer():
        assert await device.read() == b"PING\n"
        await device.write(b"\r\n\r\nPONG\r\n")

    async with open_serial_link(device.path) as link:
        await device.write(b"STALE late answer\n")
        await trio.sleep(0.02)  # let it reach the host's input queue
        async with trio.open_nursery() as nursery:
            nursery.start_soon(answer)
            assert await link.request("PING") == "PONG"


async def test_timeout_fires_promptly_and_names_port_and_wait(device):
    async with open_serial_link(device.path) as link:
        start = trio.current_time()
        with pytest.raises(DeviceTimeout) as caught:
            await link.read_line(timeout=0.1)
        elapsed = trio.current_time() - start
        assert 0.1 <= elapsed < 0.5
        assert str(caught.value) == f"{device.path}: timed out after 0.1 s waiting for a line"
        assert caught.value.seconds == 0.1

        with pytest.raises(DeviceTimeout, match=r"0\.05 s waiting for a response to 'PING'"):
            await link.request("PING", timeout=0.05)


async def test_timeout_message_shows_partial_line(device):
    async with open_serial_link(device.path) as link:
        await device.write(b"REA")
        with pytest.raises(DeviceTimeout, match=r"received b'REA' and no terminator"):
            await link.read_line(timeout=0.1)
        # The fragment is still there: the rest of the line completes it.
        await device.write(b"DY\n")
        assert await link.read_line() == "READY"


async def test_non_utf8_is_protocol_error_and_the_link_recovers(device):
    async with open_serial_link(device.path) as link:
        await device.write(b"\xff\xfeabc\nOK\n")
        with pytest.raises(ProtocolError, match=r"not UTF-8: b'\\xff\\xfeabc'") as caught:
            await link.read_line()
        assert caught.value.port == device.path
        assert await link.read_line() == "OK"


async def test_control_characters_are_garbage_but_tab_and_ansi_colour_are_not(device):
    async with open_serial_link(device.path) as link:
        await device.write(b"a\x00b\nc\x07\n\x1b[0;32mI (31) boot:\tok\x1b[0m\n")
        for _ in range(2):
            with pytest.raises(ProtocolError, match="control character"):
                await link.read_line()
        assert await link.read_line() == "\x1b[0;32mI (31) boot:\tok\x1b[0m"


async def test_endless_line_is_cut_at_max_line_and_the_next_line_survives(device):
    async def spew():
        while True:
            await device.write(b"x" * 512)
            await trio.sleep(0)

    async with open_serial_link(device.path, max_line=64) as link:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(spew)
            with trio.fail_after(2):
                with pytest.raises(ProtocolError, match="line longer than 64 bytes"):
                    await link.read_line()
            nursery.cancel_scope.cancel()
        # The rest of the runaway line is skipped, not taken for a new line.
        await device.write(b"yyyy\nNEXT\n")
        assert await link.read_line() == "NEXT"


async def test_max_line_boundary(device):
    async with open_serial_link(device.path, max_line=8) as link:
        await device.write(b"12345678\n123456789\nafter\n")
        assert await link.read_line() == "12345678"
        with pytest.raises(ProtocolError, match="longer than 8 bytes"):
            await link.read_line()
        assert await link.read_line() == "after"


async def test_raw_reads_share_the_buffer_with_lines(device):
    async with open_serial_link(device.path) as link:
        await device.write(b"AT\r\nOK\r\n> ")
        assert await link.read_until(b"OK\r\n") == b"AT\r\nOK\r\n"
        assert await link.read_some() == b"> "
        await device.write(b"line\nrest")
        assert await link.read_line() == "line"
        assert await link.read_until(b"t") == b"rest"

        await device.write(b"z" * 100)
        with pytest.raises(ProtocolError, match=r"no b'\\r\\n' within 50 bytes"):
            await link.read_until(b"\r\n", limit=50)
        link.reset_input()
        with pytest.raises(DeviceTimeout, match="waiting for any data"):
            await link.read_some(timeout=0.05)


async def test_reset_input_discards_buffered_and_queued_bytes(device):
    async with open_serial_link(device.path) as link:
        await device.write(b"old 1\nold 2\npartial")
        assert await link.read_line() == "old 1"
        await trio.sleep(0.02)
        link.reset_input()
        await device.write(b"new\n")
        assert await link.read_line() == "new"


async def test_cancelled_read_loses_no_bytes(device):
    async with open_serial_link(device.path) as link:
        await device.write(b"HEL")
        with trio.move_on_after(0.05) as scope:
            await link.read_line(timeout=math.inf)
        assert scope.cancelled_caught
        await device.write(b"LO\n")
        assert await link.read_line() == "HELLO"


async def test_write_that_the_port_cannot_accept_times_out(device):
    # Nobody reads the device end, so the pty's buffer fills up.
    async with open_serial_link(device.path) as link:
        with pytest.raises(DeviceTimeout, match=r"waiting for the port to accept \d+ of 1000000 bytes"):
            await link.write(b"x" * 1_000_000, timeout=0.2)


async def test_two_readers_at_once_is_an_error(device):
    async with open_serial_link(device.path) as link:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(link.read_line, math.inf)
            await trio.sleep(0.01)
            with pytest.raises(trio.BusyResourceError, match="already reading"):
                await link.read_line()
            with pytest.raises(trio.BusyResourceError, match="already reading"):
                link.reset_input()
            with pytest.raises(trio.BusyResourceError, match="already reading"):
                link.read_line_nowait()
            nursery.cancel_scope.cancel()


async def test_read_line_nowait_takes_only_lines_already_whole(device):
    async with open_serial_link(device.path) as link:
        with pytest.raises(trio.WouldBlock):
            link.read_line_nowait()
        await device.write(b"one\r\ntwo\n\xff\nthr")
        await trio.sleep(0.02)  # let it all reach the host's input queue
        assert await link.read_line() == "one"  # reads the kernel's queue: "two" and the rest come with it
        assert link.read_line_nowait() == "two"
        with pytest.raises(ProtocolError, match="not UTF-8"):
            link.read_line_nowait()
        with pytest.raises(trio.WouldBlock):
            link.read_line_nowait()  # "thr" is not a line yet
        await device.write(b"ee\n")
        assert await link.read_line() == "three"


async def test_missing_port_is_unavailable_naming_path():
    with pytest.raises(PortUnavailable) as caught:
        async with open_serial_link("/dev/ttyNOSUCHPORT7"):
            pass
    message = str(caught.value)
    assert message.startswith("/dev/ttyNOSUCHPORT7: no such port")
    assert "No such file or directory" in message


async def test_not_a_tty_is_unavailable(tmp_path):
    path = tmp_path / "plain-file"
    path.write_text("")
    with pytest.raises(PortUnavailable, match=f"^{path}: cannot open serial port"):
        async with open_serial_link(str(path)):
            pass


async def test_busy_port_is_unavailable_and_free_again_after_close(device):
    async with open_serial_link(device.path) as first:
        with pytest.raises(PortUnavailable, match=f"^{device.path}: port is busy"):
            async with open_serial_link(device.path):
                pass
        # The failed open did not disturb the first link.
        await device.write(b"still here\n")
        assert await first.read_line() == "still here"
    async with open_serial_link(device.path) as second:
        await device.write(b"hello again\n")
        assert await second.read_line() == "hello again"


async def test_closed_link_refuses_use_and_close_is_idempotent(device):
    async with open_serial_link(device.path) as link:
        pass
    assert link.closed
    await link.aclose()
    with pytest.raises(trio.ClosedResourceError):
        await link.read_line()
    with pytest.raises(trio.ClosedResourceError):
        link.reset_input()


async def test_close_wakes_a_parked_reader(device):
    async with open_serial_link(device.path) as link:
        async with trio.open_nursery() as nursery:

            async def reader():
                with pytest.raises(trio.ClosedResourceError):
                    await link.read_line(math.inf)

            nursery.start_soon(reader)
            await trio.sleep(0.01)
            await link.aclose()


async def test_device_vanishing_is_port_lost():
    endpoint = PtyEndpoint()
    async with open_serial_link(endpoint.path) as link:
        endpoint.close()
        with pytest.raises(PortLost, match=f"^{endpoint.path}: "):
            await link.read_line(timeout=1)


async def test_transcript_records_both_directions_bounded(device):
    async with open_serial_link(device.path, transcript_limit=4) as link:
        await link.send_line("IDENT")
        await device.write(b"IDENT serial=1\r\nbad \xff\x00\n" + b"L" * 600 + b"\nlast line\ntail")
        for _ in range(4):
            try:
                await link.read_line()
            except ProtocolError:
                pass
        entries = link.transcript
        assert [(e.direction, e.complete) for e in entries] == [
            ("RX", True),
            ("RX", True),
            ("RX", True),
            ("RX", True),
            ("RX", False),
        ]
        assert entries[0].text == "IDENT serial=1"
        assert entries[1].text == "bad \\xff\\x00"
        assert entries[2].text == "L" * 256 + " ... (+344 bytes)"
        text = link.transcript_text()
        assert f"# {device.path} 115200 baud" in text.splitlines()[0]
        assert "(1 earlier lines dropped)" in text  # the TX line went first
        assert text.rstrip().endswith("RX tail  [no newline]")


# ---------------------------------------------------------------------- fuzz

MAX_LINE = 32
SENTINEL = b"END-OF-FUZZ"


def expected_results(data: bytes) -> list[str | type[ProtocolError]]:
    """What read_line must return for *data* + newline, written independently."""
    results: list[str | type[ProtocolError]] = []
    for segment in data.split(b"\n"):
        if len(segment) > MAX_LINE:
            results.append(ProtocolError)
            continue
        segment = segment.rstrip(b"\r")  # every CR before the LF (ESP-IDF's console sends CR CR LF)
        try:
            text = segment.decode("utf-8")
        except UnicodeDecodeError:
            results.append(ProtocolError)
            continue
        if any(unicodedata.category(c) == "Cc" and c not in "\t\x1b" for c in text):
            results.append(ProtocolError)
        else:
            results.append(text)
    return results


_PIECES = st.sampled_from(
    [b"OK", b"\r", b"\n", b"\r\n", b"\xff", b"\xe2\x82", b"\xac", "é".encode(), b"\x00", b"\x1b[0m", b"x" * 20]
    # lines right at the limit, with and without a CR that counts towards it
    + [b"\n" + b"y" * n + tail for n in (MAX_LINE - 1, MAX_LINE, MAX_LINE + 1) for tail in (b"\n", b"\r\n")]
)
device_output = st.one_of(
    st.binary(max_size=400),
    st.lists(_PIECES, max_size=60).map(b"".join),
)


@settings(max_examples=50, deadline=None)
@given(data=device_output, cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=5))
async def test_fuzz_device_output_gives_lines_or_documented_errors(data, cuts):
    stream = data + b"\n" + SENTINEL + b"\n"
    bounds = sorted({0, len(stream), *(c for c in cuts if c < len(stream))})
    expected = [*expected_results(data), SENTINEL.decode()]
    got: list[str | type[ProtocolError]] = []
    with PtyEndpoint() as endpoint, trio.fail_after(5):
        async with open_serial_link(endpoint.path, max_line=MAX_LINE) as link:
            # Deliver in pieces, so lines straddle reads at arbitrary points.
            for start, end in zip(bounds, bounds[1:]):
                await endpoint.write(stream[start:end])
                await trio.sleep(0)
            while len(got) < len(expected):
                try:
                    got.append(await link.read_line(timeout=2))
                except ProtocolError as exc:
                    assert exc.port == endpoint.path
                    got.append(ProtocolError)
            with pytest.raises(DeviceTimeout):
                await link.read_line(timeout=0.01)
    assert got == expected
