"""serve_connection (proxy/accept/connection.py) and sweep_vanished (vanished.py) over a socket pair.

The client is the other end of a `socket.socketpair()`: the in-process stand-in for a TCP client
(the Downstream works on raw non-blocking sockets, so trio's memory streams do not apply). Exact
request bytes go in, exact response bytes are read back to EOF. The gateway is the real one, with its
`dispatch` replaced by a fixed answer at the seam; time is the autojump clock.
"""

from __future__ import annotations

import socket

import trio

from proxy.accept.connection import serve_connection
from proxy.accept.downstream import BUSY
from proxy.accept.vanished import CLIENT_CHECK_S, sweep_vanished
from proxy.gateway import Gateway, build_runtime
from tests.support.gateway import make_config

OK = b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 2\r\n\r\nok"


class FixedGateway(Gateway):
    """A real Gateway whose dispatch answers every request with `ok` and records the targets."""

    def __init__(self, **server) -> None:
        super().__init__(build_runtime(make_config(["http://127.0.0.1:9"], server=server)))
        self.targets: list[bytes] = []
        self.opened = self.closed = 0
        self.hold = trio.Event()
        self.holding = False

    async def dispatch(self, ds, request) -> None:
        self.targets.append(request.target)
        if self.holding:
            await self.hold.wait()
        await ds.send_response(200, [(b"content-type", b"text/plain")], b"ok")

    def connection_opened(self, ds) -> None:
        self.opened += 1
        super().connection_opened(ds)

    def connection_closed(self, ds) -> None:
        self.closed += 1
        super().connection_closed(ds)


async def serve(gw: FixedGateway, data: bytes, *, close_after_send: bool = True) -> bytes:
    """Serve one connection whose client sends `data`; everything the client got, to EOF."""
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    client = trio.socket.from_stdlib_socket(theirs)
    out = b""
    with trio.fail_after(120):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve_connection, ours, "127.0.0.1", gw)
            await client.send(data)
            if close_after_send:
                client.shutdown(socket.SHUT_WR)
            while chunk := await client.recv(65536):
                out += chunk
    client.close()
    assert ours.fileno() == -1  # serve_connection closed its socket
    return out


async def test_keep_alive_and_pipelined_requests_are_answered_in_order():
    gw = FixedGateway()
    out = await serve(gw, b"GET /a HTTP/1.1\r\nhost: x\r\n\r\nGET /b HTTP/1.1\r\nhost: x\r\n\r\n")
    assert out == OK + OK
    assert gw.targets == [b"/a", b"/b"]
    assert (gw.opened, gw.closed, gw.open_connections) == (1, 1, 0)


async def test_connection_close_ends_after_one_response():
    gw = FixedGateway()
    out = await serve(gw, b"GET /a HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\nGET /b HTTP/1.1\r\n\r\n")
    assert out == OK.replace(b"\r\n\r\n", b"\r\nconnection: close\r\n\r\n", 1)
    assert gw.targets == [b"/a"]


async def test_a_malformed_head_is_answered_once_with_400_and_closed():
    gw = FixedGateway()
    out = await serve(gw, b"GET /a HTTP/1.1\r\nbad header\r\n\r\nGET /b HTTP/1.1\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 400 Bad Request\r\n")
    assert out.count(b"HTTP/1.1") == 1 and b"connection: close\r\n" in out
    assert b'"type":"invalid_request_error"' in out
    assert gw.targets == []


async def test_a_head_over_the_limit_is_431():
    gw = FixedGateway(max_head_bytes=1024)
    out = await serve(gw, b"GET /a HTTP/1.1\r\nx-big: " + b"a" * 2000 + b"\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 431 Request Header Fields Too Large\r\n")
    assert gw.targets == []


async def test_a_head_that_stops_arriving_is_408(autojump_clock):
    gw = FixedGateway(request_head_s=5)
    out = await serve(gw, b"GET /a HTTP/1.1\r\nhost:", close_after_send=False)
    assert out.startswith(b"HTTP/1.1 408 Request Timeout\r\n")
    assert b"Timed out reading the request head." in out
    assert trio.current_time() >= 5


async def test_an_idle_keep_alive_connection_closes_quietly(autojump_clock):
    gw = FixedGateway(keepalive_idle_s=7)
    out = await serve(gw, b"GET /a HTTP/1.1\r\nhost: x\r\n\r\n", close_after_send=False)
    assert out == OK  # nothing after the response: no 408 for an idle connection
    assert trio.current_time() >= 7
    assert (gw.opened, gw.closed) == (1, 1)


async def test_the_sweeper_cancels_a_busy_request_whose_client_hung_up(autojump_clock):
    gw = FixedGateway()
    gw.holding = True
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve_connection, ours, "127.0.0.1", gw)
            theirs.sendall(b"GET /a HTTP/1.1\r\nhost: x\r\n\r\n")
            while not gw.targets:
                await trio.sleep(0.01)
            (ds,) = gw.connections
            assert ds.phase is BUSY
            now = trio.current_time()
            assert sweep_vanished(gw.connections, now) == 0  # busy, but not for CLIENT_CHECK_S yet
            assert sweep_vanished(gw.connections, now + CLIENT_CHECK_S) == 0  # client still there
            theirs.close()
            assert sweep_vanished(gw.connections, now + CLIENT_CHECK_S) == 1
            assert ds.client_gone
    assert gw.hold.is_set() is False and (gw.opened, gw.closed) == (1, 1)  # cancelled, never answered


async def test_the_sweeper_leaves_pipelined_bytes_and_idle_connections_alone(autojump_clock):
    gw = FixedGateway()
    gw.holding = True
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve_connection, ours, "127.0.0.1", gw)
            theirs.sendall(b"GET /a HTTP/1.1\r\nhost: x\r\n\r\nGET /b HTTP/1.1\r\n")
            while not gw.targets:
                await trio.sleep(0.01)
            (ds,) = gw.connections
            # the second head's bytes are already read into the reader: make some wait in the socket
            theirs.sendall(b"host: x\r\n\r\n")
            assert sweep_vanished(gw.connections, trio.current_time() + 10) == 0
            assert not ds.client_gone
            gw.holding = False
            gw.hold.set()
            while len(gw.targets) < 2:
                await trio.sleep(0.01)
            theirs.shutdown(socket.SHUT_WR)
    theirs.close()
    assert gw.targets == [b"/a", b"/b"]
