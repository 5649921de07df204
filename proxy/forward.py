"""Inference requests: body, validation, routing, the upstream exchange (with its retry rule).

Strategy: refuse as much as possible before reading the body (framing, declared size, content type),
then validate the narrow view (schemas.py) and route; nothing invalid reaches an upstream. The
ORIGINAL body bytes go upstream (the only rewrite is usage accounting's stream_options injection).
Retry rule (DESIGN.md): a connection refused, or a reset / EOF before the first response byte, is
retried on the next upstream of the tier (a reused keep-alive connection first gets one fresh
retry on the same address); after the first response byte, never. A first-byte timeout is not
retried either: the upstream may be generating. With no upstream reachable: 503 (retryable);
upstream spoke garbage or hung up after taking the request: 502; first byte too slow: 504.
Everything after the upstream's response head is relay.py's.
"""

from __future__ import annotations

import time

import trio

from proxy import errors
from proxy.connection import ClientGone, Downstream
from proxy.exchange import Exchange
from proxy.relay import end_stream_with_error, relay_response
from proxy.schemas import DECODERS
from proxy.upstream.connection import UpstreamClosed, encode_request
from proxy.wake import remaining_s, wait_for_tier, wake_header

# Never forwarded upstream: hop-by-hop (RFC 9110 7.6.1), ours to set, or the client's gateway key.
_DROP_REQUEST = frozenset((
    b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"te", b"trailer",
    b"upgrade", b"proxy-authorization", b"proxy-authenticate", b"host", b"content-length",
    b"authorization", b"expect",
))
_JSON_TYPES = (b"application/json",)


def _connection_tokens(value: bytes) -> set[bytes]:
    return {t.strip().lower() for t in value.split(b",")} - {b"close", b"keep-alive", b""}


def upstream_headers(request_headers, tier, address: tuple[str, int], request_id: bytes,
                     body_len: int, client: str) -> list[tuple[bytes, bytes]]:
    drop = _DROP_REQUEST
    for name, value in request_headers:
        if name == b"connection":
            extra = _connection_tokens(value)
            if extra:
                drop = drop | extra
            break
    out = [(b"host", f"{address[0]}:{address[1]}".encode())]
    out += [(n, v) for n, v in request_headers if n not in drop and n != b"x-request-id"]
    out.append((b"content-length", str(body_len).encode()))
    out.append((b"x-request-id", request_id))
    out.append((b"x-forwarded-for", client.encode()))
    if tier.auth_header is not None:
        out.append(tier.auth_header)
    return out


def _check_declared(request, limit: int) -> None:
    """Refuse before reading the body: a declared length past the limit, a non-JSON content type.
    (Framing itself -- Content-Length with Transfer-Encoding included -- is the parser's: 400.)"""
    if request.content_length is not None and request.content_length > limit:
        raise errors.body_too_large(limit)
    for name, value in request.headers:
        if name == b"content-type":
            mime = value.split(b";", 1)[0].strip().lower()
            if mime not in _JSON_TYPES:
                raise errors.invalid_request(
                    f"Unsupported Content-Type {mime.decode('latin-1')!r}: send application/json.",
                    code="unsupported_content_type")
            return


async def forward_inference(gw, ds: Downstream, ex: Exchange, request, key, rest: bytes) -> None:
    limit = ds.limits.max_body_bytes
    _check_declared(request, limit)
    body = await ds.read_body(limit, request)
    target = request.target
    q = target.find(b"?")
    path = target if q < 0 else target[:q]
    view = DECODERS[path](body)
    ex.model = view.model
    ex.stream = view.stream
    tier = gw.runtime.router.tier_for(view.model)
    if tier is None:
        raise errors.model_not_found(view.model)
    ex.tier = tier.name
    if key is not None and not key.allows_tier(tier.name):
        raise errors.permission_denied(f"This API key may not use tier '{tier.name}' (model '{view.model}').")
    extra_headers, body, tap = gw.admit(ex, key, view, body)
    await _exchange(gw, ds, ex, tier, request, body, extra_headers, tap)


async def _exchange(gw, ds: Downstream, ex: Exchange, tier, request, body: bytes, extra_headers, tap) -> None:
    """Handles its own errors, leaves only Cancelled (a vanished client: connection.sweep_vanished)
    to propagate.
    With a waker: wait while the tier sleeps; a tier that refuses every connection is reported to the
    waker and waited for again, all within the request's one hard cap."""
    waker = tier.waker
    try:
        while True:
            if waker is not None and not waker.is_ready():
                tier = await wait_for_tier(gw, ds, ex, tier, stream=ex.stream, extra_headers=extra_headers)
            try:
                conn, response = await open_upstream(gw, ex, tier, request, body)
                break
            except errors.ApiError as err:
                # Every upstream refused (each was reported to the waker as it failed): the tier went
                # away under us -- wait for the waker again, within the same hard cap.
                if (waker is None or err.code != "upstream_unavailable"
                        or remaining_s(ex, waker.settings.hard_cap_s) <= 0):
                    raise
                await trio.sleep(min(waker.settings.poll_s, max(0.0, remaining_s(ex, waker.settings.hard_cap_s))))
    except errors.ApiError as err:
        ex.fail(err)
        if ex.early_head:
            await end_stream_with_error(ds, err)
            return
        err.headers += tuple(extra_headers)
        wh = wake_header(ex)
        if wh is not None:
            err.headers += (wh,)
        await _send_error_quietly(ds, err, ex)
        return
    except ClientGone:
        return
    wh = wake_header(ex)
    if wh is not None:
        extra_headers = (*extra_headers, wh)
    await relay_response(gw, ds, ex, tier, conn, response, extra_headers, tap, head_sent=ex.early_head)


async def _send_error_quietly(ds: Downstream, err, ex: Exchange) -> None:
    try:
        await ds.send_error(err, ex.request_id)
    except ClientGone:
        pass


async def open_upstream(gw, ex: Exchange, tier, request, body: bytes):
    """Send the request to an upstream of `tier`; return (connection, response head)."""
    cfg = gw.runtime.config.upstream
    pool = gw.pool
    target = request.target
    saw_connect_error = saw_reset = False
    for url, address in tier.candidates():
        head = encode_request(b"POST", target, upstream_headers(request.headers, tier, address, ex.request_id,
                                                                 len(body), ex.client))
        for attempt in range(2):
            conn = pool.take_idle(address) if attempt == 0 else None
            reused = conn is not None
            if conn is None:
                try:
                    with trio.fail_after(cfg.connect_s):
                        conn = await pool.connect(address)
                except (OSError, trio.TooSlowError):
                    saw_connect_error = True
                    gw.upstream_failed(tier, url)
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
                gw.upstream_failed(tier, url)
                break
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
