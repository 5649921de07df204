"""One task per client connection: read a request head, dispatch it, repeat while keep-alive allows.

Strategy (after h11's trio example and hypercorn's h11 protocol, whose loop this keeps): our own
strict sans-I/O reader (parse/request.py; h11 is the oracle its tests are checked against) owns
request framing, keep-alive and 100-continue; `Downstream` (downstream.py) owns the socket, the phase
deadlines and the response framing. One request/response
cycle per loop turn:
  read head -> `gw.dispatch` (admit/routes.py: reads the body if it wants it, sends exactly one
  response) -> if the request or response wants close, or the body was left unread, close; else the
  next request (pipelined bytes already read stay buffered).
When the connection's scope fires, `phase` says what timed out: IDLE -> close quietly (also a drain);
HEAD/BODY -> 408. Refused requests (400 garbage, 431 head too large, 501 transfer-coding, 505
version) are answered once, then the connection closes. An unexpected exception anywhere in a cycle
meets the crash barrier (barrier.py): answered 500 if it can be, logged, counted, connection closed --
one connection ends, the worker and its other connections do not.
"""

from __future__ import annotations

import math
import socket

import trio

from proxy import errors, sockio
from proxy.accept.barrier import contain
from proxy.accept.downstream import BODY, HEAD, ClientGone, Downstream
from proxy.parse.request import RequestError


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
                except RequestError as exc:
                    scope.deadline = math.inf
                    await _send_protocol_error(ds, exc.status, exc.message)
                    return
                except ClientGone:
                    return
                except Exception as exc:  # noqa: BLE001 -- the crash barrier (a bug in reading or recording a request)
                    scope.deadline = math.inf
                    with trio.CancelScope(deadline=trio.current_time() + 1.0):
                        await contain(gw, ds, exc, "connection")
                    return
                if ds.client_gone or gw.draining or not ds.next_cycle():
                    return
        if scope.cancelled_caught and ds.phase in (HEAD, BODY):
            # A request head or body that did not arrive in time (a cancelled drain lands in IDLE).
            with trio.CancelScope(deadline=trio.current_time() + 1.0):
                await _send_protocol_error(ds, 408, f"Timed out reading the request {ds.phase}.")
    finally:
        ds.stop_phase_timer()
        gw.connection_closed(ds)
        sockio.close(sock)
