"""The downstream side: one task per client connection driving an `h11.Connection(SERVER)`.

Strategy (after h11's trio example and hypercorn's h11 protocol): h11 owns parsing, framing,
keep-alive and 100-continue; `Downstream` owns the raw socket (sockio.py) and the read size. One
request/response cycle per loop turn:
  read head -> dispatch (handlers.py: reads the body if it wants it, sends exactly one response)
  -> on MUST_CLOSE, or a request body left unread, close; else `start_next_cycle()`.
Per-phase timeouts share ONE cancel scope per connection whose deadline moves with the phase
(keep-alive idle until the first byte of a head, then request head, then request body; none while a
handler runs -- the upstream path has its own): one deadline store per phase instead of a scope per
read. When the scope fires, `phase` says what timed out: idle -> close quietly; head/body -> 408.
Errors are sent only while h11's state still allows a response (`error_status_hint` gives the status
for protocol errors: 400 garbage, 431 head too large). A failed write calls `send_failed()`.

A client that vanishes while its request is in flight (waiting for the upstream's first byte, or in
the middle of a stream) is noticed by `sweep_vanished()`, run every CLIENT_CHECK_S by one task per
process: it peeks each connection that has been busy for a while, and cancels the connection's scope
on EOF -- which closes the upstream connection and so cancels vLLM's work. No per-request task or
syscall: a request that ends quickly costs nothing here.
"""

from __future__ import annotations

import math
import socket

import h11
import trio

from proxy import errors, sockio
from proxy.sockio import BrokenPipe

REASONS = {200: b"OK", 400: b"Bad Request", 401: b"Unauthorized", 403: b"Forbidden", 404: b"Not Found",
           405: b"Method Not Allowed", 408: b"Request Timeout", 413: b"Content Too Large",
           429: b"Too Many Requests", 431: b"Request Header Fields Too Large", 500: b"Internal Server Error",
           502: b"Bad Gateway", 503: b"Service Unavailable", 504: b"Gateway Timeout"}
_JSON = (b"content-type", b"application/json")
IDLE, HEAD, BODY, BUSY = "idle", "head", "body", "busy"


class ClientGone(Exception):
    """The client closed or reset the connection, or stopped reading."""


