"""One gateway's serving life inside a trio run: its background services, then the listener.

Strategy: the services (usage writer, metrics refresher, log flusher, the vanished-client sweeper,
one waker per sleeping tier) live in an outer nursery that outlives the connections, so when the
listener has drained, the usage log is flushed last (shielded) and nothing in flight is lost. Wakers
start before the first connection is accepted (each describes its instances first: restart-safe).
`run_gateway` reports the bound address through `task_status` and serves until cancelled or drained.
"""

from __future__ import annotations

import functools

import trio

from proxy.accept.listener import serve_tcp
from proxy.accept.vanished import run_sweeper
from proxy.config import Config
from proxy.gateway import Gateway, build_runtime
from proxy.observe import logs
from proxy.usage.log import UsageLog


async def run_gateway(config: Config, *, gateway: Gateway | None = None, sock=None, spill_path: str | None = None,
                      task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Serve the gateway for `config` until cancelled; `task_status.started((host, port))`.
    Pass `gateway` to keep a handle on it (tests, the supervisor's workers)."""
    gw = gateway or Gateway(build_runtime(config))
    runtime = gw.runtime
    try:
        async with trio.open_nursery() as services:
            if config.usage.path and gw.usage is None:
                u = config.usage
                gw.usage = UsageLog(u.path, queue_max=u.queue_max, batch_max=u.batch_max, flush_s=u.flush_s,
                                    spill_path=spill_path)
            if gw.usage is not None:
                await services.start(gw.usage.run)
                gw.metrics.register_stats_source("usage", gw.usage.statistics)
            services.start_soon(gw.metrics.run)
            services.start_soon(logs.run_flusher)
            services.start_soon(run_sweeper, gw.connections)
            for waker in gw.start_wakers():
                await services.start(waker.run)  # describes the instances first: restart-safe
            gw.services = services
            gw.metrics.register_stats_source("tier", gw.waker_statistics, label="tier")
            async with trio.open_nursery() as nursery:
                address = await nursery.start(functools.partial(serve_tcp, gw, config.server, sock=sock))
                logs.event("gateway_listening", host=address[0], port=address[1],
                           tiers=[t.name for t in config.tiers], auth=not runtime.keys.open)
                task_status.started(address)
            services.cancel_scope.cancel()  # connections are done: flush usage (shielded) and stop
    finally:
        gw.pool.close_all()
        logs.flush()
