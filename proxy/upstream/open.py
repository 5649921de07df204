"""Sending a request to one of a tier's upstreams, with the retry rule: until the first response byte.

Strategy (DESIGN.md's retry rule): a connection refused, or a reset / EOF before the first response
byte, is retried on the next upstream of the tier (a reused keep-alive connection first gets one
fresh retry on the same address: the server may have closed it idle under us); after the first
response byte, never. A first-byte timeout is not retried either: the upstream may be generating.
Every upstream that refused or reset is reported to the tier's waker, which takes it out of rotation
and re-probes it. Outcomes: (connection, response head); or 503 `upstream_unavailable` (nothing
reachable: retryable), 502 (an upstream took the request and hung up, or its health record found it
silent or stalled while we waited: not retried, it may have started generating), 504 (first byte too
slow: an alarm (proxy/alarms.py) shuts the socket down at the deadline, no cancel scope per request).
Health: with the tier's health record (backends/health.py), the exchange registers a `Watch` from
the moment it is routed to the upstream (before its connect: the record's in-flight set is the load
the routing policy reads, so a burst sees its own requests) for as long as it waits on it -- a set
add and discard, no task. A sick verdict shuts the upstream
socket down, so the waiting read sees EOF at once; `watch.killed` tells that EOF from a real one. A
caller that passes its own `watch` keeps it registered past the head, for the relay (which disarms it).
A `Pin` names the one upstream ("host:port") that holds a stored response: strict (a retrieve or
cancel), only it is tried and its absence from the routable list is 404; soft (a continuation), it
is tried first when routable, then the rest as usual. The method is the client's (GET for a retrieve).
The order of the candidates is the tier's routing policy's (routing/policy.py), given the request's
prompt `blocks` (routing/prefix.py, computed by the caller); a retry that lands past the first choice
makes that host the blocks' home.
"""

from __future__ import annotations

import socket
import time

import trio

from backends.health import Verdict
from proxy import errors
from proxy.alarms import alarms
from proxy.exchange import Exchange
from proxy.observe import logs
from proxy.upstream.connection import UpstreamClosed, UpstreamProtocolError, encode_request
from proxy.upstream.headers import upstream_headers


class Pin:
    """The upstream a request must (strict) or should (soft) reach."""

    __slots__ = ("response_id", "strict", "upstream")

    def __init__(self, upstream: str, *, strict: bool, response_id: str = "") -> None:
        self.upstream = upstream
        self.strict = strict
        self.response_id = response_id

    def apply(self, pairs: list) -> list:
        """The candidates (url, address) narrowed or reordered for this pin."""
        home = [p for p in pairs if f"{p[1][0]}:{p[1][1]}" == self.upstream]
        if self.strict:
            if not home:
                raise errors.unknown_response(self.response_id[:256])
            return home
        return home + [p for p in pairs if p not in home] if home else pairs


class Watch:
    """One exchange waiting on one upstream, as that upstream's health record sees it."""

    __slots__ = ("killed", "reason", "record", "sock")

    def __init__(self) -> None:
        self.killed = False
        self.reason = ""
        self.record = None
        self.sock: socket.socket | None = None

    def arm(self, record) -> None:
        """Count this exchange in `record`'s in-flight set from the moment it is routed there, before
        any await: the next request's choice (routing/policy.py) sees it, even in a burst that has to
        open new connections."""
        self.record, self.sock, self.killed = record, None, False
        record.enter(self)  # may call cancel() at once: the upstream is already sick

    def attach(self, sock: socket.socket) -> None:
        """The connection it waits on: what a sick verdict shuts (at once if it came meanwhile)."""
        self.sock = sock
        if self.killed:
            _shut(sock)

    def disarm(self) -> None:
        record = self.record
        if record is not None:
            self.record = None
            record.leave(self)

    def cancel(self) -> None:
        """The health record's verdict: this upstream cannot answer. Wake whoever reads it with EOF."""
        self.killed = True
        record = self.record
        self.reason = ("it stopped making progress (generation tokens frozen with requests running)"
                       if record is not None and record.verdict is Verdict.STALLED
                       else "it stopped answering its health checks")
        if self.sock is not None:
            _shut(self.sock)


