"""One keep-alive HTTP/1.1 client connection to a vLLM server: a socket plus an h11 CLIENT.

Strategy (after httpcore's http11 connection): h11 owns framing and keep-alive state; this class owns
the trio stream and the read size. The lifecycle is NEW -> ACTIVE -> IDLE -> ACTIVE ... -> CLOSED;
the pool (pool.py) makes every reuse decision with `is_reusable()` and `looks_stale()`.

Rules:
- The request head and the ORIGINAL body bytes go out in one `send_all` (one syscall).
- `looks_stale()` peeks the raw socket without blocking: an idle keep-alive connection that is
  readable has been hung up (EOF) or sent garbage; either way it must not carry a request.
- No timeouts here: callers wrap `connect`, the first `next_event` and later reads in their own
  cancel scopes (upstream connect / first byte / between chunks).
- A read error or EOF before the response is complete raises `UpstreamClosed`; `got_response`
  tells the caller whether any response byte had arrived, which decides whether a retry is allowed.
"""

from __future__ import annotations

import enum
import errno
import os
import socket

import h11
import trio

from proxy import sockio

# A request body is small; an upstream that does not take it within this long is dead.
SEND_STALL_S = 30.0


class UpstreamClosed(Exception):
    """The upstream hung up or reset the connection."""


class ConnState(enum.Enum):
    NEW = "new"
    ACTIVE = "active"
    IDLE = "idle"
    CLOSED = "closed"


class UpstreamConnection:
    __slots__ = ("address", "sock", "h11", "state", "got_response", "idle_since", "requests")

    def __init__(self, address: tuple[str, int], sock: socket.socket) -> None:
        self.address = address
        self.sock = sock
        self.h11 = h11.Connection(h11.CLIENT)
        self.state = ConnState.NEW
        self.got_response = False
        self.idle_since = 0.0
        self.requests = 0

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

    async def send_request(self, request: h11.Request, body: bytes) -> None:
        """Send head + body + end of message in one write."""
        self.state = ConnState.ACTIVE
        self.got_response = False
        self.requests += 1
        conn = self.h11
        out = conn.send(request)
        if body:
            out += conn.send(h11.Data(data=body))
        out += conn.send(h11.EndOfMessage())
        try:
            await sockio.send_all(self.sock, out, SEND_STALL_S)
        except sockio.BrokenPipe:
            conn.send_failed()
            raise UpstreamClosed("upstream closed the connection") from None

    def next_event_nowait(self):
        """The next already-buffered event, or h11.NEED_DATA."""
        return self.h11.next_event()

    async def receive(self) -> None:
        """Wait for the socket, read once into h11; EOF before the response ends raises."""
        data = await sockio.recv(self.sock)
        if not data and self.h11.their_state is not h11.DONE:
            raise UpstreamClosed("upstream closed the connection")
        self.h11.receive_data(data)

    async def next_event(self):
        """Wait for the next h11 event of the response."""
        conn = self.h11
        while True:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError as exc:
                raise UpstreamClosed(f"bad HTTP from upstream: {exc}") from None
            if event is h11.NEED_DATA:
                await self.receive()
                continue
            if type(event) is h11.Response:
                self.got_response = True
            return event

    def is_reusable(self) -> bool:
        conn = self.h11
        return conn.our_state is h11.DONE and conn.their_state is h11.DONE

    def recycle(self, now: float) -> bool:
        """After a complete response: ready the connection for the next request. False -> close it."""
        if not self.is_reusable():
            return False
        try:
            self.h11.start_next_cycle()
        except h11.LocalProtocolError:
            return False
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
