"""CORS for browser apps: `[server] cors_origins` answers preflights and marks responses for those
origins only; none by default.

Strategy: nothing at all runs unless origins are configured. Then, per request, one scan of the
headers for `Origin`; an allowed origin gets `access-control-allow-origin` (the origin itself, or `*`
when configured so: keys travel in headers, never cookies, so credentials are never allowed),
`vary: origin`, and `access-control-expose-headers` naming what the SDKs read (request id, retry and
rate-limit headers, the wake time) -- added by `Downstream.response_head` to whatever response the
request gets, errors included. A preflight (`OPTIONS` on a known route with
`access-control-request-method`) is answered here, before authentication (browsers send no key on a
preflight): 204 with the route's methods, the requested headers when they are plain header names,
and a max-age; an origin not in the list gets 403 and no CORS headers, so the browser refuses.
"""

from __future__ import annotations

import re

from proxy import errors

EXPOSE = (b"x-request-id, retry-after, x-should-retry, x-ratelimit-limit-requests, "
          b"x-ratelimit-remaining-requests, x-ratelimit-reset-requests, x-ratelimit-limit-tokens, "
          b"x-ratelimit-remaining-tokens, x-ratelimit-reset-tokens, x-spotinference-wake-ms")
ALLOW_HEADERS = (b"authorization, content-type, x-api-key, anthropic-version, anthropic-beta, "
                 b"openai-organization, openai-project, x-request-id")
MAX_AGE = b"600"
_HEADER_LIST = re.compile(rb"[A-Za-z0-9!#$%&'*+.^_`|~-]+(?:[ \t]*,[ \t]*[A-Za-z0-9!#$%&'*+.^_`|~-]+)*")


def _header(headers, wanted: bytes) -> bytes | None:
    for name, value in headers:
        if name == wanted:
            return value
    return None


def allowed_origin(origins, headers) -> bytes | None:
    """The value for access-control-allow-origin, or None (no Origin, or not allowed)."""
    origin = _header(headers, b"origin")
    if origin is None:
        return None
    text = origin.decode("latin-1")
    if text in origins:
        return origin
    if "*" in origins:
        return b"*"
    return None


def response_headers(origins, headers) -> list[tuple[bytes, bytes]] | None:
    allow = allowed_origin(origins, headers)
    if allow is None:
        return None
    return [(b"access-control-allow-origin", allow), (b"vary", b"origin"),
            (b"access-control-expose-headers", EXPOSE)]


async def preflight(ds, ex, request, methods: tuple[bytes, ...]) -> None:
    """Answer an OPTIONS request on a known route."""
    if ds.cors is None or _header(request.headers, b"access-control-request-method") is None:
        ds.cors = None
        err = errors.ApiError(403, "CORS preflight refused: the Origin is not in [server] cors_origins "
                              "(or the request is not a preflight).", "invalid_request_error",
                              code="cors_origin_not_allowed")
        ex.fail(err)
        await ds.send_error(err, ex.request_id)
        return
    asked = _header(request.headers, b"access-control-request-headers")
    allow_headers = asked.strip() if asked is not None and _HEADER_LIST.fullmatch(asked.strip()) else ALLOW_HEADERS
    ex.status = 204
    head = ds.response_head(204, [
        (b"access-control-allow-methods", b", ".join((*methods, b"OPTIONS"))),
        (b"access-control-allow-headers", allow_headers),
        (b"access-control-max-age", MAX_AGE),
        (b"x-request-id", ex.request_id),
    ], None)
    await ds.send_raw(head)
