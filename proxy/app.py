"""The gateway object: the runtime record (config, keys, router) and the services around requests.

Strategy: everything a request needs hangs off one `Gateway` (no eight-argument constructors threaded
through layers). The swappable part -- config, keys, router -- lives in one immutable `Runtime`
record replaced whole on reload, so a request sees one consistent view. Long-lived services
(upstream pool, usage log, metrics, rate limiter, wakers) outlive reloads.
`run_gateway()` is the entry point: binds, starts the background services, reports the bound address
through `task_status`, and serves until cancelled.
"""

from __future__ import annotations

import functools
import os
import time
from typing import NamedTuple

import trio

from proxy import errors, logs
from proxy.config import Config
from proxy.connection import run_sweeper
from proxy.handlers import dispatch
from proxy.keys import KeysError, KeyStore
from proxy.ratelimit_shared import open_limiter
from proxy.tiers import Router
from proxy.upstream.pool import Pool
from proxy.usage import UsageLog, UsageRow
from proxy.usage_tap import BodyTail, SseUsageTap, inject_include_usage


class Runtime(NamedTuple):
    config: Config
    keys: KeyStore
    router: Router


def build_runtime(config: Config, *, created: int | None = None) -> Runtime:
    """Load the keys file (if any) and build the router; raises ConfigError/KeysError."""
    if config.auth.keys_file:
        if not os.path.exists(config.auth.keys_file):
            raise KeysError(f"keys file {config.auth.keys_file} does not exist "
                            "(create it with `spotinference keys add NAME --keys-file FILE`)")
        keys = KeyStore.from_file(config.auth.keys_file)
    else:
        keys = KeyStore(None, open=True)
    return Runtime(config, keys, Router(config, created if created is not None else int(time.time())))


