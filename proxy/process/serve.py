"""One gateway process's life: serve, reload on SIGHUP, drain on SIGTERM/SIGINT, exit 0.

Strategy: the same code runs a single-process gateway (`spotinference serve`) and each worker under
the supervisor (worker.py).
- SIGTERM / SIGINT: `Server.drain()` -- stop accepting, close idle keep-alive connections, let
  requests and streams in flight finish up to `server.drain_s`; then the usage log flushes (it is
  cancelled last, shielded) and the process exits 0.
- SIGHUP: reload.py swaps in the re-read config and keys file (or keeps the old ones, logged).
"""

from __future__ import annotations

import gc
import signal

import trio

from proxy.config import Config
from proxy.gateway import Gateway, build_runtime
from proxy.observe import logs
from proxy.process.reload import reload
from proxy.process.services import run_gateway


async def serve_process(config: Config, config_path: str | None, *, sock=None, workers: int = 1,
                        spill_path: str | None = None, announce: bool = True, restarted: str | None = None,
                        task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Run the gateway until a stop signal has drained it; `restarted`: the worker slot this process
    replaces (counted in spotinference_worker_restarts_total)."""
    gw = Gateway(build_runtime(config), workers=workers)
    if restarted is not None:
        gw.metrics.worker_restarted(restarted)
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
