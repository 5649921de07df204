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

`watch()` runs a coroutine while a sibling task waits for the client's EOF, so a client that vanishes
while the gateway waits on the upstream cancels that work at once; bytes that arrive instead (a
pipelined request) are handed to h11 for the next cycle.
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
    __slots__ = ("sock", "conn", "gw", "client", "client_gone", "limits", "scope", "phase")

    def __init__(self, sock: socket.socket, gw, client: str) -> None:
        self.sock = sock
        self.gw = gw
        self.client = client
        self.client_gone = False
        self.limits = gw.runtime.config.server
        self.conn = h11.Connection(h11.SERVER, max_incomplete_event_size=self.limits.max_head_bytes)
        self.scope: trio.CancelScope | None = None
        self.phase = IDLE

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
        while True:
            event = conn.next_event()  # RemoteProtocolError propagates to serve_connection()
            if event is h11.NEED_DATA:
                # Keep-alive idle until the first byte of the head, then the head timeout.
                if self.phase is IDLE and conn.trailing_data[0]:
                    self._enter(HEAD, limits.request_head_s)
                if await self._receive() and self.phase is IDLE:
                    self._enter(HEAD, limits.request_head_s)
                continue
            if type(event) is h11.Request:
                # h11 bounds only a head that arrives in pieces; one read can bring a whole big head.
                size = len(event.target) + sum(len(n) + len(v) + 4 for n, v in event.headers.raw_items())
                if size > limits.max_head_bytes:
                    raise h11.RemoteProtocolError("request head too large", error_status_hint=431)
                self.phase = BUSY
                self.scope.deadline = math.inf
                return event
            return None  # ConnectionClosed

    async def read_body(self, limit: int) -> bytes:
        """The whole request body (caller already refused an over-long Content-Length).
        Raises ApiError 413 past `limit`; the body timeout cancels the connection's scope (408)."""
        conn = self.conn
        if conn.they_are_waiting_for_100_continue:
            await self.send_raw(conn.send(h11.InformationalResponse(status_code=100, headers=[])))
        parts: list[bytes] = []
        size = 0
        self._enter(BODY, self.limits.request_body_s)
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
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
        self.phase = BUSY
        self.scope.deadline = math.inf
        if len(parts) == 1:
            return bytes(parts[0])
        return b"".join(parts)

    # -- writing -------------------------------------------------------------------------------
    async def send_raw(self, data: bytes) -> None:
        try:
            await sockio.send_all(self.sock, data, self.limits.write_s)
        except BrokenPipe:
            self.conn.send_failed()
            self.client_gone = True
            raise ClientGone() from None

    def can_respond(self) -> bool:
        return self.conn.our_state in (h11.SEND_RESPONSE, h11.IDLE)

    async def send_response(self, status: int, headers: list, body: bytes) -> None:
        """A complete response in one write."""
        conn = self.conn
        headers.append((b"content-length", str(len(body)).encode()))
        out = conn.send(h11.Response(status_code=status, headers=headers, reason=REASONS.get(status, b"")))
        if body:
            out += conn.send(h11.Data(data=body))
        out += conn.send(h11.EndOfMessage())
        await self.send_raw(out)

    async def send_error(self, err: errors.ApiError, request_id: bytes | None = None) -> None:
        if not self.can_respond():
            return
        headers = [_JSON, *err.headers]
        if request_id:
            headers.append((b"x-request-id", request_id))
        if self.conn.their_state is not h11.DONE:
            # The body is unread (or garbage): close after this response.
            headers.append((b"connection", b"close"))
        await self.send_response(err.status, headers, err.body())

    # -- client presence -----------------------------------------------------------------------
    async def _watch_eof(self, cancel_scope: trio.CancelScope) -> None:
        data = await sockio.recv(self.sock)
        if data:
            self.conn.receive_data(data)  # pipelined: kept for the next cycle
            return
        self.client_gone = True
        cancel_scope.cancel()

    async def watch(self, fn, *args):
        """Run `fn(*args)`; cancel it if the client disconnects meanwhile (then raise ClientGone).
        `fn` handles its own errors (it must leave nothing but Cancelled to propagate)."""
        result = None
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._watch_eof, nursery.cancel_scope)
            try:
                result = await fn(*args)
            finally:
                nursery.cancel_scope.cancel()
        if self.client_gone:
            raise ClientGone()
        return result


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
                if (ds.client_gone or conn.our_state is not h11.DONE or conn.their_state is not h11.DONE
                        or gw.draining):
                    return
                conn.start_next_cycle()
        if scope.cancelled_caught and ds.phase in (HEAD, BODY):
            # A request head or body that did not arrive in time (a cancelled drain lands in IDLE).
            with trio.CancelScope(deadline=trio.current_time() + 1.0):
                await _send_protocol_error(ds, 408)
    finally:
        gw.connection_closed(ds)
        sockio.close(sock)
