"""proxy/accept/downstream.py: `Downstream` on one end of a socket pair, the test as the client.

Strategy: Downstream reads and writes a raw non-blocking stdlib socket (proxy/sockio.py: readiness
waits, then one recv/send), so trio's memory streams do not apply; `socket.socketpair()` is the
client. The test writes exact request bytes on its end and reads back exactly what was sent (a send
on a socket pair is in the peer's receive queue when it returns). The connection's cancel scope is
the test's own, so the phase deadlines (idle / head / body) are read off it directly, and trio's
autojump clock moves time where a deadline has to fire. The gateway is the real `Gateway`; only its
`server` config (limits, timeouts) matters here.
"""

from __future__ import annotations

import contextlib
import math
import socket

import pytest
import trio
import trio.testing

from proxy import errors, sockio
from proxy.accept.downstream import BODY, BUSY, HEAD, IDLE, ClientGone, Downstream
from proxy.gateway import Gateway, build_runtime
from proxy.parse.request import RequestError
from tests.support.gateway import make_config

GET = b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n"
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


def post(body: bytes, *, length: int | None = None, extra: bytes = b"") -> bytes:
    n = len(body) if length is None else length
    return b"POST /p HTTP/1.1\r\nHost: x\r\n" + extra + b"Content-Length: %d\r\n\r\n" % n + body


@contextlib.contextmanager
def downstream(**server):
    """(ds, client): a Downstream on one end of a socket pair, inside its own cancel scope."""
    gw = Gateway(build_runtime(make_config(["http://127.0.0.1:9"], server=server)))
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    theirs.setblocking(False)
    ds = Downstream(ours, gw, "client")
    try:
        with trio.CancelScope() as scope:
            ds.scope = scope
            yield ds, theirs
    finally:
        sockio.close(ours)
        theirs.close()


def sent(client: socket.socket) -> bytes:
    """Everything the Downstream has written so far."""
    chunks = []
    while (data := sockio.recv_nowait(client)) is not None and data:
        chunks.append(data)
    return b"".join(chunks)


# -- read_head -----------------------------------------------------------------------------------

async def test_read_head_returns_the_head_and_leaves_no_deadline(autojump_clock):
    with downstream() as (ds, client):
        client.send(GET)
        head = await ds.read_head()
        assert (head.method, head.target, head.http_version, head.keep_alive) == (b"GET", b"/a", b"1.1", True)
        assert ds.phase is BUSY and ds.scope.deadline == math.inf
        assert ds.busy_since == trio.current_time()
        assert (ds.http11, ds.head_only, ds.keep_alive, ds.started) == (True, False, True, False)


async def test_read_head_of_http10_without_keep_alive():
    with downstream() as (ds, client):
        client.send(b"HEAD / HTTP/1.0\r\n\r\n")
        await ds.read_head()
        assert (ds.http11, ds.head_only, ds.keep_alive) == (False, True, False)


async def test_read_head_is_none_on_a_clean_eof():
    with downstream() as (ds, client):
        client.shutdown(socket.SHUT_WR)
        with trio.fail_after(5):
            assert await ds.read_head() is None


async def test_read_head_eof_mid_head_is_400():
    with downstream() as (ds, client):
        client.send(b"GET / HTTP/1.1\r\nHo")
        client.shutdown(socket.SHUT_WR)
        with pytest.raises(RequestError) as exc, trio.fail_after(5):
            await ds.read_head()
        assert (exc.value.status, exc.value.message) == (400, "connection closed mid-head")


async def test_deadline_is_keepalive_idle_until_the_first_byte_then_the_head_timeout(autojump_clock):
    seen = []
    with downstream(keepalive_idle_s=75.0, request_head_s=10.0) as (ds, client):

        async def client_side():
            await trio.testing.wait_all_tasks_blocked()
            seen.append((ds.phase, ds.alarm.deadline - trio.current_time()))
            client.send(b"GET /a HTTP/1.1\r\n")
            await trio.testing.wait_all_tasks_blocked()
            seen.append((ds.phase, ds.alarm.deadline - trio.current_time()))
            client.send(b"Host: x\r\n\r\n")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(client_side)
            head = await ds.read_head()
    assert head.target == b"/a"
    assert seen == [(IDLE, 75.0), (HEAD, 10.0)]


async def test_idle_timeout_fires_in_the_idle_phase(autojump_clock):
    with downstream(keepalive_idle_s=75.0, request_head_s=10.0) as (ds, _client):
        t0 = trio.current_time()
        await ds.read_head()
        pytest.fail("read_head returned a head that never came")  # pragma: no cover
    assert ds.phase is IDLE and ds.scope.cancelled_caught
    assert trio.current_time() - t0 == pytest.approx(75.0)


