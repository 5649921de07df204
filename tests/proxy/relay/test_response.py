"""relay_response (proxy/relay/response.py): the upstream's answer to the client, byte for byte.

A real upstream connection (a FakeUpstream from tests/support/upstream_kit.py, opened with the
real open_upstream) is relayed to a real Downstream on a socket pair; the client's end is read to EOF
and compared with the exact bytes expected. Every reply below goes out in one write, so the gateway
reads it in one piece; where two pieces matter the fake upstream waits for the test between them.
The between-chunks timeout runs on the autojump clock.
"""

from __future__ import annotations

import pytest
import trio

from proxy.relay.inband import inband_error
from proxy.relay.response import relay_response
from proxy.routing.wake_wait import send_early_sse_head
from proxy.upstream.open import open_upstream
from proxy.usage.body_usage import BodyTail
from proxy.usage.sse_tap import SseUsageTap
from tests.support.upstream_kit import (
    BODY,
    DONE,
    E1,
    E2,
    E3,
    EARLY_HEAD,
    LIMIT,
    OK_BODY,
    OK_JSON,
    SSE_OUT,
    SSE_UP,
    USAGE,
    FakeUpstream,
    answer,
    answer_then_close,
    answer_then_hang,
    chunk,
    client_side,
    new_gateway,
    new_request,
    received,
)


async def relay(nursery, *replies, tap=None, extra=(), early=False, stream=False, **gw_kw):
    """Relay the one answer of a FakeUpstream; (what the client got, ex, gw, ds)."""
    server = FakeUpstream(*replies)
    gw = new_gateway([await server.start(nursery)], **gw_kw)
    ds, peer = client_side(gw)
    request, ex = new_request(gw, ds)
    ex.stream = stream
    tier = gw.runtime.router.tiers["local"]
    with trio.fail_after(100):
        if early:
            await send_early_sse_head(ds, ex, [])
        conn, response = await open_upstream(gw, ex, tier, request, BODY)
        await relay_response(gw, ds, ex, tier, conn, response, extra, tap, head_sent=early)
    return await received(ds, peer), ex, gw, ds


def pool_state(gw) -> tuple[int, int]:
    stats = gw.pool.statistics()
    return stats.idle, stats.active


async def test_content_length_is_kept_when_bytes_pass_unchanged(nursery):
    got, ex, gw, ds = await relay(nursery, answer(OK_JSON), tap=BodyTail(), extra=(LIMIT,))
    assert got == (b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nx-request-id: req-1\r\n"
                   b"x-ratelimit-remaining-requests: 9\r\ncontent-length: %d\r\n\r\n" % len(OK_BODY) + OK_BODY)
    assert (ex.status, ex.error_type, ds.client_gone) == (200, None, False)
    assert (ex.prompt_tokens, ex.completion_tokens, ex.total_tokens) == (3, 2, 5)  # read by the tap
    assert pool_state(gw) == (1, 0)  # released: kept for the next request


async def test_an_upstream_error_status_and_reason_pass_through_before_the_head(nursery):
    body = b'{"object":"error","message":"bad","code":400}'
    up = b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n" % len(body)
    got, ex, gw, _ = await relay(nursery, answer(up + body), tap=BodyTail())
    assert got == (b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\nx-request-id: req-1\r\n"
                   b"content-length: %d\r\n\r\n" % len(body) + body)
    assert ex.status == 400 and pool_state(gw) == (1, 0)


async def test_sse_is_reframed_one_chunk_per_wake_up(nursery):
    more = trio.Event()

    async def two_pieces(stream):
        # E1 arrives split over two upstream chunks, E2 in a third: one downstream chunk for all three.
        await stream.send_all(SSE_UP + chunk(E1[:10]) + b"%x;ext=1\r\n%s\r\n" % (len(E1) - 10, E1[10:])
                              + chunk(E2))
        await more.wait()
        await stream.send_all(chunk(E3) + chunk(DONE) + b"0\r\n\r\n")
        return True

    server = FakeUpstream(two_pieces)
    gw = new_gateway([await server.start(nursery)])
    ds, peer = client_side(gw)
    request, ex = new_request(gw, ds)
    ex.stream = True
    tier = gw.runtime.router.tiers["local"]
    tap = SseUsageTap(strip_usage_chunk=False)
    done = trio.Event()

    async def run():
        conn, response = await open_upstream(gw, ex, tier, request, BODY)
        await relay_response(gw, ds, ex, tier, conn, response, (), tap)
        done.set()

    first = SSE_OUT + chunk(E1 + E2)
    with trio.fail_after(5):
        nursery.start_soon(run)
        got = b""
        while len(got) < len(first):
            data = await peer.recv(65536)
            assert data
            got += data
        assert got == first  # out before the upstream sent the rest
        more.set()
        await done.wait()
    assert await received(ds, peer) == chunk(E3 + DONE) + b"0\r\n\r\n"
    assert (ex.completion_tokens, ex.estimated) == (3, True)  # no usage event: estimated from events
    assert pool_state(gw) == (1, 0)


