"""The gateway side of a sleeping tier: hold a request while its tier wakes, honestly.

Strategy (DESIGN.md, "Wake semantics"): the waker (ops.waker) owns the single-flight wake; here a
request only waits for it, inside ITS OWN hard-cap scope, measured from the moment the request
arrived (`Exchange.t0`), so a retry after a refused connection waits within the same cap.
- Non-streaming requests wait silently; at the cap, 504 `wake_timeout` with `x-should-retry: false`
  (openai-python would otherwise retry a 10-minute wait twice more).
- Streaming requests get the 200 head and `: waking` SSE comments every `heartbeat_s` (SDKs ignore
  comments; proxies and load balancers see bytes and keep the connection); at the cap the stream
  ends with an in-band `data: {"error": ...}` event. Each comment says where the wake is, in a stable
  form: `: waking phase=booting elapsed_s=41 eta_s=96` -- the stage (ops/budget.py `STAGES`: starting,
  booting, loading, finishing), whole seconds since the wake was asked for, and the expected seconds
  until ready (learned from the tier's last wakes, phase by phase; the budget before any); a bare
  `: waking` when no wake is under way on this host (its waker has not begun it yet).
- Past `max_waiters`, 503 with Retry-After at once (a flood of waits is bounded) -- checked before a
  stream's early head, so a refused stream gets the 503 status, not a 200 and an in-band error.
The time waited is reported in `x-spotinference-wake-ms` (response header, or on the early SSE head).
"""

from __future__ import annotations

import time

import trio

from proxy import errors
from proxy.accept.downstream import ClientGone, Downstream
from proxy.exchange import Exchange

WAKING_COMMENT = b": waking\n\n"
_SSE_HEAD = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"),
             (b"x-accel-buffering", b"no")]


def cap_left_s(ex: Exchange, hard_cap_s: float) -> float:
    return hard_cap_s - (time.perf_counter() - ex.t0)


def waking_comment(waker) -> bytes:
    """The heartbeat comment for a stream waiting on `waker`'s tier."""
    progress = waker.wake_progress()
    if progress is None:
        return WAKING_COMMENT
    stage, elapsed_s, eta_s = progress
    return b": waking phase=%s elapsed_s=%d eta_s=%d\n\n" % (stage.encode(), round(elapsed_s), round(eta_s))


async def _heartbeat(ds: Downstream, waker, every_s: float, scope: trio.CancelScope) -> None:
    try:
        while True:
            await trio.sleep(every_s)
            await ds.send_raw(ds.frame(waking_comment(waker)))
    except ClientGone:
        scope.cancel()


async def send_early_sse_head(ds: Downstream, ex: Exchange, extra_headers) -> None:
    headers = [*_SSE_HEAD, (b"x-request-id", ex.request_id), *extra_headers]
    ex.early_head = True  # from here on, failures are in-band events
    await ds.send_raw(ds.response_head(200, headers, None))


async def wait_for_tier(gw, ds: Downstream, ex: Exchange, tier, *, stream: bool, extra_headers):
    """Wait until `tier` -- or the tier its waker falls back to -- is ready, within the request's hard
    cap; returns the tier to use. A stream gets its SSE head early (`ex.early_head`) and heartbeats.
    Raises ApiError (504 wake_timeout / 503 overloaded) when the caller must fail."""
    waker = tier.waker
    settings = waker.settings
    started = time.perf_counter()
    try:
        if stream:
            if not ex.early_head:
                _check_room(waker, tier)
                await send_early_sse_head(ds, ex, extra_headers)
            failed = None
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_heartbeat, ds, waker, settings.heartbeat_s, nursery.cancel_scope)
                try:
                    chosen = await _wait_ready_or_fallback(gw, ex, tier)
                except errors.ApiError as exc:  # raised outside the nursery: an ApiError, not a group
                    failed = exc
                nursery.cancel_scope.cancel()
            if failed is not None:
                raise failed
        else:
            chosen = await _wait_ready_or_fallback(gw, ex, tier)
    finally:
        ex.wake_ms = (ex.wake_ms or 0.0) + (time.perf_counter() - started) * 1000.0
    if ds.client_gone:
        raise ClientGone()
    if chosen is None:
        raise errors.wake_timeout(tier.name, time.perf_counter() - ex.t0)
    return chosen


def _overloaded(tier, exc) -> errors.ApiError:
    return errors.overloaded(f"Too many requests are waiting for tier '{tier.name}' to wake.",
                             max(1, int(exc.retry_after_s)))


def _check_room(waker, tier) -> None:
    """503 now if the tier's waiting room is full (before a stream's 200 head goes out)."""
    from ops.waker import WakeQueueFull

    try:
        waker.check_room()
    except WakeQueueFull as exc:
        raise _overloaded(tier, exc) from None


def _fallback(gw, tier):
    """The ready tier this tier's waker falls back to (`fallback_tier`), if any."""
    name = tier.waker.fallback_tier
    if not name:
        return None
    other = gw.runtime.router.tiers.get(name)
    if other is None or (other.waker is not None and not other.waker.is_ready()):
        return None
    return other


async def _wait_ready_or_fallback(gw, ex: Exchange, tier):
    """Ready tier, or None at the hard cap. Wakes up every poll_s to notice a fallback tier."""
    from ops.waker import WakeQueueFull

    waker = tier.waker
    settings = waker.settings
    while True:
        live = gw.runtime.router.tiers.get(tier.name)
        if live is not None and live is not tier:
            # A reload replaced the tier (and stopped its old waker): wait on the new one, if any.
            tier = live
            if tier.waker is None:
                return tier
            waker, settings = tier.waker, tier.waker.settings
        if waker.is_ready():
            return tier
        other = _fallback(gw, tier)
        if other is not None:
            ex.tier = other.name
            return other
        left = cap_left_s(ex, settings.hard_cap_s)
        if left <= 0:
            return None
        try:
            with trio.move_on_after(min(left, settings.poll_s)):
                await waker.wait_ready()
        except WakeQueueFull as exc:
            raise _overloaded(tier, exc) from None


def wake_header(ex: Exchange) -> tuple[bytes, bytes] | None:
    if ex.wake_ms is None:
        return None
    return (b"x-spotinference-wake-ms", str(int(ex.wake_ms)).encode())
