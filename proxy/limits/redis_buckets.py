"""Per-key limits for the whole cluster: buckets.py's token buckets kept in Redis, changed by Lua.

Strategy: several gateway hosts behind a load balancer must give a key its rpm/tpm once, not once per
host. The buckets of a key live in one Redis hash (``spotinference:rl:<key name>``: request cap, level,
stamp; token cap, level, stamp) and every read-modify-write is one Lua script run atomically by Redis
on the Redis server's own clock (``TIME``), so hosts with skewed clocks agree and no lock is held
across the network. One round trip per limited request: ADMIT refills both buckets, decides, charges
(or refuses without charging) and returns the buckets' state *before* the charge; the gateway then
runs buckets.decide() on that state itself, which reproduces Redis's decision bit for bit (the same
IEEE doubles, the same order of operations as buckets.py) and gives the Admission -- headers, message,
Retry-After -- from the one implementation both limiters share. Settling (vLLM's real count replacing
the estimate) is off the request path: `reconcile` queues the difference and `run` sends every queued
settle in one pipeline; a settle that cannot be sent is dropped (the key keeps the up-front charge:
conservative, never a free request). A bucket's hash expires a minute after it would be full again:
a full bucket and no bucket mean the same, so Redis keeps only the keys in use.

Redis down (cluster/link.py): with ``on_redis_failure = "local"`` the request is charged to this host's
own limiter (the mmap table across its workers, or the process's buckets) at the key's full limit --
per-host limits, logged once and counted; ``"closed"`` refuses a limited key's request with 503 in the
envelope (Retry-After: the link's retry period). Unlimited keys never touch Redis. When the link is
up again, the next request is charged in Redis.
"""

from __future__ import annotations

import math
from collections import deque

import trio

from proxy import errors
from proxy.cluster.link import FAILURES
from proxy.cluster.redis import Script
from proxy.limits.buckets import UNLIMITED, Admission, Bucket, decide

PREFIX = "spotinference:rl:"

# Mirrors buckets.fit / decide / settle. Levels go back as %.17g strings (Lua numbers would be truncated
# to integers by the reply conversion). Returns {charged, rc, rl, tc, tl} with "" for an absent bucket.
_COMMON = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local function num(x)
  x = tonumber(x)
  if x == nil or x ~= x or x == math.huge or x == -math.huge then return nil end
  return x
end
local function fit(limit, c, l, s)
  local cap = limit
  if cap <= 0 then cap = 0 end
  c, l, s = num(c), num(l), num(s)
  if c == nil or l == nil or s == nil or c < 0 or l > c then return cap, cap end
  local function refill()
    local dt = now - s
    if dt > 0 then l = math.min(c, l + dt * (c / 60.0)) end
    s = now
  end
  if c ~= cap then
    refill()
    c = cap
    l = math.min(l, cap)
  end
  refill()
  return c, l
end
local function ttl_ms(c, l)
  if c <= 0 then return 60000 end
  return math.ceil((c - l) / (c / 60.0) * 1000) + 60000
end
local function fmt(x) return string.format('%.17g', x) end
"""

ADMIT = Script(_COMMON + """
local rpm, tpm, est = num(ARGV[1]), num(ARGV[2]), tonumber(ARGV[3])
local h = redis.call('HMGET', KEYS[1], 'rc', 'rl', 'rs', 'tc', 'tl', 'ts')
local rc, rl, tc, tl
if rpm ~= nil then rc, rl = fit(rpm, h[1], h[2], h[3]) end
if tpm ~= nil then tc, tl = fit(tpm, h[4], h[5], h[6]) end
local ok = 1
if tc ~= nil and est > tc then ok = 0 end
if ok == 1 and rc ~= nil and rl < 1 then ok = 0 end
if ok == 1 and tc ~= nil and tl < est then ok = 0 end
local out = {ok, '', '', '', ''}
local ttl = 0
if rc ~= nil then
  out[2], out[3] = fmt(rc), fmt(rl)
  local nl = rl
  if ok == 1 then nl = rl - 1 end
  redis.call('HSET', KEYS[1], 'rc', fmt(rc), 'rl', fmt(nl), 'rs', fmt(now))
  ttl = math.max(ttl, ttl_ms(rc, nl))
end
if tc ~= nil then
  out[4], out[5] = fmt(tc), fmt(tl)
  local nl = tl
  if ok == 1 then nl = tl - est end
  redis.call('HSET', KEYS[1], 'tc', fmt(tc), 'tl', fmt(nl), 'ts', fmt(now))
  ttl = math.max(ttl, ttl_ms(tc, nl))
