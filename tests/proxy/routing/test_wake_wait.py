"""wait_for_tier and its helpers (proxy/routing/wake_wait.py): waiting for a tier inside the hard cap.

The tier's waker is FakeWaker (tests/support/upstream_kit.py): the surface wake_wait and forward use (is_ready, wait_ready,
settings, fallback_tier, report_unreachable, upstreams), made ready by the test at a chosen moment.
Time is trio's autojump clock; wake_wait measures the hard cap and wake_ms with `time.perf_counter`,
so the `wake_clock` fixture points that module's clock at trio's (and each Exchange starts at trio's
now): the cap, the heartbeats and the polls then all move with the autojump clock, exactly.
The client is a real Downstream on a socket pair; what it got is compared byte for byte.
"""

from __future__ import annotations

import pytest
import trio

from proxy.accept.downstream import ClientGone
from proxy.config import TierConfig
from proxy.errors import ApiError
from proxy.routing.wake_wait import cap_left_s, wait_for_tier, wake_header
from tests.support.upstream_kit import (
    HEAD,
    LIMIT,
    WAKING,
    FakeWaker,
    at,
    client_side,
    new_gateway,
    new_request,
    received,
)


def setup(*, fallback: TierConfig | None = None, **waker_kw):
    """A gateway whose tier 'local' has a FakeWaker; the client side; the request's Exchange."""
    tiers = [TierConfig(name="local", upstreams=["http://127.0.0.1:9"], models=["sim-chat"])]
    if fallback is not None:
        tiers.append(fallback)
    gw = new_gateway([], tiers=tiers)
    tier = gw.runtime.router.tiers["local"]
    tier.waker = FakeWaker(**waker_kw)
    ds, peer = client_side(gw)
    _, ex = new_request(gw, ds)
    ex.t0 = trio.current_time()
    return gw, tier, ds, peer, ex


async def test_non_stream_waits_silently_and_returns_the_tier(nursery, wake_clock):
    gw, tier, ds, peer, ex = setup()
    nursery.start_soon(at(31, tier.waker.become_ready))
    chosen = await wait_for_tier(gw, ds, ex, tier, stream=False, extra_headers=[LIMIT])
    assert chosen is tier and ex.tier == "local"
    assert trio.current_time() == 31 and ex.wake_ms == 31000
    assert wake_header(ex) == (b"x-spotinference-wake-ms", b"31000")
    assert not ex.early_head and await received(ds, peer) == b""


async def test_non_stream_at_the_hard_cap_is_504_wake_timeout(wake_clock):
    gw, tier, ds, peer, ex = setup()
    with pytest.raises(ApiError) as caught:
        await wait_for_tier(gw, ds, ex, tier, stream=False, extra_headers=[])
    err = caught.value
    assert (err.status, err.type, err.code) == (504, "server_error", "wake_timeout")
    assert err.message == "Tier 'local' did not become ready within the wake hard cap (60 s)."
    assert err.headers == ((b"x-should-retry", b"false"),)
    assert trio.current_time() == 60 and ex.wake_ms == 60000
    assert tier.waker.waits == 30  # woke every poll_s (2 s) to look for a fallback
    assert await received(ds, peer) == b""


async def test_the_cap_counts_from_the_request_not_from_the_wait(wake_clock):
    gw, tier, ds, _peer, ex = setup()
    ex.t0 -= 50  # e.g. a retry after a dead_upstream connection: 10 s of the cap are left
    assert cap_left_s(ex, 60) == 10
    ex.wake_ms = 1500.0  # time already waited before
    with pytest.raises(ApiError) as caught:
        await wait_for_tier(gw, ds, ex, tier, stream=False, extra_headers=[])
    assert caught.value.message == "Tier 'local' did not become ready within the wake hard cap (60 s)."
    assert trio.current_time() == 10 and ex.wake_ms == 11500  # added to, not replaced
    ds.sock.close()


async def test_a_stream_gets_the_early_head_and_a_heartbeat_every_heartbeat_s(nursery, wake_clock):
    gw, tier, ds, peer, ex = setup()
    nursery.start_soon(at(22, tier.waker.become_ready))
    chosen = await wait_for_tier(gw, ds, ex, tier, stream=True, extra_headers=[LIMIT])
    assert chosen is tier and ex.early_head and ex.wake_ms == 22000
    assert await received(ds, peer) == HEAD + WAKING * 3  # at 7, 14 and 21 s


async def test_a_stream_at_the_hard_cap_raises_after_its_heartbeats(wake_clock):
    gw, tier, ds, peer, ex = setup()
    with pytest.raises(ApiError) as caught:
        await wait_for_tier(gw, ds, ex, tier, stream=True, extra_headers=[LIMIT])
    assert caught.value.code == "wake_timeout" and ex.early_head
    assert await received(ds, peer) == HEAD + WAKING * 8  # 7 .. 56 s; the in-band error is the caller's


async def test_a_stream_whose_head_is_out_gets_only_heartbeats(nursery, wake_clock):
    gw, tier, ds, peer, ex = setup()
    ds.response_head(200, [], None)  # sent by an earlier wait of this request
    ex.early_head = True
    nursery.start_soon(at(8, tier.waker.become_ready))
    assert await wait_for_tier(gw, ds, ex, tier, stream=True, extra_headers=[LIMIT]) is tier
    assert await received(ds, peer) == WAKING


