"""A request with its tier chosen: wait for the tier to wake, reach an upstream, hand over to the relay.

Strategy: the one loop that ties the wake wait (wake_wait.py) to the upstream retry rule
(upstream/open.py), inside the request's one hard cap (`Exchange.t0` + `hard_cap_s`):
  tier asleep -> wait (a stream gets its 200 SSE head early and heartbeats) -> open an upstream ->
  every upstream refused (each already reported to the waker) -> the tier went away under us: wait
  again, within the same cap -> ... -> relay the response (relay/response.py).
Errors become the response here: the JSON envelope with the rate-limit and wake headers, or -- once
an early SSE head is out -- an in-band error event. Only a vanished client's cancellation propagates.
The loop waits on the requested tier's waker; a fallback tier it hands over that has no waker is
tried once, its refusal answered as an error (nothing to wait for). One `Watch` (upstream/open.py) follows the
exchange from the upstream's head to the end of the relay, so a health verdict can end it.
The request's prompt blocks (routing/prefix.py) are hashed once, here, for a prefix-routed tier.
A `Pin` (a stored Responses API response's home, routing/homes.py) narrows the upstreams tried to one;
a Responses API answer's id is remembered with the upstream that made it once the relay ends.
"""

from __future__ import annotations

import trio

from proxy import errors
from proxy.accept.downstream import ClientGone, Downstream
from proxy.exchange import Exchange
from proxy.relay.inband import end_stream_with_error
from proxy.relay.response import relay_response
from proxy.routing.prefix import prefix_blocks
from proxy.routing.wake_wait import cap_left_s, wait_for_tier, wake_header
from proxy.upstream.open import Pin, Watch, open_upstream

__all__ = ["Pin", "forward_to_tier"]


async def forward_to_tier(gw, ds: Downstream, ex: Exchange, tier, request, body: bytes, extra_headers,
                          tap, pin: Pin | None = None) -> None:
    """Send `body` to `tier` (waking it if needed) and relay the answer; sends exactly one response."""
    home = tier
    waker = home.waker
    watch = Watch()  # registered with the chosen upstream's health record until the relay ends
    blocks = () if pin is not None and pin.strict else prefix_blocks(body) if tier.prefix_routed else ()
    if blocks and gw.prefixes is not None:  # [cluster]: what the other gateway hosts know of these blocks
        gw.prefixes.watch(tier)
        await gw.prefixes.fill(tier, blocks)
    try:
        while True:
            tier = home
            if waker is not None and not waker.is_ready():
                # The tier to use: this one once ready, or the fallback tier its waker engaged.
                tier = await wait_for_tier(gw, ds, ex, home, stream=ex.stream, extra_headers=extra_headers)
            try:
                conn, response = await open_upstream(gw, ex, tier, request, body, watch, pin, blocks)
                break
            except errors.ApiError as err:
                # Every upstream refused (each was reported to the waker as it failed): the tier went
                # away under us -- wait for its waker again, within the same hard cap. A tier without
                # a waker (a fallback tier) is answered as it is: 503 in the envelope, or in-band.
                again = tier.waker
                if (again is None or err.code != "upstream_unavailable"
                        or cap_left_s(ex, again.settings.hard_cap_s) <= 0):
                    raise
                if tier is not home and tier.name == home.name:
                    home, waker = tier, again  # a reload replaced the tier while we waited
                await trio.sleep(min(again.settings.poll_s, max(0.0, cap_left_s(ex, again.settings.hard_cap_s))))
    except errors.ApiError as err:
        ex.fail(err)
        if ex.early_head:
            await end_stream_with_error(ds, err)
            return
        err.headers += tuple(extra_headers)
        wh = wake_header(ex)
        if wh is not None:
            err.headers += (wh,)
        try:
            await ds.send_error(err, ex.request_id)
        except ClientGone:
            pass
        return
    except ClientGone:
        return
    wh = wake_header(ex)
    if wh is not None:
        extra_headers = (*extra_headers, wh)
    await relay_response(gw, ds, ex, tier, conn, response, extra_headers, tap, head_sent=ex.early_head,
                         watch=watch)
    if tap is not None and ex.status == 200 and ex.endpoint == "responses":
        response_id = tap.response_id
        if response_id is not None and ex.upstream is not None:
            gw.homes.remember(response_id, tier.name, ex.upstream)
