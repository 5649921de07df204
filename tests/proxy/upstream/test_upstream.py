"""The upstream side: retries before the first byte, timeouts, mid-stream failure, cancellation.

The gateway and the simulated vLLM run in-process on the test's trio loop, so where a test's claim is
a duration ("fast", "within 1 s", "a connection idle for less than the stale-check age") it runs on
pytest-trio's autojump clock: time moves only when every task waits, straight to the next deadline,
so what is asserted is the order of the code's own deadlines, not the speed of this machine. A down
upstream is `dead_upstream()` (tests/support/refusing.py): refused for the whole test.
"""

from __future__ import annotations

import functools
import socket

import pytest
import trio

from proxy.accept.vanished import CLIENT_CHECK_S
from proxy.upstream.pool import STALE_CHECK_AFTER_S
from tests.support.gateway import (
    CHAT,
    error_of,
    make_config,
    post,
    raw_request,
    split_response,
    start_gateway,
    start_sim,
)

STREAM = b'{"model":"sim-chat","stream":true,"max_tokens":40,"messages":[{"role":"user","content":"hi"}]}'


async def test_all_upstreams_refused_is_503_fast(nursery, dead_upstream, autojump_clock):
    config = make_config([dead_upstream(), dead_upstream()])
    gw = await start_gateway(nursery, config)
    started = trio.current_time()
    with trio.fail_after(60):
        raw = await raw_request(gw.port, post(CHAT, extra=b"Connection: close\r\n"))
    status, _, body = split_response(raw)
    assert status == 503
    assert error_of(body)["code"] == "upstream_unavailable"
    # Fast: a refusal is an answer -- the gateway waited for no connect timeout (nor anything as long).
    assert trio.current_time() - started < config.upstream.connect_s


async def test_refused_upstream_is_skipped_for_the_next_one(nursery, dead_upstream):
    sim, url = await start_sim(nursery)
    gw = await start_gateway(nursery, make_config([dead_upstream(), url]))
    with trio.fail_after(10):
        for _ in range(4):  # round robin starts at either; every request must succeed
            raw = await raw_request(gw.port, post(CHAT, extra=b"Connection: close\r\n"))
            assert split_response(raw)[0] == 200
    assert len(sim.requests) == 4


async def test_first_byte_timeout_is_504(nursery):
    _sim, url = await start_sim(nursery, latency_ms=2000)
    gw = await start_gateway(nursery, make_config([url], upstream={"first_byte_s": 0.3}))
    with trio.fail_after(5):
        raw = await raw_request(gw.port, post(CHAT, extra=b"Connection: close\r\n"))
    status, _, body = split_response(raw)
    assert status == 504 and error_of(body)["code"] == "upstream_timeout"


async def test_upstream_dying_mid_stream_ends_stream_with_inband_error_and_no_done(nursery):
    sim, url = await start_sim(nursery)
    sim.die_after_events = 3
    gw = await start_gateway(nursery, make_config([url]))
    with trio.fail_after(5):
        raw = await raw_request(gw.port, post(STREAM))
    status, _, body = split_response(raw)
    assert status == 200
    assert b'"error"' in body and b"mid-stream" in body
    assert b"[DONE]" not in body
    assert not body.endswith(b"0\r\n\r\n")  # no terminating chunk: the client sees a truncated stream


async def test_between_chunks_timeout_ends_stream_with_inband_error(nursery):
    _sim, url = await start_sim(nursery, tokens_per_s=2)
    gw = await start_gateway(nursery, make_config([url], upstream={"between_chunks_s": 0.2}))
    with trio.fail_after(5):
        raw = await raw_request(gw.port, post(STREAM))
    status, _, body = split_response(raw)
    assert status == 200 and b"upstream_timeout" in body and b"[DONE]" not in body


async def _vanish_after(port: int, data: bytes, delay: float) -> None:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    await stream.send_all(data)
    await trio.sleep(delay)
    await stream.aclose()


async def test_client_vanishing_before_first_byte_cancels_upstream_within_1s(nursery, autojump_clock):
    sim, url = await start_sim(nursery, latency_ms=30_000)
    gw = await start_gateway(nursery, make_config([url]))
    with trio.fail_after(60):
        await _vanish_after(gw.port, post(CHAT), 0.3)
        gone = trio.current_time()
        while sim.statistics().cancelled_total < 1:
            await trio.sleep(0.01)
    # On trio's clock: noticed by the vanished-client sweep (a connection busy for CLIENT_CHECK_S is
    # peeked every CLIENT_CHECK_S), long before the upstream's 30 s answer was due.
    assert trio.current_time() - gone < min(1.0, 4 * CLIENT_CHECK_S)
    assert sim.statistics().running == 0
    assert gw.gw.pool.statistics().active == 0


async def test_client_vanishing_mid_stream_cancels_upstream(nursery, autojump_clock):
    sim, url = await start_sim(nursery, tokens_per_s=20)  # 40 tokens: 2 s of stream
    gw = await start_gateway(nursery, make_config([url]))
    with trio.fail_after(60):
        await _vanish_after(gw.port, post(STREAM), 0.4)
        gone = trio.current_time()
        while sim.statistics().cancelled_total < 1:
            await trio.sleep(0.01)
    assert trio.current_time() - gone < 1.0  # on trio's clock; the stream had 1.6 s to go
    assert sim.statistics().finished_total == 0


