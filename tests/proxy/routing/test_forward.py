"""forward_to_tier (proxy/routing/forward.py): wait, open, retry, wait again -- one hard cap -- then relay.

Real pieces throughout: upstreams are FakeUpstream servers or refusing sockets
(tests/support/upstream_kit.py), the client a Downstream on a socket pair, the tier's waker the
FakeWaker (tests/support/upstream_kit.py). Time is the autojump clock, with wake_wait's clock pointed at it
(`wake_clock`), so the cap and the poll interval are exact. Each test checks the one response the
client got, byte for byte.
"""

from __future__ import annotations

import msgspec
import pytest
import trio

from proxy import errors
from proxy.config import TierConfig
from proxy.relay.inband import inband_error
from proxy.routing.forward import forward_to_tier
from proxy.usage.event_tap import EventUsageTap
from proxy.usage.sse_tap import SseUsageTap
from tests.support.gateway import split_response
from tests.support.upstream_kit import (
    BODY,
    DONE,
    E1,
    HEAD,
    LIMIT,
    OK_BODY,
    OK_JSON,
    SSE_UP,
    WAKING,
    FakeUpstream,
    FakeWaker,
    answer,
    at,
    chunk,
    client_side,
    new_gateway,
    new_request,
    received,
    reset,
)


def ok_head(*extra: bytes) -> bytes:
    return (b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nx-request-id: req-1\r\n"
            + b"".join(extra) + b"content-length: %d\r\n\r\n" % len(OK_BODY))


def error_response(err: errors.ApiError, *headers: bytes) -> bytes:
    reason = {502: b"Bad Gateway", 503: b"Service Unavailable", 504: b"Gateway Timeout"}[err.status]
    body = err.body()
    return (b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\n" % (err.status, reason) + b"".join(headers)
            + b"x-request-id: req-1\r\ncontent-length: %d\r\n\r\n" % len(body) + body)


def setup(urls, *, waker: FakeWaker | None = None, stream: bool = False, fallback: TierConfig | None = None):
    tiers = [TierConfig(name="local", upstreams=list(urls), models=["sim-chat"])]
    if fallback is not None:
        tiers.append(fallback)
    gw = new_gateway([], tiers=tiers)
    tier = gw.runtime.router.tiers["local"]
    tier.waker = waker
    ds, peer = client_side(gw)
    request, ex = new_request(gw, ds)
    ex.t0 = trio.current_time()
    ex.stream = stream
    return gw, tier, ds, peer, request, ex


async def forward(gw, tier, ds, request, ex, tap=None):
    with trio.fail_after(1000):
        await forward_to_tier(gw, ds, ex, tier, request, BODY, (LIMIT,), tap)


async def test_a_tier_without_a_waker_just_relays(nursery):
    server = FakeUpstream(answer(OK_JSON))
    gw, tier, ds, peer, request, ex = setup([await server.start(nursery)])
    await forward(gw, tier, ds, request, ex)
    assert await received(ds, peer) == ok_head(b"x-ratelimit-remaining-requests: 9\r\n") + OK_BODY
    assert ex.wake_ms is None and ex.status == 200 and len(server.requests) == 1


async def test_all_refused_then_wait_again_then_relay_with_the_wake_header(nursery, wake_clock, dead_upstream):
    server = FakeUpstream(answer(OK_JSON))
    good, bad = await server.start(nursery), dead_upstream()
    waker = FakeWaker([bad], ready=True, goes_down=True)
    gw, tier, ds, peer, request, ex = setup([bad], waker=waker)
    nursery.start_soon(at(11, waker.become_ready, [good]))  # the host came back under a new address
    await forward(gw, tier, ds, request, ex)
    # Refused at 0 s, a poll_s (2 s) pause, then a wait from 2 s until the tier was ready at 11 s.
    assert trio.current_time() == 11 and ex.wake_ms == 9000
    assert await received(ds, peer) == ok_head(b"x-ratelimit-remaining-requests: 9\r\n",
                                               b"x-spotinference-wake-ms: 9000\r\n") + OK_BODY
    assert waker.reported == [bad] and len(server.requests) == 1
    assert ex.upstream == good.removeprefix("http://")