# -- read_body -----------------------------------------------------------------------------------

async def test_read_body_in_pieces_runs_the_body_timeout_only_while_waiting(autojump_clock):
    seen = []
    with downstream(request_body_s=60.0, min_body_rate_bytes_s=0) as (ds, client):
        client.send(post(b"hel", length=10))
        head = await ds.read_head()

        async def client_side():
            await trio.testing.wait_all_tasks_blocked()
            seen.append((ds.phase, ds.scope.deadline - trio.current_time()))
            client.send(b"lo, world")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(client_side)
            body = await ds.read_body(100, head)
        assert body == b"hello, wor"
        assert seen == [(BODY, 60.0)]
        assert ds.phase is BUSY and ds.scope.deadline == math.inf
        assert ds.reader.body_complete and sent(client) == b""


async def test_read_body_already_buffered_is_read_without_a_wait_or_100_continue():
    with downstream() as (ds, client):
        client.send(post(b"hello", extra=b"Expect: 100-continue\r\n"))
        head = await ds.read_head()
        assert await ds.read_body(100, head) == b"hello"
        assert ds.phase is BUSY  # never entered BODY
        assert sent(client) == b""


async def test_read_body_asks_for_100_continue_once_when_it_has_to_wait():
    with downstream() as (ds, client):
        client.send(post(b"", length=10, extra=b"Expect: 100-continue\r\n"))
        head = await ds.read_head()
        assert head.expect_continue

        async def client_side():
            await trio.testing.wait_all_tasks_blocked()
            assert sent(client) == CONTINUE
            client.send(b"01234")
            await trio.testing.wait_all_tasks_blocked()
            assert sent(client) == b""  # not asked again
            client.send(b"56789")

        with trio.fail_after(5):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(client_side)
                body = await ds.read_body(100, head)
        assert body == b"0123456789"


async def test_read_body_of_a_request_without_one_is_empty_at_once():
    with downstream() as (ds, client):
        client.send(GET)
        head = await ds.read_head()
        assert await ds.read_body(100, head) == b""


async def test_read_chunked_body():
    with downstream() as (ds, client):
        client.send(b"POST /p HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                    b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n")
        head = await ds.read_head()
        assert await ds.read_body(100, head) == b"abcde"


@pytest.mark.parametrize("request_bytes", [
    post(b"0123456789"),
    post(b"012345", length=10),  # the rest still on its way
    b"POST /p HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nabcd\r\n4\r\nefgh\r\n0\r\n\r\n",
], ids=["whole", "partial", "chunked"])
async def test_read_body_past_the_limit_is_413_and_the_answer_closes(request_bytes):
    with downstream() as (ds, client):
        client.send(request_bytes)
        head = await ds.read_head()
        with pytest.raises(errors.ApiError) as exc:
            await ds.read_body(5, head)
        assert (exc.value.status, exc.value.code) == (413, "request_too_large")
        assert ds.keep_alive is False
        await ds.send_error(exc.value)
        body = (b'{"error":{"message":"Request body exceeds the limit of 5 bytes.",'
                b'"type":"invalid_request_error","param":null,"code":"request_too_large"}}')
        assert sent(client) == (b"HTTP/1.1 413 Content Too Large\r\ncontent-type: application/json\r\n"
                                b"content-length: %d\r\nconnection: close\r\n\r\n" % len(body) + body)
        assert ds.next_cycle() is False


async def test_read_body_with_bad_chunking_is_400():
    with downstream() as (ds, client):
        client.send(b"POST /p HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n")
        head = await ds.read_head()
        with pytest.raises(RequestError) as exc:
            await ds.read_body(100, head)
        assert exc.value.status == 400


async def test_a_slow_body_fires_the_scope_in_the_body_phase(autojump_clock):
    with downstream(request_body_s=60.0, min_body_rate_bytes_s=0) as (ds, client):
        client.send(post(b"abc", length=10))
        head = await ds.read_head()
        t0 = trio.current_time()
        await ds.read_body(100, head)
        pytest.fail("read_body returned a body that never came")  # pragma: no cover
    assert ds.scope.cancelled_caught and ds.phase is BODY
    assert trio.current_time() - t0 == pytest.approx(60.0)


# -- the body's minimum rate (mod_reqtimeout's MinRate) ------------------------------------------