async def test_first_sse_event_reaches_client_while_upstream_still_generating(nursery, autojump_clock):
    sim, url = await start_sim(nursery, tokens_per_s=10)
    gw = await start_gateway(nursery, make_config([url]))
    with trio.fail_after(5):
        stream = await trio.open_tcp_stream("127.0.0.1", gw.port)
        async with stream:
            await stream.send_all(post(STREAM))
            data = b""
            while b"data: " not in data:
                data += await stream.receive_some(65536)
            assert sim.statistics().running == 1  # 40 tokens at 10/s (trio's clock): still going


PAUSES = (0.1, 0.7)  # younger / older than the pool's stale-check age


@pytest.mark.parametrize("pause_s", PAUSES)
async def test_stale_keepalive_connection_is_retried_transparently(nursery, pause_s, autojump_clock):
    """An upstream that closes each keep-alive connection shortly after answering: a connection idle
    past the stale-check age is seen to be closed and dropped; a younger one fails before the first
    byte and the request is retried on a fresh connection. Either way the client sees only 200s.
    The idle ages are trio's clock (autojump): exactly the pauses, however slow the machine."""
    assert min(PAUSES) < STALE_CHECK_AFTER_S < max(PAUSES)
    served = []

    async def one_shot(stream):
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = await stream.receive_some(65536)
            if not chunk:
                return
            data += chunk
        served.append(1)
        body = b'{"object":"chat.completion","choices":[]}'
        await stream.send_all(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: "
                              + str(len(body)).encode() + b"\r\n\r\n" + body)
        await trio.sleep(0.05)
        await stream.aclose()  # the keep-alive connection dies while idle in the gateway's pool

    listeners = await nursery.start(functools.partial(trio.serve_tcp, one_shot, 0, host="127.0.0.1"))
    port = listeners[0].socket.getsockname()[1]
    gw = await start_gateway(nursery, make_config([f"http://127.0.0.1:{port}"]))
    with trio.fail_after(5):
        for _ in range(3):
            raw = await raw_request(gw.port, post(CHAT, extra=b"Connection: close\r\n"))
            assert split_response(raw)[0] == 200
            await trio.sleep(pause_s)
    assert len(served) == 3
    stats = gw.gw.pool.statistics()
    if pause_s > STALE_CHECK_AFTER_S:
        assert stats.stale_closed_total == 2
    else:
        assert stats.connects_total == 3 and stats.reuses_total == 2  # each reuse failed, then retried


async def test_a_stream_longer_than_between_chunks_is_fine_while_events_keep_coming(nursery, autojump_clock):
    # On trio's clock the gaps are exactly 40 ms, whatever else this machine is doing.
    _sim, url = await start_sim(nursery, tokens_per_s=25)  # 40 ms gaps, 40 tokens: 1.6 s in all
    gw = await start_gateway(nursery, make_config([url], upstream={"between_chunks_s": 0.3}))
    started = trio.current_time()
    with trio.fail_after(10):
        raw = await raw_request(gw.port, post(STREAM, extra=b"Connection: close\r\n"))
    status, _, body = split_response(raw)
    assert status == 200 and b"data: [DONE]" in body and b'"error"' not in body
    assert trio.current_time() - started > 0.3  # longer in all than between_chunks_s


async def test_a_client_that_never_reads_is_dropped_after_write_s_and_upstream_cancelled(nursery):
    sim, url = await start_sim(nursery, max_model_len=200_000)  # unpaced: fills the buffers at once
    gw = await start_gateway(nursery, make_config([url], server={"write_s": 0.5}))
    body = (b'{"model":"sim-chat","stream":true,"max_tokens":150000,'
            b'"messages":[{"role":"user","content":"hi"}]}')
    sock = trio.socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a tiny window, and we never read
    with trio.fail_after(20):
        await sock.connect(("127.0.0.1", gw.port))
        await sock.send(post(body))
        while sim.statistics().cancelled_total < 1:  # the gateway gave up on us and closed upstream
            await trio.sleep(0.05)
    sock.close()
    assert sim.statistics().running == 0


async def test_an_upstream_that_never_accepts_hits_the_connect_timeout(nursery):
    """A listener whose accept queue is full drops SYNs: connect() hangs until upstream.connect_s."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    fillers = []
    for _ in range(4):  # fill the accept queue; further SYNs are dropped by the kernel
        s = socket.socket()
        s.setblocking(False)
        s.connect_ex(listener.getsockname())
        fillers.append(s)
    port = listener.getsockname()[1]
    gw = await start_gateway(nursery, make_config([f"http://127.0.0.1:{port}"], upstream={"connect_s": 0.3}))
    try:
        with trio.fail_after(5):
            started = trio.current_time()
            raw = await raw_request(gw.port, post(CHAT, extra=b"Connection: close\r\n"))
            waited = trio.current_time() - started
        status, _, body = split_response(raw)
        assert status == 503 and error_of(body)["code"] == "upstream_unavailable"
        assert waited >= 0.3  # it waited for the connect timeout rather than failing on a refusal
    finally:
        for s in fillers:
            s.close()
        listener.close()