class Downstream:
    __slots__ = ("sock", "conn", "gw", "client", "client_gone", "limits", "scope", "phase", "started",
                 "chunked", "keep_alive", "head_only", "http11", "busy_since")

    def __init__(self, sock: socket.socket, gw, client: str) -> None:
        self.sock = sock
        self.gw = gw
        self.client = client
        self.client_gone = False
        self.limits = gw.runtime.config.server
        self.conn = h11.Connection(h11.SERVER, max_incomplete_event_size=self.limits.max_head_bytes)
        self.scope: trio.CancelScope | None = None
        self.phase = IDLE
        self.started = False      # response head sent for the current request
        self.chunked = False      # current response framed with chunked encoding
        self.keep_alive = True    # current request allows another on this connection
        self.head_only = False    # HEAD request: no body bytes
        self.http11 = True
        self.busy_since = 0.0

    def _enter(self, phase: str, seconds: float) -> None:
        self.phase = phase
        self.scope.deadline = trio.current_time() + seconds

    async def _receive(self) -> bool:
        data = await sockio.recv(self.sock)
        self.conn.receive_data(data)
        return bool(data)

    # -- reading -------------------------------------------------------------------------------
    async def read_head(self):
        """The next Request, or None when the connection should just close (EOF)."""
        conn = self.conn
        limits = self.limits
        self._enter(IDLE, limits.keepalive_idle_s)
        got_bytes = False
        while True:
            event = conn.next_event()  # RemoteProtocolError propagates to serve_connection()
            if event is h11.NEED_DATA:
                # Keep-alive idle until the first byte of a head, then the head timeout -- set only
                # when a head is actually incomplete (usually a whole head arrives in one read).
                if self.phase is IDLE and (got_bytes or conn.trailing_data[0]):
                    self._enter(HEAD, limits.request_head_s)
                got_bytes = await self._receive()
                continue
            if type(event) is h11.Request:
                # h11 bounds only a head that arrives in pieces; one read can bring a whole big head.
                size = len(event.target) + sum(len(n) + len(v) + 4 for n, v in event.headers.raw_items())
                if size > limits.max_head_bytes:
                    raise h11.RemoteProtocolError("request head too large", error_status_hint=431)
                self.phase = BUSY
                self.busy_since = trio.current_time()
                self.scope.deadline = math.inf
                self.started = False
                self.http11 = event.http_version == b"1.1"
                self.head_only = event.method == b"HEAD"
                keep = self.http11
                for name, value in event.headers:
                    if name == b"connection" and b"close" in value.lower():
                        keep = False
                self.keep_alive = keep
                return event
            return None  # ConnectionClosed

    async def read_body(self, limit: int) -> bytes:
        """The whole request body (caller already refused an over-long Content-Length).
        Raises ApiError 413 past `limit`; the body timeout cancels the connection's scope (408)."""
        conn = self.conn
        if conn.they_are_waiting_for_100_continue:
            await self.send_raw(b"HTTP/1.1 100 Continue\r\n\r\n")
        parts: list[bytes] = []
        size = 0
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                if self.phase is not BODY:  # the body timeout runs only while we wait for it
                    self._enter(BODY, self.limits.request_body_s)
                await self._receive()
                continue
            t = type(event)
            if t is h11.Data:
                size += len(event.data)
                if size > limit:
                    raise errors.body_too_large(limit)
                parts.append(event.data)
            elif t is h11.EndOfMessage:
                break
            else:  # ConnectionClosed mid-body
                raise ClientGone()
        if self.phase is BODY:
            self.phase = BUSY
            self.scope.deadline = math.inf
        if len(parts) == 1:
            return bytes(parts[0])
        return b"".join(parts)

    # -- writing -------------------------------------------------------------------------------
    # Responses are framed here, not by h11: h11 parses requests; we know exactly what we send.
    async def send_raw(self, data: bytes) -> None:
        try:
            await sockio.send_all(self.sock, data, self.limits.write_s)
        except BrokenPipe:
            self.client_gone = True
            raise ClientGone() from None

    def can_respond(self) -> bool:
        return not self.started

    def response_head(self, status: int, headers, length: int | None, reason: bytes | None = None) -> bytes:
        """Head bytes for a response of `length` bytes, or of unknown length (chunked on HTTP/1.1,
        close-delimited on HTTP/1.0). Framing headers in `headers` must already be removed."""
        self.started = True
        if length is None:
            self.chunked = self.http11
            if not self.http11:
                self.keep_alive = False
        else:
            self.chunked = False
        if reason is None:
            reason = REASONS.get(status, b"")
        lines = [b"HTTP/1.1 %d %s\r\n" % (status, reason)]
        lines += [b"%s: %s\r\n" % h for h in headers]
        if length is not None:
            lines.append(b"content-length: %d\r\n" % length)
        elif self.chunked:
            lines.append(b"transfer-encoding: chunked\r\n")
        if not self.keep_alive:
            lines.append(b"connection: close\r\n")
        lines.append(b"\r\n")
        return b"".join(lines)

    def frame(self, data: bytes) -> bytes:
        """Body bytes as they go on the wire for the current response."""
        if self.head_only or not data:
            return b""
        if self.chunked:
            return b"%x\r\n%s\r\n" % (len(data), data)
        return data

    def end(self) -> bytes:
        """The end of the current response body (the last chunk, if chunked)."""
        return b"0\r\n\r\n" if self.chunked and not self.head_only else b""

    async def send_response(self, status: int, headers: list, body: bytes) -> None:
        """A complete response in one write."""
        await self.send_raw(self.response_head(status, headers, len(body)) + (b"" if self.head_only else body))

    async def send_error(self, err: errors.ApiError, request_id: bytes | None = None) -> None:
        if self.started:
            return
        headers = [_JSON, *err.headers]
        if request_id:
            headers.append((b"x-request-id", request_id))
        if self.conn.their_state is not h11.DONE:
            self.keep_alive = False  # the body is unread (or garbage): close after this response
        await self.send_response(err.status, headers, err.body())

    def next_cycle(self) -> bool:
        """After a complete response: ready h11 for the next request on this connection (False: close).
        h11 parsed the request; the response never went through it, so a fresh parser takes over the
        bytes it already buffered (a pipelined request)."""
        old = self.conn
        if not self.keep_alive or old.their_state is not h11.DONE:
            return False
        data, closed = old.trailing_data
        new = h11.Connection(h11.SERVER, max_incomplete_event_size=self.limits.max_head_bytes)
        if data:
            new.receive_data(bytes(data))
        if closed:
            new.receive_data(b"")
        self.conn = new
        self.started = False
        return True

