"""The response head the client gets: the upstream's headers, less hop-by-hop, plus ours.

Strategy: one pass over the upstream's header list. Hop-by-hop headers are dropped (RFC 9110 7.6.1),
those the upstream names in any `Connection` header too (a rare second pass, only when it names
something), and so is the upstream's framing (the relay re-frames); `x-request-id` and the rate-limit and wake
headers are added. SSE responses get `Cache-Control: no-cache` and `X-Accel-Buffering: no` (replacing
the upstream's cache-control) so an nginx or load balancer in front does not buffer them.
"""

from __future__ import annotations

_DROP_RESPONSE = frozenset((
    b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"te", b"trailer",
    b"upgrade", b"proxy-authenticate", b"cache-control", b"x-accel-buffering", b"content-length",
))
_SSE_HEADERS = ((b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no"))
_EVENT_STREAM = b"text/event-stream"


def _is_event_stream(value: bytes) -> bool:
    # Media types are case-insensitive (RFC 9110 8.3.1): `Text/Event-Stream; charset=utf-8` is SSE too.
    return value[:17].lower() == _EVENT_STREAM and (len(value) == 17 or value[17:18] in b"; \t")


def response_headers(upstream_headers, request_id: bytes, extra) -> tuple[list, bool]:
    out = []
    sse = False
    named = None
    for name, value in upstream_headers:
        if name in _DROP_RESPONSE:
            if name == b"cache-control":
                out.append((name, value))  # kept unless SSE (replaced below)
            elif name == b"connection":
                for token in value.lower().split(b","):
                    token = token.strip()
                    if token and token not in (b"close", b"keep-alive"):
                        named = named or set()
                        named.add(token)
            continue
        if name == b"content-type" and _is_event_stream(value):
            sse = True
        out.append((name, value))
    if named:
        out = [h for h in out if h[0] not in named]
    if sse:
        out = [h for h in out if h[0] != b"cache-control"]
        out.extend(_SSE_HEADERS)
    out.append((b"x-request-id", request_id))
    out.extend(extra)
    return out, sse
