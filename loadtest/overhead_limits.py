"""`spotinference bench overhead --limits`: what a rate-limited key costs, buckets in the mmap table vs Redis.

Strategy: after the main cells, start one redis-server (a free loopback port, `--save "" --appendonly
no`, no persistence) and two `spotinference serve --workers 2` gateways in front of the same 20 ms
"chat" sim, identical but for where a key's buckets live: "gateway-table" has no [cluster] (the workers
share the mmap'd table, proxy/limits/shared_table.py) and "gateway-redis" has `[cluster] redis_url`
(one Lua EVALSHA round trip per request before it goes upstream, the settle batched after it;
proxy/limits/redis_buckets.py). Both read one keys file with
one LIMITED key (rpm 1,000,000,000, tpm 1,000,000,000,000: charged on every request, never refused),
made with `spotinference keys add` like an operator does -- loadtest/ imports nothing from proxy/.
Every request of the cells carries that key (direct and the sim ignore it). Measuring starts only once
both workers of each gateway logged `gateway_listening` and an untimed warm-up went through each (first
requests are start-up: keys lookup, table slot, SCRIPT LOAD, upstream pool). Cells (chat c=1, c=16,
open 500/s) interleave direct / gateway-table / gateway-redis in rotating slices like run_cell (same
warm-up, same order, GC paused in slices, the same run_slice), and additionally read redis-server's
own CPU (all its threads, /proc schedstat) around EVERY slice: what it spent during gateway-redis's
slices is its cost for those requests; what it spent during the other targets' slices is its idle
housekeeping, reported as ms/s and subtracted for a net figure. Rows are of kind "limits", rendered in
their own small table after the main one (`limits_table_rows`). No redis-server installed: a note says
so and the cells are skipped. Every process is stopped through the caller's ExitStack; waits are
bounded.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import trio

from loadtest import procs
from loadtest.overhead_cells import Interrupted, Plan
from loadtest.overhead_load import Shape, Stat, Target, added, requests_for, run_cell, run_slice
from loadtest.overhead_rig import ProcessDied, Rig

KEY_NAME = "bench-limited"
KEY_RPM = 1_000_000_000  # charged on every request, never reached
KEY_TPM = 1_000_000_000_000
WORKERS = 2
SIDES = ("gateway-table", "gateway-redis")
REDIS_START_S = 10.0
WARMUP_S = 0.3  # untimed load through each gateway before the cells
KEYS_ADD_TIMEOUT_S = 60.0
INSTALL_HINT = "apt-get install redis-server"

CELLS = (
    ("limits_chat_c1", "chat c=1", Shape("chat", concurrency=1)),
    ("limits_chat_c16", "chat c=16", Shape("chat", concurrency=16)),
    ("limits_chat_open500", "chat open 500/s", Shape("chat", rate=500.0)),
)

COLUMNS = ("limited key", "direct P50/P95", "+table", "+redis", "redis-table", "table CPU us",
           "redis gw CPU us", "redis-table CPU us", "redis-server CPU us", "err")
LEGEND = (
    "Limited key (rpm 1e9, tpm 1e12: charged, never refused), two --workers 2 gateways, same 20 ms sim:\n"
    "+table = buckets in the workers' shared mmap table, +redis = buckets in Redis ([cluster] redis_url:\n"
    "an EVALSHA round trip per request, the settle batched after it). Latency in ms, P50/P95: direct\n"
    "absolute, +table/+redis ADDED over direct (same cell, interleaved slices), redis-table = their\n"
    "difference. CPU = microseconds per request of the gateway's own processes; redis-server CPU =\n"
    "redis-server's own, read around each gateway-redis slice, net of its idle housekeeping (measured\n"
    "during the other targets' slices; gross in the JSON).")


@dataclass
class LimitsRig:
    """The redis-server, the two limited-key gateways and the targets of the limits cells."""

    rig: Rig
    redis: procs.Proc | None = None
    gateways: dict[str, procs.Proc] = field(default_factory=dict)
    targets: list[Target] = field(default_factory=list)  # direct, gateway-table, gateway-redis
    secret: str = ""
    info: dict = field(default_factory=dict)

    def check_alive(self) -> None:
        """Raise ProcessDied naming the first process of these cells (the chat sim included) that exited."""
        for proc in [self.rig.sims["chat"], *([self.redis] if self.redis else []), *self.gateways.values()]:
            if proc.popen.poll() is not None:
                raise ProcessDied(f"{proc.name} exited with {proc.popen.returncode} mid-run; log tail:\n"
                                  f"{proc.log_tail()}")

    def close_pools(self) -> None:
        for t in self.targets:
            t.pool.close_all()


# --- the processes ------------------------------------------------------------------------------------


def redis_binary() -> str | None:
    """Path of redis-server, or None when it is not installed."""
    return shutil.which("redis-server") or next(
        (p for p in ("/usr/bin/redis-server", "/usr/local/bin/redis-server") if os.access(p, os.X_OK)), None)


def _redis_version(binary: str) -> str | None:
    try:
        out = subprocess.run([binary, "--version"], check=False, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return next((w[2:] for w in out.stdout.split() if w.startswith("v=")), None)


def _pong(proc: procs.Proc, port: int, timeout_s: float) -> bool:
    """Wait (bounded) until redis-server on `port` answers PING; False if it exited or stayed silent."""
    deadline = time.monotonic() + timeout_s
    while proc.popen.poll() is None and time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
                s.settimeout(0.5)
                s.sendall(b"PING\r\n")
                if s.recv(64).startswith(b"+PONG"):
                    return True
        except OSError:
            pass
        time.sleep(0.02)
    return False


def start_redis(binary: str, workdir: Path, stack: ExitStack) -> procs.Proc:
    """redis-server on a free loopback port, no persistence; three tries in case the port was taken."""
    last = ""
    for attempt in range(3):
        port = procs.free_port()
        proc = procs.launch("redis" if attempt == 0 else f"redis-{attempt}",
                            [binary, "--bind", "127.0.0.1", "--port", str(port), "--save", "",
                             "--appendonly", "no", "--dir", str(workdir)], workdir)
        stack.callback(proc.stop)
        if _pong(proc, port, REDIS_START_S):
            proc.ports = [port]
            proc.url = f"redis://127.0.0.1:{port}/0"
            return proc
        last = proc.log_tail()
        proc.stop()
    raise procs.StartError(f"redis-server did not start:\n{last}")


def add_key(keys_file: Path) -> str:
    """`spotinference keys add` the limited key to `keys_file`; returns its secret."""
    argv = [*procs.spotinference_cmd(), "keys", "add", KEY_NAME, "--keys-file", str(keys_file),
            "--rpm", str(KEY_RPM), "--tpm", str(KEY_TPM)]
    try:
        out = subprocess.run(argv, check=False, capture_output=True, text=True, timeout=KEYS_ADD_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise procs.StartError(f"`keys add` took over {KEYS_ADD_TIMEOUT_S:.0f}s") from None
    secret = out.stdout.strip()
    if out.returncode != 0 or not secret:
        raise procs.StartError(f"`keys add` exited with {out.returncode}:\n{out.stderr[-2000:]}")
    return secret


def gateway_config(upstream: str, keys_file: Path, redis_url: str | None) -> str:
    """procs.gateway_config plus the keys file and, for gateway-redis, [cluster] redis_url."""
    text = procs.gateway_config([upstream]) + f"\n[auth]\nkeys_file = {json.dumps(str(keys_file))}\n"
    if redis_url:
        text += f"\n[cluster]\nredis_url = {json.dumps(redis_url)}\n"
    return text


def wait_workers(proc: procs.Proc, n: int, timeout_s: float = 30.0) -> None:
    """Wait (bounded) until `n` workers logged `gateway_listening`: the supervisor says `listening on`
    before its workers have even imported, and their start-up CPU must not land in the first cell."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if proc.log_path.read_bytes().count(b'"event":"gateway_listening"') >= n:
                return
        except OSError:
            pass
        if proc.popen.poll() is not None:
            raise procs.StartError(f"{proc.name} exited with {proc.popen.returncode}:\n{proc.log_tail()}")
        if time.monotonic() > deadline:
            raise procs.StartError(f"{proc.name}: {n} workers not listening after {timeout_s:.0f}s:\n"
                                   f"{proc.log_tail()}")
        time.sleep(0.05)


