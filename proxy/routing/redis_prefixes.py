"""Prefix homes for the whole cluster: policy.py's block -> host memory shared through Redis.

Strategy: behind a load balancer, a conversation's turns may reach different gateway hosts; each host
choosing alone would send a turn to a vLLM host without its history cached. Each host keeps its own
`RouteState.homes` (the synchronous choice stays a pure function over it) and this module keeps them in
step: before the choice, `fill` asks Redis -- one MGET -- for the request's blocks this host does not
know, only when its deepest block is unknown here (a turn of a conversation this host has been serving
costs nothing); after choices, the homes that are new or moved (`RouteState.moved`) are sent by `run`,
one pipeline of SETs per wake-up, off the request path. Keys: ``spotinference:prefix:<tier>:<hash>`` =
upstream URL, living `ttl_s` (a prefix cache forgets too). A home naming an upstream the tier no longer
has is ignored. Redis down (cluster/link.py): each host goes on with what it knows.
"""

from __future__ import annotations

import trio

from proxy.cluster.link import FAILURES

PREFIX = "spotinference:prefix:"
TTL_S = 1800.0
SEND_EVERY_S = 0.05


class SharedPrefixes:
    def __init__(self, link, *, ttl_s: float = TTL_S) -> None:
        self.link = link  # cluster/link.ClusterLink
        self._ttl_ms = max(1, int(ttl_s * 1000))
        self._tiers: dict[str, object] = {}  # tier name -> the Tier whose moves are drained (latest router)

    def watch(self, tier) -> None:
        """Share `tier`'s prefix homes from now on (idempotent; a reload's new Tier replaces the old)."""
        if tier.route.moved is None:
            tier.route.moved = {}
        self._tiers[tier.name] = tier

    async def fill(self, tier, blocks: tuple[int, ...]) -> None:
        """Learn the cluster's homes of `blocks` this host does not know (one MGET), before choosing."""
        homes = tier.route.homes
        if not blocks or blocks[-1] in homes or not self.link.up:
            return
        unknown = [h for h in blocks if h not in homes]
        base = f"{PREFIX}{tier.name}:"
        try:
            values = await self.link.client.execute("MGET", *[base + format(h, "x") for h in unknown])
        except FAILURES as exc:
            self.link.failed(exc)
            return
        urls = set(tier.urls)
        found = {}
        for h, v in zip(unknown, values if isinstance(values, list) else (), strict=False):
            if isinstance(v, bytes):
                url = v.decode("utf-8", "replace")
                if url in urls:
                    found[h] = url
        if found:
            tier.route.learn(found)

    async def run(self) -> None:
        """Service task: send every tier's new or moved homes, one pipeline per period."""
        while True:
            await trio.sleep(SEND_EVERY_S)
            batch = []
            for name, tier in self._tiers.items():
                moved = tier.route.moved
                if not moved:
                    continue
                tier.route.moved = {}
                base = f"{PREFIX}{name}:"
                batch += [("SET", base + format(h, "x"), url, "PX", self._ttl_ms) for h, url in moved.items()]
            if batch and self.link.up:
                try:
                    await self.link.client.pipeline(batch)
                except FAILURES as exc:
                    self.link.failed(exc)
