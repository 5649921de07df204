"""The downstream side: one task per client connection, parsing requests with http1_server.py.

Strategy (after h11's trio example and hypercorn's h11 protocol, whose loop this keeps): a sans-I/O
parser owns request framing, keep-alive and 100-continue; `Downstream` owns the raw socket
(sockio.py) and the read size; responses are framed here (we know exactly what we send). The parser is
our own rather than h11 because h11 cost more CPU per request than all of the gateway's own logic
(~34 µs against ~8 µs for a typical SDK request); it is as strict as h11 or stricter (its module says
where), and differential tests hold it to h11's answers. One request/response cycle per loop turn:
  read head -> dispatch (handlers.py: reads the body if it wants it, sends exactly one response)
  -> if the request or response wants close, or the body was left unread, close; else next request
     (pipelined bytes already read stay buffered).
Per-phase timeouts share ONE cancel scope per connection whose deadline moves with the phase
(keep-alive idle until the first byte of a head, then request head, then request body; none while a
handler runs -- the upstream path has its own): one deadline store per phase instead of a scope per
read. When the scope fires, `phase` says what timed out: idle -> close quietly; head/body -> 408.
Protocol errors (400 garbage, 431 head too large, 501 transfer-coding, 505 version) are answered once,
then the connection closes.

A client that vanishes while its request is in flight (waiting for the upstream's first byte, or in
the middle of a stream) is noticed by `sweep_vanished()`, run every CLIENT_CHECK_S by one task per
process: it peeks each connection that has been busy for a while, and cancels the connection's scope
on EOF -- which closes the upstream connection and so cancels vLLM's work. No per-request task or
syscall: a request that ends quickly costs nothing here.
"""
from __future__ import annotations

import math
import socket

import trio

from proxy import errors, sockio
from proxy.http1_server import ProtocolError, RequestReader
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
    __slots__ = (
        "busy_since",
        "chunked",
        "client",
        "client_gone",
        "gw",
        "head_only",
        "http11",
        "keep_alive",
        "limits",
        "phase",
        "reader",
        "scope",
        "sock",
        "started",
    )

    def __init__(self, sock: socket.socket, gw, client: str) -> None:
        self.sock = sock
        self.gw = gw
        self.client = client
        self.client_gone = False
        self.limits = gw.runtime.config.server
        self.reader = RequestReader(max_head_bytes=self.limits.max_head_bytes)
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
        self.reader.feed(data)
        return bool(data)

    # -- reading -------------------------------------------------------------------------------
    async def read_head(self):
        """The next request head, or None when the connection should just close (EOF).
        Raises ProtocolError for a request that must be refused (then the connection closes)."""
        reader = self.reader
        limits = self.limits
        self._enter(IDLE, limits.keepalive_idle_s)
        while True:
            head = reader.next_head()
            if head is None:
                if reader.closed:
                    return None
                # Keep-alive idle until the first byte of a head, then the head timeout -- set only
                # when a head is actually incomplete (usually a whole head arrives in one read).
                if self.phase is IDLE and reader.has_partial():
                    self._enter(HEAD, limits.request_head_s)
                await self._receive()
                continue
            self.phase = BUSY
            self.busy_since = trio.current_time()
            self.scope.deadline = math.inf
            self.started = False
            self.http11 = head.http_version == b"1.1"
            self.head_only = head.method == b"HEAD"
            self.keep_alive = head.keep_alive
            return head

    async def read_body(self, limit: int, head) -> bytes:
        """The whole request body (caller already refused an over-long Content-Length).
        Raises ApiError 413 past `limit`; the body timeout cancels the connection's scope (408)."""
        reader = self.reader
        parts: list[bytes] = []
        size = 0
        asked_continue = False
        while True:
            data = reader.read_body()  # ProtocolError: bad chunking or EOF mid-body
            if data is None:
                if head.expect_continue and not asked_continue:
                    asked_continue = True
                    await self.send_raw(b"HTTP/1.1 100 Continue\r\n\r\n")
                if self.phase is not BODY:  # the body timeout runs only while we wait for it
                    self._enter(BODY, self.limits.request_body_s)
                await self._receive()
                continue
            if not data:
                break
            size += len(data)
            if size > limit:
                self.keep_alive = False  # the rest of the body may still be on its way: close
                raise errors.body_too_large(limit)
            parts.append(data)
        if self.phase is BODY:
            self.phase = BUSY
            self.scope.deadline = math.inf
        if len(parts) == 1:
            return parts[0]
        return b"".join(parts)

    # -- writing -------------------------------------------------------------------------------
    # Responses are framed here: we know exactly what we send.
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
        if not self.reader.body_complete:
            self.keep_alive = False  # the body is unread (or garbage): close after this response
        await self.send_response(err.status, headers, err.body())

    def next_cycle(self) -> bool:
        """After a complete response: ready for the next request on this connection (False: close).
        A body the handler did not read (a GET's empty one, an error before reading) is skipped if
        it is already buffered; one still on the wire means the connection closes."""
        reader = self.reader
        if not self.keep_alive:
            return False
        if not reader.body_complete:
            try:
                while reader.read_body():
                    pass
            except ProtocolError:
                return False
            if not reader.body_complete:
                return False
        reader.next_request()
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


async def _send_protocol_error(ds: Downstream, status: int, message: str) -> None:
    code = {408: "request_timeout", 431: "header_too_large", 501: "not_implemented",
            505: "http_version_not_supported"}.get(status, "bad_http")
    ds.keep_alive = False
    try:
        await ds.send_error(errors.ApiError(status, message, "invalid_request_error", code=code))
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
                    if request is None:
                        return
                    await gw.dispatch(ds, request)
                except ProtocolError as exc:
                    scope.deadline = math.inf
                    await _send_protocol_error(ds, exc.status, exc.message)
                    return
                except ClientGone:
                    return
                if ds.client_gone or gw.draining or not ds.next_cycle():
                    return
        if scope.cancelled_caught and ds.phase in (HEAD, BODY):
            # A request head or body that did not arrive in time (a cancelled drain lands in IDLE).
            with trio.CancelScope(deadline=trio.current_time() + 1.0):
                await _send_protocol_error(ds, 408, f"Timed out reading the request {ds.phase}.")
    finally:
        gw.connection_closed(ds)
        sockio.close(sock)
