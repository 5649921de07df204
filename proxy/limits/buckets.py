"""Per-key requests-per-minute and tokens-per-minute limits: pure, synchronous, clock-injected.

Strategy: two token buckets per key, one for requests and one for tokens. A bucket holds at most the
per-minute limit and refills continuously at limit/60 per second, so a key may burst up to its whole
minute's allowance and then proceeds at the steady rate. Chosen over a sliding window because it needs
O(1) state per key, gives an exact Retry-After (the time until enough has refilled), and matches what
OpenAI's headers describe: ``x-ratelimit-reset-*`` is "the time until the rate limit resets to its
initial state", i.e. until the bucket is full again.

Tokens are charged up front -- ``max_tokens`` plus an estimate of the prompt, computed by the caller --
and reconciled with vLLM's usage once the answer is known (`RateLimiter.reconcile`). A request larger
than the whole tokens-per-minute limit can never be admitted: it is refused at once (``never``), with
OpenAI's "Request too large" wording and ``x-should-retry: false`` -- waiting would not help, and
admitting it from a full bucket would let one request spend minutes of the key's allowance. A bucket may
still go into debt (negative level) when an answer used more than was charged; later requests wait
until the debt has refilled. A refused request consumes nothing.

Headers follow OpenAI's names (``x-ratelimit-{limit,remaining,reset}-{requests,tokens}``) and its
duration format for the reset values: Go-style ``1s``, ``6m0s``, ``20ms``, ``1.5s``, rounded up to whole
milliseconds (`format_duration`). They are attached to every response of a key that has a limit (only
the trio of the limit it has). A refusal also carries ``retry-after-ms``, which openai-python prefers
over ``Retry-After`` for its back-off; ``errors.rate_limited`` adds ``Retry-After`` in whole seconds.

The bucket math is pure and shared: `fit` (create or refill, re-cap on a reloaded limit), `decide`
(admit-and-charge or refuse, headers) and `settle` (reconcile) act on `Bucket` objects. `RateLimiter`
keeps the buckets in dicts in this process -- the single-process gateway. Several workers under the
supervisor keep them in one shared table instead (proxy/limits/shared_table.py), so limits are exact
however a key's connections spread over workers; both limiters give identical answers.
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
    never: bool = False  # larger than the whole limit: no wait admits it

    def message(self, key_name: str) -> str:
        """OpenAI-style text for the 429 body; names the key, never its secret."""
        if self.never:
            return (f"Request too large for key '{key_name}' on tokens per min (TPM): Limit {_num(self.limit)}, "
                    f"Requested {self.requested}. The input or output tokens must be reduced in order to run "
                    "successfully (the request is counted as its body size / 4 plus max_tokens).")
        if self.exceeded == "tokens":
            what = f"tokens per min (TPM): Limit {_num(self.limit)}, Requested {self.requested}"
        else:
            what = f"requests per min (RPM): Limit {_num(self.limit)}"
        return (f"Rate limit reached for key '{key_name}' on {what}. "
                f"Please try again in {format_duration(self.retry_after_s)}.")


UNLIMITED = Admission(True)


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


class Bucket:
    """One token bucket: capacity ``cap`` (the per-minute limit), refilling at cap/60 per second.

    The pure state the limiters keep per key and limit (in a dict here, in a shared table in
    proxy/limits/shared_table.py); `fit`, `decide` and `settle` are the only code that changes it.
    """

    __slots__ = ("cap", "level", "rate", "stamp")

    def __init__(self, cap: float, now: float, level: float | None = None) -> None:
        self.cap = cap
        self.rate = cap / _MINUTE
        self.level = cap if level is None else level
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


def fit(bucket: Bucket | None, limit: float, now: float) -> Bucket:
    """The bucket for `limit` at `now`: a new full one when there was none, else `bucket` refilled up to
    `now` (and re-capped first when the limit changed on a reload)."""
    cap = limit if limit > 0 else 0.0
    if bucket is None:
        return Bucket(cap, now)
    if bucket.cap != cap:
        bucket.refill(now)
        bucket.set_limit(cap)
    bucket.refill(now)
    return bucket


def decide(rb: Bucket | None, tb: Bucket | None, tokens_estimate: int) -> Admission:
    """Admit one request and `tokens_estimate` tokens against refilled buckets (charging them), or refuse
    without charging. At least one bucket is given."""
    if tb is not None and tokens_estimate > tb.cap:
        headers = _headers(rb, tb) + ((b"x-should-retry", b"false"),)
        return Admission(False, 0.0, headers, "tokens", tb.cap, tokens_estimate, never=True)
    wait = 0.0
    exceeded = None
    limit = 0.0
    if rb is not None:
        w = rb.wait_for(1.0)
        if w > 0:
            wait, exceeded, limit = w, "requests", rb.cap
    if tb is not None:
        w = tb.wait_for(tokens_estimate)
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


def settle(tb: Bucket, charged: int, actual: int, now: float) -> None:
    """Refund (or charge) the difference between the up-front charge and the actual tokens."""
    tb.refill(now)
    tb.level = min(tb.cap, tb.level + (charged - actual))


class RateLimiter:
    """Token buckets per key name, in this process. Not thread-safe; one per worker, used from its event
    loop. proxy/limits/shared_table.SharedRateLimiter has the same interface and results."""

    remote = False  # answers synchronously (charge.py awaits only the cluster's limiter)

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._requests: dict[str, Bucket] = {}
        self._tokens: dict[str, Bucket] = {}

    def admit(self, key_name: str, rpm: float | None, tpm: float | None, tokens_estimate: int) -> Admission:
        """Charge one request and `tokens_estimate` tokens, or refuse without charging.

        `rpm`/`tpm` None means no such limit; both None means the key is not limited (no headers).
        `tokens_estimate` is ``max_tokens`` plus the prompt estimate; keep it to reconcile later.
        """
        if rpm is None and tpm is None:
            return UNLIMITED
        now = self._clock()
        rb = tb = None
        if rpm is not None:
            rb = self._requests[key_name] = fit(self._requests.get(key_name), rpm, now)
        if tpm is not None:
            tb = self._tokens[key_name] = fit(self._tokens.get(key_name), tpm, now)
        return decide(rb, tb, tokens_estimate)

    def reconcile(self, key_name: str, charged: int, actual: int) -> None:
        """Refund (or charge) the difference between the up-front charge and the tokens vLLM reported."""
        tb = self._tokens.get(key_name)
        if tb is None or charged == actual:
            return
        settle(tb, charged, actual, self._clock())

    def forget(self, key_name: str) -> None:
        """Drop a key's buckets (a revoked key)."""
        self._requests.pop(key_name, None)
        self._tokens.pop(key_name, None)


def _headers(rb: Bucket | None, tb: Bucket | None) -> tuple[tuple[bytes, bytes], ...]:
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
