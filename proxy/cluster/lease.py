"""The cluster's tier link (ops/lease.py's contract) in Redis: one wake lease per tier, shared notices.

Strategy: the lease is one key, ``spotinference:lease:<tier>``, whose value is the holder's node name
(cluster/link.py), set with ``SET NX PX lease_s``: taken only when free, gone by itself `lease_s` after
its holder last asked (a host that died mid-wake). The waker asks (`hold`) before each call that
changes instances, so the lease lives while there is something to start or stop and lapses once EC2
shows the instances pending -- long past the seconds EC2 may still show them stopped, so no second node
starts them. `hold` is one Lua call that renews the key when this node holds it, takes it when it is
free, and says which; `release` deletes it only when it is
still ours (compare-and-delete, so a holder whose lease expired and went to another node cannot delete
the new holder's). A notice is one key per instance, ``spotinference:notice:<instance id>`` = kind,
living `hold_s`; `share` queues its SET and `notices`, called at each waker poll, sends the queued
SETs and reads the tier's instances' keys (MGET) in one pipeline.
Redis down (the link says so): under ``on_redis_failure = "local"`` the lease counts as held -- a
wake must not wait on a store that is away; two hosts may then both start the instances (EC2 takes a
second StartInstances of a pending instance as a no-op), which is logged -- and under "closed" it counts
as not held: no host starts anything until Redis answers. Notices are neither shared nor read while
down; every host still sees a noticed host fail its /health (the GPU host refuses new connections).
"""

from __future__ import annotations

from collections import deque

from proxy.cluster.link import FAILURES
from proxy.cluster.redis import Script
from proxy.observe import logs

LEASE = "spotinference:lease:"
NOTICE = "spotinference:notice:"

_HOLD = Script("""
local v = redis.call('GET', KEYS[1])
if v == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
if v then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
""")

_RELEASE = Script("""
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
""")


class RedisTierLink:
    """The lease and the shared notices of one tier, for this node's waker."""

    def __init__(self, link, tier: str) -> None:
        self.link = link  # cluster/link.ClusterLink
        self.tier = tier
        self._key = LEASE + tier
        self._held: bool | None = False  # None: Redis was down at the last ask (logged once)
        self._outbox: deque[tuple] = deque()

    async def hold(self) -> bool:
        link = self.link
        if link.up:
            try:
                got = await link.client.eval(_HOLD, [self._key], [link.node, int(link.config.lease_s * 1000)])
            except FAILURES as exc:
                link.failed(exc)
            else:
                held = got == 1
                if held != self._held:
                    logs.event("wake_lease", tier=self.tier, held=held, node=link.node)
                self._held = held
                return held
        held = not link.closed
        if self._held is not None:  # once per outage, not at every poll
            logs.event("wake_lease_without_redis", level="warning", tier=self.tier, held=held,
                       policy=link.config.on_redis_failure)
            self._held = None
        return held

    async def release(self) -> None:
        if not self._held:
            return
        self._held = False
        if not self.link.up:
            return  # it expires by itself
        try:
            await self.link.client.eval(_RELEASE, [self._key], [self.link.node])
        except FAILURES as exc:
            self.link.failed(exc)
        logs.event("wake_lease", tier=self.tier, held=False, node=self.link.node)

    def share(self, instance_id: str, kind: str, hold_s: float) -> None:
        self._outbox.append(("SET", NOTICE + instance_id, kind, "PX", max(1, int(hold_s * 1000))))

    async def notices(self, instance_ids: list[str]) -> dict[str, str]:
        """Send the queued notices and read the tier's, in one pipeline."""
        if not self.link.up or not (instance_ids or self._outbox):
            return {}
        batch = list(self._outbox)
        self._outbox.clear()
        if instance_ids:
            batch.append(("MGET", *[NOTICE + i for i in instance_ids]))
        try:
            replies = await self.link.client.pipeline(batch)
        except FAILURES as exc:
            self.link.failed(exc)
            return {}
        if not instance_ids or not isinstance(replies[-1], list):
            return {}
        return {i: v.decode("utf-8", "replace") for i, v in zip(instance_ids, replies[-1]) if v is not None}