async def _feed(client: socket.socket, data: bytes, piece: int, every_s: float) -> None:
    """Send `data` in `piece`-byte writes, one every `every_s` seconds (waiting for room as needed)."""
    for i in range(0, len(data), piece):
        await trio.sleep(every_s)
        view = memoryview(data[i:i + piece])
        while view:
            await trio.lowlevel.wait_writable(client)
            try:
                view = view[client.send(view):]
            except BlockingIOError:
                pass


async def _body_at(rate_s: float, piece: int, total: int, **server) -> tuple[bool, float, int]:
    """(cut, seconds until cut or done, bytes read) for a body of `total` bytes sent at `piece` bytes
    every `rate_s` seconds."""
    with downstream(**server) as (ds, client):
        client.send(post(b"", length=total))
        head = await ds.read_head()
        t0 = trio.current_time()
        got = b""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_feed, client, b"x" * total, piece, rate_s)
            try:
                got = await ds.read_body(total + 1, head)
            finally:
                nursery.cancel_scope.cancel()
    return ds.scope.cancelled_caught, trio.current_time() - t0, len(got)


@pytest.mark.parametrize(("piece", "every_s", "cut_by_s"), [
    (1, 1.0, 10.1),     # a byte a second: cut right after the 10 s grace
    (250, 1.0, 20.5),   # half the minimum rate: cut at grace / (1 - 1/2)
    (100, 0.5, 17.0),   # 200 B/s
])
async def test_a_trickling_body_is_cut_soon_after_the_grace_not_at_request_body_s(autojump_clock, piece, every_s,
                                                                                cut_by_s):
    cut, elapsed, _ = await _body_at(every_s, piece, 100_000, request_body_s=60.0, body_grace_s=10.0,
                                     min_body_rate_bytes_s=500)
    assert cut
    assert 10.0 <= elapsed <= cut_by_s < 30.0


async def test_an_8_mib_upload_at_1_mb_s_is_never_cut(autojump_clock):
    total = 8 * 1024 * 1024
    cut, elapsed, n = await _body_at(1 / 16, 65536, total, request_body_s=60.0, body_grace_s=10.0,
                                     min_body_rate_bytes_s=500)
    assert not cut and n == total
    assert 7.5 <= elapsed <= 9.0


async def test_a_steady_body_just_above_the_rate_runs_to_request_body_s(autojump_clock):
    cut, elapsed, _ = await _body_at(1.0, 600, 1_000_000, request_body_s=60.0, body_grace_s=10.0,
                                     min_body_rate_bytes_s=500)
    assert cut and elapsed == pytest.approx(60.0)


# -- response framing ----------------------------------------------------------------------------

async def response(request: bytes, status: int, headers: list, length: int | None, pieces: list[bytes],
                   **kw) -> tuple[bytes, Downstream]:
    """The exact bytes of one response framed by a Downstream that read `request`."""
    with downstream() as (ds, client):
        client.send(request)
        await ds.read_head()
        out = ds.response_head(status, headers, length, **kw)
        out += b"".join(ds.frame(p) for p in pieces) + ds.end()
        await ds.send_raw(out)
        assert sent(client) == out
        return out, ds


async def test_unknown_length_on_http11_is_chunked():
    out, ds = await response(GET, 200, [(b"content-type", b"text/event-stream")], None,
                             [b"data: 1\n\n", b"", b"data: 22\n\n"])
    assert out == (b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
                   b"9\r\ndata: 1\n\n\r\n" b"a\r\ndata: 22\n\n\r\n" b"0\r\n\r\n")
    assert ds.chunked and ds.keep_alive and ds.started


async def test_unknown_length_on_http10_is_close_delimited():
    out, ds = await response(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n", 200, [], None,
                             [b"abc", b"def"])
    assert out == b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\nabcdef"
    assert ds.chunked is False and ds.keep_alive is False
    assert ds.next_cycle() is False


async def test_known_length_is_content_length_and_unframed():
    out, ds = await response(GET, 404, [(b"x-a", b"1")], 5, [b"ab", b"cde"])
    assert out == b"HTTP/1.1 404 Not Found\r\nx-a: 1\r\ncontent-length: 5\r\n\r\nabcde"
    assert ds.chunked is False


async def test_head_request_gets_the_head_and_no_body_bytes():
    out, head_ds = await response(b"HEAD /a HTTP/1.1\r\nHost: x\r\n\r\n", 200, [], None, [b"abc"])
    assert out == b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"  # no chunks, no last chunk
    assert head_ds.head_only and head_ds.keep_alive
    with downstream() as (ds, client):
        client.send(b"HEAD /a HTTP/1.1\r\nHost: x\r\n\r\n")
        await ds.read_head()
        await ds.send_response(200, [], b"hello")
        assert sent(client) == b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n"


