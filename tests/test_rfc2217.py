"""RFC 2217 ports: the client's protocol against pyserial's own server half, and a link over a real socket.

The server side is always pyserial's :class:`serial.rfc2217.PortManager`
(inside :mod:`fixtures.sim.rfc2217_port`), the same code ``esp_rfc2217_server``
builds on, so what passes here is what a real remote port would see.
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import serial.rfc2217 as telnet
import trio

from fixtures.rfc2217 import Rfc2217Client, rfc2217_address
from fixtures.serial_link import PortUnavailable, open_serial_link
from sequencer.config import RELEASED, SerialLines
from fixtures.sim.rfc2217_port import BridgeUart, listen_loopback, serve_rfc2217


class _Recorder:
    """PortManager's connection: what the server sends back."""

    def __init__(self) -> None:
        self.sent = bytearray()

    def write(self, data: bytes) -> None:
        self.sent += data


def negotiated() -> tuple[Rfc2217Client, telnet.PortManager, BridgeUart, _Recorder]:
    """A client and pyserial's server, talked to each other until neither has anything more to say."""
    uart, back = BridgeUart("test"), _Recorder()
    manager = telnet.PortManager(uart, back)
    client = Rfc2217Client()
    for _ in range(4):
        assert b"".join(manager.filter(client.take_outgoing())) == b""
        assert client.receive(bytes(back.sent)) == b""
        back.sent.clear()
    return client, manager, uart, back


def test_the_client_agrees_rfc2217_with_pyserials_server_and_its_settings_reach_the_port() -> None:
    client, manager, uart, back = negotiated()
    assert client.negotiated and not client.refused
    client.set_baudrate(921600)
    client.set_format()
    client.set_dtr(True)
    client.set_rts(False)
    assert b"".join(manager.filter(client.take_outgoing())) == b""
    assert (uart.baudrate, uart.bytesize, uart.parity, uart.stopbits) == (921600, 8, "N", 1)
    assert (uart.dtr, uart.rts) == (True, False)
    # The server's acknowledgements are protocol, never data.
    assert client.receive(bytes(back.sent)) == b""


def test_0xff_survives_both_ways() -> None:
    client, manager, _, _ = negotiated()
    data = bytes(range(256)) * 2
    assert b"".join(manager.filter(client.send(data))) == data
    assert client.receive(b"".join(manager.escape(data))) == data


def test_a_connection_changes_hands_anywhere_in_the_stream() -> None:
    # The station lends its connection to a flash worker mid-stream: a Telnet
    # sequence may be cut in two, and the worker (or the station) resumes it.
    client, _, _, _ = negotiated()
    stream = (b"boot" + telnet.IAC + telnet.SB + telnet.COM_PORT_OPTION + telnet.SERVER_NOTIFY_MODEMSTATE + b"\x10"
              + telnet.IAC + telnet.SE + b"\xff\xff!" + telnet.IAC + telnet.WILL + telnet.ECHO + b"ok")
    for cut in range(len(stream) + 1):
        first = Rfc2217Client(state=client.state())
        head = first.receive(stream[:cut])
        second = Rfc2217Client(state=first.state())
        assert head + second.receive(stream[cut:]) == b"boot\xff!ok", cut
        assert (first.modem_state or second.modem_state) == 0x10


def test_urls() -> None:
    assert rfc2217_address("rfc2217://10.0.0.7:4000") == ("10.0.0.7", 4000)
    assert rfc2217_address("rfc2217://hub.factory:2217?ign_set_control") == ("hub.factory", 2217)
    for bad, message in [("rfc2217://10.0.0.7", "has no TCP port"), ("socket://x:1", "is not rfc2217://host:port"),
                         ("rfc2217://h:1?speed=9", "unknown option 'speed'")]:
        with pytest.raises(ValueError, match=message):
            rfc2217_address(bad)


# -- a link over a socket ------------------------------------------------------------


