"""`--workers N`: a supervisor process with N gateway workers sharing one listening socket.

Strategy: the supervisor binds and listens ONCE, then starts N worker processes
(`python -m proxy _worker ...`) that inherit the socket and accept on it; the kernel's accept queue
belongs to the socket, so a killed worker loses no queued connection and the port keeps serving while
it is replaced. The supervisor itself serves nothing and imports no prometheus_client: it prepares the
multiprocess metrics directory before any worker starts (so one scrape covers all workers), imports
usage rows spilled by an earlier run, and then only watches:
- a worker that exits unexpectedly is replaced (with a short back-off if it keeps crashing) and its
  live metrics are marked dead;
- SIGHUP: the new config is validated here first; if it loads, every worker reloads itself; if not,
  a log line says why and nothing changes;
- SIGTERM/SIGINT: close our copy of the socket, forward the signal (each worker drains), wait up to
  drain_s plus a margin, SIGKILL stragglers, exit 0.
Rate limits: the supervisor creates the shared bucket table (proxy/limits/shared_table.py) before the
workers start, names it in their environment, and deletes it on exit; every key's limits are exact
across workers.
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


def _spawn(index: int, config_path: str, fd: int, workers: int, env: dict) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "proxy", "_worker", "--config", config_path, "--fd", str(fd),
         "--workers", str(workers), "--index", str(index)],
        pass_fds=(fd,), env=env,
    )


def run_supervisor(config: Config, config_path: str) -> int:
    from proxy.limits import shared_table
    from proxy.observe.metrics import prepare_multiproc_dir, worker_exited
    from proxy.usage.log import recover_spills

    host, port = parse_listen(config.server.listen)
    sock = bind_socket(host, port)
    sock.set_inheritable(True)
    host, port = sock.getsockname()[:2]
    n = config.server.workers
    metrics_dir = tempfile.mkdtemp(prefix="spotinference-metrics-")
    env = {**os.environ, **prepare_multiproc_dir(metrics_dir)}
    ratelimit_table = shared_table.create_table()
    env[shared_table.ENV] = ratelimit_table
    if config.usage.path:
        recovered = recover_spills(config.usage.path)
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

    workers = {i: _spawn(i, config_path, sock.fileno(), n, env) for i in range(n)}
    crashes: dict[int, list[float]] = {i: [] for i in range(n)}
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
        for i, proc in list(workers.items()):
            code = proc.poll()
            if code is None or stop["signal"] is not None:
                continue
            worker_exited(proc.pid, metrics_dir)
            now = time.monotonic()
            crashes[i] = [t for t in crashes[i] if now - t < 60] + [now]
            delay = min(10.0, 0.5 * (2 ** max(0, len(crashes[i]) - 3))) if len(crashes[i]) > 2 else 0.0
            logs.event("worker_exited", level="error", index=i, pid=proc.pid, code=code, restart_in_s=delay)
            if delay:
                time.sleep(delay)
            workers[i] = _spawn(i, config_path, sock.fileno(), n, env)

    sig = stop["signal"]
    sock.close()  # the workers hold the only copies now: once they drain, the port refuses
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
    shutil.rmtree(metrics_dir, ignore_errors=True)
    for i, pid, code in failed:
        logs.event("worker_failed_on_stop", level="error", index=i, pid=pid, code=code)
    logs.event("supervisor_stopped", clean=not failed)
    return 1 if failed else 0
