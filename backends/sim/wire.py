"""HTTP/1.1 on one accepted socket for the simulator: h11 parses requests, heads are hand-encoded.

Strategy: `Conn` owns a non-blocking stdlib socket (detached from trio's SocketStream) and parks on
`trio.lowlevel.wait_readable`/`wait_writable` only when the kernel says EAGAIN, so the fast path is
one syscall per read or write and no scheduler round trip; every `FAIRNESS` operations without a
wait end in a checkpoint, so a busy connection still lets the others run and sees cancellation.
`read_request` runs a fresh `h11.Connection` per cycle as a parser (fed the bytes the previous cycle
left over, which is how pipelining works) and raises `Refused` for input we will not serve. Heads
carry what uvicorn puts on vLLM's answers: `date`, `server: uvicorn`, then Starlette's
`content-length`/`content-type` (or `transfer-encoding: chunked` for SSE).

Bounds (module constants, patched by tests): idle keep-alive `KEEPALIVE_IDLE_S` (uvicorn's 5 s
default, which vLLM keeps), a request needing more than one read gets `REQUEST_READ_S`, heads up to
`MAX_HEAD_BYTES`, bodies up to `MAX_BODY_BYTES` (413), a write that has to wait for buffer space
`WRITE_S`. One cancel scope per connection carries the deadline of the current phase, so the hot
path arms one deadline per request and a paced stream none per token.
"""

from __future__ import annotations

import email.utils
import socket
import time
from typing import NamedTuple

import h11
import trio

KEEPALIVE_IDLE_S = 5.0
REQUEST_READ_S = 30.0
WRITE_S = 60.0
MAX_HEAD_BYTES = 64 * 1024
MAX_BODY_BYTES = 32 * 1024 * 1024
RECEIVE_BYTES = 65536
FAIRNESS = 16

JSON = b"application/json"
_REASONS = {200: b"OK", 400: b"Bad Request", 401: b"Unauthorized", 404: b"Not Found",
            405: b"Method Not Allowed", 413: b"Request Entity Too Large", 503: b"Service Unavailable"}
_date_cache: list[object] = [-1, b""]


def http_date() -> bytes:
    """The `date` header value, formatted once per second."""
    now = int(time.time())
    if now != _date_cache[0]:
        _date_cache[:] = [now, email.utils.formatdate(now, usegmt=True).encode()]
    return _date_cache[1]  # type: ignore[return-value]


def sse_head() -> bytes:
    return (b"HTTP/1.1 200 OK\r\ndate: %s\r\nserver: uvicorn\r\n"
            b"content-type: text/event-stream; charset=utf-8\r\ntransfer-encoding: chunked\r\n\r\n"
            % http_date())


class Request(NamedTuple):
    method: bytes
    target: bytes
    path: bytes  # target without the query string
    headers: list[tuple[bytes, bytes]]  # as received, names lower-cased by h11
    fields: dict[bytes, bytes]  # the same, last one wins
    body: bytes
    keep_alive: bool


class Refused(Exception):
    """Input we will not serve: answer with this and close the connection."""

    def __init__(self, status: int, body: bytes, content_type: bytes = JSON) -> None:
        super().__init__(status)
        self.status = status
        self.body = body
        self.content_type = content_type


