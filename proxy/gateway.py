"""The gateway object: the runtime record (config, keys, router) and the services around requests.

Strategy: everything a request needs hangs off one `Gateway` (no eight-argument constructors threaded
through layers). The swappable part -- config, keys, router -- lives in one immutable `Runtime`
record replaced whole on reload (process/reload.py), so a request sees one consistent view.
Long-lived services (upstream pool, usage log, metrics, rate limiter, wakers, the cluster's Redis link)
outlive reloads; `[cluster]` is read once, at start.
The request path calls back into it at three points: `dispatch` (a parsed head, from
accept/connection.py), `request_finished` (the record of a finished request, from `Exchange.finish`)
and `connection_opened` / `connection_closed`. process/services.py starts and serves it.
"""

from __future__ import annotations

import os
import time
from typing import NamedTuple

import trio

from proxy.admit.keys import KeysError, KeyStore
from proxy.admit.routes import dispatch
from proxy.config import Config
from proxy.limits.charge import settle
from proxy.limits.shared_table import open_limiter
from proxy.observe import logs
from proxy.observe.access import access_fields
from proxy.observe.recent import RecentTraffic
from proxy.routing.shared_homes import open_homes
from proxy.routing.tiers import Router
from proxy.upstream.headers import trusted_networks
from proxy.upstream.pool import Pool
from proxy.usage.record import usage_row


class Runtime(NamedTuple):
    config: Config
    keys: KeyStore
    router: Router
    trusted_proxies: tuple = ()  # [server] trusted_proxies as ip networks (upstream/headers.py)


def build_runtime(config: Config, *, created: int | None = None) -> Runtime:
    """Load the keys file (if any) and build the router; raises ConfigError/KeysError."""
    if config.auth.database_url:
        keys = KeyStore([])  # refuses everyone until the keys database's first load (services.py)
    elif config.auth.keys_file:
        if not os.path.exists(config.auth.keys_file):
            raise KeysError(f"keys file {config.auth.keys_file} does not exist "
                            "(create it with `spotinference keys add NAME --keys-file FILE`)")
        keys = KeyStore.from_file(config.auth.keys_file)
    else:
        keys = KeyStore(None, open=True)
    return Runtime(config, keys, Router(config, created if created is not None else int(time.time())),
                   trusted_networks(config.server.trusted_proxies))


