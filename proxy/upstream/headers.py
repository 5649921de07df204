"""The request head an upstream gets: the client's headers, less what must not cross the hop.

Strategy: one pass over the client's header list to find what changes the rules (`Connection`, the
forwarding headers), one to copy. Dropped: hop-by-hop headers (RFC 9110 7.6.1) and whatever ANY of
the client's `Connection` headers names, the framing headers we set ourselves, the client's
`x-request-id`, the client's `origin` (the gateway answers CORS itself: admit/cors.py; vLLM's own
CORS middleware, allow-all by default, must not add a second answer), and the client's gateway key
(`authorization`, `x-api-key`) -- it never reaches vLLM; the tier's
`upstream_api_key` does (`tier.auth_header`). Added: `host`, the body's `content-length`, the
request id, `x-forwarded-for` and `x-real-ip`.
Forwarding headers (`x-forwarded-for`, `x-real-ip`, `forwarded`): from a peer that is not in
`[server] trusted_proxies` they are dropped and ours say `x-forwarded-for: <peer>`,
`x-real-ip: <peer>`. From a trusted proxy its `x-forwarded-for` lines are joined into one and
`, <peer>` is appended; its `x-real-ip` and `forwarded` pass unchanged (`x-real-ip: <peer>` is
added only when it sent none). Upstreams therefore always see exactly one `x-forwarded-for`.
Cost: trusted_proxies is parsed once per config load (`trusted_networks`, held in the gateway's
`Runtime`); the peer's address is parsed only when the client sent a forwarding header and the
list is not empty.
"""

from __future__ import annotations

import ipaddress

# Never forwarded upstream: hop-by-hop (RFC 9110 7.6.1), ours to set, or the client's gateway key.
_DROP_REQUEST = frozenset((
    b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"te", b"trailer",
    b"upgrade", b"proxy-authorization", b"proxy-authenticate", b"host", b"content-length",
    b"authorization", b"x-api-key", b"origin", b"expect", b"x-request-id", b"x-forwarded-for", b"x-real-ip", b"forwarded",
))
# From a trusted proxy: its x-real-ip and forwarded pass; its x-forwarded-for is extended (re-added).
_DROP_TRUSTED = _DROP_REQUEST - {b"x-real-ip", b"forwarded"}
_FORWARDING = frozenset((b"x-forwarded-for", b"x-real-ip", b"forwarded"))
_NOTICE = _FORWARDING | {b"connection"}

Networks = tuple  # of ipaddress.IPv4Network | ipaddress.IPv6Network


def trusted_networks(entries) -> Networks:
    """`[server] trusted_proxies` (IPs or CIDRs, validated by proxy/config.py) as networks."""
    return tuple(ipaddress.ip_network(e, strict=False) for e in entries)


def is_trusted(client: str, trusted: Networks) -> bool:
    """Whether the peer address `client` is in one of `trusted` (False for a non-IP peer, e.g. unix)."""
    if not trusted:
        return False
    try:
        ip = ipaddress.ip_address(client)
    except ValueError:
        return False
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped  # ::ffff:10.0.0.1 on a dual-stack listener is 10.0.0.1
    return any(ip in net for net in trusted)  # `in` is False across IP versions


def _connection_tokens(value: bytes) -> set[bytes]:
    return {t.strip(b" \t").lower() for t in value.split(b",")} - {b"close", b"keep-alive", b""}


def upstream_headers(request_headers, tier, address: tuple[str, int], request_id: bytes,
                     body_len: int, client: str, trusted: Networks = ()) -> list[tuple[bytes, bytes]]:
    listed = None       # names in the client's Connection headers (all of them)
    forwarding = False  # the client sent x-forwarded-for / x-real-ip / forwarded
    for name, value in request_headers:
        if name in _NOTICE:
            if name == b"connection":
                tokens = _connection_tokens(value)
                if tokens:
                    listed = tokens if listed is None else listed | tokens
            else:
                forwarding = True
    peer = client.encode()
    xff = peer
    real_ip = True
    if forwarding and trusted and is_trusted(client, trusted):
        drop = _DROP_TRUSTED if listed is None else _DROP_TRUSTED | listed
        if listed is None or b"x-forwarded-for" not in listed:  # (not named hop-by-hop by its Connection)
            chain = [v for n, v in request_headers if n == b"x-forwarded-for" and v]
            if chain:
                chain.append(peer)
                xff = b", ".join(chain)
        real_ip = b"x-real-ip" in drop or not any(n == b"x-real-ip" for n, _ in request_headers)  # none kept
    else:
        drop = _DROP_REQUEST if listed is None else _DROP_REQUEST | listed
    out = [(b"host", f"{address[0]}:{address[1]}".encode())]
    out += [(n, v) for n, v in request_headers if n not in drop]
    out.append((b"content-length", str(body_len).encode()))
    out.append((b"x-request-id", request_id))
    out.append((b"x-forwarded-for", xff))
    if real_ip:
        out.append((b"x-real-ip", peer))
    if tier.auth_header is not None:
        out.append(tier.auth_header)
    return out
