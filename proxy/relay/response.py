"""Relay: the upstream's response head, then its body as it arrives, to the client.

Strategy: pure byte relay, no JSON on this path. parse/response.py decodes the upstream framing
(chunked for SSE) and Downstream.frame re-frames it; the body bytes -- every SSE event -- pass
unchanged and unbuffered. Bytes already buffered are batched into one downstream write; the write happens
before the next upstream read waits, so nothing waits in the gateway (flow control is the write
itself: a slow client slows the upstream read, never a queue).
Waiting for the rest of a body is the pump's (relay/pump.py): the relay parks with `_step`, which the
pump runs inline whenever the upstream socket has bytes -- read, tap, frame, one non-blocking send --
so a relayed event costs no task switch, no reschedule and no epoll_ctl. The relay task wakes only when
the body is complete, when the client's buffer is full (it waits for the client, bounded by write_s,
then parks again), on an error, or when the upstream has been silent for `between_chunks_s` (counted
from the last read the pump stamped). Where there is no epoll the relay waits on its socket itself.
The usage tap (usage/taps.py) sees every piece on its way and may drop the one usage event the
gateway asked for; its counts go into the request's record when the relay ends.
The head's headers are headers.py's. Failure after the head was sent (the upstream closes or goes
silent for `between_chunks_s`, or its health record declares it silent or stalled -- the `watch` from
upstream/open.py shuts its socket down): for SSE the in-band error event of inband.py, then an abort.
"""

from __future__ import annotations

import math
import time

import trio

from proxy import errors
from proxy.accept.downstream import ClientGone, Downstream
from proxy.exchange import Exchange
from proxy.relay.headers import response_headers
from proxy.relay.inband import end_stream_with_error, inband_error
from proxy.relay.pump import AGAIN
from proxy.relay.pump import pump as relay_pump
from proxy.sockio import READ_SIZE
from proxy.upstream.connection import UpstreamClosed
from proxy.usage.taps import read_tap

REARM_S = 0.5


async def _upstream_error_body(conn, between_s: float, limit: int = 65536) -> bytes:
    parts = []
    size = 0
    with trio.move_on_after(between_s):
        while size < limit:
            data = conn.body_nowait()
            if data is None:
                await conn.receive()
                continue
            if not data:
                break
            parts.append(data)
            size += len(data)
    return b"".join(parts)[:limit]


def _take(conn, tap, frame) -> tuple[bytes, bool]:
    """Everything the upstream reader has buffered now, framed for the client; and whether the
    response is complete."""
    out = b""
    while True:
        data = conn.body_nowait()
        if data is None:
            return out, False
        if not data:
            return out, True
        if tap is not None:
            data = tap.feed(data)
            if not data:
                continue
        out += frame(data)


def _step(conn, tap, frame, ds: Downstream):
    """The pump's step for one relay (relay/pump.py): read what the upstream sent (until the kernel
    buffer is empty, as edge-triggered readiness needs), frame it, and send it with one non-blocking
    write. None: all sent, stay parked; (True, rest): complete, `rest` to send; (False, rest): the
    client's buffer is full, `rest` to send by waiting."""
    sock = conn.sock
    reader = conn.reader
    dsock = ds.sock

    def step():
        reads = 0
        while True:
            try:
                data = sock.recv(READ_SIZE)
            except BlockingIOError:
                break
            except OSError:
                data = b""
            reader.feed(data)
            if len(data) < READ_SIZE:
                break
            reads += 1
            if reads == 4:
                break
        out, complete = _take(conn, tap, frame)
        if complete:
            return True, out
        if out:
            try:
                sent = dsock.send(out)
            except BlockingIOError:
                sent = 0
            except OSError:
                ds.client_gone = True
                raise ClientGone() from None
            if sent < len(out):
                return False, out[sent:]
        return AGAIN if reads == 4 else None

    return step


async def _relay_pumped(pump, conn, tap, frame, ds: Downstream, out: bytes, between_s: float) -> tuple[bytes, bool]:
    """The rest of the body through the pump; returns (what is left to send, complete). Incomplete:
    the upstream was silent for `between_s`. Raises UpstreamClosed / ClientGone."""
    if out:
        await ds.send_raw(out)
    parked = pump.parking(conn.sock.fileno(), _step(conn, tap, frame, ds))
    try:
        while True:
            with trio.move_on_at(parked.last + between_s) as silence:
                complete, rest = await pump.park(parked)
            if silence.cancelled_caught:
                if trio.current_time() - parked.last >= between_s:
                    return b"", False
                continue  # data came meanwhile: the pump stamped it
            if complete:
                return rest, True
            await ds.send_raw(rest)  # the client is slow: wait for it (write_s), then park again
    finally:
        pump.release(parked)


