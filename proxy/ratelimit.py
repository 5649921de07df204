"""Per-key requests-per-minute and tokens-per-minute limits: pure, synchronous, clock-injected.

Strategy: two token buckets per key, one for requests and one for tokens. A bucket holds at most the
per-minute limit and refills continuously at limit/60 per second, so a key may burst up to its whole
minute's allowance and then proceeds at the steady rate. Chosen over a sliding window because it needs
O(1) state per key, gives an exact Retry-After (the time until enough has refilled), and matches what
OpenAI's headers describe: ``x-ratelimit-reset-*`` is "the time until the rate limit resets to its
initial state", i.e. until the bucket is full again.

Tokens are charged up front -- ``max_tokens`` plus an estimate of the prompt, computed by the caller --
and reconciled with vLLM's usage once the answer is known (`RateLimiter.reconcile`). A bucket may go into
debt (negative level): a request larger than the whole limit is admitted when the bucket is full and
then empties it below zero, and an answer that used more than was charged pushes it down the same way;
later requests wait until the debt has refilled. A refused request consumes nothing.

Headers follow OpenAI's names (``x-ratelimit-{limit,remaining,reset}-{requests,tokens}``) and its
duration format for the reset values: Go-style ``1s``, ``6m0s``, ``20ms``, ``1.5s``, rounded up to whole
milliseconds (`format_duration`). They are attached to every response of a key that has a limit (only
the trio of the limit it has). A refusal also carries ``retry-after-ms``, which openai-python prefers
over ``Retry-After`` for its back-off; ``errors.rate_limited`` adds ``Retry-After`` in whole seconds.

Several workers: each worker process holds its own buckets; nothing is shared. The gateway passes each
worker the key's limits divided by the worker count (``rpm / workers``; fractional limits are accepted),
so that the sum over workers never exceeds the configured limit. The cost of that choice: a client that
reuses one keep-alive connection (the OpenAI SDKs do, for sequential calls) always lands on the same
worker and therefore gets ``1/workers`` of its limit; clients that spread over several connections get
the full limit on average. With one worker the limits are exact.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import msgspec

_MINUTE = 60.0


class Admission(msgspec.Struct, frozen=True):
    """The decision for one request.

    ``headers`` go on the response whatever its status. When ``allowed`` is False, ``exceeded`` names the
    limit ("requests" or "tokens") and ``retry_after_s`` says when the same request would be admitted.
    """

    allowed: bool
    retry_after_s: float = 0.0
    headers: tuple[tuple[bytes, bytes], ...] = ()
    exceeded: str | None = None
    limit: float = 0.0
    requested: int = 0

    def message(self, key_name: str) -> str:
        """OpenAI-style text for the 429 body; names the key, never its secret."""
        if self.exceeded == "tokens":
            what = f"tokens per min (TPM): Limit {_num(self.limit)}, Requested {self.requested}"
        else:
            what = f"requests per min (RPM): Limit {_num(self.limit)}"
        return (f"Rate limit reached for key '{key_name}' on {what}. "
                f"Please try again in {format_duration(self.retry_after_s)}.")


_UNLIMITED = Admission(True)


def _num(x: float) -> str:
    return str(int(x)) if x == int(x) else f"{x:g}"


def format_duration(seconds: float) -> str:
    """OpenAI's reset format (Go ``time.Duration`` text) in whole milliseconds, rounded up.

    0 -> ``0s``; 0.02 -> ``20ms``; 1 -> ``1s``; 1.5 -> ``1.5s``; 360 -> ``6m0s``; 3725 -> ``1h2m5s``.
    """
    ms = math.ceil(seconds * 1000.0 - 1e-6)
    if ms <= 0:
        return "0s"
    if ms < 1000:
        return f"{ms}ms"
    h, rem = divmod(ms, 3_600_000)
    m, rem = divmod(rem, 60_000)
    if rem % 1000:
        s = f"{rem / 1000:.3f}".rstrip("0").rstrip(".")
    else:
        s = str(rem // 1000)
    if h:
        return f"{h}h{m}m{s}s"
    if m:
        return f"{m}m{s}s"
    return f"{s}s"


class _Bucket:
    __slots__ = ("cap", "level", "rate", "stamp")

    def __init__(self, cap: float, now: float) -> None:
        self.cap = cap
        self.rate = cap / _MINUTE
        self.level = cap
        self.stamp = now

    def refill(self, now: float) -> None:
        dt = now - self.stamp
        if dt > 0:
            level = self.level + dt * self.rate
            self.level = min(self.cap, level)
        self.stamp = now

    def set_limit(self, cap: float) -> None:
        # A reloaded limit: keep what was used, within the new capacity.
        self.cap = cap
        self.rate = cap / _MINUTE
        self.level = min(self.level, cap)

    def wait_for(self, amount: float) -> float:
        """Seconds until the level reaches `amount` (0 if it already has)."""
        short = amount - self.level
        if short <= 0:
            return 0.0
        if self.rate <= 0:
            return _MINUTE  # a zero limit: nothing will ever refill; say "a minute" honestly-ish
        return short / self.rate

    def time_to_full(self) -> float:
        if self.rate <= 0:
            return 0.0
        return (self.cap - self.level) / self.rate


class RateLimiter:
    """Token buckets per key name. Not thread-safe; one per worker, used from its event loop."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._requests: dict[str, _Bucket] = {}
        self._tokens: dict[str, _Bucket] = {}

    def admit(self, key_name: str, rpm: float | None, tpm: float | None, tokens_estimate: int) -> Admission:
        """Charge one request and `tokens_estimate` tokens, or refuse without charging.

        `rpm`/`tpm` None means no such limit; both None means the key is not limited (no headers).
        `tokens_estimate` is ``max_tokens`` plus the prompt estimate; keep it to reconcile later.
        """
        if rpm is None and tpm is None:
            return _UNLIMITED
        now = self._clock()
        rb = self._bucket(self._requests, key_name, rpm, now) if rpm is not None else None
        tb = self._bucket(self._tokens, key_name, tpm, now) if tpm is not None else None
        wait = 0.0
        exceeded = None
        limit = 0.0
        if rb is not None:
            w = rb.wait_for(1.0)
            if w > 0:
                wait, exceeded, limit = w, "requests", rb.cap
        if tb is not None:
            # A request above the whole limit needs a full bucket, not an impossible one.
            need = min(tb.cap, tokens_estimate)
            w = tb.wait_for(need)
            if w > wait:
                wait, exceeded, limit = w, "tokens", tb.cap
        allowed = exceeded is None
        if allowed:
            if rb is not None:
                rb.level -= 1.0
            if tb is not None:
                tb.level -= tokens_estimate
        headers = _headers(rb, tb)
        if not allowed:
            headers += ((b"retry-after-ms", str(math.ceil(wait * 1000.0)).encode()),)
        return Admission(allowed, wait, headers, exceeded, limit, tokens_estimate)

    def reconcile(self, key_name: str, charged: int, actual: int) -> None:
        """Refund (or charge) the difference between the up-front charge and the tokens vLLM reported."""
        tb = self._tokens.get(key_name)
        if tb is None or charged == actual:
            return
        tb.refill(self._clock())
        level = tb.level + (charged - actual)
        tb.level = min(tb.cap, level)

    def forget(self, key_name: str) -> None:
        """Drop a key's buckets (a revoked key)."""
        self._requests.pop(key_name, None)
        self._tokens.pop(key_name, None)

    def _bucket(self, table: dict[str, _Bucket], key_name: str, limit: float, now: float) -> _Bucket:
        cap = limit if limit > 0 else 0.0
        b = table.get(key_name)
        if b is None:
            b = table[key_name] = _Bucket(cap, now)
            return b
        if b.cap != cap:
            b.refill(now)
            b.set_limit(cap)
        b.refill(now)
        return b


def _headers(rb: _Bucket | None, tb: _Bucket | None) -> tuple[tuple[bytes, bytes], ...]:
    h: tuple[tuple[bytes, bytes], ...] = ()
    if rb is not None:
        h += (
            (b"x-ratelimit-limit-requests", _num(rb.cap).encode()),
            (b"x-ratelimit-remaining-requests", str(max(0, math.floor(rb.level))).encode()),
            (b"x-ratelimit-reset-requests", format_duration(rb.time_to_full()).encode()),
        )
    if tb is not None:
        h += (
            (b"x-ratelimit-limit-tokens", _num(tb.cap).encode()),
            (b"x-ratelimit-remaining-tokens", str(max(0, math.floor(tb.level))).encode()),
            (b"x-ratelimit-reset-tokens", format_duration(tb.time_to_full()).encode()),
        )
    return h
