"""The request head an upstream gets: the client's headers, less what must not cross the hop.

Strategy: one pass over the client's header list. Dropped: hop-by-hop headers (RFC 9110 7.6.1) and
whatever the client's `Connection` header names, the framing headers we set ourselves, and the
client's gateway key (`authorization`) -- it never reaches vLLM; the tier's `upstream_api_key` does
(`tier.auth_header`). Added: `host`, the body's `content-length`, the request id, `x-forwarded-for`.
"""

from __future__ import annotations

# Never forwarded upstream: hop-by-hop (RFC 9110 7.6.1), ours to set, or the client's gateway key.
_DROP_REQUEST = frozenset((
    b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"te", b"trailer",
    b"upgrade", b"proxy-authorization", b"proxy-authenticate", b"host", b"content-length",
    b"authorization", b"expect",
))


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
