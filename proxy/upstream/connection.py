"""One keep-alive HTTP/1.1 client connection to a vLLM server: a raw socket plus a response reader.

Strategy (after httpcore's http11 connection): parse/response.py owns response framing and keep-alive; this
class owns the socket and the read size. The lifecycle is NEW -> ACTIVE -> IDLE -> ACTIVE ... -> CLOSED;
the pool (pool.py) makes every reuse decision with `recycle()` and `looks_stale()`.

Rules:
- The request head (encode_request) and the ORIGINAL body bytes go out in one write (one syscall).
- `looks_stale()` peeks the raw socket without blocking: an idle keep-alive connection that is
  readable has been hung up (EOF) or sent garbage; either way it must not carry a request.
- No timeouts here: callers wrap `connect`, `read_head` and later reads in their own
  cancel scopes (upstream connect / first byte / between chunks).
- A read error or EOF before the response is complete raises `UpstreamClosed`. Whether a retry is
  allowed is the caller's to decide (upstream/open.py: only before the response head).
"""

from __future__ import annotations

import enum
import errno
import os
import socket

import trio

from proxy import sockio
from proxy.parse.response import ResponseClosed, ResponseError, ResponseHead, ResponseReader

# A request body is small; an upstream that does not take it within this long is dead.
SEND_STALL_S = 30.0


class UpstreamClosed(Exception):
    """The upstream hung up or reset the connection."""


class UpstreamProtocolError(Exception):
    """The upstream sent a response head that is not valid HTTP/1.1 (parse/response.py's rules): answered
    502, never relayed and never retried -- the upstream did answer, just not correctly."""


class ConnState(enum.Enum):
    NEW = "new"
    ACTIVE = "active"
    IDLE = "idle"
    CLOSED = "closed"


def encode_request(method: bytes, target: bytes, headers: list[tuple[bytes, bytes]]) -> bytes:
    """Request head bytes. Header names/values come from input the strict request reader already validated or from us."""
    return b"".join((method, b" ", target, b" HTTP/1.1\r\n",
                     *[b"%s: %s\r\n" % (n, v) for n, v in headers], b"\r\n"))


class UpstreamConnection:
    __slots__ = ("address", "idle_since", "reader", "sock", "state")

    def __init__(self, address: tuple[str, int], sock: socket.socket) -> None:
        self.address = address
        self.sock = sock
        self.reader = ResponseReader()
        self.state = ConnState.NEW
        self.idle_since = 0.0

    @classmethod
    async def connect(cls, address: tuple[str, int]) -> UpstreamConnection:
        """Open a TCP connection (raises OSError on refusal/unreachable)."""
        host, port = address
        infos = await trio.socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        last: OSError | None = None
        for family, type_, proto, _, sockaddr in infos:
            raw = socket.socket(family, type_, proto)
            raw.setblocking(False)
            try:
                err = raw.connect_ex(sockaddr)
                if err not in (0, errno.EINPROGRESS):
                    raise OSError(err, os.strerror(err))
                if err:
                    await trio.lowlevel.wait_writable(raw)
                    err = raw.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                    if err:
                        raise OSError(err, os.strerror(err))
                raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError as exc:
                sockio.close(raw)
                last = exc
                continue
            except BaseException:
                sockio.close(raw)
                raise
            return cls(address, raw)
        raise last or OSError(errno.EHOSTUNREACH, f"no address for {host}")

    async def send_request(self, head: bytes, body: bytes) -> None:
        """Send head + body in one write."""
        self.state = ConnState.ACTIVE
        try:
            await sockio.send_all(self.sock, head + body if body else head, SEND_STALL_S)
        except sockio.BrokenPipe:
            raise UpstreamClosed("upstream closed the connection") from None

    async def receive(self) -> None:
        """Wait for the socket and read once into the reader (EOF is recorded, not raised)."""
        self.reader.feed(await sockio.recv(self.sock))

    async def read_head(self) -> ResponseHead:
        """Wait for the final response head."""
        reader = self.reader
        while True:
            try:
                head = reader.next_head()
            except ResponseClosed as exc:
                raise UpstreamClosed(str(exc)) from None
            except ResponseError as exc:
                raise UpstreamProtocolError(str(exc)) from None
            if head is not None:
                return head
            await self.receive()

    def body_nowait(self) -> bytes | None:
        """Body bytes already buffered (b"" when the response is complete), None to read more."""
        try:
            return self.reader.read_body()
        except ResponseError as exc:
            raise UpstreamClosed(str(exc)) from None

    @property
    def complete(self) -> bool:
        return self.reader.complete

    def recycle(self, now: float) -> bool:
        """After a complete response: ready the connection for the next request. False -> close it."""
        reader = self.reader
        if not reader.complete or reader.head is None or not reader.head.keep_alive or reader.buf or reader.eof:
            return False
        reader.reset()
        self.state = ConnState.IDLE
        self.idle_since = now
        return True

    def looks_stale(self) -> bool:
        """An idle connection that is readable was closed by the server (or is out of sync)."""
        return sockio.recv_nowait(self.sock, 1) is not None  # EOF, error, or unsolicited bytes

    def close(self) -> None:
        """Close now (synchronously); cancels the upstream's work for an in-flight request."""
        if self.state is not ConnState.CLOSED:
            self.state = ConnState.CLOSED
            sockio.close(self.sock)