async def _relay_waiting(conn, tap, frame, ds: Downstream, out: bytes, between_s: float) -> tuple[bytes, bool]:
    """Without a pump: the relay waits on its own upstream socket."""
    # One scope for the rest of the relay, only when we must wait; its deadline moves before
    # each upstream read (between_chunks_s). A client that stops reading is bounded by write_s.
    complete = False
    with trio.CancelScope() as silence:
        armed_at = -math.inf
        rearm_s = min(REARM_S, between_s / 4)
        while not complete:
            if out:
                await ds.send_raw(out)
                out = b""
            # Re-arm at most every rearm_s: the limit is then between between_s - rearm_s
            # and between_s, and a stream of many events pays for few deadline changes.
            now = trio.current_time()
            if now - armed_at > rearm_s:
                silence.deadline = now + between_s
                armed_at = now
            await conn.receive()
            more, complete = _take(conn, tap, frame)
            out += more
    return out, complete


async def relay_response(gw, ds: Downstream, ex: Exchange, tier, conn, response, extra_headers, tap, *,
                         head_sent: bool = False, watch=None) -> None:
    """Relay the response whose head is `response` (http1.ResponseHead); release or discard `conn`.
    With `head_sent` (a stream that waited for a wake got its 200 head early) only the body is relayed,
    and an upstream error status becomes an in-band error event. `watch` (upstream/open.py), still
    registered with the upstream's health record, is disarmed when the relay ends."""
    ex.t_first_byte = time.perf_counter()
    ex.status = response.status
    between_s = gw.runtime.config.upstream.between_chunks_s
    pool = gw.pool
    ok = False
    if head_sent:
        if response.status != 200:
            try:
                detail = await _upstream_error_body(conn, between_s)
            except UpstreamClosed:
                detail = b""
            finally:
                pool.discard(conn)
                if watch is not None:
                    watch.disarm()
            ex.error_type = "upstream_error"
            message = detail.decode("utf-8", "replace")[:2000] or f"upstream status {response.status}"
            await end_stream_with_error(ds, errors.ApiError(response.status, message, "server_error",
                                                            code="upstream_error"))
            return
        sse = True
    else:
        headers, sse = response_headers(response.headers, ex.request_id, extra_headers)
    metrics = gw.metrics
    if sse:
        metrics.stream_opened()
    failure = None
    out = b""
    frame = ds.frame
    try:
        if not head_sent:
            # Keep the upstream's length only when the bytes pass unchanged.
            length = response.content_length if (tap is None or not tap.rewrites) else None
            out = ds.response_head(response.status, headers, length, response.reason)
        more, complete = _take(conn, tap, frame)
        out += more
        if not complete:
            pending, out = out, b""  # sent first thing: never again on a failure's way out
            pump = relay_pump()
            if pump is None:
                out, complete = await _relay_waiting(conn, tap, frame, ds, pending, between_s)
            else:
                out, complete = await _relay_pumped(pump, conn, tap, frame, ds, pending, between_s)
        if complete:
            if tap is not None:
                rest = tap.finish()
                if rest:
                    out += frame(rest)
            out += ds.end()
            ok = True
            await ds.send_raw(out)
            return
        failure = f"no data for {between_s:g} s"
        ex.error_type = "upstream_timeout"
    except UpstreamClosed:
        if watch is not None and watch.killed:
            failure = watch.reason
            ex.error_type = "upstream_unhealthy"
        else:
            failure = "the upstream closed the stream"
            ex.error_type = "upstream_closed"
    except ClientGone:
        pass
    finally:
        if sse:
            metrics.stream_closed()
        if tap is not None:
            read_tap(ex, tap)
        if watch is not None:
            watch.disarm()
            ok = ok and not watch.killed  # its socket is shut: never back into the pool
        if ok:
            pool.release(conn)
        else:
            pool.discard(conn)
    if failure is not None:
        ex.status = 502 if ex.status < 400 else ex.status
        if sse:
            try:
                await ds.send_raw(out + frame(inband_error(
                    f"The upstream of tier '{tier.name}' failed mid-stream: {failure}.", ex.error_type, ds.dialect)))
            except ClientGone:
                pass
        # End without the terminating chunk: the client must see an incomplete response.
        ds.client_gone = True
