"""The relay pump (proxy/relay/pump.py): parked relays, edge-triggered, woken only to hand back.

Strategy: the pump alone on real socket pairs (a step that reads what came and reports it), then the
real relay through it (tests/support/upstream_kit.py's FakeUpstream and a Downstream on a socket
pair): a client whose buffer fills mid-stream gets every byte once, in order; an upstream that floods
faster than one wake-up can read is drained without waiting for an edge; the silence limit counts
from the last byte the pump read, not from when the relay parked; a step that raises wakes only its
own relay; a cancelled parked relay leaves nothing registered.
"""

from __future__ import annotations

import socket

import pytest
import trio

from proxy.relay import pump as pump_mod
from proxy.relay.inband import inband_error
from proxy.relay.pump import AGAIN, pump
from proxy.relay.response import relay_response
from proxy.upstream.open import open_upstream
from tests.support.upstream_kit import (
    BODY,
    E1,
    E2,
    SSE_OUT,
    SSE_UP,
    FakeUpstream,
    chunk,
    client_side,
    new_gateway,
    new_request,
    received,
)

pytestmark = pytest.mark.skipif(not pump_mod.HAS_EPOLL, reason="the pump needs epoll (Linux)")


def pair():
    a, b = socket.socketpair()
    a.setblocking(False)
    b.setblocking(False)
    return a, b


def reader_step(sock, got: list[bytes], *, stop_at: bytes = b"end"):
    """A step that reads everything buffered; wakes its task once `stop_at` has been seen."""
    def step():
        while True:
            try:
                data = sock.recv(65536)
            except BlockingIOError:
                break
            got.append(data)
            if not data:
                raise ConnectionError("closed")
        return "done" if b"".join(got).endswith(stop_at) else None
    return step


async def test_a_parked_step_runs_on_every_arrival_and_wakes_its_task_only_to_hand_back():
    p = pump()
    ours, theirs = pair()
    got: list[bytes] = []
    parked = p.parking(ours.fileno(), reader_step(ours, got))
    result = []

    async def relay():
        result.append(await p.park(parked))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(relay)
        for piece in (b"one ", b"two ", b"end"):
            await trio.sleep(0.01)
            theirs.send(piece)
    assert result == ["done"] and b"".join(got) == b"one two end"
    p.release(parked)
    assert p._by_fd == {}


async def test_bytes_that_came_while_the_task_was_away_are_seen_when_it_parks_again():
    p = pump()
    ours, theirs = pair()
    got: list[bytes] = []
    parked = p.parking(ours.fileno(), reader_step(ours, got, stop_at=b"1"))
    theirs.send(b"1")  # already there at the first park: ADD reports it
    with trio.fail_after(5):
        assert await p.park(parked) == "done"
    theirs.send(b"2")  # arrives while nobody is parked: the edge fires for no one
    await trio.sleep(0.05)
    parked.step = reader_step(ours, got, stop_at=b"2")
    with trio.fail_after(5):
        assert await p.park(parked) == "done"  # MOD re-arms and reports it
    p.release(parked)


async def test_a_step_that_raises_wakes_only_its_own_task():
    p = pump()
    (bad, bad_peer), (good, good_peer) = pair(), pair()

    def boom():
        raise ValueError("this stream's own bug")

    good_got: list[bytes] = []
    bad_parked = p.parking(bad.fileno(), boom)
    good_parked = p.parking(good.fileno(), reader_step(good, good_got))
    outcomes = {}

    async def park(name, parked):
        try:
            outcomes[name] = await p.park(parked)
        except ValueError as exc:
            outcomes[name] = exc

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(park, "bad", bad_parked)
            nursery.start_soon(park, "good", good_parked)
            await trio.sleep(0.01)
            bad_peer.send(b"x")
            good_peer.send(b"before ")
            await trio.sleep(0.05)
            assert "bad" in outcomes and "good" not in outcomes
            good_peer.send(b"end")
    assert isinstance(outcomes["bad"], ValueError) and outcomes["good"] == "done"
    p.release(bad_parked)
    p.release(good_parked)


async def test_a_step_that_says_again_runs_again_without_a_new_edge():
    p = pump()
    ours, theirs = pair()
    runs = []

    def step():
        runs.append(1)
        return AGAIN if len(runs) < 3 else "third"

    parked = p.parking(ours.fileno(), step)
    theirs.send(b"x")  # one edge only
    with trio.fail_after(5):
        assert await p.park(parked) == "third"
    assert len(runs) == 3
    p.release(parked)


