"""Routing: model name -> tier, and the tier's upstream addresses in the order to try them.

Strategy: the router is built once per (re)load from the config and its maps are not changed
afterwards (a reload builds a new one); the hot path does one dict lookup per request. What does
change under a tier: its routing memory (policy.py's `RouteState`: rotation, prefix homes), and the
waker attached once at start (or carried over by a reload). `candidates(blocks)` gives the routable
upstreams in the order the tier's policy chooses ("prefix" by default for several upstreams:
routing/policy.py), with each one's load from its health record (this gateway's requests in flight
there, vLLM's own running + waiting when fresh), so a refused host is skipped by the caller's retry
loop to the next choice rather than by bookkeeping here. When a tier
has a waker (ops.waker), the waker is the authority on which upstreams are routable and whether the
tier is ready; the router only holds it.
Active health (backends/health.py): the gateway's prober attaches its `HealthBook` to every tier of
the router in use (`attach_health`; a reloaded router within one probe interval). A tier without a
waker then skips upstreams whose record is down or stalled -- none left: none to try (503) --
re-filtering only when the book's `version` moved, so the hot path pays one integer comparison. A
waker's routable list already reflects the same records. `health_record(url)` is the record an
exchange on that upstream registers with (proxy/upstream/open.py).
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import trio

from proxy.config import Config, TierConfig, parse_upstream
from proxy.routing.policy import Load, RouteState, choose

if TYPE_CHECKING:
    from backends.health import HealthBook, UpstreamHealth
    from ops.waker import Waker


@functools.lru_cache(maxsize=1024)
def _address(url: str) -> tuple[str, int]:
    return parse_upstream(url, "upstream")


class Tier:
    __slots__ = ("_records", "_up", "_version", "auth_header", "config", "health", "models", "name",
                 "pairs", "route", "urls", "waker")

    def __init__(self, config: TierConfig) -> None:
        self.config = config
        self.name = config.name
        self.models = list(config.models)
        self.urls = list(config.upstreams)
        self.pairs = [(u, _address(u)) for u in self.urls]
        self.auth_header = (
            (b"authorization", b"Bearer " + config.upstream_api_key.encode())
            if config.upstream_api_key else None
        )
        self.waker: Waker | None = None
        self.health: HealthBook | None = None
        self._records: list[UpstreamHealth] = []
        self._up = self.pairs  # the pairs whose record is up, as of book version `_version`
        self._version = -1
        policy = config.routing or ("prefix" if len(self.urls) > 1 else "round_robin")
        self.route = RouteState(policy, load_bound=config.load_bound)

    @property
    def prefix_routed(self) -> bool:
        """Whether requests should bring their prompt blocks (routing/prefix.py) to `candidates`."""
        return self.route.policy == "prefix"

    def attach_health(self, book: HealthBook) -> None:
        """Route by `book`'s verdicts from now on (idempotent)."""
        if book is self.health:
            return
        self._records = [book.record(u) for u in self.urls]
        self._version = -1
        self.health = book

    def health_record(self, url: str) -> UpstreamHealth | None:
        book = self.health
        return None if book is None else book.get(url)

    def candidates(self, blocks: tuple[int, ...] = ()) -> list[tuple[str, tuple[str, int]]]:
        """(url, address) of the upstreams to try for one request, in the policy's order."""
        if self.waker is not None:
            pairs = [(u, _address(u)) for u in self.waker.upstreams()]
        else:
            book = self.health
            if book is not None and book.version != self._version:
                self._version = book.version
                self._up = [p for p, rec in zip(self.pairs, self._records, strict=True) if rec.up]
            pairs = self._up
        if len(pairs) <= 1:
            return pairs
        route = self.route
        urls = [u for u, _ in pairs]
        if route.policy == "round_robin":
            order = choose(route, urls, [], (), 0.0)
        else:
            order = choose(route, urls, self._loads(urls), blocks, trio.current_time())
        return [pairs[i] for i in order]

    def _loads(self, urls: list[str]) -> list[Load]:
        book = self.health
        out = []
        for url in urls:
            rec = None if book is None else book.get(url)
            if rec is None:
                out.append(Load(0))
            elif rec.load is None:
                out.append(Load(len(rec.inflight)))
            else:
                vllm, kv, at, ours_then = rec.load
                out.append(Load(len(rec.inflight), max(0.0, vllm - ours_then), kv, at))
        return out

    def served(self, blocks: tuple[int, ...], url: str) -> None:
        """The request with `blocks` was taken by `url` (a retry past the first choice): its new home."""
        if blocks and self.route.policy == "prefix":
            self.route.remember(blocks, url)


class Router:
    __slots__ = ("by_model", "model_created", "tiers")

    def __init__(self, config: Config, created: int) -> None:
        self.tiers = {t.name: Tier(t) for t in config.tiers}
        self.by_model = {m: tier for tier in self.tiers.values() for m in tier.models}
        self.model_created = created

    def tier_for(self, model: str) -> Tier | None:
        return self.by_model.get(model)
