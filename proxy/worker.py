"""One gateway process's life: serve, reload on SIGHUP, drain on SIGTERM/SIGINT, exit 0.

Strategy: the same code runs a single-process gateway and each worker under the supervisor.
- SIGTERM / SIGINT: `Server.drain()` -- stop accepting, close idle keep-alive connections, let
  requests and streams in flight finish up to `server.drain_s`; then the usage log flushes (it is
  cancelled last, shielded) and the process exits 0.
- SIGHUP: re-read the config file and the keys file; build a new runtime record and swap it in whole,
  so new keys, revoked keys and tier changes apply to the next request while open connections carry
  on. A config that does not load is refused with a log line and the old one stays. Wakers of tiers
  whose wake settings did not change are carried over (a wake in progress is not restarted); new or
  changed ones are started. `listen` and `workers` changes need a restart (logged).
"""

from __future__ import annotations

import gc
import signal

import trio

from proxy import logs
from proxy.app import Gateway, build_runtime, run_gateway
from proxy.config import Config, ConfigError, load
from proxy.keys import KeysError


def reload(gw: Gateway, config_path: str | None) -> bool:
    """Swap in the config at `config_path` (and its keys file); False (old kept) if it is invalid."""
    if config_path is None:
        logs.event("reload_ignored", level="warning", reason="no config file (embedded default)")
        return False
    old = gw.runtime
    try:
        config = load(config_path)
        runtime = build_runtime(config, created=old.router.model_created)
    except (ConfigError, KeysError) as exc:
        logs.event("reload_rejected", level="error", error=str(exc))
        return False
    if config.server.listen != old.config.server.listen or config.server.workers != old.config.server.workers:
        logs.event("reload_partial", level="warning",
                   reason="server.listen and server.workers change only on restart")
    for name, tier in runtime.router.tiers.items():
        prev = old.router.tiers.get(name)
        if prev is not None and prev.waker is not None and prev.config.wake == tier.config.wake \
                and prev.urls == tier.urls:
            tier.waker = prev.waker
    gw.runtime = runtime
    gw.start_wakers()
    logs.event("reloaded", tiers=list(runtime.router.tiers), keys=len(runtime.keys))
    return True


async def serve_process(config: Config, config_path: str | None, *, sock=None, workers: int = 1,
                        spill_path: str | None = None, announce: bool = True,
                        task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Run the gateway until a stop signal has drained it."""
    gw = Gateway(build_runtime(config), workers=workers)
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async with trio.open_nursery() as nursery:
            host, port = await nursery.start(lambda task_status: run_gateway(
                config, gateway=gw, sock=sock, spill_path=spill_path, task_status=task_status))
            # Start-up objects are permanent: keep the cyclic GC off them, and run it less often --
            # request objects die by reference counting, so frequent young collections are wasted work.
            gc.collect()
            gc.freeze()
            gc.set_threshold(20_000, 50, 100)
            if announce:
                print(f"spotinference listening on http://{host}:{port}", flush=True)
            task_status.started((host, port))
            async for signum in signals:
                if signum == signal.SIGHUP:
                    reload(gw, config_path)
                    continue
                logs.event("draining", signal=signal.Signals(signum).name, open_connections=gw.open_connections,
                           drain_s=config.server.drain_s)
                gw.server.drain()
                break
    logs.event("stopped")
