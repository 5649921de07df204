"""`--workers N`: a supervisor process with N gateway workers sharing one listening socket.

Strategy: the supervisor binds and listens ONCE, then starts N worker processes
(`python -m proxy _worker ...`) that inherit the socket and accept on it; the kernel's accept queue
belongs to the socket, so a killed worker loses no queued connection and the port keeps serving while
it is replaced. The supervisor itself serves nothing and imports no prometheus_client: it prepares the
multiprocess metrics directory before any worker starts (so one scrape covers all workers), imports
usage rows spilled by an earlier run, and then only watches:
- a worker that exits unexpectedly is replaced and its live metrics are marked dead; a crash loop
  backs off (restarts.py) without ever leaving the port with no worker; replacements count themselves
  in `spotinference_worker_restarts_total`;
- SIGHUP: the new config is validated here first; if it loads, every worker reloads itself; if not,
  a log line says why and nothing changes;
- SIGTERM/SIGINT: close our copy of the socket, forward the signal (each worker drains), wait up to
  drain_s plus a margin, SIGKILL stragglers, exit 0.
Rate limits: the supervisor creates the shared bucket table (proxy/limits/shared_table.py) before the
workers start, names it in their environment, and deletes it on exit; every key's limits are exact
across workers. The stored-responses table (proxy/routing/shared_homes.py) is made and removed the
same way, so a retrieve finds its response's upstream whichever worker takes it.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from proxy.accept.listener import bind_socket
from proxy.admit.keys import KeysError
from proxy.config import Config, ConfigError, load, parse_listen
from proxy.observe import logs
from proxy.process.restarts import RestartPolicy


def _spawn(index: int, config_path: str, fd: int, workers: int, env: dict,
           restarted: bool = False) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "proxy", "_worker", "--config", config_path, "--fd", str(fd),
         "--workers", str(workers), "--index", str(index), *(["--restarted"] if restarted else [])],
        pass_fds=(fd,), env=env,
    )


def run_supervisor(config: Config, config_path: str, sock=None) -> int:
    """Serve with `config.server.workers` workers on `sock` (bound here from `listen` when None)."""
    from proxy.limits import shared_table
    from proxy.observe.metrics import prepare_multiproc_dir, worker_exited
    from proxy.routing import shared_homes
    from proxy.usage.log import recover_usage_spills

    if sock is None:
        host, port = parse_listen(config.server.listen)
        sock = bind_socket(host, port)
    sock.set_inheritable(True)
    host, port = sock.getsockname()[:2]
    n = config.server.workers
    metrics_dir = tempfile.mkdtemp(prefix="spotinference-metrics-")
    env = {**os.environ, **prepare_multiproc_dir(metrics_dir)}
    ratelimit_table = shared_table.create_table()
    env[shared_table.ENV] = ratelimit_table
    homes_table = shared_homes.create_homes_table()
    env[shared_homes.ENV] = homes_table
    recovered = recover_usage_spills(config.usage)
    if recovered:
        logs.event("usage_spill_recovered", rows=recovered)

    stop = {"signal": None}
    hup = {"pending": False}

    def on_stop(signum, _frame):
        stop["signal"] = signum

    def on_hup(_signum, _frame):
        hup["pending"] = True

    signal.signal(signal.SIGTERM, on_stop)
    signal.signal(signal.SIGINT, on_stop)
    signal.signal(signal.SIGHUP, on_hup)

    workers: dict[int, subprocess.Popen | None] = {i: _spawn(i, config_path, sock.fileno(), n, env)
                                                   for i in range(n)}
    policy = RestartPolicy()
    print(f"spotinference listening on http://{host}:{port}", flush=True)
    logs.event("supervisor_started", workers=n, pids=[p.pid for p in workers.values()], port=port)

    while stop["signal"] is None:
        time.sleep(0.1)
        if hup["pending"]:
            hup["pending"] = False
            try:
                load(config_path)
            except (ConfigError, KeysError) as exc:
                logs.event("reload_rejected", level="error", error=str(exc))
            else:
                for proc in workers.values():
                    if proc.poll() is None:
                        proc.send_signal(signal.SIGHUP)
        if stop["signal"] is not None:
            break
        now = time.monotonic()
        for i, proc in list(workers.items()):
            if proc is None or (code := proc.poll()) is None:
                continue
            worker_exited(proc.pid, metrics_dir)
            workers[i] = None
            delay = policy.exited(i, now)
            logs.event("worker_exited", level="error", index=i, pid=proc.pid, code=code, restart_in_s=delay)
        running = sum(1 for p in workers.values() if p is not None)
        for i in policy.due(now, running):
            workers[i] = _spawn(i, config_path, sock.fileno(), n, env, restarted=True)
            logs.event("worker_restarted", index=i, pid=workers[i].pid, restarts=policy.restarts)

    sig = stop["signal"]
    sock.close()  # the workers hold the only copies now: once they drain, the port refuses
    workers = {i: p for i, p in workers.items() if p is not None}  # slots waiting for a restart stay empty
    for proc in workers.values():
        if proc.poll() is None:
            proc.send_signal(sig)
    deadline = time.monotonic() + config.server.drain_s + 10.0
    failed = []
    for i, proc in workers.items():
        try:
            code = proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            code = proc.wait()
            logs.event("worker_killed", level="error", index=i, pid=proc.pid, reason="drain took too long")
        if code != 0:
            failed.append((i, proc.pid, code))
    os.unlink(ratelimit_table)
    os.unlink(homes_table)
    shutil.rmtree(metrics_dir, ignore_errors=True)
    for i, pid, code in failed:
        logs.event("worker_failed_on_stop", level="error", index=i, pid=pid, code=code)
    logs.event("supervisor_stopped", clean=not failed)
    return 1 if failed else 0