async def test_refusals_are_retried_every_poll_s_within_the_one_hard_cap(wake_clock, dead_upstream):
    bad = dead_upstream()
    waker = FakeWaker([bad], ready=True)  # says ready, but its host keeps refusing
    gw, tier, ds, peer, request, ex = setup([bad], waker=waker)
    await forward(gw, tier, ds, request, ex)
    assert trio.current_time() == 60
    assert waker.reported == [bad] * 31  # at 0, 2, ..., 60 s
    assert await received(ds, peer) == error_response(errors.upstream_unreachable("local"),
                                                      b"x-ratelimit-remaining-requests: 9\r\n")
    assert (ex.status, ex.error_type, ex.wake_ms) == (503, "upstream_unavailable", None)


async def test_a_tier_that_went_away_and_stays_away_is_504_at_the_cap(wake_clock, dead_upstream):
    bad = dead_upstream()
    waker = FakeWaker([bad], ready=True, goes_down=True)
    gw, tier, ds, peer, request, ex = setup([bad], waker=waker)
    await forward(gw, tier, ds, request, ex)
    assert trio.current_time() == 60 and ex.wake_ms == 58000
    err = errors.wake_timeout("local", 60)
    assert await received(ds, peer) == error_response(err, b"x-should-retry: false\r\n",
                                                      b"x-ratelimit-remaining-requests: 9\r\n",
                                                      b"x-spotinference-wake-ms: 58000\r\n")
    assert (ex.status, ex.error_type) == (504, "wake_timeout") and waker.reported == [bad]


@pytest.mark.parametrize("kind", ["dead_upstream", "reset"])
async def test_without_a_waker_an_error_is_answered_at_once(nursery, dead_upstream, kind):
    if kind == "dead_upstream":
        url, err = dead_upstream(), errors.upstream_unreachable("local")
    else:
        url, err = await FakeUpstream(reset).start(nursery), errors.bad_gateway(
            "local", "connection reset before the response")
    gw, tier, ds, peer, request, ex = setup([url])
    await forward(gw, tier, ds, request, ex)
    assert await received(ds, peer) == error_response(err, b"x-ratelimit-remaining-requests: 9\r\n")
    assert ex.status == err.status and ex.error_type == err.code


async def test_a_full_wait_queue_is_503_with_retry_after_and_the_wake_header(wake_clock):
    waker = FakeWaker(["http://127.0.0.1:9"])
    waker.queue_full = 7
    gw, tier, ds, peer, request, ex = setup(["http://127.0.0.1:9"], waker=waker)
    await forward(gw, tier, ds, request, ex)
    err = errors.overloaded("Too many requests are waiting for tier 'local' to wake.", 7)
    assert await received(ds, peer) == error_response(err, b"retry-after: 7\r\n",
                                                      b"x-ratelimit-remaining-requests: 9\r\n",
                                                      b"x-spotinference-wake-ms: 0\r\n")
    assert (ex.status, ex.error_type) == (503, "overloaded")


async def test_after_the_early_head_an_error_is_an_inband_event_and_an_abort(wake_clock):
    waker = FakeWaker(["http://127.0.0.1:9"])
    gw, tier, ds, peer, request, ex = setup(["http://127.0.0.1:9"], waker=waker, stream=True)
    await forward(gw, tier, ds, request, ex)
    event = inband_error("Tier 'local' did not become ready within the wake hard cap (60 s).", "wake_timeout")
    assert await received(ds, peer) == HEAD + WAKING * 8 + chunk(event)  # no last chunk, no [DONE]
    assert ds.client_gone and (ex.status, ex.error_type) == (504, "wake_timeout")


async def test_a_stream_that_waited_gets_only_the_body_after_its_early_head(nursery, wake_clock):
    server = FakeUpstream(answer(SSE_UP + chunk(E1) + chunk(DONE) + b"0\r\n\r\n"))
    url = await server.start(nursery)
    waker = FakeWaker([url])
    gw, tier, ds, peer, request, ex = setup([url], waker=waker, stream=True)
    nursery.start_soon(at(9, waker.become_ready))
    await forward(gw, tier, ds, request, ex, tap=SseUsageTap(strip_usage_chunk=False))
    assert await received(ds, peer) == HEAD + WAKING + chunk(E1 + DONE) + b"0\r\n\r\n"
    assert (ex.status, ex.wake_ms, ds.client_gone) == (200, 9000, False)


