"""Sending a request to one of a tier's upstreams, with the retry rule: until the first response byte.

Strategy (DESIGN.md's retry rule): a connection refused, or a reset / EOF before the first response
byte, is retried on the next upstream of the tier (a reused keep-alive connection first gets one
fresh retry on the same address: the server may have closed it idle under us); after the first
response byte, never. A first-byte timeout is not retried either: the upstream may be generating.
Every upstream that refused or reset is reported to the tier's waker, which takes it out of rotation
and re-probes it. Outcomes: (connection, response head); or 503 `upstream_unavailable` (nothing
reachable: retryable), 502 (an upstream took the request and hung up), 504 (first byte too slow).
"""

from __future__ import annotations

import time

import trio

from proxy import errors
from proxy.exchange import Exchange
from proxy.observe import logs
from proxy.upstream.connection import UpstreamClosed, UpstreamProtocolError, encode_request
from proxy.upstream.headers import upstream_headers


def report_unreachable(tier, url: str) -> None:
    """An upstream refused or reset before its first byte: log it and tell the tier's waker."""
    logs.event("upstream_unreachable", level="warning", tier=tier.name, upstream=url)
    if tier.waker is not None:
        tier.waker.report_unreachable(url)


async def open_upstream(gw, ex: Exchange, tier, request, body: bytes):
    """Send the request to an upstream of `tier`; return (connection, response head)."""
    cfg = gw.runtime.config.upstream
    pool = gw.pool
    trusted = gw.runtime.trusted_proxies
    target = request.target
    saw_connect_error = saw_reset = False
    for url, address in tier.candidates():
        head = encode_request(b"POST", target, upstream_headers(request.headers, tier, address, ex.request_id,
                                                                 len(body), ex.client, trusted))
        for attempt in range(2):
            conn = pool.take_idle(address) if attempt == 0 else None
            reused = conn is not None
            if conn is None:
                try:
                    with trio.fail_after(cfg.connect_s):
                        conn = await pool.connect(address)
                except (OSError, trio.TooSlowError):
                    saw_connect_error = True
                    report_unreachable(tier, url)
                    break
            try:
                ex.t_upstream = time.perf_counter()
                await conn.send_request(head, body)
                with trio.CancelScope(deadline=trio.current_time() + cfg.first_byte_s) as first_byte:
                    event = await conn.read_head()
                if first_byte.cancelled_caught:
                    raise trio.TooSlowError
            except UpstreamClosed:
                pool.discard(conn)
                if reused:
                    continue  # the server closed an idle keep-alive connection under us
                saw_reset = True
                report_unreachable(tier, url)
                break
            except UpstreamProtocolError as exc:
                pool.discard(conn)  # it answered, wrongly: never resent, never relayed, not "unreachable"
                raise errors.bad_gateway(tier.name, f"invalid response head ({exc})") from None
            except trio.TooSlowError:
                pool.discard(conn)
                raise errors.upstream_timeout(tier.name, f"no response within {cfg.first_byte_s:g} s") from None
            except BaseException:
                pool.discard(conn)
                raise
            ex.upstream = f"{address[0]}:{address[1]}"
            return conn, event
    if saw_reset and not saw_connect_error:
        raise errors.bad_gateway(tier.name, "connection reset before the response")
    raise errors.upstream_unreachable(tier.name)
