"""Which upstream of a tier takes a request: prefix affinity under a load bound, least loaded, round robin.

Strategy: vLLM keeps a prefix cache per host, and an agent's or a chat's next turn repeats its whole
history: sent where that history was last served, it skips most of its prefill. `choose` is one
synchronous function over a small per-tier record (`RouteState`) and the candidates' loads, with the
clock and the randomness injected, so every decision is tested without an event loop; it returns the
ORDER in which to try the candidates, so the before-first-byte retry (upstream/open.py) goes to the
next choice. The candidates are already the routable ones (down, draining and stalled hosts are
filtered out by the tier: routing/tiers.py).

- Load of a host: this gateway's requests in flight there (its health record's watches, exact), plus,
  while vLLM's own /metrics reading is fresh (`FRESH_S`), the requests it counted then that were not
  ours (running + waiting less our in-flight at the reading: other workers' and hosts', which all read
  the same counters), plus its KV-cache fill (0..1) as a tie-breaker.
- least_loaded: the lowest load first; among equals, two picked at random and the one with fewer of
  this gateway's requests wins (power of two choices), so equal hosts share new work without herding.
- prefix: the request's leading prompt blocks (`blocks`: chained hashes, block i covers everything up to
  it -- routing/prefix.py) are looked up deepest first in a bounded LRU of block -> host. The host of the
  deepest match goes first unless its load exceeds the least loaded host's by more than `load_bound`;
  then the least loaded goes first and becomes the blocks' new home (the bounded load of vllm-router's
  cache_aware and llm-d's prefix scorer). A match on the first block alone -- the system prompt and
  tools that many conversations share -- is weak: it goes first only if it is among the least loaded,
  so new conversations spread and every host soon holds the shared prompt. No match: least loaded,
  and it becomes the home. Every block
  of the request is recorded for the host chosen (`remember`, also called by the caller when a retry
  landed elsewhere), so the next turn, whose blocks extend these, finds it.
- round_robin: a rotation, as before.
Cost: a handful of dict lookups and comparisons per request (`bench` figure in the closing note of the
routing issue: measured in tests/proxy/routing/test_policy.py's `test_choose_costs_microseconds` output).
"""

from __future__ import annotations

import random
from collections import OrderedDict
from typing import NamedTuple

FRESH_S = 5.0  # a vLLM /metrics reading older than this is not believed (the prober reads every 2 s)
MAX_BLOCKS = 65536  # block -> host entries kept per tier (LRU)


class Load(NamedTuple):
    """One candidate's load as this gateway knows it."""

    in_flight: int  # this gateway's requests there now (exact)
    others: float | None = None  # vLLM's running + waiting at its last /metrics reading, less ours then
    kv_usage: float | None = None  # vLLM's KV-cache fill then, 0..1
    read_at: float | None = None  # when that reading was taken (the policy's clock)


def load_of(load: Load, now: float) -> float:
    """Our requests there now, plus -- while vLLM's reading is fresh -- the others it counted then (other
    workers' and hosts'), plus its KV fill as a tie-breaker. Our own count is never replaced by a
    reading up to seconds old: a host that just finished a burst must not look busy."""
    if load.read_at is not None and load.others is not None and now - load.read_at <= FRESH_S:
        return load.in_flight + load.others + (load.kv_usage or 0.0)
    return float(load.in_flight)


class RouteState:
    """A tier's routing memory: the policy, the rotation, the prefix homes, the randomness."""

    __slots__ = ("homes", "load_bound", "max_blocks", "moved", "policy", "rng", "rr")

    def __init__(self, policy: str, *, load_bound: int = 4, max_blocks: int = MAX_BLOCKS,
                 rng: random.Random | None = None) -> None:
        self.policy = policy
        self.load_bound = load_bound
        self.max_blocks = max_blocks
        self.homes: OrderedDict[int, str] = OrderedDict()
        # Blocks whose home is new or changed since the last `drain_moved` (None: nobody drains them --
        # a single gateway; redis_prefixes.py shares them with the other hosts of a cluster).
        self.moved: dict[int, str] | None = None
        self.rr = 0
        self.rng = rng or random.Random()

    def learn(self, found: dict[int, str]) -> None:
        """Homes another gateway host recorded (redis_prefixes.py), for blocks this one does not know."""
        homes = self.homes
        for h, url in found.items():
            if h not in homes:
                homes[h] = url
        while len(homes) > self.max_blocks:
            homes.popitem(last=False)

    def home_of(self, blocks, urls) -> tuple[int, int] | None:
        """(index in `urls` of the host of the deepest block found there, that block's depth), or None."""
        homes = self.homes
        for depth in range(len(blocks), 0, -1):
            url = homes.get(blocks[depth - 1])
            if url is not None:
                try:
                    return urls.index(url), depth
                except ValueError:
                    continue  # its home is not a candidate now (down, draining): look shallower
        return None

    def remember(self, blocks, url: str) -> None:
        """Every block of a request now lives on `url`."""
        homes = self.homes
        moved = self.moved
        for h in blocks:
            if moved is not None and homes.get(h) != url:
                moved[h] = url
            homes[h] = url
            homes.move_to_end(h)
        while len(homes) > self.max_blocks:
            homes.popitem(last=False)


def _least_loaded(loads: list[Load], scores: list[float], rng: random.Random) -> int:
    best = min(scores)
    tied = [i for i, s in enumerate(scores) if s == best]
    if len(tied) == 1:
        return tied[0]
    a, b = rng.sample(tied, 2)
    return a if loads[a].in_flight <= loads[b].in_flight else b


def _by_load(first: int, scores: list[float]) -> list[int]:
    rest = sorted((i for i in range(len(scores)) if i != first), key=scores.__getitem__)
    return [first, *rest]


def choose(state: RouteState, urls: list[str], loads: list[Load], blocks, now: float) -> list[int]:
    """The order (indices into `urls`) in which to try the candidates for one request.

    `urls` and `loads` are parallel; `blocks` are the request's prefix block hashes (empty: none, e.g.
    an embedding); `now` is the clock `Load.read_at` was taken with."""
    n = len(urls)
    if n <= 1:
        return list(range(n))
    policy = state.policy
    if policy == "round_robin":
        state.rr = i = (state.rr + 1) % n
        return [*range(i, n), *range(i)]
    scores = [load_of(x, now) for x in loads]
    if policy == "prefix" and blocks:
        found = state.home_of(blocks, urls)
        # A match on the first block only (a system prompt and tools other conversations share) is weak
        # evidence: it wins among the least loaded only. A deeper one (this conversation's own
        # history) wins up to the load bound.
        bound = state.load_bound if found is not None and found[1] > 1 else 0
        if found is not None and scores[found[0]] - min(scores) <= bound:
            first = found[0]
        else:
            first = _least_loaded(loads, scores, state.rng)
        state.remember(blocks, urls[first])
        return _by_load(first, scores)
    return _by_load(_least_loaded(loads, scores, state.rng), scores)
