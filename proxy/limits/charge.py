"""Charging a request to its key's limits up front, and settling with vLLM's own count at the end.

Strategy: the bucket math is buckets.py's and the table is chosen by shared_table.open_limiter; this
module only says what a request costs. Up front: one request and an estimate of its tokens (prompt
estimated from the body size, plus the requested maximum output), so a key cannot start more work
than its tokens-per-minute allow; over the limit -> 429 with Retry-After and the x-ratelimit headers
(openai-python reads both). At the end: the estimate is replaced by vLLM's reported total (`settle`);
when none came (no usage event, client gone, upstream failure) by an estimate, never by 0 -- otherwise
every such request would be refunded in full and a key could run past its limit indefinitely.
Under the supervisor each worker's share is the key's limit divided by `gw.limit_divisor` (1 with the
shared table: exact limits across workers). With `[cluster] redis_url` the limiter is Redis's
(limits/redis_buckets.py, exact across hosts): the only one that is awaited.
"""

from __future__ import annotations

from proxy import errors
from proxy.exchange import Exchange
from proxy.usage.taps import settlement


async def charge(gw, ex: Exchange, key, view, body_len: int, *, also: tuple = (),
                 replies: list | None = None) -> tuple[tuple[bytes, bytes], ...]:
    """Admit the request against `key`'s rpm/tpm; returns the x-ratelimit headers for the response.
    Raises ApiError 429 when the key is over its limits (503 when the cluster's limits cannot be
    checked and `on_redis_failure` is "closed"). Records the tokens charged on `ex`. `also`: Redis
    commands the request needs anyway, pipelined with the cluster limiter's round trip (their replies
    in `replies`; none when no round trip was made)."""
    if key is None or (key.rpm is None and key.tpm is None):
        return ()
    estimate = view.estimate_prompt_tokens(body_len) + (view.output_limit() or 0)
    w = gw.limit_divisor
    rpm = None if key.rpm is None else key.rpm / w
    tpm = None if key.tpm is None else key.tpm / w
    limiter = gw.limiter
    if limiter.remote:  # the cluster's buckets in Redis (limits/redis_buckets.py): one round trip
        adm = await limiter.admit(key.name, rpm, tpm, estimate, also=also, replies=replies)
    else:
        adm = limiter.admit(key.name, rpm, tpm, estimate)
    if not adm.allowed:
        raise errors.rate_limited(adm.message(key.name), adm.retry_after_s, adm.headers)
    ex.charged_tokens = estimate if key.tpm is not None else 0
    return adm.headers


def settle(gw, ex: Exchange) -> None:
    """Replace the up-front token estimate by what the upstream reported; when it reported nothing, by
    the best-founded estimate (usage/taps.py `settlement`: the stream's counted events, else the charge
    itself) -- 0 only for a request that provably cost nothing (never sent, refused with a 4xx)."""
    if ex.charged_tokens:
        total, _estimated = settlement(ex)
        gw.limiter.reconcile(ex.key.name, ex.charged_tokens, 0 if total is None else total)
