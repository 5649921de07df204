"""The gateway's link to the cluster's Redis: the client, whether Redis answers now, and the policy.

Strategy: every user of Redis (limits/redis_buckets.py, cluster/lease.py, routing/redis_homes.py) goes
through one `ClusterLink`, so they agree on one fact -- Redis is up, or it is down -- and a request
never pays a timeout to learn what the previous one already found out. A call that fails
(`FAILURES`: refused, reset, past `timeout_s`, or an error reply such as OOM) marks the link down (`failed`; logged once per
outage, counted); while down, callers skip Redis at once and apply `[cluster] on_redis_failure`
("local": this host's own state; "closed": refuse what needs Redis). `run`, a service task, PINGs every
`retry_s` while down and marks the link up again when Redis answers: the switch back is automatic and
needs no request to try it. `node` names this gateway process in leases (host name, pid, a random
suffix: two workers of one host are two nodes).
"""

from __future__ import annotations

import os
import socket

import msgspec
import trio

from proxy.cluster.redis import RedisClient, RedisUnavailable
from proxy.cluster.resp import ReplyError
from proxy.observe import logs
from proxy.observe.redact import redact_url

# What makes a call "Redis is down" for its caller: no answer (refused, reset, past timeout_s), or an
# error reply where a script or a write should have run (OOM under maxmemory, READONLY after a
# failover to a replica). The prober's PING decides when it is back.
FAILURES = (RedisUnavailable, ReplyError)


class ClusterStatistics(msgspec.Struct, frozen=True):
    redis_up: int  # 1 while Redis answers, 0 during an outage
    redis_failures_total: int  # outages begun (each logged once)
    redis_fallbacks_total: int  # requests served on this host's own limits during an outage
    redis_refused_total: int  # requests refused (503) during an outage, on_redis_failure = "closed"


def node_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{os.urandom(3).hex()}"


class ClusterLink:
    __slots__ = ("_back", "client", "closed", "config", "failures", "fallbacks", "node", "refused", "up", "where")

    def __init__(self, config, *, client: RedisClient | None = None, node: str | None = None) -> None:
        self.config = config  # proxy.config.ClusterConfig
        self.client = client or RedisClient(config.redis_url, timeout_s=config.timeout_s)
        self.where = redact_url(config.redis_url)
        self.closed = config.on_redis_failure == "closed"
        self.node = node or node_name()
        self.up = True
        self.failures = 0
        self.fallbacks = 0
        self.refused = 0
        self._back = trio.Event()  # set by failed(): the prober starts pinging

    def failed(self, exc: BaseException) -> None:
        """A Redis call failed: down from now until a PING answers (logged once per outage)."""
        if not self.up:
            return
        self.up = False
        self.failures += 1
        logs.event("redis_down", level="error", redis=self.where, error=str(exc)[:200],
                   policy=self.config.on_redis_failure)
        self._back.set()

    def statistics(self) -> ClusterStatistics:
        return ClusterStatistics(int(self.up), self.failures, self.fallbacks, self.refused)

    async def ping(self) -> bool:
        try:
            return await self.client.execute("PING") == b"PONG"
        except RedisUnavailable:
            return False

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Service task: while Redis is down, PING every `retry_s`; mark it up when it answers."""
        if not await self.ping():
            self.failed(RedisUnavailable(f"no answer from {self.where} at start"))
        task_status.started()
        try:
            while True:
                if self.up:
                    self._back = trio.Event()
                    await self._back.wait()
                    continue
                await trio.sleep(self.config.retry_s)
                if await self.ping():
                    self.up = True
                    logs.event("redis_up", redis=self.where)
        finally:
            with trio.CancelScope(shield=True):
                await self.client.aclose()