class Gateway:
    def __init__(self, runtime: Runtime, *, workers: int = 1) -> None:
        from proxy.observe.metrics import Metrics

        self.runtime = runtime
        up = runtime.config.upstream
        self.pool = Pool(max_idle_per_host=up.max_idle_per_host, idle_keepalive_s=up.idle_keepalive_s)
        self.metrics = Metrics()
        self.homes = open_homes(workers)  # stored Responses API ids -> the upstream that holds them
        self.workers = max(1, workers)
        # Under the supervisor: one shared bucket table, exact limits (divisor 1); see limits/shared_table.
        self.limiter, self.limit_divisor = open_limiter(self.workers, time.monotonic)
        self.cluster = None  # cluster/link.ClusterLink with [cluster] redis_url: limits, leases, homes shared
        self.prefixes = None  # routing/redis_prefixes.SharedPrefixes with [cluster]: prefix homes shared
        self.gpu_time = None  # usage/gpu_time.GpuTimeRecorder, set when it runs ([tiers.cost])
        if runtime.config.cluster.redis_url:
            self._join_cluster(runtime.config.cluster)
        self.usage = None  # UsageLog, started by run_gateway when [usage] path or database_url is set
        self.recent = RecentTraffic()  # this process's recent traffic, for the status page (admit/status.py)
        self.open_connections = 0
        self.connections: set = set()  # open Downstream objects (a drain closes the idle ones)
        self.server = None  # proxy.accept.listener.Server, set when serving
        self.services: trio.Nursery | None = None  # long-lived tasks: usage writer, metrics, wakers
        self._waker_scopes: dict = {}  # running waker -> its cancel scope (run_waker, stop_waker)
        self.metrics.register_stats_source("upstream_pool", self.pool.statistics)

    def use_keys(self, store: KeyStore) -> None:
        """A new key store (the keys database changed): swapped in whole; revoked keys' buckets go."""
        old = self.runtime
        self.runtime = old._replace(keys=store)
        for name in old.keys.names() - store.names():
            self.limiter.forget(name)

    def _join_cluster(self, config) -> None:
        from proxy.cluster.link import ClusterLink
        from proxy.limits.redis_buckets import RedisRateLimiter
        from proxy.routing.redis_homes import RedisHomes
        from proxy.routing.redis_prefixes import SharedPrefixes

        self.cluster = ClusterLink(config)
        self.limiter = RedisRateLimiter(self.cluster, self.limiter)  # this host's limiter: the fallback
        self.limit_divisor = 1
        self.homes = RedisHomes(self.cluster, self.homes, ttl_s=config.homes_ttl_s)
        self.prefixes = SharedPrefixes(self.cluster)

    async def run_cluster(self, services: trio.Nursery) -> None:
        """Start the cluster's service tasks (the Redis link's prober, settles, homes) in `services`."""
        if self.cluster is None:
            return
        await services.start(self.cluster.run)
        services.start_soon(self.limiter.run)
        services.start_soon(self.homes.run)
        services.start_soon(self.prefixes.run)
        self.metrics.register_stats_source("cluster", self.cluster.statistics)

    @property
    def draining(self) -> bool:
        return self.server is not None and self.server.draining

    def start_wakers(self) -> list:
        """Create (and, once serving, start) a waker for every tier with `[tiers.wake]` lacking one."""
        from ops.waker import Waker

        if self.cluster is not None:
            from proxy.cluster.lease import RedisTierLink
        created = []
        for tier in self.runtime.router.tiers.values():
            cfg = tier.config
            if cfg.wake is None or tier.waker is not None:
                continue
            tier.waker = Waker(cfg.name, cfg.wake, list(cfg.upstreams), list(cfg.models),
                               upstream_api_key=cfg.upstream_api_key, on_wake_ready=self.metrics.wake_ready,
                               link=None if self.cluster is None else RedisTierLink(self.cluster, cfg.name))
            created.append(tier.waker)
            if self.services is not None:
                self.services.start_soon(self.run_waker, tier.waker)
        return created

    async def run_waker(self, waker, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Run `waker` (describing its instances first) until `stop_waker` or the services end."""
        with trio.CancelScope() as scope:
            self._waker_scopes[waker] = scope
            try:
                await waker.run(task_status=task_status)
            finally:
                self._waker_scopes.pop(waker, None)

    def running_wakers(self) -> list:
        """The wakers whose control loop is running now."""
        return list(self._waker_scopes)

    def stop_waker(self, waker) -> None:
        """Stop a waker no tier uses any more (a reload changed or removed its `[tiers.wake]`): one
        controller per tier, never two -- the old one would act on instances the new one controls."""
        scope = self._waker_scopes.get(waker)
        if scope is not None:
            scope.cancel()

    def waker_statistics(self) -> dict:
        return {name: t.waker.statistics() for name, t in self.runtime.router.tiers.items() if t.waker is not None}

    def close_idle_connections(self) -> None:
        from proxy.accept.downstream import IDLE

        for ds in list(self.connections):
            if ds.phase is IDLE and ds.scope is not None:
                ds.scope.cancel()

    # -- request path hooks ---------------------------------------------------------------------
    async def dispatch(self, ds, request) -> None:
        await dispatch(self, ds, request)

    def request_finished(self, ex) -> None:
        """The record of a finished request: limits settled, metrics, recent traffic, usage row,
        access line."""
        settle(self, ex)
        ttfb_ms = ex.ttfb_ms()
        tier = ex.tier or "-"
        model = ex.model if ex.tier is not None else "-"  # only configured names become labels
        self.metrics.request_done(ex.status, model, tier, ex.endpoint, ex.gateway_ms() / 1000.0,
                                  None if ttfb_ms is None else ttfb_ms / 1000.0, ex.prompt_tokens,
                                  ex.completion_tokens)
        self.recent.record(ex)
        if self.usage is not None:
            row = usage_row(ex)
            if row is not None:
                self.usage.record(row)
        logs.access(access_fields(ex))

    def connection_opened(self, ds) -> None:
        self.open_connections += 1
        self.connections.add(ds)
        self.metrics.connection_opened()

    def connection_closed(self, ds) -> None:
        self.open_connections -= 1
        self.connections.discard(ds)
        self.metrics.connection_closed()
