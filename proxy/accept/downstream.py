"""The client side of one connection: its socket, its request reader, and the framing of what we send.

Strategy: `Downstream` owns the raw non-blocking socket (sockio.py) and a sans-I/O `RequestReader`
(parse/request.py); handlers call `read_body`, `send_response`, `send_error`, or -- for a relayed
stream -- `response_head`, `frame` and `end` to build the exact bytes and `send_raw` to write them
(we know exactly what we send, so responses are framed here, not by a library).
Per-phase timeouts share ONE cancel scope per connection (`scope`, owned by connection.py), cancelled
when the phase's time is up: keep-alive idle until the first byte of a head (IDLE), then the request
head (HEAD) -- both by an alarm (proxy/alarms.py: a dict entry set and cleared per request, where two
deadline changes of the scope cost several times as much) -- then the request body (BODY, the scope's
own deadline, only while we actually wait for it); none while a handler runs (BUSY: the upstream path
has its own).
The body's deadline is a minimum rate, as Apache's mod_reqtimeout MinRate: `body_grace_s` plus one
second per `min_body_rate_bytes_s` bytes received so far, never past `request_body_s` -- a trickle is
cut (408) soon after the grace, a slow but steady upload is not. It moves only when a read must wait.
A client that closed, reset or stopped reading surfaces as `ClientGone` from the send methods.
"""

from __future__ import annotations

import math
import socket

import trio

from proxy import errors, sockio
from proxy.alarms import alarms, cancel_scope
from proxy.parse.request import RequestError, RequestReader
from proxy.sockio import BrokenPipe

REASONS = {200: b"OK", 204: b"No Content", 400: b"Bad Request", 401: b"Unauthorized", 403: b"Forbidden", 404: b"Not Found",
           405: b"Method Not Allowed", 408: b"Request Timeout", 413: b"Content Too Large",
           429: b"Too Many Requests", 431: b"Request Header Fields Too Large", 500: b"Internal Server Error",
           502: b"Bad Gateway", 503: b"Service Unavailable", 504: b"Gateway Timeout",
           529: b"Overloaded"}
_JSON = (b"content-type", b"application/json")
IDLE, HEAD, BODY, BUSY = "idle", "head", "body", "busy"


class ClientGone(Exception):
    """The client closed or reset the connection, or stopped reading."""


class Downstream:
    __slots__ = (
        "alarm",
        "busy_since",
        "chunked",
        "client",
        "client_gone",
        "cors",
        "dialect",
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
        self.alarm = None  # the IDLE or HEAD phase's alarm while one runs
        self.phase = IDLE
        self.started = False      # response head sent for the current request
        self.chunked = False      # current response framed with chunked encoding
        self.keep_alive = True    # current request allows another on this connection
        self.head_only = False    # HEAD request: no body bytes
        self.http11 = True
        self.busy_since = 0.0
        self.dialect = errors.OPENAI  # the error shape of the current request's route (routes.py sets it)
        self.cors: list | None = None  # CORS headers for the current request's response (admit/cors.py)

    def _enter(self, phase: str, seconds: float) -> None:
        if self.alarm is not None:
            self.alarm.owner.clear(self.alarm)
        self.phase = phase
        self.alarm = alarms(phase).set(seconds, cancel_scope, self.scope)

    def stop_phase_timer(self) -> None:
        """No IDLE/HEAD timeout any more (the request is read, or the connection ends)."""
        if self.alarm is not None:
            self.alarm.owner.clear(self.alarm)
            self.alarm = None

    async def _receive(self) -> bool:
        data = await sockio.recv(self.sock)
        self.reader.feed(data)
        return bool(data)

    # -- reading -------------------------------------------------------------------------------
    async def read_head(self):
        """The next request head, or None when the connection should just close (EOF).
        Raises RequestError for a request that must be refused (then the connection closes)."""
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
            self.stop_phase_timer()
            self.phase = BUSY
            self.busy_since = trio.current_time()
            self.started = False
            self.http11 = head.http_version == b"1.1"
            self.head_only = head.method == b"HEAD"
            self.keep_alive = head.keep_alive
            self.dialect = errors.OPENAI
            self.cors = None
            return head

    async def read_body(self, limit: int, head) -> bytes:
        """The whole request body (caller already refused an over-long Content-Length).
        Raises ApiError 413 past `limit`; the body timeout cancels the connection's scope (408)."""
        reader = self.reader
        parts: list[bytes] = []
        size = 0
        asked_continue = False
        started = hard = -1.0
        while True:
            data = reader.read_body()  # RequestError: bad chunking or EOF mid-body
            if data is None:
                if head.expect_continue and not asked_continue:
                    asked_continue = True
                    await self.send_raw(b"HTTP/1.1 100 Continue\r\n\r\n")
                limits = self.limits
                if hard < 0:  # the body timeout runs only while we wait for it
                    started = trio.current_time()
                    hard = started + limits.request_body_s
                self.phase = BODY
                rate = limits.min_body_rate_bytes_s
                self.scope.deadline = hard if rate <= 0 else min(hard, started + limits.body_grace_s + size / rate)
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
        if length is None and status != 204:  # a 204 has no body and no framing header (RFC 9110 8.6)
            self.chunked = self.http11
            if not self.http11:
                self.keep_alive = False
        else:
            self.chunked = False
        if reason is None:
            reason = REASONS.get(status, b"")
        lines = [b"HTTP/1.1 %d %s\r\n" % (status, reason)]
        lines += [b"%s: %s\r\n" % h for h in headers]
        if self.cors is not None:
            lines += [b"%s: %s\r\n" % h for h in self.cors]
        if length is not None and status != 204:
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
        await self.send_response(err.status_for(self.dialect), headers, err.body(self.dialect))

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
            except RequestError:
                return False
            if not reader.body_complete:
                return False
        reader.next_request()
        self.started = False
        return True