async def test_a_ready_fallback_tier_answers_instead(nursery, wake_clock):
    server = FakeUpstream(answer(OK_JSON))
    big = TierConfig(name="big", upstreams=[await server.start(nursery)], models=["sim-big"])
    waker = FakeWaker(["http://127.0.0.1:9"], fallback_tier="big")
    gw, tier, ds, peer, request, ex = setup(["http://127.0.0.1:9"], waker=waker, fallback=big)
    await forward(gw, tier, ds, request, ex)
    assert await received(ds, peer) == ok_head(b"x-ratelimit-remaining-requests: 9\r\n",
                                               b"x-spotinference-wake-ms: 0\r\n") + OK_BODY
    assert ex.tier == "big" and len(server.requests) == 1 and waker.waits == 0


async def test_a_client_gone_before_the_error_is_not_an_error(dead_upstream):
    gw, tier, ds, peer, request, ex = setup([dead_upstream()])
    peer.close()
    await forward(gw, tier, ds, request, ex)
    assert ds.client_gone and ex.status == 503
    ds.sock.close()


# -- the other APIs while a tier wakes: the same wait, each API's own error shape ---------------------------

MSG_START = (b'event: message_start\ndata: {"type":"message_start","message":{"id":"m1","usage":'
             b'{"input_tokens":3,"output_tokens":1}}}\n\n')
MSG_DELTA = b'event: message_delta\ndata: {"type":"message_delta","usage":{"output_tokens":4}}\n\n'


async def test_a_messages_stream_waits_with_heartbeats_and_counts_its_usage(nursery, wake_clock):
    server = FakeUpstream(answer(SSE_UP + chunk(MSG_START + MSG_DELTA) + b"0\r\n\r\n"))
    url = await server.start(nursery)
    waker = FakeWaker([url])
    gw, tier, ds, peer, request, ex = setup([url], waker=waker, stream=True)
    ds.dialect = ex.dialect = errors.ANTHROPIC
    nursery.start_soon(at(9, waker.become_ready))
    await forward(gw, tier, ds, request, ex, tap=EventUsageTap("messages"))
    assert await received(ds, peer) == HEAD + WAKING + chunk(MSG_START + MSG_DELTA) + b"0\r\n\r\n"
    assert (ex.status, ex.wake_ms, ex.prompt_tokens, ex.completion_tokens) == (200, 9000, 3, 4)


@pytest.mark.parametrize("dialect", [errors.ANTHROPIC, errors.RESPONSES])
async def test_a_waiting_stream_at_the_cap_ends_in_its_apis_error_event(wake_clock, dialect):
    waker = FakeWaker(["http://127.0.0.1:9"])
    gw, tier, ds, peer, request, ex = setup(["http://127.0.0.1:9"], waker=waker, stream=True)
    ds.dialect = ex.dialect = dialect
    await forward(gw, tier, ds, request, ex)
    event = inband_error("Tier 'local' did not become ready within the wake hard cap (60 s).", "wake_timeout",
                         dialect)
    assert event.startswith(b"event: error\ndata: ")
    assert await received(ds, peer) == HEAD + WAKING * 8 + chunk(event)
    assert (ex.status, ex.error_type) == (504, "wake_timeout")


async def test_a_waiting_messages_request_at_the_cap_is_504_api_error_not_to_be_retried(wake_clock):
    waker = FakeWaker(["http://127.0.0.1:9"])
    gw, tier, ds, peer, request, ex = setup(["http://127.0.0.1:9"], waker=waker)
    ds.dialect = ex.dialect = errors.ANTHROPIC
    await forward(gw, tier, ds, request, ex)
    status, headers, body = split_response(await received(ds, peer))
    assert status == 504 and headers["x-should-retry"] == "false"
    assert msgspec.json.decode(body) == {"type": "error", "error": {
        "type": "api_error", "message": "Tier 'local' did not become ready within the wake hard cap (60 s)."}}