def start_limits(rig: Rig, workdir: Path, stack: ExitStack) -> LimitsRig | None:
    """Start redis-server, the keys file and both gateways; None (with a note on rig.notes) if skipped."""
    binary = redis_binary()
    if binary is None:
        rig.notes.append(f"limits: redis-server is not installed ({INSTALL_HINT}): "
                         "the limits cells are skipped")
        return None
    lrig = LimitsRig(rig)
    try:
        lrig.redis = start_redis(binary, workdir, stack)
        keys_file = workdir / "limits-keys.toml"
        keys_file.unlink(missing_ok=True)  # a kept --workdir: start from one key
        lrig.secret = add_key(keys_file)
        for side in SIDES:
            config = workdir / f"{side}.toml"
            config.write_text(gateway_config(rig.sims["chat"].url, keys_file,
                                             lrig.redis.url if side == "gateway-redis" else None))
            proc = procs.launch(side, procs.gateway_argv(config, WORKERS), workdir)
            stack.callback(proc.stop)
            lrig.gateways[side] = proc
        for proc in lrig.gateways.values():
            procs.wait_ready(proc)
            wait_workers(proc, WORKERS)
    except procs.StartError as exc:
        last = exc.args[0].strip().splitlines()
        rig.notes.append(f"limits: could not start the limits cells' processes, skipped ({last[-1][:160]})")
        for proc in [*lrig.gateways.values(), *([lrig.redis] if lrig.redis else [])]:
            proc.stop()
        return None
    lrig.targets = [Target("direct", rig.sims["chat"].ports[0]),
                    *(Target(side, gw.ports[0], gw.pids()) for side, gw in lrig.gateways.items())]
    lrig.info = {"workers": WORKERS, "key": {"name": KEY_NAME, "rpm": KEY_RPM, "tpm": KEY_TPM},
                 "redis_version": _redis_version(binary), "redis_pid": lrig.redis.pid,
                 "redis_cpu": "redis-server's /proc schedstat (all threads) read around every slice"}
    return lrig