async def test_a_client_gone_during_heartbeats_ends_the_wait(nursery, wake_clock):
    gw, tier, ds, peer, ex = setup()

    async def hang_up_after_head():
        got = b""
        while len(got) < len(HEAD):
            data = await peer.recv(65536)
            assert data
            got += data
        assert got == HEAD
        peer.close()

    nursery.start_soon(hang_up_after_head)
    with pytest.raises(ClientGone):
        await wait_for_tier(gw, ds, ex, tier, stream=True, extra_headers=[LIMIT])
    assert ds.client_gone and trio.current_time() == 7 and ex.wake_ms == 7000  # the first heartbeat failed
    ds.sock.close()


async def test_a_ready_fallback_tier_is_chosen_at_once(wake_clock):
    big = TierConfig(name="big", upstreams=["http://127.0.0.1:10"], models=["sim-big"])
    gw, tier, ds, _peer, ex = setup(fallback=big, fallback_tier="big")
    chosen = await wait_for_tier(gw, ds, ex, tier, stream=False, extra_headers=[])
    assert chosen is gw.runtime.router.tiers["big"] and ex.tier == "big"
    assert tier.waker.waits == 0 and ex.wake_ms == 0 and trio.current_time() == 0
    ds.sock.close()


async def test_a_fallback_tier_that_becomes_ready_is_noticed_at_the_next_poll(nursery, wake_clock):
    big = TierConfig(name="big", upstreams=["http://127.0.0.1:10"], models=["sim-big"])
    gw, tier, ds, _peer, ex = setup(fallback=big, fallback_tier="big")
    other = gw.runtime.router.tiers["big"]
    other.waker = FakeWaker()
    nursery.start_soon(at(5, other.waker.become_ready))
    chosen = await wait_for_tier(gw, ds, ex, tier, stream=False, extra_headers=[])
    assert chosen is other and ex.tier == "big"
    assert trio.current_time() == 6 and ex.wake_ms == 6000  # polls at 2, 4, 6 s
    ds.sock.close()


async def test_a_fallback_name_without_a_tier_is_ignored(nursery, wake_clock):
    gw, tier, ds, _peer, ex = setup(fallback_tier="gone")
    nursery.start_soon(at(3, tier.waker.become_ready))
    assert await wait_for_tier(gw, ds, ex, tier, stream=False, extra_headers=[]) is tier
    assert ex.tier == "local" and ex.wake_ms == 3000
    ds.sock.close()


@pytest.mark.parametrize(("retry_after_s", "header"), [(7, b"7"), (0, b"1"), (12.9, b"12")])
async def test_a_full_wait_queue_is_503_overloaded_with_retry_after(wake_clock, retry_after_s, header):
    gw, tier, ds, peer, ex = setup()
    tier.waker.queue_full = retry_after_s
    with pytest.raises(ApiError) as caught:
        await wait_for_tier(gw, ds, ex, tier, stream=False, extra_headers=[])
    err = caught.value
    assert (err.status, err.code) == (503, "overloaded")
    assert err.message == "Too many requests are waiting for tier 'local' to wake."
    assert err.headers == ((b"retry-after", header),)
    assert ex.wake_ms == 0 and wake_header(ex) == (b"x-spotinference-wake-ms", b"0")  # recorded anyway
    assert await received(ds, peer) == b""


def test_wake_header_is_absent_until_a_wait_and_whole_milliseconds():
    gw = new_gateway(["http://127.0.0.1:9"])
    _, ex = new_request(gw)
    assert wake_header(ex) is None
    ex.wake_ms = 1234.99
    assert wake_header(ex) == (b"x-spotinference-wake-ms", b"1234")


async def test_a_stream_refused_by_a_full_wait_queue_gets_the_503_status_not_an_early_head(wake_clock):
    gw, tier, ds, peer, ex = setup()
    tier.waker.queue_full = 7
    with pytest.raises(ApiError) as caught:  # a plain ApiError, not an exception group
        await wait_for_tier(gw, ds, ex, tier, stream=True, extra_headers=[])
    assert (caught.value.status, caught.value.code) == (503, "overloaded")
    assert not ex.early_head and not ds.started
    assert await received(ds, peer) == b""  # nothing sent: the caller answers with the 503


async def test_a_stream_whose_wait_fails_after_the_head_gets_a_plain_api_error(wake_clock):
    gw, tier, ds, _peer, ex = setup()

    class LateFull(type(tier.waker)):
        def check_room(self) -> None:  # room at first; full by the time it waits (another request won)
            pass

    tier.waker.__class__ = LateFull
    tier.waker.queue_full = 3
    with pytest.raises(ApiError) as caught:
        await wait_for_tier(gw, ds, ex, tier, stream=True, extra_headers=[])
    assert (caught.value.status, caught.value.code) == (503, "overloaded")
    assert ex.early_head  # forward.py turns it into an in-band error event
    ds.sock.close()


async def test_each_heartbeat_says_where_the_wake_is(nursery, wake_clock):
    gw, tier, ds, peer, ex = setup()
    tier.waker.progress = ("booting", 41.4, 95.6)  # what the waker's history says now
    nursery.start_soon(at(8, tier.waker.become_ready))
    assert await wait_for_tier(gw, ds, ex, tier, stream=True, extra_headers=[LIMIT]) is tier
    comment = b": waking phase=booting elapsed_s=41 eta_s=96\n\n"
    assert await received(ds, peer) == HEAD + b"%x\r\n%s\r\n" % (len(comment), comment)