class Gateway:
    def __init__(self, runtime: Runtime, *, workers: int = 1) -> None:
        from proxy.metrics import Metrics

        self.runtime = runtime
        up = runtime.config.upstream
        self.pool = Pool(max_idle_per_host=up.max_idle_per_host, idle_keepalive_s=up.idle_keepalive_s)
        self.metrics = Metrics()
        self.workers = max(1, workers)
        # Under the supervisor: one shared bucket table, exact limits (divisor 1); see ratelimit_shared.
        self.limiter, self.limit_divisor = open_limiter(self.workers, time.monotonic)
        self.usage = None  # UsageLog, started by run_gateway when [usage] path is set
        self.open_connections = 0
        self.connections: set = set()  # open Downstream objects (a drain closes the idle ones)
        self.server = None  # proxy.server.Server, set when serving
        self._services: trio.Nursery | None = None  # long-lived tasks: usage writer, metrics, wakers
        self.metrics.register_stats_source("upstream_pool", self.pool.statistics)

    @property
    def draining(self) -> bool:
        return self.server is not None and self.server.draining

    def start_wakers(self) -> list:
        """Create (and, once serving, start) a waker for every tier with `[tiers.wake]` lacking one."""
        from ops.waker import Waker

        created = []
        for tier in self.runtime.router.tiers.values():
            cfg = tier.config
            if cfg.wake is None or tier.waker is not None:
                continue
            tier.waker = Waker(cfg.name, cfg.wake, list(cfg.upstreams), list(cfg.models),
                               upstream_api_key=cfg.upstream_api_key)
            created.append(tier.waker)
            if self._services is not None:
                self._services.start_soon(tier.waker.run)
        return created

    def waker_statistics(self) -> dict:
        return {name: t.waker.statistics() for name, t in self.runtime.router.tiers.items() if t.waker is not None}

    def close_idle_connections(self) -> None:
        from proxy.connection import IDLE

        for ds in list(self.connections):
            if ds.phase is IDLE and ds.scope is not None:
                ds.scope.cancel()

    # -- request path hooks ---------------------------------------------------------------------
    async def dispatch(self, ds, request) -> None:
        await dispatch(self, ds, request)

    def admit(self, ex, key, view, body: bytes):
        """Rate limits and usage set-up: (extra response headers, body to send upstream, SSE tap).
        Raises ApiError 429 when the key is over its limits."""
        headers = ()
        if key is not None and (key.rpm is not None or key.tpm is not None):
            estimate = view.estimate_prompt_tokens(len(body)) + (view.max_output_tokens() or 0)
            w = self.limit_divisor
            adm = self.limiter.admit(key.name, None if key.rpm is None else key.rpm / w,
                                     None if key.tpm is None else key.tpm / w, estimate)
            if not adm.allowed:
                raise errors.rate_limited(adm.message(key.name), adm.retry_after_s, adm.headers)
            ex.charged_tokens = estimate if key.tpm is not None else 0
            headers = adm.headers
        tap = None
        if view.stream:
            if view.include_usage:
                tap = SseUsageTap(strip_usage_chunk=False)
            else:
                # vLLM reports token counts only when asked: ask, and hide the answer from the client.
                injected = inject_include_usage(body)
                if injected is not None:
                    body = injected
                tap = SseUsageTap(strip_usage_chunk=injected is not None)
        else:
            tap = BodyTail()
        return headers, body, tap

    def tap_finished(self, ex, tap) -> None:
        usage = tap.usage
        if usage is not None:
            ex.prompt_tokens = usage.prompt_tokens
            ex.completion_tokens = usage.completion_tokens
            ex.total_tokens = usage.total_tokens
        elif ex.stream and tap.events:
            ex.completion_tokens = tap.events  # roughly one event per token; flagged as estimated
            ex.estimated = True

    def upstream_failed(self, tier, url: str) -> None:
        """An upstream refused or reset before its first byte: tell the tier's waker (it takes the host
        out of rotation and re-probes it)."""
        logs.event("upstream_unreachable", level="warning", tier=tier.name, upstream=url)
        if tier.waker is not None:
            tier.waker.report_unreachable(url)

    def request_finished(self, ex) -> None:
        key_name = ex.key.name if ex.key is not None else None
        if ex.charged_tokens:
            self.limiter.reconcile(key_name, ex.charged_tokens, ex.total_tokens or 0)
        latency_ms = ex.latency_ms()
        ttfb_ms = ex.ttfb_ms()
        gateway_ms = ex.gateway_ms()
        if gateway_ms is not None and ex.wake_ms:
            gateway_ms = max(0.0, gateway_ms - ex.wake_ms)
        tier = ex.tier or "-"
        model = ex.model if ex.tier is not None else "-"  # only configured names become labels
        self.metrics.request_done(
            ex.status, model, tier, ex.endpoint,
            (gateway_ms if gateway_ms is not None else latency_ms) / 1000.0,
            None if ttfb_ms is None else ttfb_ms / 1000.0, ex.prompt_tokens, ex.completion_tokens,
        )
        rid = ex.request_id.decode("latin-1")
        if self.usage is not None and ex.endpoint in _BILLED:
            self.usage.record(UsageRow(
                ts=ex.ts, request_id=rid, key_name=key_name, model=ex.model, tier=ex.tier,
                endpoint=ex.endpoint, stream=ex.stream, status=ex.status, prompt_tokens=ex.prompt_tokens,
                completion_tokens=ex.completion_tokens, total_tokens=ex.total_tokens, estimated=ex.estimated,
                ttfb_ms=ttfb_ms, latency_ms=latency_ms, wake_ms=ex.wake_ms, upstream=ex.upstream,
                error_type=ex.error_type,
            ))
        logs.access({
            "ts": round(ex.ts, 3), "event": "access", "request_id": rid,
            "method": ex.method.decode("latin-1"), "endpoint": ex.endpoint, "key": key_name,
            "model": ex.model, "tier": ex.tier, "stream": ex.stream, "status": ex.status,
            "error": ex.error_type, "upstream": ex.upstream, "latency_ms": round(latency_ms, 3),
            "ttfb_ms": None if ttfb_ms is None else round(ttfb_ms, 3), "wake_ms": ex.wake_ms,
            "prompt_tokens": ex.prompt_tokens, "completion_tokens": ex.completion_tokens,
        })

    def connection_opened(self, ds) -> None:
        self.open_connections += 1
        self.connections.add(ds)
        self.metrics.connection_opened()

    def connection_closed(self, ds) -> None:
        self.open_connections -= 1
        self.connections.discard(ds)
        self.metrics.connection_closed()


_BILLED = frozenset(("chat", "completions", "embeddings"))


async def run_gateway(config: Config, *, gateway: Gateway | None = None, sock=None, spill_path: str | None = None,
                      task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Serve the gateway for `config` until cancelled; `task_status.started((host, port))`.
    Pass `gateway` to keep a handle on it (tests, the supervisor's workers)."""
    from proxy.server import serve_tcp

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
            gw._services = services
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