end
if ttl > 0 then redis.call('PEXPIRE', KEYS[1], ttl) end
return out
""")

SETTLE = Script(_COMMON + """
local h = redis.call('HMGET', KEYS[1], 'tc', 'tl', 'ts')
local c, l, s = num(h[1]), num(h[2]), num(h[3])
if c == nil or l == nil or s == nil then return 0 end
local dt = now - s
if dt > 0 then l = math.min(c, l + dt * (c / 60.0)) end
l = math.min(c, l + tonumber(ARGV[1]))
redis.call('HSET', KEYS[1], 'tl', fmt(l), 'ts', fmt(now))
redis.call('PEXPIRE', KEYS[1], math.max(redis.call('PTTL', KEYS[1]), ttl_ms(c, l)))
return 1
""")


def _bucket(cap: bytes, level: bytes) -> Bucket | None:
    if not cap:
        return None
    b = Bucket(float(cap), 0.0)
    b.level = float(level)
    return b


def admission_of(reply: list, tokens_estimate: int) -> Admission:
    """The Admission for ADMIT's reply: buckets.decide() on the pre-charge state Redis returned."""
    _ok, rc, rl, tc, tl = reply
    return decide(_bucket(rc, rl), _bucket(tc, tl), tokens_estimate)


class RedisRateLimiter:
    """Same answers as buckets.RateLimiter, for the whole cluster; `admit` is awaited (one round trip)."""

    remote = True

    def __init__(self, link, fallback) -> None:
        self.link = link  # cluster/link.ClusterLink
        self.fallback = fallback  # this host's limiter, for on_redis_failure = "local"
        self._pending: deque[tuple] = deque()  # settle / forget commands waiting for `run`
        self._kick = trio.Event()

    async def admit(self, key_name: str, rpm: float | None, tpm: float | None, tokens_estimate: int, *,
                    also: tuple = (), replies: list | None = None) -> Admission:
        """`also`: other commands the request needs from Redis, sent in the same round trip; their
        replies are appended to `replies` (nothing is appended when Redis was not asked)."""
        if rpm is None and tpm is None:
            return UNLIMITED
        link = self.link
        if link.up:
            args = ["" if rpm is None else repr(float(rpm)), "" if tpm is None else repr(float(tpm)),
                    tokens_estimate]
            try:
                if also:
                    got = await link.client.pipeline([link.client.evalsha(ADMIT, [PREFIX + key_name], args),
                                                      *also])
                    reply = got[0]
                    if isinstance(reply, BaseException):
                        raise reply
                    if replies is not None:
                        replies.extend(got[1:])
                else:
                    reply = await link.client.eval(ADMIT, [PREFIX + key_name], args)
            except FAILURES as exc:
                link.failed(exc)
            else:
                return admission_of(reply, tokens_estimate)
        if link.closed:
            link.refused += 1
            raise errors.ApiError(503, "Rate limits cannot be checked right now (the cluster's Redis is "
                                  "unreachable). Try again shortly.", "server_error", code="limits_unavailable",
                                  headers=((b"retry-after", str(max(1, math.ceil(link.config.retry_s))).encode()),))
        link.fallbacks += 1
        return self.fallback.admit(key_name, rpm, tpm, tokens_estimate)

    def reconcile(self, key_name: str, charged: int, actual: int) -> None:
        """Queue the settle (sent by `run`, pipelined); during an outage, settle locally."""
        if charged == actual:
            return
        if not self.link.up:
            self.fallback.reconcile(key_name, charged, actual)
            return
        self._pending.append(self.link.client.evalsha(SETTLE, [PREFIX + key_name], [charged - actual]))
        self._kick.set()

    def forget(self, key_name: str) -> None:
        """A revoked key: drop its buckets here and in Redis."""
        self.fallback.forget(key_name)
        self._pending.append(("DEL", PREFIX + key_name))
        self._kick.set()

    async def run(self) -> None:
        """Service task: send queued settles in one pipeline per wake-up."""
        while True:
            await self._kick.wait()
            self._kick = trio.Event()
            batch = list(self._pending)
            self._pending.clear()
            if not batch or not self.link.up:
                continue
            try:
                await self.link.client.pipeline(batch)
            except FAILURES as exc:
                self.link.failed(exc)
