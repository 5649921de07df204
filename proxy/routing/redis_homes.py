"""Stored responses' homes for the whole cluster: homes.py's map in Redis, with a TTL.

Strategy: behind a load balancer the create of a stored Responses API response and its retrieve,
cancel or follow-up (`previous_response_id`) may reach different gateway hosts; the map from response
id to (tier, upstream) must be the cluster's. Each id is one key, ``spotinference:resp:<id>`` =
``<tier>\\n<host:port>``, living `homes_ttl_s`. `remember` (at the end of the relay that created the id)
keeps the entry in this host's own map (homes.py / shared_homes.py) and queues the SET, which `run`
sends (every queued SET in one pipeline); `lookup` answers from the local map when it can (this host's
own responses: no round trip) and otherwise with one GET, caching what it found (an id's home never
changes). Ids come from upstreams, never from clients, so a client cannot fill Redis; a client only
looks up. Redis down: lookups answer from the local map only (another host's ids are then unknown:
404, as after a restart) and remembered ids are not sent.
"""

from __future__ import annotations

from collections import deque

import trio

from proxy.cluster.link import FAILURES

PREFIX = "spotinference:resp:"


class RedisHomes:
    def __init__(self, link, local, *, ttl_s: float) -> None:
        self.link = link  # cluster/link.ClusterLink
        self.local = local  # this host's map (homes.ResponseHomes or shared_homes.SharedHomes)
        self._ttl_ms = max(1, int(ttl_s * 1000))
        self._outbox: deque[tuple] = deque()
        self._kick = trio.Event()

    def __len__(self) -> int:
        return len(self.local)

    def remember(self, response_id: str, tier: str, upstream: str) -> None:
        self.local.remember(response_id, tier, upstream)
        self._outbox.append(("SET", PREFIX + response_id, f"{tier}\n{upstream}", "PX", self._ttl_ms))
        self._kick.set()

    def home(self, response_id: str) -> tuple[str, str] | None:
        return self.local.home(response_id)

    def fetch_command(self, response_id: str) -> tuple | None:
        """The command that fetches `response_id`'s home (None when Redis is down), for a caller that
        pipelines it with its other Redis work (admit/inference.py with the cluster's limits); the reply
        goes to `from_reply`."""
        return ("GET", PREFIX + response_id) if self.link.up else None

    async def lookup(self, response_id: str) -> tuple[str, str] | None:
        found = self.local.home(response_id)
        if found is not None or not self.link.up:
            return found
        try:
            value = await self.link.client.execute("GET", PREFIX + response_id)
        except FAILURES as exc:
            self.link.failed(exc)
            return None
        return self.from_reply(response_id, value)

    def from_reply(self, response_id: str, value) -> tuple[str, str] | None:
        """The home in a GET's reply (cached here), or None."""
        if not isinstance(value, bytes):
            return None
        tier, sep, upstream = value.decode("utf-8", "replace").partition("\n")
        if not sep:
            return None
        self.local.remember(response_id, tier, upstream)
        return tier, upstream

    async def run(self) -> None:
        """Service task: send queued SETs, one pipeline per wake-up."""
        while True:
            await self._kick.wait()
            self._kick = trio.Event()
            batch = list(self._outbox)
            self._outbox.clear()
            if batch and self.link.up:
                try:
                    await self.link.client.pipeline(batch)
                except FAILURES as exc:
                    self.link.failed(exc)