@asynccontextmanager
async def served(uart_lines: list[tuple[bool, bool]] | None = None) -> AsyncIterator[tuple[BridgeUart, str]]:
    listener, url = listen_loopback()
    lines = uart_lines if uart_lines is not None else []
    uart = BridgeUart(url, on_lines=lambda dtr, rts: lines.append((dtr, rts)))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve_rfc2217, listener, uart)
        yield uart, url
        nursery.cancel_scope.cancel()
    listener.close()


async def test_a_link_over_rfc2217_moves_bytes_and_sets_its_lines_before_any_data() -> None:
    changes: list[tuple[bool, bool]] = []
    async with served(changes) as (uart, url):
        await uart.write(b"printed before anyone listened\r\n")
        async with open_serial_link(url, 460800, lines=SerialLines(dtr=True, rts=False)) as link:
            assert await link.read_line() == "printed before anyone listened"
            await link.write(b"\xff\x00binary\xff\n")
            assert await uart.read_line() == b"\xff\x00binary\xff"
            # The settings went before the first byte of data, in the same stream.
            assert uart.baudrate == 460800 and (uart.dtr, uart.rts) == (True, False)
            await uart.write(b"\xffraw\xff")
            assert await link.read_some(timeout=2) == b"\xffraw\xff"
        # Closing the port releases the lines, as a tty closing with HUPCL does.
        await trio.sleep(0.05)
        assert changes == [(True, False), (False, False)]
        async with open_serial_link(url, lines=RELEASED):
            pass
        await trio.sleep(0.05)
        assert changes == [(True, False), (False, False)]  # released to released: no change at all


async def test_what_cannot_be_an_rfc2217_port_is_one_line_naming_it() -> None:
    free = socket.socket()
    free.bind(("127.0.0.1", 0))
    port = free.getsockname()[1]
    free.close()
    with pytest.raises(PortUnavailable, match=rf"rfc2217://127.0.0.1:{port}: cannot connect to the RFC 2217 server"):
        async with open_serial_link(f"rfc2217://127.0.0.1:{port}"):
            pass
    with pytest.raises(PortUnavailable, match="has no TCP port"):
        async with open_serial_link("rfc2217://127.0.0.1"):
            pass
    with pytest.raises(PortUnavailable, match="the only port URLs are rfc2217://host:port"):
        async with open_serial_link("socket://127.0.0.1:9"):
            pass

    # A Telnet server that will not do RFC 2217, and a service that says nothing and hangs up.
    async def refuse(stream: trio.SocketStream) -> None:
        data = await stream.receive_some()
        if telnet.COM_PORT_OPTION in data:
            await stream.send_all(telnet.IAC + telnet.DONT + telnet.COM_PORT_OPTION)
        await trio.sleep(1)

    async def hang_up(stream: trio.SocketStream) -> None:
        await stream.aclose()

    async with trio.open_nursery() as nursery:
        for handler, message in [(refuse, "does not speak RFC 2217"), (hang_up, "closed the connection")]:
            listeners = await nursery.start(trio.serve_tcp, handler, 0)
            address = listeners[0].socket.getsockname()
            with pytest.raises(PortUnavailable, match=message):
                async with open_serial_link(f"rfc2217://127.0.0.1:{address[1]}"):
                    pass
        nursery.cancel_scope.cancel()


async def test_a_server_that_goes_away_mid_write_is_port_lost() -> None:
    from fixtures.serial_link import PortLost

    listener, url = listen_loopback()
    uart = BridgeUart(url)
    async with trio.open_nursery() as nursery:
        serving = trio.CancelScope()

        async def serve() -> None:
            with serving:
                await serve_rfc2217(listener, uart)

        nursery.start_soon(serve)
        async with open_serial_link(url) as link:
            # One write far larger than the socket's buffers: the link has taken it all and is
            # still handing it to the kernel when the hub goes down and its end closes.
            async def hub_goes_down() -> None:
                await trio.sleep(0.3)
                serving.cancel()

            nursery.start_soon(hub_goes_down)
            with pytest.raises(PortLost, match=rf"{url}: write failed"):
                await link.write(b"x" * 20_000_000, timeout=30)
    listener.close()
