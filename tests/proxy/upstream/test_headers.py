"""upstream_headers (proxy/upstream/headers.py): the request head an upstream gets, header by header.

Pure function, no I/O: the client's header list (lowercase names, as the request reader yields them)
goes in with a real Tier from the router, and the exact list that comes out is compared.
"""

from __future__ import annotations

import pytest

from proxy.config import TierConfig
from proxy.routing.tiers import Router
from proxy.upstream.headers import upstream_headers
from tests.support.gateway import make_config

ADDRESS = ("10.0.0.7", 8000)
TAIL = [(b"content-length", b"42"), (b"x-request-id", b"rid-9"), (b"x-forwarded-for", b"192.0.2.5"),
        (b"x-real-ip", b"192.0.2.5")]


def tier(key: str | None = None):
    cfg = make_config([], tiers=[TierConfig(name="t", upstreams=["http://10.0.0.7:8000"], models=["m"],
                                            upstream_api_key=key)])
    return Router(cfg, 0).tiers["t"]


def run(headers, key: str | None = None):
    return upstream_headers(headers, tier(key), ADDRESS, b"rid-9", 42, "192.0.2.5")


def test_host_first_then_the_rest_in_order_then_ours():
    headers = [(b"host", b"gw.example"), (b"user-agent", b"OpenAI/Python 1.40"), (b"accept", b"*/*"),
               (b"content-type", b"application/json"), (b"content-length", b"99"), (b"x-stainless-os", b"Linux")]
    assert run(headers) == [
        (b"host", b"10.0.0.7:8000"), (b"user-agent", b"OpenAI/Python 1.40"), (b"accept", b"*/*"),
        (b"content-type", b"application/json"), (b"x-stainless-os", b"Linux"), *TAIL]


@pytest.mark.parametrize("name", [b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"te",
                                  b"trailer", b"upgrade", b"proxy-authorization", b"proxy-authenticate",
                                  b"host", b"content-length", b"expect"])
def test_hop_by_hop_and_framing_headers_are_dropped(name):
    value = b"keep-alive" if name == b"connection" else b"x"
    assert run([(b"accept", b"*/*"), (name, value)]) == [(b"host", b"10.0.0.7:8000"), (b"accept", b"*/*"), *TAIL]


def test_names_listed_in_connection_are_dropped():
    headers = [(b"connection", b"keep-alive, X-Secret ,close,,x-debug"), (b"x-secret", b"s"), (b"x-debug", b"1"),
               (b"x-kept", b"k")]
    assert run(headers) == [(b"host", b"10.0.0.7:8000"), (b"x-kept", b"k"), *TAIL]


def test_connection_close_alone_drops_nothing_else():
    headers = [(b"connection", b"close"), (b"keep-alive", b"timeout=5"), (b"close", b"odd but kept")]
    assert run(headers) == [(b"host", b"10.0.0.7:8000"), (b"close", b"odd but kept"), *TAIL]


def test_the_clients_key_never_goes_upstream():
    out = run([(b"authorization", b"Bearer sk-client-secret"), (b"accept", b"*/*")])
    assert out == [(b"host", b"10.0.0.7:8000"), (b"accept", b"*/*"), *TAIL]
    assert all(b"sk-client-secret" not in v for _, v in out)


def test_the_tiers_key_is_added_last_instead_of_the_clients():
    out = run([(b"authorization", b"Bearer sk-client-secret"), (b"accept", b"*/*")], key="vllm-key")
    assert out == [(b"host", b"10.0.0.7:8000"), (b"accept", b"*/*"), *TAIL,
                   (b"authorization", b"Bearer vllm-key")]
    assert [n for n, _ in out].count(b"authorization") == 1


def test_the_clients_request_id_is_replaced_by_ours():
    out = run([(b"x-request-id", b"client-chosen"), (b"accept", b"*/*")])
    assert out == [(b"host", b"10.0.0.7:8000"), (b"accept", b"*/*"), *TAIL]


def test_an_untrusted_clients_forwarded_for_is_replaced_by_ours():
    # Trusted proxies, X-Real-IP and Forwarded: tests/proxy/upstream/test_forward_headers.py.
    out = run([(b"x-forwarded-for", b"198.51.100.1")])
    assert out == [(b"host", b"10.0.0.7:8000"), *TAIL]


def test_length_and_address_come_from_the_arguments():
    out = upstream_headers([], tier(), ("vllm-1.internal", 80), b"r", 0, "::1")
    assert out == [(b"host", b"vllm-1.internal:80"), (b"content-length", b"0"), (b"x-request-id", b"r"),
                   (b"x-forwarded-for", b"::1"), (b"x-real-ip", b"::1")]
