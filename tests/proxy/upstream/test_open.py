"""open_upstream (proxy/upstream/open.py): the retry rule, against real sockets and exact bytes.

Each upstream is a tiny trio server on 127.0.0.1 port 0 that reads one request at a time and answers
as the test says (exact response bytes, a close, a reset, silence: FakeUpstream, in
tests/support/upstream_kit.py); a refusing upstream comes from the `dead_upstream` fixture (a socket
bound but never listen()ed, held open for the whole test). A fresh tier rotates before its first request, so with
two upstreams [A, B] it tries B first. Where time matters the autojump clock moves it.
"""

from __future__ import annotations

import pytest
import trio

from proxy.errors import ApiError
from proxy.upstream.open import open_upstream
from tests.support.upstream_kit import (
    BODY,
    OK_BODY,
    OK_JSON,
    FakeUpstream,
    Reporter,
    answer,
    answer_then_close,
    close,
    drain,
    new_gateway,
    new_request,
    reset,
    silent,
)


def upstream_request(port: int, body: bytes = BODY) -> bytes:
    return (b"POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1:%d\r\ncontent-type: application/json\r\n"
            b"content-length: %d\r\nx-request-id: req-1\r\nx-forwarded-for: 10.1.2.3\r\n"
            b"x-real-ip: 10.1.2.3\r\n\r\n"
            % (port, len(body))) + body


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def _open(gw, urls, *, waker=True):
    tier = gw.runtime.router.tiers["local"]
    if waker:
        tier.waker = Reporter(urls)
    request, ex = new_request(gw)
    return tier, ex, request


async def test_success_sends_exact_bytes_and_sets_ex_upstream(nursery):
    server = FakeUpstream(answer(OK_JSON))
    url = await server.start(nursery)
    gw = new_gateway([url])
    tier, ex, request = _open(gw, [url])
    with trio.fail_after(5):
        conn, head = await open_upstream(gw, ex, tier, request, BODY)
        assert head.status == 200 and head.content_length == len(OK_BODY)
        assert await drain(conn) == OK_BODY
    assert server.requests == [upstream_request(port_of(url))]
    assert ex.upstream == f"127.0.0.1:{port_of(url)}" and ex.t_upstream is not None
    assert gw.pool.statistics().active == 1
    gw.pool.release(conn)
    assert gw.pool.statistics().idle == 1


async def test_refused_goes_to_the_next_upstream_and_is_reported(nursery, dead_upstream):
    server = FakeUpstream(answer(OK_JSON))
    good, bad = await server.start(nursery), dead_upstream()
    gw = new_gateway([good, bad])
    tier, ex, request = _open(gw, [good, bad])
    with trio.fail_after(5):
        conn, head = await open_upstream(gw, ex, tier, request, BODY)
    assert head.status == 200
    assert tier.waker.reported == [bad]
    assert ex.upstream == f"127.0.0.1:{port_of(good)}"
    assert len(server.requests) == 1 and gw.pool.statistics().connect_errors_total == 1
    gw.pool.discard(conn)


@pytest.mark.parametrize("hang_up", [close, reset], ids=["eof", "rst"])
async def test_reset_before_the_first_byte_goes_to_the_next_upstream(nursery, hang_up):
    good_server, bad_server = FakeUpstream(answer(OK_JSON)), FakeUpstream(hang_up)
    good, bad = await good_server.start(nursery), await bad_server.start(nursery)
    gw = new_gateway([good, bad])
    tier, ex, request = _open(gw, [good, bad])
    with trio.fail_after(5):
        conn, head = await open_upstream(gw, ex, tier, request, BODY)
    assert head.status == 200 and ex.upstream == f"127.0.0.1:{port_of(good)}"
    assert bad_server.requests == [upstream_request(port_of(bad))]  # it took the request, then hung up
    assert len(good_server.requests) == 1
    assert tier.waker.reported == [bad]
    assert gw.pool.statistics().active == 1  # the reset one was discarded
    gw.pool.discard(conn)


async def test_every_upstream_reset_is_502(nursery):
    one, two = FakeUpstream(reset), FakeUpstream(close)
    a, b = await one.start(nursery), await two.start(nursery)
    gw = new_gateway([a, b])
    tier, ex, request = _open(gw, [a, b])
    with trio.fail_after(5), pytest.raises(ApiError) as caught:
        await open_upstream(gw, ex, tier, request, BODY)
    err = caught.value
    assert (err.status, err.code) == (502, "bad_gateway")
    assert err.message == "The upstream of tier 'local' failed: connection reset before the response."
    assert tier.waker.reported == [b, a]
    assert len(one.requests) == len(two.requests) == 1 and ex.upstream is None
    assert gw.pool.statistics().active == 0


