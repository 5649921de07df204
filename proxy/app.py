"""The gateway object: the runtime record (config, keys, router) and the services around requests.

Strategy: everything a request needs hangs off one `Gateway` (no eight-argument constructors threaded
through layers). The swappable part -- config, keys, router -- lives in one immutable `Runtime`
record replaced whole on reload, so a request sees one consistent view. Long-lived services
(upstream pool, usage log, metrics, rate limiter, wakers) outlive reloads.
`run_gateway()` is the entry point: binds, starts the background services, reports the bound address
through `task_status`, and serves until cancelled.
"""

from __future__ import annotations

import time
from typing import NamedTuple

import trio

from proxy import logs
from proxy.config import Config
from proxy.keys import KeyStore
from proxy.tiers import Router
from proxy.upstream.pool import Pool


class Runtime(NamedTuple):
    config: Config
    keys: KeyStore
    router: Router


def build_runtime(config: Config, *, created: int | None = None) -> Runtime:
    """Load the keys file (if any) and build the router; raises ConfigError/KeysError."""
    if config.auth.keys_file:
        keys = KeyStore.from_file(config.auth.keys_file)
    else:
        keys = KeyStore(None, open=True)
    return Runtime(config, keys, Router(config, created if created is not None else int(time.time())))


class Gateway:
    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        up = runtime.config.upstream
        self.pool = Pool(max_idle_per_host=up.max_idle_per_host, idle_keepalive_s=up.idle_keepalive_s)
        self.open_connections = 0
        self.open_streams = 0
        self.requests_total = 0

    # -- request path hooks ---------------------------------------------------------------------
    async def dispatch(self, ds, request) -> None:
        from proxy.handlers import dispatch

        await dispatch(self, ds, request)

    def admit(self, ex, key, view, body: bytes):
        """Rate limits and usage accounting set-up: (extra response headers, body to send, SSE tap)."""
        return (), body, None

    def tap_finished(self, ex, tap) -> None:
        pass

    def upstream_failed(self, tier, address) -> None:
        logs.event("upstream_unreachable", level="warning", tier=tier.name, upstream=f"{address[0]}:{address[1]}")

    def request_finished(self, ex) -> None:
        self.requests_total += 1
        logs.access({
            "ts": round(ex.ts, 3), "event": "access", "request_id": ex.request_id.decode("latin-1"),
            "method": ex.method.decode("latin-1"), "endpoint": ex.endpoint, "key": ex.key_name,
            "model": ex.model, "tier": ex.tier, "stream": ex.stream, "status": ex.status,
            "error": ex.error_type, "upstream": ex.upstream, "latency_ms": round(ex.latency_ms(), 3),
            "ttfb_ms": None if ex.t_first_byte is None else round(ex.ttfb_ms(), 3),
            "prompt_tokens": ex.prompt_tokens, "completion_tokens": ex.completion_tokens,
        })

    def connection_opened(self) -> None:
        self.open_connections += 1

    def connection_closed(self) -> None:
        self.open_connections -= 1

    def render_metrics(self) -> tuple[bytes, bytes]:
        st = self.pool.statistics()
        lines = [
            f"spotinference_requests_total {self.requests_total}",
            f"spotinference_open_connections {self.open_connections}",
            f"spotinference_upstream_pool_idle {st.idle}",
            f"spotinference_upstream_pool_active {st.active}",
        ]
        return b"text/plain; version=0.0.4; charset=utf-8", ("\n".join(lines) + "\n").encode()


async def run_gateway(config: Config, *, gateway: Gateway | None = None,
                      task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Serve the gateway for `config` until cancelled; `task_status.started((host, port))`.
    Pass `gateway` to keep a handle on it (tests, the supervisor's workers)."""
    from proxy.server import serve_tcp

    gw = gateway or Gateway(build_runtime(config))
    runtime = gw.runtime
    try:
        async with trio.open_nursery() as nursery:
            address = await nursery.start(serve_tcp, gw, config.server)
            logs.event("gateway_listening", host=address[0], port=address[1],
                       tiers=[t.name for t in config.tiers], auth=not runtime.keys.open)
            task_status.started(address)
    finally:
        gw.pool.close_all()