# --- the cells ----------------------------------------------------------------------------------------


@dataclass
class RedisCpu:
    """redis-server's CPU over one cell: during gateway-redis's slices (busy) and the others' (idle)."""

    busy_s: float = 0.0
    busy_wall_s: float = 0.0
    idle_s: float = 0.0
    idle_wall_s: float = 0.0


async def interleaved(targets: list[Target], shape: Shape, requests: dict[str, bytes], rounds: int,
                      slice_s: float, redis_pid: int) -> tuple[dict[str, Stat], RedisCpu]:
    """run_cell's interleaving, with redis-server's CPU read around every slice."""
    redis = RedisCpu()

    def around(t: Target):
        cpu0, t0 = procs.cpu_seconds([redis_pid]), trio.current_time()

        def after() -> None:
            cpu, wall = procs.cpu_seconds([redis_pid]) - cpu0, trio.current_time() - t0
            if t.name == "gateway-redis":
                redis.busy_s, redis.busy_wall_s = redis.busy_s + cpu, redis.busy_wall_s + wall
            else:
                redis.idle_s, redis.idle_wall_s = redis.idle_s + cpu, redis.idle_wall_s + wall

        return after

    stats = await run_cell(targets, shape, requests, rounds, slice_s, around)
    return stats, redis


def _diff(a: float | None, b: float | None, nd: int = 4) -> float | None:
    return None if a is None or b is None else round(a - b, nd)


def limits_row(row_id: str, label: str, shape: Shape, stats: dict[str, Stat], redis: RedisCpu) -> dict:
    targets = {name: s.summary() for name, s in stats.items()}
    direct = targets["direct"]["latency_ms"]
    add = {side: added(targets[side]["latency_ms"], direct) for side in SIDES if side in targets}
    cpu = {side: (targets.get(side) or {}).get("cpu_us_per_req") for side in SIDES}
    table, red = add.get("gateway-table") or {}, add.get("gateway-redis") or {}
    n = stats["gateway-redis"].ok if "gateway-redis" in stats else 0
    idle_rate = redis.idle_s / redis.idle_wall_s if redis.idle_wall_s else 0.0
    net_s = redis.busy_s - idle_rate * redis.busy_wall_s
    server = {
        "n": n, "cpu_s": round(redis.busy_s, 4), "wall_s": round(redis.busy_wall_s, 3),
        "cpu_us_per_req": round(redis.busy_s / n * 1e6, 1) if n else None,
        "idle_ms_per_s": round(idle_rate * 1e3, 3),
        "net_cpu_us_per_req": round(net_s / n * 1e6, 1) if n else None,
    }
    return {
        "id": row_id, "label": label, "kind": "limits", "metric": "latency_ms",
        "shape": shape.__dict__.copy(), "targets": targets, "added": add,
        "redis_minus_table": {"p50": _diff(red.get("p50"), table.get("p50")),
                              "p95": _diff(red.get("p95"), table.get("p95")),
                              "cpu_us_per_req": _diff(cpu["gateway-redis"], cpu["gateway-table"], 1)},
        "redis_server": server, "budget": None,
        "errors": sum(s.errors for s in stats.values()), "note": "",
    }


