"""One gateway's serving life inside a trio run: its background services, then the listener.

Strategy: the services (usage writer, metrics refresher, log flusher, the vanished-client sweeper,
one waker per sleeping tier, the cluster's Redis link, the keys database's poller) live in an outer
nursery that outlives the connections, so when the listener has drained, the usage log is flushed last (shielded) and nothing in flight is lost. Wakers
start before the first connection is accepted (each describes its instances first: restart-safe).
`run_gateway` reports the bound address through `task_status` and serves until cancelled or drained.
Active health (backends/health.py): one `HealthBook` per worker, attached to every tier (and handed to
every waker, which probes its own hosts into it) before the first connection; the prober probes the
upstreams of the tiers without a waker every `upstream.health_interval_s`. A reload's new router (and
its new wakers) are attached when the prober next asks for its targets, within one interval. The
interval, timeout and thresholds are read at start.
"""

from __future__ import annotations

import functools

import trio

from backends.health import HealthBook, run_prober
from proxy.accept.listener import serve_tcp
from proxy.accept.vanished import run_sweeper
from proxy.config import Config
from proxy.gateway import Gateway, build_runtime
from proxy.observe import logs
from proxy.usage.gpu_time import GpuTimeRecorder
from proxy.usage.log import open_usage_log


async def run_gateway(config: Config, *, gateway: Gateway | None = None, sock=None, spill_path: str | None = None,
                      task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Serve the gateway for `config` until cancelled; `task_status.started((host, port))`.
    Pass `gateway` to keep a handle on it (tests, the supervisor's workers)."""
    gw = gateway or Gateway(build_runtime(config))
    runtime = gw.runtime
    try:
        async with trio.open_nursery() as services:
            if gw.usage is None:
                gw.usage = open_usage_log(config.usage, spill_path=spill_path)
            if gw.usage is not None:
                await services.start(gw.usage.run)
                gw.metrics.register_stats_source("usage", gw.usage.statistics)
            await gw.run_cluster(services)  # [cluster]: the Redis link first (limits, leases, homes)
            if config.auth.database_url:  # keys in PostgreSQL: loaded before the first request, then polled
                from proxy.admit.keys_refresh import KeysRefresher

                refresher = KeysRefresher(config.auth.database_url, config.auth.refresh_s, gw.use_keys)
                gw.use_keys(await services.start(refresher.run))
                gw.metrics.register_stats_source("keys_db", refresher.statistics)
            services.start_soon(gw.metrics.run)
            services.start_soon(logs.run_flusher)
            services.start_soon(run_sweeper, gw.connections)
            up = config.upstream
            book = HealthBook(unhealthy_after=up.unhealthy_after, stall_s=up.stall_s)
            wakers = gw.start_wakers()
            targets = _health_targets(gw, book)
            targets()  # attach the book to the tiers and wakers before they serve
            for waker in wakers:
                await services.start(gw.run_waker, waker)  # describes the instances first: restart-safe
            await services.start(functools.partial(run_prober, book, targets, interval_s=up.health_interval_s,
                                                   timeout_s=up.health_timeout_s))
            services.start_soon(GpuTimeRecorder(gw).run)  # [tiers.cost]: GPU time per minute (usage/gpu_time)
            gw.services = services
            gw.metrics.register_stats_source("tier", gw.waker_statistics, label="tier")
            gw.metrics.register_stats_source("upstream_health", book.statistics, label="upstream")
            async with trio.open_nursery() as nursery:
                address = await nursery.start(functools.partial(serve_tcp, gw, config.server, sock=sock))
                logs.event("gateway_listening", host=address[0], port=address[1],
                           tiers=[t.name for t in config.tiers], auth=not runtime.keys.open)
                task_status.started(address)
            services.cancel_scope.cancel()  # connections are done: flush usage (shielded) and stop
    finally:
        gw.pool.close_all()
        logs.flush()


def attach_health(router, book: HealthBook) -> None:
    """Route every tier of `router` by `book`, and have every waker keep its hosts' records there."""
    for tier in router.tiers.values():
        tier.attach_health(book)
        use = getattr(tier.waker, "use_health", None)
        if use is not None:
            use(book)


def _health_targets(gw: Gateway, book: HealthBook):
    """The prober's targets: the upstreams of the tiers without a waker (a waker probes its own hosts),
    attaching the book to a router the first time it is seen (a reload)."""
    attached = [None]

    def targets() -> list[str]:
        router = gw.runtime.router
        if router is not attached[0]:
            attach_health(router, book)
            attached[0] = router
        return [url for tier in router.tiers.values() if tier.waker is None for url in tier.urls]

    return targets
