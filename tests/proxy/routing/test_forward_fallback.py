"""forward_to_tier (proxy/routing/forward.py) when the tier a waker falls back to refuses: the fallback
tier has no waker of its own, and its refusal is the answer -- 503 in the envelope, or in-band after an
early SSE head -- never a crash on the missing waker. Fakes and clock as in test_forward.py."""

from __future__ import annotations

import trio

from proxy import errors
from proxy.config import TierConfig
from proxy.relay.inband import inband_error
from proxy.routing.forward import forward_to_tier
from tests.support.upstream_kit import (
    BODY,
    HEAD,
    LIMIT,
    FakeWaker,
    client_side,
    new_gateway,
    new_request,
    received,
)


def setup(dead: str, *, stream: bool):
    tiers = [TierConfig(name="local", upstreams=["http://127.0.0.1:9"], models=["sim-chat"]),
             TierConfig(name="big", upstreams=[dead], models=["sim-big"])]
    gw = new_gateway([], tiers=tiers)
    tier = gw.runtime.router.tiers["local"]
    tier.waker = FakeWaker(["http://127.0.0.1:9"], fallback_tier="big")  # never ready: the fallback answers
    ds, peer = client_side(gw)
    request, ex = new_request(gw, ds)
    ex.t0 = trio.current_time()
    ex.stream = stream
    return gw, tier, ds, peer, request, ex


async def test_a_refusing_fallback_tier_is_a_503_envelope(wake_clock, dead_upstream):
    gw, tier, ds, peer, request, ex = setup(dead_upstream(), stream=False)
    with trio.fail_after(1000):
        await forward_to_tier(gw, ds, ex, tier, request, BODY, (LIMIT,), None)
    err = errors.upstream_unreachable("big")
    body = err.body()
    assert await received(ds, peer) == (
        b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n"
        b"x-ratelimit-remaining-requests: 9\r\nx-spotinference-wake-ms: 0\r\nx-request-id: req-1\r\n"
        b"content-length: %d\r\n\r\n" % len(body) + body)
    assert (ex.status, ex.error_type, ex.tier) == (503, "upstream_unavailable", "big")
    assert trio.current_time() == 0  # answered at once, no wait on a waker it does not have


async def test_a_refusing_fallback_tier_after_an_early_head_is_an_inband_error(wake_clock, dead_upstream):
    gw, tier, ds, peer, request, ex = setup(dead_upstream(), stream=True)
    with trio.fail_after(1000):
        await forward_to_tier(gw, ds, ex, tier, request, BODY, (LIMIT,), None)
    event = inband_error(errors.upstream_unreachable("big").message, "upstream_unavailable")
    assert await received(ds, peer) == HEAD + b"%x\r\n%s\r\n" % (len(event), event)  # no last chunk
    assert ds.client_gone and (ex.status, ex.error_type) == (503, "upstream_unavailable")