async def _cells(lrig: LimitsRig, rounds: int, slice_s: float, log) -> list[dict]:
    rows = []
    # Untimed warm-up through each gateway: both workers' first requests (the keys lookup, the table's
    # slot, Redis's SCRIPT LOAD, the upstream pool) are start-up, not the steady state being compared.
    shape = Shape("chat", concurrency=16)
    requests = requests_for(lrig.targets, shape, lrig.secret)
    for t in lrig.targets[1:]:
        await run_slice(t, shape, requests[t.name], Stat(), WARMUP_S)
    for row_id, label, shape in CELLS:
        lrig.rig.check_alive()
        lrig.check_alive()
        log(f"  {label}")
        requests = requests_for(lrig.targets, shape, lrig.secret)
        stats, redis = await interleaved(lrig.targets, shape, requests, rounds, slice_s, lrig.redis.pid)
        rows.append(limits_row(row_id, label, shape, stats, redis))
    lrig.check_alive()
    return rows


async def _measure(lrig: LimitsRig, rounds: int, slice_s: float, log) -> list[dict] | None:
    """The cells, cancelled cleanly on SIGTERM/SIGHUP (then None); pools closed inside trio."""
    rows = None
    died: ProcessDied | None = None
    try:
        async with trio.open_nursery() as nursery:

            async def watch_signals() -> None:
                with trio.open_signal_receiver(signal.SIGTERM, signal.SIGHUP) as signals:
                    async for _ in signals:
                        nursery.cancel_scope.cancel()
                        return

            nursery.start_soon(watch_signals)
            try:
                rows = await _cells(lrig, rounds, slice_s, log)
            except ProcessDied as exc:  # re-raised below, not wrapped in the nursery's ExceptionGroup
                died = exc
            nursery.cancel_scope.cancel()
    finally:
        lrig.close_pools()
    if died is not None:
        raise died
    return rows


def run_limits(rig: Rig, plan: Plan, workdir: Path, stack: ExitStack, log) -> tuple[list[dict], dict | None]:
    """Start the limits cells' processes, run the cells; (rows, info for the metadata).

    Raises ProcessDied, or Interrupted on SIGTERM/SIGHUP."""
    log(f"limits: a limited key through two --workers {WORKERS} gateways, mmap table vs Redis")
    lrig = start_limits(rig, workdir, stack)
    if lrig is None:
        return [], None
    rows = trio.run(_measure, lrig, plan.rounds(plan.slice_s), plan.slice_s, log)
    if rows is None:
        raise Interrupted
    return rows, lrig.info


# --- the table ------------------------------------------------------------------------------------------


def _pair(d: dict | None) -> str:
    if not d or d.get("p50") is None or d.get("p95") is None:
        return "-"
    return f"{d['p50']:.2f}/{d['p95']:.2f}"


def _num(v: float | None, fmt: str = ".1f") -> str:
    return "-" if v is None else format(v, fmt)


def limits_table_rows(rows: list[dict]) -> list[list[str]]:
    """The limits rows as text cells, in COLUMNS order (the terminal, --markdown and docs alike)."""
    out = []
    for row in rows:
        t, add, diff = row["targets"], row["added"], row["redis_minus_table"]
        out.append([
            row["label"], _pair(t["direct"]["latency_ms"]), _pair(add.get("gateway-table")),
            _pair(add.get("gateway-redis")), _pair(diff),
            _num((t.get("gateway-table") or {}).get("cpu_us_per_req")),
            _num((t.get("gateway-redis") or {}).get("cpu_us_per_req")),
            _num(diff.get("cpu_us_per_req")), _num(row["redis_server"]["net_cpu_us_per_req"]),
            str(row["errors"]),
        ])
    return out


def limits_footer(rows: list[dict]) -> list[str]:
    """One line per row: redis-server's gross CPU and idle rate (what the net column was made from)."""
    return [f"{r['label']}: redis-server {r['redis_server']['cpu_us_per_req'] or 0:.1f} us/req gross, "
            f"idle housekeeping {r['redis_server']['idle_ms_per_s']:.2f} ms/s" for r in rows]