def _sse_with_length(body: bytes) -> bytes:
    return b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncontent-length: %d\r\n\r\n" % len(body) + body


async def test_a_stripping_tap_drops_the_usage_event_and_the_length_goes_away(nursery):
    up = _sse_with_length(E1 + USAGE + DONE)
    got, ex, gw, _ = await relay(nursery, answer(up), tap=SseUsageTap(strip_usage_chunk=True), stream=True)
    assert got == SSE_OUT + chunk(E1 + DONE) + b"0\r\n\r\n"
    assert (ex.prompt_tokens, ex.completion_tokens, ex.total_tokens, ex.estimated) == (17, 6, 23, False)
    assert pool_state(gw) == (1, 0)


async def test_a_tap_that_does_not_strip_keeps_the_length(nursery):
    body = E1 + USAGE + DONE
    got, ex, _, _ = await relay(nursery, answer(_sse_with_length(body)), tap=SseUsageTap(strip_usage_chunk=False),
                                stream=True)
    assert got == (b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\n"
                   b"x-accel-buffering: no\r\nx-request-id: req-1\r\ncontent-length: %d\r\n\r\n" % len(body) + body)
    assert ex.prompt_tokens == 17


async def test_upstream_closing_mid_stream_is_an_inband_error_and_no_last_chunk(nursery):
    got, ex, gw, ds = await relay(nursery, answer_then_close(SSE_UP + chunk(E1)), stream=True)
    event = inband_error("The upstream of tier 'local' failed mid-stream: the upstream closed the stream.",
                         "upstream_closed")
    assert got == SSE_OUT + chunk(E1) + chunk(event)
    assert (ex.status, ex.error_type, ds.client_gone) == (502, "upstream_closed", True)
    assert pool_state(gw) == (0, 0)  # discarded


async def test_upstream_closing_mid_body_of_json_just_ends_short(nursery):
    up = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n" + OK_BODY[:10]
    got, ex, gw, ds = await relay(nursery, answer_then_close(up))
    assert got == (b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nx-request-id: req-1\r\n"
                   b"content-length: 100\r\n\r\n" + OK_BODY[:10])  # no event in a JSON body
    assert (ex.status, ex.error_type, ds.client_gone) == (502, "upstream_closed", True)
    assert pool_state(gw) == (0, 0)


async def test_between_chunks_silence_is_an_inband_upstream_timeout(nursery, autojump_clock):
    start = trio.current_time()
    got, ex, gw, ds = await relay(nursery, answer_then_hang(SSE_UP + chunk(E1)), stream=True,
                                  upstream={"between_chunks_s": 20})
    assert trio.current_time() - start == pytest.approx(20)
    event = inband_error("The upstream of tier 'local' failed mid-stream: no data for 20 s.", "upstream_timeout")
    assert got == SSE_OUT + chunk(E1) + chunk(event)
    assert (ex.status, ex.error_type, ds.client_gone) == (502, "upstream_timeout", True)
    assert pool_state(gw) == (0, 0)


async def test_head_sent_and_an_upstream_error_status_is_an_inband_upstream_error(nursery):
    body = b'{"object":"error","message":"The model is loading"}'
    up = b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n"
    got, ex, gw, ds = await relay(nursery, answer(up % len(body) + body), early=True, stream=True)
    assert got == EARLY_HEAD + chunk(inband_error(body.decode(), "upstream_error"))
    assert (ex.status, ex.error_type, ds.client_gone) == (503, "upstream_error", True)
    assert pool_state(gw) == (0, 0)


async def test_head_sent_and_an_empty_error_body_names_the_status(nursery):
    up = b"HTTP/1.1 500 Internal Server Error\r\ncontent-length: 0\r\n\r\n"
    got, ex, _, _ = await relay(nursery, answer(up), early=True, stream=True)
    assert got == EARLY_HEAD + chunk(inband_error("upstream status 500", "upstream_error"))
    assert ex.status == 500


async def test_head_sent_and_200_relays_only_the_body(nursery):
    up = SSE_UP + chunk(E1) + chunk(DONE) + b"0\r\n\r\n"
    got, ex, gw, ds = await relay(nursery, answer(up), early=True, stream=True,
                                  tap=SseUsageTap(strip_usage_chunk=False))
    assert got == EARLY_HEAD + chunk(E1 + DONE) + b"0\r\n\r\n"
    assert (ex.status, ds.client_gone) == (200, False)
    assert pool_state(gw) == (1, 0)