async def test_a_cancelled_parked_task_is_no_longer_parked_and_release_forgets_its_socket():
    p = pump()
    ours, theirs = pair()
    calls = []
    parked = p.parking(ours.fileno(), lambda: calls.append(1))
    with trio.move_on_after(0.05):
        await p.park(parked)
    assert parked.task is None
    theirs.send(b"late")
    await trio.sleep(0.05)
    assert calls == []  # nobody parked: the step does not run
    p.release(parked)
    ours.close()
    p.release(parked)  # twice, after close: harmless
    assert p._by_fd == {}


# -- the real relay through the pump ------------------------------------------------------------------

async def _relay_one(nursery, handler, *, client_buffer: int | None = None, read_after_s: float = 0.0,
                     **gw_kw):
    server = FakeUpstream(handler)
    gw = new_gateway([await server.start(nursery)], **gw_kw)
    ds, peer = client_side(gw)
    if client_buffer is not None:
        ds.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, client_buffer)
        peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, client_buffer)
    request, ex = new_request(gw, ds)
    ex.stream = True
    tier = gw.runtime.router.tiers["local"]
    got = bytearray()
    done = trio.Event()

    async def run():
        conn, response = await open_upstream(gw, ex, tier, request, BODY)
        await relay_response(gw, ds, ex, tier, conn, response, (), None)
        done.set()

    nursery.start_soon(run)
    await trio.sleep(read_after_s)  # a client that does not read yet: the gateway's writes must wait
    with trio.fail_after(100):  # virtual seconds on the autojump clock
        while not done.is_set():
            with trio.move_on_after(0.05):
                data = await peer.recv(65536)
                got += data
    got += await received(ds, peer)
    return bytes(got), ex, gw


def _events(n: int, size: int) -> list[bytes]:
    return [b"data: {\"i\":%d,\"pad\":\"%s\"}\n\n" % (i, b"x" * size) for i in range(n)]


async def test_a_client_that_stops_reading_gets_every_byte_once_in_order(nursery):
    events = _events(400, 2000)  # ~800 KB: far past the client's socket buffers

    async def flood(stream):
        await stream.send_all(SSE_UP)
        for e in events:
            await stream.send_all(chunk(e))
        await stream.send_all(b"0\r\n\r\n")
        return True

    got, ex, gw = await _relay_one(nursery, flood, client_buffer=4096, read_after_s=0.3)
    assert got == SSE_OUT + b"".join(_rechunked(events, got[len(SSE_OUT):])) + b"0\r\n\r\n"
    assert ex.status == 200 and gw.pool.statistics().idle == 1


def _rechunked(events: list[bytes], wire: bytes) -> list[bytes]:
    """The client's chunks decoded back into the payload, checked against `events` in order."""
    payload, i = b"", 0
    while True:
        nl = wire.index(b"\r\n", i)
        size = int(wire[i:nl], 16)
        if size == 0:
            break
        payload += wire[nl + 2:nl + 2 + size]
        assert wire[nl + 2 + size:nl + 4 + size] == b"\r\n"
        i = nl + 4 + size
    assert payload == b"".join(events)
    # Return the client's own framing, so the comparison above checks the whole wire format.
    out, i = [], 0
    while True:
        nl = wire.index(b"\r\n", i)
        size = int(wire[i:nl], 16)
        if size == 0:
            return out
        out.append(wire[i:nl + 4 + size])
        i = nl + 4 + size


async def test_an_upstream_faster_than_a_wake_up_is_drained_without_a_new_edge(nursery):
    events = _events(64, 60000)  # ~3.8 MB in one burst: many 64 KiB reads per edge

    async def burst(stream):
        await stream.send_all(SSE_UP + b"".join(chunk(e) for e in events) + b"0\r\n\r\n")
        return True

    got, ex, _ = await _relay_one(nursery, burst)
    assert got.endswith(b"0\r\n\r\n") and ex.status == 200
    _rechunked(events, got[len(SSE_OUT):])


async def test_silence_counts_from_the_last_byte_read_not_from_the_park(nursery, autojump_clock):
    async def pause_then_hang(stream):
        await stream.send_all(SSE_UP + chunk(E1))
        await trio.sleep(15)
        await stream.send_all(chunk(E2))
        await trio.sleep_forever()

    start = trio.current_time()
    got, ex, _ = await _relay_one(nursery, pause_then_hang, upstream={"between_chunks_s": 20})
    assert trio.current_time() - start == pytest.approx(35, abs=0.6)  # 15 s, then 20 s of silence
    event = inband_error("The upstream of tier 'local' failed mid-stream: no data for 20 s.", "upstream_timeout")
    assert got == SSE_OUT + chunk(E1) + chunk(E2) + chunk(event)
    assert ex.error_type == "upstream_timeout"