async def test_a_reset_and_a_refusal_is_503(nursery, dead_upstream):
    server = FakeUpstream(reset)
    a, b = await server.start(nursery), dead_upstream()
    gw = new_gateway([a, b])
    tier, ex, request = _open(gw, [a, b])
    with trio.fail_after(5), pytest.raises(ApiError) as caught:
        await open_upstream(gw, ex, tier, request, BODY)
    assert (caught.value.status, caught.value.code) == (503, "upstream_unavailable")
    assert tier.waker.reported == [b, a]


@pytest.mark.parametrize("with_waker", [True, False])
async def test_none_reachable_is_503_upstream_unavailable(dead_upstream, with_waker):
    a, b = dead_upstream(), dead_upstream()
    gw = new_gateway([a, b])
    tier, ex, request = _open(gw, [a, b], waker=with_waker)
    with trio.fail_after(5), pytest.raises(ApiError) as caught:
        await open_upstream(gw, ex, tier, request, BODY)
    err = caught.value
    assert (err.status, err.type, err.code) == (503, "server_error", "upstream_unavailable")
    assert err.message == "No upstream of tier 'local' is reachable. Try again shortly."
    if with_waker:
        assert tier.waker.reported == [b, a]
    stats = gw.pool.statistics()
    assert (stats.connect_errors_total, stats.active, ex.upstream) == (2, 0, None)


async def test_a_reused_connection_the_server_closed_gets_one_fresh_retry(nursery, autojump_clock):
    server = FakeUpstream(answer_then_close(OK_JSON), answer(OK_JSON))
    url = await server.start(nursery)
    gw = new_gateway([url])
    tier, ex, request = _open(gw, [url])
    with trio.fail_after(5):
        conn, _ = await open_upstream(gw, ex, tier, request, BODY)
        assert await drain(conn) == OK_BODY
        gw.pool.release(conn)
        await server.hung_up.wait()  # closed by the server while idle in our pool
        _, ex2 = new_request(gw)
        conn2, head2 = await open_upstream(gw, ex2, tier, request, BODY)
    assert head2.status == 200 and conn2 is not conn
    stats = gw.pool.statistics()
    assert (stats.connects_total, stats.reuses_total, stats.stale_closed_total) == (2, 1, 0)
    assert server.connections == 2 and len(server.requests) == 2
    assert tier.waker.reported == []  # a stale keep-alive connection says nothing about the host
    gw.pool.discard(conn2)


async def test_a_reused_connection_whose_fresh_retry_resets_counts_as_a_reset(nursery, autojump_clock):
    server = FakeUpstream(answer_then_close(OK_JSON), reset)
    url = await server.start(nursery)
    gw = new_gateway([url])
    tier, ex, request = _open(gw, [url])
    with trio.fail_after(5):
        conn, _ = await open_upstream(gw, ex, tier, request, BODY)
        await drain(conn)
        gw.pool.release(conn)
        await server.hung_up.wait()
        with pytest.raises(ApiError) as caught:
            await open_upstream(gw, ex, tier, request, BODY)
    assert (caught.value.status, caught.value.code) == (502, "bad_gateway")
    assert tier.waker.reported == [url] and server.connections == 2


async def test_first_byte_too_slow_is_504_and_not_retried(nursery, autojump_clock):
    slow_server, good_server = FakeUpstream(silent), FakeUpstream(answer(OK_JSON))
    good, slow = await good_server.start(nursery), await slow_server.start(nursery)
    gw = new_gateway([good, slow], upstream={"first_byte_s": 30})
    tier, ex, request = _open(gw, [good, slow])
    start = trio.current_time()
    with trio.fail_after(100), pytest.raises(ApiError) as caught:
        await open_upstream(gw, ex, tier, request, BODY)
    err = caught.value
    assert (err.status, err.code) == (504, "upstream_timeout")
    assert err.message == "The upstream of tier 'local' timed out (no response within 30 s)."
    assert trio.current_time() - start == pytest.approx(30)
    assert len(slow_server.requests) == 1 and good_server.requests == []  # the upstream may be generating
    assert tier.waker.reported == [] and gw.pool.statistics().active == 0