class Conn:
    """One accepted socket (see the module docstring)."""

    __slots__ = ("buffer", "eager", "linger", "scope", "sock")

    def __init__(self, stream: trio.SocketStream) -> None:
        self.sock = socket.socket(fileno=stream.socket.detach())  # trio set TCP_NODELAY on accept
        self.sock.setblocking(False)
        self.buffer = b""  # received bytes of the next request (pipelining)
        self.scope = trio.CancelScope()  # its deadline follows the phase: idle, reading, writing
        self.linger = False  # closing after a refusal: drain unread input so no RST eats the answer
        self.eager = 0  # operations since this connection last yielded to the scheduler

    def phase(self, seconds: float) -> None:
        self.scope.deadline = trio.current_time() + seconds

    async def _yield_sometimes(self) -> None:
        self.eager += 1
        if self.eager >= FAIRNESS:
            self.eager = 0
            await trio.lowlevel.checkpoint()

    async def receive(self) -> bytes:
        """Up to RECEIVE_BYTES; b"" at EOF. Resets and other socket errors -> BrokenResourceError."""
        while True:
            try:
                data = self.sock.recv(RECEIVE_BYTES)
            except BlockingIOError:
                self.eager = 0
                await trio.lowlevel.wait_readable(self.sock)
                continue
            except OSError as exc:
                raise trio.BrokenResourceError(exc) from exc
            await self._yield_sometimes()
            return data

    async def send(self, data: bytes) -> None:
        """Write all of `data`, waiting for buffer space as needed (the flow control)."""
        sent = 0
        view = None
        while True:
            try:
                sent += self.sock.send(data if view is None else view[sent:])
            except BlockingIOError:
                pass
            except OSError as exc:
                raise trio.BrokenResourceError(exc) from exc
            if sent >= len(data):
                await self._yield_sometimes()
                return
            view = memoryview(data)
            self.eager = 0
            self.phase(WRITE_S)  # only a write that has to wait needs (and gets) an allowance
            await trio.lowlevel.wait_writable(self.sock)

    async def write(self, parts: list[bytes]) -> None:
        """Send and clear buffered parts."""
        if parts:
            data = b"".join(parts)
            parts.clear()
            await self.send(data)

    async def respond(self, status: int, body: bytes, keep: bool, content_type: bytes | None = JSON,
                      extra: bytes = b"") -> None:
        head = b"HTTP/1.1 %d %s\r\ndate: %s\r\nserver: uvicorn\r\n%scontent-length: %d\r\n" % (
            status, _REASONS.get(status, b""), http_date(), extra, len(body))
        if content_type is not None:
            head += b"content-type: %s\r\n" % content_type
        if not keep:
            head += b"connection: close\r\n"
        await self.send(head + b"\r\n" + body)

    async def close(self) -> None:
        if self.linger:  # half-close, then discard what the client still sends (bounded)
            with trio.CancelScope(shield=True), trio.move_on_after(1.0):
                try:
                    self.sock.shutdown(socket.SHUT_WR)
                    drained = 0
                    while drained < MAX_BODY_BYTES and (data := await self.receive()):
                        drained += len(data)
                except (OSError, trio.BrokenResourceError):
                    pass
        trio.lowlevel.notify_closing(self.sock)
        self.sock.close()


async def read_request(conn: Conn) -> Request | None:
    """The next request, None when the connection should just close (idle EOF), or `Refused`."""
    parser = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD_BYTES)
    data, conn.buffer = conn.buffer, b""
    # One deadline per cycle on the fast path: the idle allowance also covers parsing and an
    # immediate answer; a request that needs more reads, or an answer that waits, moves it.
    conn.phase(KEEPALIVE_IDLE_S)
    if not data:
        data = await conn.receive()
        if not data:
            return None
    parser.receive_data(data)
    head: h11.Request | None = None
    headers: list[tuple[bytes, bytes]] = []
    fields: dict[bytes, bytes] = {}
    chunks: list[bytes] = []
    size = 0
    slow = False
    try:
        while True:
            event = parser.next_event()
            if event is h11.NEED_DATA:
                if not slow:
                    slow = True
                    conn.phase(REQUEST_READ_S)
                parser.receive_data(await conn.receive())
            elif type(event) is h11.Data:
                chunks.append(event.data)
                size += len(event.data)
                if size > MAX_BODY_BYTES:
                    raise Refused(413, b'{"detail":"Request Entity Too Large"}')
            elif type(event) is h11.Request:
                head = event
                headers = list(event.headers)
                fields = dict(headers)
                if int(fields.get(b"content-length", 0)) > MAX_BODY_BYTES:
                    raise Refused(413, b'{"detail":"Request Entity Too Large"}')
                if parser.they_are_waiting_for_100_continue:
                    await conn.send(b"HTTP/1.1 100 Continue\r\n\r\n")
            elif type(event) is h11.EndOfMessage:
                break
            else:  # ConnectionClosed before a request started
                return None
    except h11.RemoteProtocolError:
        raise Refused(400, b"Invalid HTTP request received.", b"text/plain; charset=utf-8") from None
    assert head is not None
    conn.buffer = parser.trailing_data[0]
    keep = head.http_version == b"1.1" and b"close" not in fields.get(b"connection", b"").lower()
    body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
    return Request(head.method, head.target, head.target.split(b"?", 1)[0], headers, fields, body, keep)
