"""The downstream side: one task per client connection driving an `h11.Connection(SERVER)`.

Strategy (after h11's trio example and hypercorn's h11 protocol): h11 owns framing, keep-alive and
100-continue; `Downstream` owns the trio stream and the read size. One request/response cycle per
loop turn:
  read head (keep-alive idle timeout until the first byte, then the request-head timeout)
  -> dispatch (handlers.py) which reads the body if it wants it and sends exactly one response
  -> on MUST_CLOSE, or a request body left unread, close; else `start_next_cycle()`.
Errors are sent only while h11's state still allows a response (`error_status_hint` gives the
status for protocol errors: 400 garbage, 431 head too large). A failed write calls `send_failed()`.

`watch()` runs a coroutine while a sibling task waits for the client's EOF, so a client that
vanishes while the gateway waits on the upstream (or relays a stream) cancels that work at once;
bytes that arrive instead (a pipelined request) are handed to h11 for the next cycle.
"""

from __future__ import annotations

import h11
import trio

from proxy import errors

READ_SIZE = 65536
REASONS = {200: b"OK", 400: b"Bad Request", 401: b"Unauthorized", 403: b"Forbidden", 404: b"Not Found",
           405: b"Method Not Allowed", 408: b"Request Timeout", 413: b"Content Too Large",
           429: b"Too Many Requests", 431: b"Request Header Fields Too Large", 500: b"Internal Server Error",
           502: b"Bad Gateway", 503: b"Service Unavailable", 504: b"Gateway Timeout"}
_JSON = (b"content-type", b"application/json")


class ClientGone(Exception):
    """The client closed or reset the connection."""


class Downstream:
    __slots__ = ("stream", "conn", "gw", "client", "client_gone", "limits")

    def __init__(self, stream: trio.SocketStream, gw, client: str) -> None:
        self.stream = stream
        self.gw = gw
        self.client = client
        self.client_gone = False
        self.limits = gw.runtime.config.server
        self.conn = h11.Connection(h11.SERVER, max_incomplete_event_size=self.limits.max_head_bytes)

    # -- reading -------------------------------------------------------------------------------
    async def _receive(self) -> bool:
        try:
            data = await self.stream.receive_some(READ_SIZE)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            data = b""
        self.conn.receive_data(data)
        return bool(data)

    async def read_head(self):
        """The next Request, or None when the connection should just close (EOF, idle timeout)."""
        conn = self.conn
        limits = self.limits
        got_bytes = False
        idle = self.gw.idle_scopes
        with trio.move_on_after(limits.keepalive_idle_s) as scope:
            idle.add(scope)  # a drain cancels connections that wait for a request
            while True:
                event = conn.next_event()  # RemoteProtocolError propagates to serve()
                if event is h11.NEED_DATA:
                    # Keep-alive idle until the first byte of the head, then the head timeout.
                    if not got_bytes and conn.trailing_data[0]:
                        got_bytes = True
                        idle.discard(scope)
                        scope.deadline = trio.current_time() + limits.request_head_s
                    if await self._receive() and not got_bytes:
                        got_bytes = True
                        idle.discard(scope)
                        scope.deadline = trio.current_time() + limits.request_head_s
                    continue
                idle.discard(scope)
                if type(event) is h11.Request:
                    # h11 bounds only a head that arrives in pieces; one read can bring a whole big head.
                    size = len(event.target) + sum(len(n) + len(v) + 4 for n, v in event.headers.raw_items())
                    if size > limits.max_head_bytes:
                        raise h11.RemoteProtocolError("request head too large", error_status_hint=431)
                    return event
                return None  # ConnectionClosed
        idle.discard(scope)
        if got_bytes:
            await self.send_error(errors.ApiError(408, "Timed out reading the request head.",
                                                  "invalid_request_error", code="request_timeout"))
        return None

    async def read_body(self, limit: int) -> bytes:
        """The whole request body (caller already refused an over-long Content-Length).
        Raises ApiError 413 past `limit`, 408 past the body timeout."""
        conn = self.conn
        if conn.they_are_waiting_for_100_continue:
            await self.send_raw(conn.send(h11.InformationalResponse(status_code=100, headers=[])))
        parts: list[bytes] = []
        size = 0
        with trio.move_on_after(self.limits.request_body_s) as scope:
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
        if scope.cancelled_caught:
            raise errors.ApiError(408, "Timed out reading the request body.", "invalid_request_error",
                                  code="request_timeout")
        return parts[0] if len(parts) == 1 else b"".join(parts)

    # -- writing -------------------------------------------------------------------------------
    async def send_raw(self, data: bytes) -> None:
        try:
            with trio.fail_after(self.limits.write_s):
                await self.stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError):
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
        try:
            data = await self.stream.receive_some(READ_SIZE)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            data = b""
        if data:
            self.conn.receive_data(data)  # pipelined: kept for the next cycle
            return
        self.client_gone = True
        cancel_scope.cancel()

    async def watch(self, fn, *args) -> None:
        """Run `fn(*args)`; cancel it if the client disconnects meanwhile. `fn` handles its own
        errors (it must leave nothing but Cancelled to propagate)."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._watch_eof, nursery.cancel_scope)
            try:
                await fn(*args)
            finally:
                nursery.cancel_scope.cancel()


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


async def serve_connection(stream: trio.SocketStream, gw) -> None:
    """Serve one client connection until it closes."""
    try:
        peer = stream.socket.getpeername()
        client = peer[0] if isinstance(peer, tuple) else str(peer)
    except OSError:
        client = "?"
    ds = Downstream(stream, gw, client)
    gw.connection_opened()
    try:
        while True:
            try:
                request = await ds.read_head()
            except h11.RemoteProtocolError as exc:
                status = exc.error_status_hint
                if status == 431:
                    err = errors.ApiError(431, "Request header fields too large.", "invalid_request_error",
                                          code="header_too_large")
                else:
                    err = errors.ApiError(status, "Malformed HTTP request.", "invalid_request_error",
                                          code="bad_http")
                try:
                    await ds.send_error(err)
                except ClientGone:
                    pass
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
    finally:
        gw.connection_closed()
        stream.socket.close()