def _shut(sock: socket.socket) -> None:
    """Wake whoever reads `sock` with EOF (the first-byte alarm, a health verdict); its owner says why."""
    if sock.fileno() >= 0:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


def report_unreachable(tier, url: str) -> None:
    """An upstream refused or reset before its first byte: log it and tell the tier's waker."""
    logs.event("upstream_unreachable", level="warning", tier=tier.name, upstream=url)
    if tier.waker is not None:
        tier.waker.report_unreachable(url)


async def open_upstream(gw, ex: Exchange, tier, request, body: bytes, watch: Watch | None = None,
                        pin: Pin | None = None, blocks: tuple[int, ...] = ()):
    """Send the request to an upstream of `tier`; return (connection, response head). With `watch`,
    it stays registered with the chosen upstream's health record after the head (the caller disarms)."""
    cfg = gw.runtime.config.upstream
    pool = gw.pool
    first_byte = alarms()
    trusted = gw.runtime.trusted_proxies
    target = request.target
    saw_connect_error = saw_reset = False
    keep = watch is not None
    candidates = tier.candidates(blocks)
    if pin is not None:
        candidates = pin.apply(candidates)
    for n, (url, address) in enumerate(candidates):
        head = encode_request(request.method, target, upstream_headers(request.headers, tier, address, ex.request_id,
                                                                 len(body), ex.client, trusted))
        record = tier.health_record(url)
        if record is not None and watch is None:
            watch = Watch()
        for attempt in range(2):
            if record is not None:
                watch.arm(record)  # synchronous with the choice: counted before the first await
            conn = pool.take_idle(address) if attempt == 0 else None
            reused = conn is not None
            if conn is None:
                try:
                    with trio.fail_after(cfg.connect_s):
                        conn = await pool.connect(address)
                except BaseException as exc:
                    if record is not None:
                        watch.disarm()
                    if not isinstance(exc, (OSError, trio.TooSlowError)):
                        raise
                    saw_connect_error = True
                    report_unreachable(tier, url)
                    break
            if record is not None:
                watch.attach(conn.sock)
            try:
                try:
                    ex.t_upstream = time.perf_counter()
                    await conn.send_request(head, body)
                    alarm = first_byte.set(cfg.first_byte_s, _shut, conn.sock)
                    try:
                        event = await conn.read_head()
                    except UpstreamClosed:
                        if alarm.fired:  # our own shutdown at the deadline
                            raise trio.TooSlowError from None
                        raise
                    finally:
                        first_byte.clear(alarm)
                    if alarm.fired:  # the head came as the deadline passed: the socket is shut anyway
                        raise trio.TooSlowError
                except BaseException:  # whatever went wrong: this connection and this watch are done
                    pool.discard(conn)
                    if record is not None:
                        watch.disarm()
                    raise
            except UpstreamClosed:
                if record is not None and watch.killed:
                    raise errors.bad_gateway(tier.name, watch.reason) from None
                if reused:
                    continue  # the server closed an idle keep-alive connection under us
                saw_reset = True
                report_unreachable(tier, url)
                break
            except UpstreamProtocolError as exc:
                # It answered, wrongly: never resent, never relayed, not "unreachable".
                raise errors.bad_gateway(tier.name, f"invalid response head ({exc})") from None
            except trio.TooSlowError:
                raise errors.upstream_timeout(tier.name, f"no response within {cfg.first_byte_s:g} s") from None
            if record is not None and not keep:
                watch.disarm()
            ex.upstream = f"{address[0]}:{address[1]}"
            if n:
                tier.served(blocks, url)  # a retry landed past the policy's first choice: the new home
            return conn, event
    if saw_reset and not saw_connect_error:
        raise errors.bad_gateway(tier.name, "connection reset before the response")
    raise errors.upstream_unreachable(tier.name)