async def test_connection_close_request_and_reasons():
    out, _ = await response(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", 299, [], 0, [])
    assert out == b"HTTP/1.1 299 \r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
    out, _ = await response(GET, 200, [], 0, [], reason=b"Fine")
    assert out == b"HTTP/1.1 200 Fine\r\ncontent-length: 0\r\n\r\n"


# -- send_error ----------------------------------------------------------------------------------

ERR = errors.ApiError(404, "no", "invalid_request_error", code="not_found", headers=((b"x-e", b"1"),))
ERR_BODY = b'{"error":{"message":"no","type":"invalid_request_error","param":null,"code":"not_found"}}'


async def test_send_error_with_the_body_unread_closes():
    with downstream() as (ds, client):
        client.send(post(b"abc", length=10))
        await ds.read_head()
        await ds.send_error(ERR, b"req-1")
        assert sent(client) == (b"HTTP/1.1 404 Not Found\r\ncontent-type: application/json\r\nx-e: 1\r\n"
                                b"x-request-id: req-1\r\ncontent-length: %d\r\nconnection: close\r\n\r\n"
                                % len(ERR_BODY) + ERR_BODY)
        assert ds.keep_alive is False and ds.next_cycle() is False


async def test_send_error_after_a_read_body_keeps_the_connection():
    with downstream() as (ds, client):
        client.send(post(b"abc"))
        head = await ds.read_head()
        await ds.read_body(100, head)
        await ds.send_error(ERR)
        assert sent(client) == (b"HTTP/1.1 404 Not Found\r\ncontent-type: application/json\r\nx-e: 1\r\n"
                                b"content-length: %d\r\n\r\n" % len(ERR_BODY) + ERR_BODY)
        assert ds.keep_alive and ds.next_cycle()


async def test_send_error_once_the_head_is_out_sends_nothing():
    with downstream() as (ds, client):
        client.send(GET)
        await ds.read_head()
        await ds.send_raw(ds.response_head(200, [], None))
        assert ds.can_respond() is False
        sent(client)
        await ds.send_error(ERR)
        assert sent(client) == b""


# -- next_cycle ----------------------------------------------------------------------------------

async def test_next_cycle_keeps_pipelined_bytes():
    with downstream() as (ds, client):
        client.send(GET + b"GET /b HTTP/1.1\r\nHost: x\r\n\r\nGET /c HTTP/1.1\r\nHo")
        client.shutdown(socket.SHUT_WR)
        assert (await ds.read_head()).target == b"/a"
        await ds.send_response(200, [], b"")
        assert ds.next_cycle() is True and ds.started is False
        assert (await ds.read_head()).target == b"/b"
        assert ds.next_cycle() is True
        with pytest.raises(RequestError, match="closed mid-head"), trio.fail_after(5):
            await ds.read_head()  # /c was cut off: its bytes were kept, then EOF


async def test_next_cycle_skips_an_unread_body_that_is_buffered():
    with downstream() as (ds, client):
        client.send(post(b"abc") + b"GET /next HTTP/1.1\r\nHost: x\r\n\r\n")
        await ds.read_head()
        await ds.send_response(200, [], b"")
        assert ds.next_cycle() is True
        assert (await ds.read_head()).target == b"/next"


@pytest.mark.parametrize("request_bytes", [
    post(b"abc", length=10),
    b"POST /p HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n",
    b"POST /p HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
], ids=["length-on-the-wire", "chunks-on-the-wire", "bad-chunks", "connection-close"])
async def test_next_cycle_closes(request_bytes):
    with downstream() as (ds, client):
        client.send(request_bytes)
        await ds.read_head()
        await ds.send_response(200, [], b"")
        assert ds.next_cycle() is False


# -- a client that is gone -----------------------------------------------------------------------

async def test_writing_to_a_closed_peer_is_client_gone():
    with downstream() as (ds, client):
        client.send(GET)
        await ds.read_head()
        client.close()
        with pytest.raises(ClientGone):
            await ds.send_response(200, [], b"hello")
        assert ds.client_gone is True


async def test_a_peer_that_stops_reading_is_client_gone_after_write_s(autojump_clock):
    with downstream(write_s=5.0) as (ds, client):
        client.send(GET)
        await ds.read_head()
        t0 = trio.current_time()
        with pytest.raises(ClientGone):
            await ds.send_raw(b"x" * (16 << 20))  # far more than a socket pair buffers
        assert ds.client_gone is True
        assert trio.current_time() - t0 == pytest.approx(5.0)