CLIENT_CHECK_S = 0.25


def sweep_vanished(connections, now: float) -> int:
    """Cancel the requests of clients that have hung up. Checks only connections busy for at least
    CLIENT_CHECK_S (a peek: EOF means gone; bytes mean a pipelined request, left alone)."""
    gone = 0
    for ds in list(connections):
        if ds.phase is not BUSY or now - ds.busy_since < CLIENT_CHECK_S or ds.client_gone:
            continue
        try:
            peeked = ds.sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except BlockingIOError:
            continue
        except OSError:
            peeked = b""
        if not peeked:
            ds.client_gone = True
            ds.scope.cancel()
            gone += 1
    return gone


async def run_sweeper(connections) -> None:
    """One task per process: see sweep_vanished."""
    while True:
        await trio.sleep(CLIENT_CHECK_S)
        sweep_vanished(connections, trio.current_time())


def _skip_buffered_body(conn: h11.Connection) -> None:
    """A handler that needed no body (GET) left its end-of-message unread: consume what is already
    buffered so keep-alive continues; a body still on the wire means the connection closes."""
    try:
        while True:
            event = conn.next_event()
            if type(event) is not h11.Data:
                return
    except h11.RemoteProtocolError:
        return


async def _send_protocol_error(ds: Downstream, status: int) -> None:
    if status == 431:
        err = errors.ApiError(431, "Request header fields too large.", "invalid_request_error",
                              code="header_too_large")
    elif status == 408:
        err = errors.ApiError(408, "Timed out reading the request.", "invalid_request_error",
                              code="request_timeout")
    else:
        err = errors.ApiError(status, "Malformed HTTP request.", "invalid_request_error", code="bad_http")
    try:
        await ds.send_error(err)
    except ClientGone:
        pass


async def serve_connection(sock: socket.socket, client: str, gw) -> None:
    """Serve one client connection until it closes; closes the socket."""
    ds = Downstream(sock, gw, client)
    gw.connection_opened(ds)
    try:
        with trio.CancelScope() as scope:
            ds.scope = scope
            while True:
                try:
                    request = await ds.read_head()
                except h11.RemoteProtocolError as exc:
                    scope.deadline = math.inf
                    await _send_protocol_error(ds, exc.error_status_hint)
                    return
                if request is None:
                    return
                try:
                    await gw.dispatch(ds, request)
                except ClientGone:
                    return
                conn = ds.conn
                if conn.their_state is h11.SEND_BODY and not ds.client_gone:
                    _skip_buffered_body(conn)
                if ds.client_gone or gw.draining or not ds.next_cycle():
                    return
        if scope.cancelled_caught and ds.phase in (HEAD, BODY):
            # A request head or body that did not arrive in time (a cancelled drain lands in IDLE).
            with trio.CancelScope(deadline=trio.current_time() + 1.0):
                await _send_protocol_error(ds, 408)
    finally:
        gw.connection_closed(ds)
        sockio.close(sock)
