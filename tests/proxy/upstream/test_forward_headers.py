"""Forwarding and Connection-named headers on the way upstream (proxy/upstream/headers.py, issue 10).

Unit part: upstream_headers with and without `[server] trusted_proxies` (parsed once per config load
into `Runtime.trusted_proxies`). Gateway part: a recording FakeUpstream (tests/support/upstream_kit.py)
behind the real gateway, the client is httpx on 127.0.0.1: the upstream sees exactly one
X-Forwarded-For with the right value whether the peer is trusted or not, and no header named by either
of two Connection headers.
"""

from __future__ import annotations

import ipaddress

import httpx
import pytest
import trio

from proxy.config import TierConfig
from proxy.gateway import build_runtime
from proxy.routing.tiers import Router
from proxy.upstream import headers as headers_module
from proxy.upstream.headers import is_trusted, trusted_networks, upstream_headers
from tests.support.gateway import CHAT, make_config, start_gateway
from tests.support.upstream_kit import OK_JSON, FakeUpstream, answer

ADDRESS = ("10.0.0.7", 8000)
PEER = "192.0.2.5"
TRUSTED = trusted_networks(["192.0.2.0/24", "2001:db8::/32"])


def tier():
    cfg = make_config([], tiers=[TierConfig(name="t", upstreams=["http://10.0.0.7:8000"], models=["m"])])
    return Router(cfg, 0).tiers["t"]


def run(headers, client: str = PEER, trusted=TRUSTED):
    return upstream_headers(headers, tier(), ADDRESS, b"rid", 0, client, trusted)


def values(out, name: bytes) -> list[bytes]:
    return [v for n, v in out if n == name]


CLIENT_FORWARDING = [(b"x-forwarded-for", b"198.51.100.1"), (b"x-forwarded-for", b"203.0.113.2, 10.9.9.9"),
                     (b"x-real-ip", b"198.51.100.1"), (b"forwarded", b"for=198.51.100.1;proto=https"),
                     (b"accept", b"*/*")]


# -- untrusted ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("client, trusted", [(PEER, ()), ("198.51.100.9", TRUSTED), ("2001:db9::1", TRUSTED),
                                             ("unix", TRUSTED)])
def test_an_untrusted_peers_forwarding_headers_are_replaced_by_ours(client, trusted):
    out = run(CLIENT_FORWARDING, client, trusted)
    assert values(out, b"x-forwarded-for") == [client.encode()]
    assert values(out, b"x-real-ip") == [client.encode()]
    assert values(out, b"forwarded") == []
    assert values(out, b"accept") == [b"*/*"]


# -- trusted --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("client", [PEER, "::ffff:192.0.2.77", "2001:db8::1"])
def test_a_trusted_proxys_chain_is_appended_to_and_its_real_ip_and_forwarded_kept(client):
    out = run(CLIENT_FORWARDING, client)
    assert values(out, b"x-forwarded-for") == [b"198.51.100.1, 203.0.113.2, 10.9.9.9, " + client.encode()]
    assert values(out, b"x-real-ip") == [b"198.51.100.1"]
    assert values(out, b"forwarded") == [b"for=198.51.100.1;proto=https"]


def test_a_trusted_proxy_without_x_real_ip_gets_ours_and_empty_values_add_no_commas():
    out = run([(b"x-forwarded-for", b""), (b"x-forwarded-for", b"198.51.100.1")])
    assert values(out, b"x-forwarded-for") == [b"198.51.100.1, " + PEER.encode()]
    assert values(out, b"x-real-ip") == [PEER.encode()]
    out = run([(b"forwarded", b"for=198.51.100.1")])
    assert values(out, b"x-forwarded-for") == [PEER.encode()] and values(out, b"x-real-ip") == [PEER.encode()]
    assert values(out, b"forwarded") == [b"for=198.51.100.1"]


def test_forwarding_headers_a_trusted_proxy_names_in_connection_are_hop_by_hop():
    out = run([(b"connection", b"x-forwarded-for, x-real-ip, forwarded"), *CLIENT_FORWARDING])
    assert values(out, b"x-forwarded-for") == [PEER.encode()]
    assert values(out, b"x-real-ip") == [PEER.encode()] and values(out, b"forwarded") == []


def test_the_peer_address_is_parsed_only_when_a_forwarding_header_came(monkeypatch):
    def boom(_):
        raise AssertionError("ip_address parsed on the fast path")

    monkeypatch.setattr(headers_module.ipaddress, "ip_address", boom)
    out = run([(b"accept", b"*/*"), (b"user-agent", b"u")])
    assert values(out, b"x-forwarded-for") == [PEER.encode()]


def test_is_trusted_and_networks():
    net = ipaddress.ip_network
    assert trusted_networks(["10.0.0.1", "10.1.0.0/16", "::1"]) == (net("10.0.0.1/32"), net("10.1.0.0/16"),
                                                                     net("::1/128"))
    nets = trusted_networks(["10.1.0.5/16"])  # host bits allowed, as config validation
    assert is_trusted("10.1.200.3", nets) and not is_trusted("10.2.0.1", nets)
    assert not is_trusted("10.1.0.1", ()) and not is_trusted("unix", nets) and not is_trusted("::1", nets)


def test_the_runtime_holds_the_parsed_networks():
    cfg = make_config(["http://127.0.0.1:1"], server={"trusted_proxies": ["127.0.0.0/8", "::1"]})
    assert build_runtime(cfg).trusted_proxies == (ipaddress.ip_network("127.0.0.0/8"),
                                                  ipaddress.ip_network("::1"))
    assert build_runtime(make_config(["http://127.0.0.1:1"])).trusted_proxies == ()


# -- Connection ----------------------------------------------------------------------------------------
def test_tokens_of_every_connection_header_are_dropped():
    headers = [(b"connection", b"X-Hop-A"), (b"x-hop-a", b"1"), (b"x-kept", b"k"),
               (b"connection", b"keep-alive,  x-hop-b\t, close"), (b"x-hop-b", b"2"), (b"keep-alive", b"t=5")]
    out = run(headers, trusted=())
    assert [n for n, _ in out] == [b"host", b"x-kept", b"content-length", b"x-request-id", b"x-forwarded-for",
                                   b"x-real-ip"]


# -- through the real gateway ----------------------------------------------------------------------------
def head_fields(request: bytes) -> list[tuple[str, str]]:
    head = request.split(b"\r\n\r\n", 1)[0].decode("latin-1")
    out = []
    for line in head.split("\r\n")[1:]:
        name, _, value = line.partition(":")
        out.append((name.strip().lower(), value.strip()))
    return out


CLIENT_HEADERS = [("content-type", "application/json"), ("x-forwarded-for", "198.51.100.1"),
                  ("x-forwarded-for", "203.0.113.2"), ("x-real-ip", "198.51.100.1"),
                  ("forwarded", "for=198.51.100.1"), ("connection", "keep-alive, x-hop-a"),
                  ("connection", "X-Hop-B"), ("x-hop-a", "1"), ("x-hop-b", "2"), ("x-kept", "k")]


@pytest.mark.parametrize("trusted, xff, real_ip, forwarded", [
    ([], "127.0.0.1", "127.0.0.1", []),
    (["10.0.0.0/8", "::1"], "127.0.0.1", "127.0.0.1", []),  # trusted list, but not this peer
    (["127.0.0.1"], "198.51.100.1, 203.0.113.2, 127.0.0.1", "198.51.100.1", ["for=198.51.100.1"]),
    (["127.0.0.0/8"], "198.51.100.1, 203.0.113.2, 127.0.0.1", "198.51.100.1", ["for=198.51.100.1"]),
])
async def test_the_upstream_sees_one_forwarded_for_and_no_connection_named_header(nursery, trusted, xff,
                                                                                  real_ip, forwarded):
    server = FakeUpstream(answer(OK_JSON), answer(OK_JSON))
    url = await server.start(nursery)
    gw = await start_gateway(nursery, make_config([url], server={"trusted_proxies": trusted}))
    with trio.fail_after(15):
        async with httpx.AsyncClient(base_url=gw.url, timeout=10) as http:
            for _ in range(2):  # a fresh and a reused upstream connection
                r = await http.post("/v1/chat/completions", content=CHAT, headers=CLIENT_HEADERS)
                assert r.status_code == 200
    assert len(server.requests) == 2
    for request in server.requests:
        fields = head_fields(request)
        names = [n for n, _ in fields]
        assert [v for n, v in fields if n == "x-forwarded-for"] == [xff]
        assert [v for n, v in fields if n == "x-real-ip"] == [real_ip]
        assert [v for n, v in fields if n == "forwarded"] == forwarded
        assert "x-hop-a" not in names and "x-hop-b" not in names and "connection" not in names
        assert [v for n, v in fields if n == "x-kept"] == ["k"]
