"""`spotinference bench overhead`: what the gateway adds, side by side with nginx, in one run.

Strategy: start simulated vLLM upstreams, gateways in front of them, and one nginx (when installed)
in front of the same upstreams, all as separate processes (loadtest/procs.py); this process is the
load generator and does nothing else while it measures. It speaks HTTP/1.1 itself over raw trio
sockets with request bytes built once and keep-alive connections held in a pool per target, so the
client costs a few microseconds per request and no HTTP library sits between the clock and the wire.

Rules that make the numbers mean something:
- Targets are INTERLEAVED: every cell (one load shape) is cut into short slices and the slices of
  direct / nginx / gateway alternate in a rotating order, so machine noise lands on all of them alike.
  "Added" latency is via-proxy minus direct, per percentile, from the same cell of the same run.
- Fixed offered loads are OPEN-LOOP: request i is due at t0 + i/rate and its latency is measured from
  that scheduled time, so a slow server cannot slow the arrivals (no coordinated omission). Closed
  loop (concurrency 1, 16, 64) and saturation use a fixed number of connections, each back to back.
- Realistic service times for latency (sim --latency-ms 20, streams at 100 tokens/s), a zero-latency
  upstream for saturation, as DESIGN.md "Performance budget" asks: added latency only means
  something below saturation.
- Streams: time to first byte is the arrival of the first complete SSE event; per-event added latency
  is the difference of the inter-event gap distributions (the sim's `created` has 1 s resolution).
- CPU per request / per relayed event comes from the proxy's own /proc accounting, read before and
  after each of its slices: steadier than wall time on a shared machine.
- Everything is bounded: per-request timeout, in-flight cap in open loop (excess counts as an error),
  slice deadlines; every process is stopped in `finally`. GC is paused inside slices.
`--quick` is the CI smoke mode: tiny cells, seconds, exit status 1 on any error.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import math
import os
import platform
import select
import signal
import socket
import subprocess
import sys
import tempfile
import time
from array import array
from contextlib import ExitStack
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import trio

from loadtest import procs

REQUEST_TIMEOUT_S = 30.0
CONNECT_TIMEOUT_S = 10.0
DRAIN_TIMEOUT_S = 60.0
STALE_CHECK_AFTER_S = 0.5
# uvicorn (vLLM, the sim) closes keep-alive connections idle for 5 s; reusing one at that moment
# races the close (EOF or RST instead of an answer), so like any sane client we retire them first.
MAX_IDLE_S = 4.0
OPEN_LOOP_MAX_INFLIGHT = 4000
CONN_ERROR_BACKOFF_S = 0.05
BIG_STREAMS_RAMP_S = 1.0  # spread of the starts in the 1,000-stream check (streams last ~2 s)

# --- raw HTTP/1.1 client -----------------------------------------------------------------------------


class HttpProtocolError(Exception):
    """The peer closed early or sent something this small client does not parse."""


_CLIENT_ERRORS = (OSError, HttpProtocolError, trio.TooSlowError, ValueError)


class Conn:
    """One keep-alive client connection. `exchange` sends pre-built bytes and reads one response."""

    __slots__ = ("buf", "idle_since", "keep", "sock")

    def __init__(self, sock: trio.socket.SocketType) -> None:
        self.sock = sock
        self.buf = b""
        self.idle_since = 0.0
        self.keep = True

    @classmethod
    async def open(cls, host: str, port: int) -> Conn:
        sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            with trio.fail_after(CONNECT_TIMEOUT_S):
                await sock.connect((host, port))
        except BaseException:
            sock.close()
            raise
        return cls(sock)

    def close(self) -> None:
        self.keep = False
        self.sock.close()

    def looks_stale(self) -> bool:
        """An idle keep-alive socket that is readable has been closed (or spoken to) by the server."""
        poller = select.poll()  # not select(): descriptors past 1024 while 10,000 connections are held
        poller.register(self.sock.fileno(), select.POLLIN)
        return bool(poller.poll(0))

    async def exchange(self, request: bytes, times: list[float] | None = None) -> int:
        """Send `request`, read the whole response; return its status.

        With `times` given, append the arrival time of every complete SSE event (a blank line), except
        the final `data: [DONE]`, as seen by the recv() that completed it.
        """
        sock = self.sock
        while request:
            request = request[await sock.send(request) :]
        recv = sock.recv
        buf = self.buf
        while (end := buf.find(b"\r\n\r\n")) < 0:
            data = await recv(65536)
            if not data:
                raise HttpProtocolError("connection closed before the response head")
            buf += data
        head = buf[:end].lower()
        buf = buf[end + 4 :]
        if not head.startswith(b"http/1."):
            raise HttpProtocolError("not an HTTP/1.x response")
        status = int(head[9:12])
        self.keep = head.startswith(b"http/1.1") and b"\r\nconnection: close" not in head
        feed = _EventClock(times) if times is not None else None
        if b"\r\ntransfer-encoding: chunked" in head:
            buf = await self._read_chunked(buf, feed)
        elif (i := head.find(b"\r\ncontent-length:")) >= 0:
            j = head.find(b"\r\n", i + 17)
            length = int(head[i + 17 : j if j >= 0 else len(head)])
            if feed is not None and buf:
                feed.feed(buf[:length], trio.current_time())
            while len(buf) < length:
                data = await recv(65536)
                if not data:
                    raise HttpProtocolError("connection closed inside the body")
                buf += data
                if feed is not None:
                    feed.feed(data[: max(0, length - (len(buf) - len(data)))], trio.current_time())
            buf = buf[length:]
        elif status in (204, 304) or 100 <= status < 200:
            pass
        else:  # delimited by close
            self.keep = False
            while data := await recv(65536):
                if feed is not None:
                    feed.feed(data, trio.current_time())
            buf = b""
        if feed is not None:
            feed.finish()
        self.buf = buf
        return status

    async def _read_chunked(self, buf: bytes, feed: _EventClock | None) -> bytes:
        recv = self.sock.recv
        while True:
            while (j := buf.find(b"\r\n")) < 0:
                data = await recv(65536)
                if not data:
                    raise HttpProtocolError("connection closed inside chunked body")
                buf += data
            size = int(buf[:j].split(b";", 1)[0], 16)
            buf = buf[j + 2 :]
            if size == 0:
                while True:  # trailers, then the empty line
                    while (j := buf.find(b"\r\n")) < 0:
                        data = await recv(65536)
                        if not data:
                            raise HttpProtocolError("connection closed in trailers")
                        buf += data
                    line, buf = buf[:j], buf[j + 2 :]
                    if not line:
                        return buf
            while len(buf) < size + 2:
                data = await recv(65536)
                if not data:
                    raise HttpProtocolError("connection closed inside a chunk")
                buf += data
            if feed is not None:
                feed.feed(buf[:size], trio.current_time())
            buf = buf[size + 2 :]


class _EventClock:
    """Timestamps SSE events (blank-line terminated) as body pieces arrive."""

    __slots__ = ("start", "tail", "times")

    def __init__(self, times: list[float]) -> None:
        self.times = times
        self.start = len(times)
        self.tail = b""  # the last bytes seen: one for a "\n\n" split across pieces, more for [DONE]

    def feed(self, piece: bytes, now: float) -> None:
        if not piece:
            return
        k = (self.tail[-1:] + piece).count(b"\n\n")
        if k:
            self.times.extend([now] * k)
        self.tail = (self.tail + piece)[-16:] if len(piece) < 16 else piece[-16:]

    def finish(self) -> None:
        if self.tail.endswith(b"[DONE]\n\n") and len(self.times) > self.start:
            self.times.pop()


class Pool:
    """Idle keep-alive connections to one target; opens new ones on demand."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.idle: list[Conn] = []
        self.opened = 0

    async def get(self) -> Conn:
        now = trio.current_time()
        while self.idle:
            conn = self.idle.pop()
            idle_s = now - conn.idle_since
            if idle_s < STALE_CHECK_AFTER_S or (idle_s < MAX_IDLE_S and not conn.looks_stale()):
                return conn
            conn.close()
        self.opened += 1
        return await Conn.open(self.host, self.port)

    def put(self, conn: Conn) -> None:
        if conn.keep:
            conn.idle_since = trio.current_time()
            self.idle.append(conn)
        else:
            conn.close()

    async def fill(self, n: int, parallel: int = 64) -> list[str]:
        """Pre-open connections until `n` are idle (so cells do not measure TCP handshakes).

        Returns the kinds of the connect errors met (empty when all opened)."""
        now = trio.current_time()
        keep = []
        for conn in self.idle:  # retire what the server closed or is about to close
            if now - conn.idle_since < MAX_IDLE_S and not conn.looks_stale():
                keep.append(conn)
            else:
                conn.close()
        self.idle = keep
        missing = n - len(self.idle)
        limiter = trio.CapacityLimiter(parallel)
        failures: list[str] = []

        async def one() -> None:
            async with limiter:
                try:
                    conn = await Conn.open(self.host, self.port)
                except (OSError, trio.TooSlowError) as exc:
                    failures.append(f"connect: {type(exc).__name__}")
                    return
                self.put(conn)

        async with trio.open_nursery() as nursery:
            for _ in range(max(0, missing)):
                nursery.start_soon(one)
        return failures

    def close_all(self) -> None:
        for conn in self.idle:
            conn.close()
        self.idle.clear()


# --- targets, samples, statistics -------------------------------------------------------------------


@dataclass
class Target:
    """One address to load: direct to a sim, or a proxy in front of it (with its pids for CPU)."""

    name: str
    port: int
    pids: list[int] = field(default_factory=list)
    host: str = "127.0.0.1"

    def __post_init__(self) -> None:
        self.pool = Pool(self.host, self.port)


@dataclass
class Stat:
    """What one target accumulated over all its slices of one cell."""

    lat: array = field(default_factory=lambda: array("d"))  # ms: request latency, or stream TTFB
    gaps: array = field(default_factory=lambda: array("d"))  # ms between consecutive SSE events
    ok: int = 0
    errors: int = 0
    error_kinds: dict[str, int] = field(default_factory=dict)  # "status 502", "TooSlowError", ...
    events: int = 0
    cpu_s: float = 0.0
    wall_s: float = 0.0

    def error(self, kind: str) -> None:
        self.errors += 1
        self.error_kinds[kind] = self.error_kinds.get(kind, 0) + 1

    def summary(self) -> dict:
        out = {"n": self.ok, "errors": self.errors, "error_kinds": self.error_kinds, "events": self.events,
               "wall_s": round(self.wall_s, 3)}
        out["rate_per_s"] = round(self.ok / self.wall_s, 1) if self.wall_s else None
        out["events_per_s"] = round(self.events / self.wall_s, 1) if self.wall_s and self.events else None
        out["latency_ms"] = percentiles(self.lat)
        out["gap_ms"] = percentiles(self.gaps) if self.gaps else None
        out["cpu_s"] = round(self.cpu_s, 4)
        out["cpu_us_per_req"] = round(self.cpu_s / self.ok * 1e6, 1) if self.ok and self.cpu_s else None
        out["cpu_us_per_event"] = (
            round(self.cpu_s / self.events * 1e6, 2) if self.events and self.cpu_s else None
        )
        return out


def percentiles(values: array) -> dict | None:
    """Nearest-rank P50/P95/P99 (and mean, max) of millisecond samples."""
    if not values:
        return None
    s = sorted(values)
    n = len(s)

    def rank(q: float) -> float:
        return round(s[min(n - 1, max(0, math.ceil(q * n) - 1))], 4)

    return {"p50": rank(0.50), "p95": rank(0.95), "p99": rank(0.99),
            "mean": round(sum(s) / n, 4), "max": round(s[-1], 4)}


def added(via: dict | None, direct: dict | None) -> dict | None:
    """Per-percentile via-minus-direct (ms)."""
    if not via or not direct:
        return None
    return {k: round(via[k] - direct[k], 4) for k in ("p50", "p95", "p99")}


# --- load shapes --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Shape:
    """One load shape applied to each target in turn for `slice_s` at a time."""

    kind: str  # "chat" | "stream"
    concurrency: int = 0  # closed loop: connections, back to back
    rate: float = 0.0  # open loop: requests per second on a fixed schedule
    max_tokens: int = 16


async def _one(target: Target, request: bytes, stat: Stat, t_start: float, stream: bool) -> bool:
    """One request on a pooled connection; latency from `t_start` (the scheduled time in open loop).

    Returns False when the connection failed (not on an HTTP error status)."""
    times: list[float] | None = [] if stream else None
    conn = None
    try:
        with trio.fail_after(REQUEST_TIMEOUT_S):
            conn = await target.pool.get()
            status = await conn.exchange(request, times)
    except _CLIENT_ERRORS as exc:
        stat.error(type(exc).__name__)
        if conn is not None:
            conn.close()
        return False
    target.pool.put(conn)
    if status != 200:
        stat.error(f"status {status}")
        return True
    stat.ok += 1
    if not stream:
        stat.lat.append((trio.current_time() - t_start) * 1000.0)
        return True
    if not times:
        stat.error("stream without events")
        return True
    stat.events += len(times)
    stat.lat.append((times[0] - t_start) * 1000.0)
    gaps = stat.gaps
    for a, b in itertools.pairwise(times):
        gaps.append((b - a) * 1000.0)
    return True


async def run_slice(target: Target, shape: Shape, request: bytes, stat: Stat, slice_s: float) -> None:
    """Load `target` with `shape` for `slice_s`, wait for in-flight requests, account CPU and wall."""
    stream = shape.kind == "stream"
    cpu0 = procs.cpu_seconds(target.pids) if target.pids else 0.0
    t0 = trio.current_time()
    with trio.fail_after(slice_s + DRAIN_TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            if shape.rate:
                await _open_loop(nursery, target, shape, request, stat, slice_s, stream)
            else:
                deadline = t0 + slice_s
                for i in range(shape.concurrency):
                    nursery.start_soon(_closed_worker, target, request, stat, deadline, stream,
                                       i / shape.concurrency * 0.01 if stream else 0.0)
    stat.wall_s += trio.current_time() - t0
    if target.pids:
        stat.cpu_s += procs.cpu_seconds(target.pids) - cpu0


async def _closed_worker(target: Target, request: bytes, stat: Stat, deadline: float, stream: bool,
                         stagger_s: float) -> None:
    if stagger_s:
        await trio.sleep(stagger_s)  # desynchronise stream token clocks
    now = trio.current_time
    while (t := now()) < deadline:
        if not await _one(target, request, stat, t, stream):
            await trio.sleep(CONN_ERROR_BACKOFF_S)  # a dead target must not become a busy loop


async def _open_loop(nursery: trio.Nursery, target: Target, shape: Shape, request: bytes, stat: Stat,
                     slice_s: float, stream: bool) -> None:
    n = max(1, round(shape.rate * slice_s))
    interval = 1.0 / shape.rate
    t0 = trio.current_time() + 0.002
    inflight = [0]

    async def tracked(t_sched: float) -> None:
        try:
            await _one(target, request, stat, t_sched, stream)
        finally:
            inflight[0] -= 1

    for i in range(n):
        t_sched = t0 + i * interval
        if trio.current_time() < t_sched:
            await trio.sleep_until(t_sched)
        if inflight[0] >= OPEN_LOOP_MAX_INFLIGHT:
            stat.error("open-loop backlog full")  # the target cannot keep up with the offered load
            continue
        inflight[0] += 1
        nursery.start_soon(tracked, t_sched)


async def run_cell(targets: list[Target], shape: Shape, requests: dict[str, bytes], rounds: int,
                   slice_s: float) -> dict[str, Stat]:
    """Interleave `rounds` slices per target, rotating the order each round."""
    stats = {t.name: Stat() for t in targets}
    warm = shape.concurrency or int(min(512, shape.rate * 0.05 + 16))
    for t in targets:
        for kind in await t.pool.fill(warm):
            stats[t.name].error(kind)
    for r in range(rounds):
        k = r % len(targets)
        for t in targets[k:] + targets[:k]:
            gc.collect()
            gc.disable()
            try:
                await run_slice(t, shape, requests[t.name], stats[t.name], slice_s)
            finally:
                gc.enable()
    return stats


# --- requests ------------------------------------------------------------------------------------------


def build_request(port: int, body: bytes | None, path: str, key: str | None) -> bytes:
    """Pre-built HTTP/1.1 request bytes (keep-alive is the HTTP/1.1 default)."""
    lines = [f"{'POST' if body is not None else 'GET'} {path} HTTP/1.1", f"Host: 127.0.0.1:{port}"]
    if key:
        lines.append(f"Authorization: Bearer {key}")
    if body is not None:
        lines += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + (body or b"")


def chat_body(stream: bool, max_tokens: int, model: str = "sim-chat") -> bytes:
    return json.dumps({
        "model": model,
        "messages": [{"role": "user", "content": "Say hello in a few words."}],
        "max_tokens": max_tokens,
        "stream": stream,
    }, separators=(",", ":")).encode()


def requests_for(targets: list[Target], shape: Shape, key: str | None) -> dict[str, bytes]:
    body = chat_body(shape.kind == "stream", shape.max_tokens)
    return {t.name: build_request(t.port, body, "/v1/chat/completions", key) for t in targets}


# --- the processes under test -----------------------------------------------------------------------

# Upstream profiles: one `spotinference sim` each, a gateway and an nginx port in front of each.
PROFILES: dict[str, dict[str, float]] = {
    "chat": {"latency_ms": 20.0},  # non-streaming answers take 20 ms
    "stream": {"ttft_ms": 20.0, "tokens_per_s": 100.0},  # streams: 20 ms to first token, 100 tokens/s
    "zero": {"latency_ms": 0.0, "ttft_ms": 0.0, "tokens_per_s": 0.0},  # saturation: no service time
    "slow": {"ttft_ms": 20.0, "tokens_per_s": 5.0},  # 1,000 long-lived streams at 5 tokens/s
}
# gateway name -> (profile, workers)
GATEWAYS = {"chat": ("chat", 1), "stream": ("stream", 1), "zero": ("zero", 1), "zero-w2": ("zero", 2),
            "slow": ("slow", 1)}


class ProcessDied(RuntimeError):
    """A process under test exited during the run: its numbers would be meaningless."""


@dataclass
class Rig:
    """Every process of one run and a Target per (profile, side)."""

    sims: dict[str, procs.Proc] = field(default_factory=dict)
    gateways: dict[str, procs.Proc] = field(default_factory=dict)
    nginx: procs.Proc | None = None
    notes: list[str] = field(default_factory=list)
    targets: dict[tuple[str, str], Target] = field(default_factory=dict)

    def side_by_side(self, profile: str, extra: tuple[str, ...] = ()) -> list[Target]:
        names = ("direct", "nginx", "gateway", *extra)
        return [self.targets[(profile, n)] for n in names if (profile, n) in self.targets]

    def check_alive(self) -> None:
        """Raise ProcessDied naming the first process under test that has exited."""
        for proc in [*self.sims.values(), *self.gateways.values(), *([self.nginx] if self.nginx else [])]:
            if proc.popen.poll() is not None:
                raise ProcessDied(f"{proc.name} exited with {proc.popen.returncode} mid-run; log tail:\n"
                                  f"{proc.log_tail()}")

    def close_pools(self) -> None:
        for t in self.targets.values():
            t.pool.close_all()


def start_rig(workdir: Path, stack: ExitStack, use_nginx: bool) -> Rig:
    """Start sims, then gateways and nginx in front of them; register every stop on `stack`."""
    rig = Rig()
    for name, flags in PROFILES.items():
        proc = procs.launch(f"sim-{name}", procs.sim_argv(**flags), workdir)
        stack.callback(proc.stop)
        rig.sims[name] = proc
    for proc in rig.sims.values():
        procs.wait_ready(proc)
    for name, (profile, workers) in GATEWAYS.items():
        proc = procs.launch_gateway(f"gateway-{name}", [rig.sims[profile].url], workdir, workers)
        stack.callback(proc.stop)
        rig.gateways[name] = proc
    if use_nginx and procs.nginx_binary():
        rig.nginx = procs.start_nginx([p.url for p in rig.sims.values()], workdir)
        stack.callback(rig.nginx.stop)
    else:
        rig.notes.append("nginx: skipped (--no-nginx)" if not use_nginx else
                         "nginx: not installed (apt-get install nginx), its column is empty")
    for name, proc in list(rig.gateways.items()):
        try:
            procs.wait_ready(proc)
        except procs.StartError as exc:
            if GATEWAYS[name][1] == 1:
                raise
            # Multi-worker mode is reported, not required: say why it is missing and go on.
            first = exc.args[0].strip().splitlines()
            rig.notes.append(f"gateway --workers {GATEWAYS[name][1]} did not start ({first[-1][:120]})")
            proc.stop()
            del rig.gateways[name]
    nginx_pids = rig.nginx.pids() if rig.nginx else []
    for i, (profile, sim) in enumerate(rig.sims.items()):
        rig.targets[(profile, "direct")] = Target("direct", sim.ports[0])
        if rig.nginx:
            rig.targets[(profile, "nginx")] = Target("nginx", rig.nginx.ports[i], nginx_pids)
    for name, gw in rig.gateways.items():
        profile, workers = GATEWAYS[name]
        side = "gateway" if workers == 1 else f"gateway-w{workers}"
        rig.targets[(profile, side)] = Target(side, gw.ports[0], gw.pids())
    return rig


# --- the plan of one run ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    duration_s: float  # per target per cell, split into slices
    slice_s: float  # one slice of one target in latency cells
    stream_slice_s: float  # SSE gap cells: streams last ~0.2 s, so longer slices
    sat_slice_s: float
    concurrency: tuple[int, ...] = (1, 16, 64)
    rates: tuple[float, ...] = (100.0, 500.0, 1000.0)
    sse_streams: tuple[int, ...] = (50, 100, 200)
    big_streams: int = 1000
    idle_conns: int = 10_000

    @classmethod
    def full(cls, duration_s: float) -> Plan:
        return cls(duration_s=duration_s, slice_s=0.5, stream_slice_s=1.0, sat_slice_s=1.0)

    @classmethod
    def quick(cls) -> Plan:
        return cls(duration_s=0.3, slice_s=0.15, stream_slice_s=0.3, sat_slice_s=0.2,
                   concurrency=(1, 16), rates=(100.0,), sse_streams=(20,), big_streams=100,
                   idle_conns=300)

    def rounds(self, slice_s: float) -> int:
        """Slices per target per cell for slices of `slice_s`: at least one each."""
        return max(1, round(self.duration_s / slice_s))


# --- measuring -------------------------------------------------------------------------------------


def latency_row(row_id: str, label: str, shape: Shape, stats: dict[str, Stat], metric: str,
                budget_ms: float | None) -> dict:
    targets = {name: s.summary() for name, s in stats.items()}
    direct = targets["direct"][metric]
    add = {name: added(t[metric], direct) for name, t in targets.items() if name != "direct"}
    gw, ng = add.get("gateway"), add.get("nginx")
    ratio = round(gw["p95"] / ng["p95"], 2) if gw and ng and ng["p95"] > 0.005 else None
    return {
        "id": row_id, "label": label, "kind": "latency", "metric": metric,
        "shape": shape.__dict__.copy(), "targets": targets, "added": add, "ratio_p95": ratio,
        "budget": None if budget_ms is None else {
            "text": f"+P95 < {budget_ms:g} ms", "ok": bool(gw and gw["p95"] < budget_ms)},
        "errors": sum(s.errors for s in stats.values()),
    }


def throughput_row(row_id: str, label: str, shape: Shape, stats: dict[str, Stat], per: str,
                   budget: float | None, note: str = "") -> dict:
    targets = {name: s.summary() for name, s in stats.items()}
    key = "rate_per_s" if per == "req" else "events_per_s"
    gw = targets.get("gateway", {}).get(key)
    ng = targets.get("nginx", {}).get(key)
    cpu = targets.get("gateway", {}).get("cpu_us_per_req" if per == "req" else "cpu_us_per_event")
    per_core = round(1e6 / cpu) if cpu else None
    if per_core and not note:
        unit = "req" if per == "req" else "event"
        note = (f"gateway CPU {cpu:.1f} us/{unit} -> ~{per_core:,}/s if one core were its own "
                "(2 cores here are shared with the sim and this load generator)")
    return {
        "id": row_id, "label": label, "kind": "throughput", "metric": key, "shape": shape.__dict__.copy(),
        "targets": targets, "ratio": round(gw / ng, 3) if gw and ng else None,
        "gateway_per_core_per_s": per_core,
        "budget": None if budget is None else {"text": f">= {budget:,.0f}/s", "ok": bool(gw and gw >= budget)},
        "errors": sum(s.errors for s in stats.values()), "note": note,
    }


class Interrupted(Exception):
    """SIGTERM or SIGHUP arrived: the run was cancelled and everything is being stopped."""


async def measure(rig: Rig, plan: Plan, key: str | None, log) -> list[dict]:
    """All cells of one run, in order; returns the rows of the report.

    SIGTERM/SIGHUP cancel the run cleanly (then `Interrupted`); Ctrl-C is trio's KeyboardInterrupt."""
    rows: list[dict] | None = None
    interrupted = False
    died: ProcessDied | None = None
    try:
        async with trio.open_nursery() as nursery:

            async def watch_signals() -> None:
                nonlocal interrupted
                with trio.open_signal_receiver(signal.SIGTERM, signal.SIGHUP) as signals:
                    async for _ in signals:
                        interrupted = True
                        nursery.cancel_scope.cancel()
                        return

            nursery.start_soon(watch_signals)
            try:
                rows = await _measure(rig, plan, key, log)
            except ProcessDied as exc:  # re-raised below, not wrapped in the nursery's ExceptionGroup
                died = exc
            nursery.cancel_scope.cancel()
    finally:
        rig.close_pools()  # trio sockets must be closed inside trio.run
    if died is not None:
        raise died
    if interrupted or rows is None:
        raise Interrupted
    return rows


async def _measure(rig: Rig, plan: Plan, key: str | None, log) -> list[dict]:
    rows: list[dict] = []

    async def latency_cells(profile: str, metric: str, shapes) -> None:
        targets = rig.side_by_side(profile)
        for row_id, label, shape, budget, slice_s in shapes:
            rig.check_alive()
            log(f"  {label}")
            stats = await run_cell(targets, shape, requests_for(targets, shape, key), plan.rounds(slice_s),
                                   slice_s)
            rows.append(latency_row(row_id, label, shape, stats, metric, budget))
        for t in targets:
            t.pool.close_all()

    log("non-streaming chat, upstream answers in 20 ms")
    await latency_cells("chat", "latency_ms", [
        *[(f"chat_c{c}", f"chat c={c}", Shape("chat", concurrency=c),
           0.5 if c == 1 else None, plan.slice_s) for c in plan.concurrency],
        *[(f"chat_open{r:g}", f"chat open {r:g}/s", Shape("chat", rate=r), 1.0, plan.slice_s)
          for r in plan.rates],
    ])
    log("streaming chat: time to first event (20 ms TTFT, 4 tokens at 100/s)")
    await latency_cells("stream", "latency_ms", [
        ("ttfb_c1", "TTFB c=1", Shape("stream", concurrency=1, max_tokens=4), 0.5,
         plan.slice_s),
        *[(f"ttfb_open{r:g}", f"TTFB open {r:g}/s", Shape("stream", rate=r, max_tokens=4),
           1.0, plan.slice_s) for r in plan.rates],
    ])
    log("streaming chat: per-event gaps (100 tokens/s, 16 tokens per stream)")
    await latency_cells("stream", "gap_ms", [
        (f"sse_{n}", f"SSE gap, {n} streams", Shape("stream", concurrency=n, max_tokens=16), 0.2,
         plan.stream_slice_s) for n in plan.sse_streams
    ])

    rig.check_alive()
    log("saturation, zero-latency upstream")
    targets = rig.side_by_side("zero", ("gateway-w2",))
    note = "--workers 2 on 2 cores shared with the load generator and the sim: shape, not limit"
    shape = Shape("chat", concurrency=64, max_tokens=16)
    stats = await run_cell(targets, shape, requests_for(targets, shape, key), plan.rounds(plan.sat_slice_s),
                           plan.sat_slice_s)
    rows.append(throughput_row("sat_chat", "max chat req/s, 64 conns", shape, stats, "req", 3000.0))
    if "zero-w2" in rig.gateways:
        rows.append(_w2_row("sat_chat_w2", "max chat req/s, 2 workers", rows[-1], note))
    shape = Shape("stream", concurrency=16, max_tokens=200)
    stats = await run_cell(targets, shape, requests_for(targets, shape, key), plan.rounds(plan.sat_slice_s),
                           plan.sat_slice_s)
    rows.append(throughput_row("sat_sse", "max SSE events/s, 16 str.", shape, stats, "event",
                               50000.0))
    if "zero-w2" in rig.gateways:
        rows.append(_w2_row("sat_sse_w2", "max SSE events/s, 2 workers", rows[-1], note))
    for t in targets:
        t.pool.close_all()

    log(f"scale: {plan.big_streams:,} concurrent streams (10 tokens at 5/s, starts over {BIG_STREAMS_RAMP_S:g} s)")
    rows.append(await big_streams(rig, plan.big_streams, key))
    rig.check_alive()
    log(f"scale: {plan.idle_conns:,} idle keep-alive connections on one gateway worker")
    rows.append(await idle_connections(rig, plan, key))
    return rows


def _w2_row(row_id: str, label: str, base: dict, note: str) -> dict:
    w2 = base["targets"].get("gateway-w2", {}).get(base["metric"])
    ng = base["targets"].get("nginx", {}).get(base["metric"])
    return {"id": row_id, "label": label, "kind": "throughput", "metric": base["metric"],
            "shape": base["shape"], "targets": {"gateway-w2": base["targets"].get("gateway-w2")},
            "ratio": round(w2 / ng, 3) if w2 and ng else None, "budget": None, "errors": 0, "note": note}


async def big_streams(rig: Rig, n: int, key: str | None) -> dict:
    """`n` streams open at once through each target in turn (not interleaved: one burst each)."""
    shape = Shape("stream", concurrency=n, max_tokens=10)
    targets = rig.side_by_side("slow")
    requests = requests_for(targets, shape, key)
    stats = {t.name: Stat() for t in targets}
    peak = {t.name: 0 for t in targets}
    for t in targets:
        rig.check_alive()
        stat = stats[t.name]
        for kind in await t.pool.fill(n, parallel=100):
            stat.error(kind)
        cpu0 = procs.cpu_seconds(t.pids) if t.pids else 0.0
        t0 = trio.current_time()
        inflight = [0]

        async def one(i: int, t: Target = t, stat: Stat = stat, inflight: list[int] = inflight) -> None:
            await trio.sleep(i * BIG_STREAMS_RAMP_S / n)  # a ramp the sim can take; all overlap after it
            inflight[0] += 1
            peak[t.name] = max(peak[t.name], inflight[0])
            try:
                await _one(t, requests[t.name], stat, trio.current_time(), True)
            finally:
                inflight[0] -= 1

        with trio.fail_after(DRAIN_TIMEOUT_S * 2):
            async with trio.open_nursery() as nursery:
                for i in range(n):
                    nursery.start_soon(one, i)
        stat.wall_s = trio.current_time() - t0
        if t.pids:
            stat.cpu_s = procs.cpu_seconds(t.pids) - cpu0
        t.pool.close_all()
    row = latency_row("streams_1000", f"TTFB, {n:,} streams", shape, stats, "latency_ms", None)
    gw = stats.get("gateway")
    row["kind"] = "scale"
    row["budget"] = {"text": "0 errors", "ok": row["errors"] == 0}
    row["peak_concurrent"] = peak
    if gw:
        gap = added(gw.summary()["gap_ms"], stats["direct"].summary()["gap_ms"])
        row["note"] = (f"{gw.ok:,}/{n:,} streams ok, peak {peak['gateway']:,} open at once"
                       + (f"; SSE gap +P95 {gap['p95']:.2f} ms" if gap else ""))
    return row


async def idle_connections(rig: Rig, plan: Plan, key: str | None) -> dict:
    """Hold `plan.idle_conns` keep-alive connections on one gateway worker; probe latency meanwhile."""
    gw = rig.targets[("chat", "gateway")]
    nofile = procs.raise_nofile(0)
    n = min(plan.idle_conns, nofile - 1024)
    # A real (cheap) request makes each connection a used keep-alive connection, not just an accept.
    request = build_request(gw.port, chat_body(False, 1), "/v1/chat/completions", key)
    held: list[Conn] = []
    opening = Stat()
    limiter = trio.CapacityLimiter(200)
    rss0 = procs.rss_bytes(gw.pids)

    async def open_one() -> None:
        async with limiter:
            conn = None
            try:
                with trio.fail_after(REQUEST_TIMEOUT_S):
                    conn = await Conn.open(gw.host, gw.port)
                    status = await conn.exchange(request)
            except _CLIENT_ERRORS as exc:
                opening.error(type(exc).__name__)
                if conn is not None:
                    conn.close()
                return
            if status != 200:
                opening.error(f"status {status}")
            if not conn.keep:
                opening.error("not keep-alive")
                conn.close()
                return
            opening.ok += 1
            held.append(conn)

    try:
        t0 = trio.current_time()
        async with trio.open_nursery() as nursery:
            for _ in range(n):
                nursery.start_soon(open_one)
        opening.wall_s = trio.current_time() - t0
        await trio.sleep(0.5)  # let the gateway settle before reading its memory
        rss1 = procs.rss_bytes(gw.pids)
        shape = Shape("chat", concurrency=1)
        targets = rig.side_by_side("chat")
        stats = await run_cell(targets, shape, requests_for(targets, shape, key), plan.rounds(plan.slice_s),
                               plan.slice_s)
        closed = _count_closed(held)
    finally:
        for conn in held:
            conn.close()
        for t in rig.side_by_side("chat"):
            t.pool.close_all()
    still_open = len(held) - closed
    row = latency_row("idle_10k", f"chat c=1, {n:,} idle conns", shape, stats, "latency_ms", None)
    row["kind"] = "scale"
    row["errors"] += opening.errors + closed
    per_conn = (rss1 - rss0) / max(1, len(held))
    row["idle"] = {"requested": plan.idle_conns, "target": n, "opened": len(held), "open_at_end": still_open,
                   "closed_by_server": closed, "errors": opening.errors, "error_kinds": opening.error_kinds,
                   "open_s": round(opening.wall_s, 2), "rss_before": rss0, "rss_after": rss1,
                   "rss_bytes_per_conn": round(per_conn, 1)}
    row["budget"] = {"text": "0 errors", "ok": row["errors"] == 0}
    kinds = ", ".join(f"{k} x{v}" for k, v in opening.error_kinds.items())
    row["note"] = (f"{still_open:,}/{n:,} open at end; RSS {per_conn / 1024:.1f} KiB/conn"
                   + (f"; errors while opening: {kinds}" if kinds else ""))
    return row


def _count_closed(conns: list[Conn]) -> int:
    """How many held connections the server has closed (readable idle socket), via one poll()."""
    poller = select.poll()
    for conn in conns:
        poller.register(conn.sock.fileno(), select.POLLIN)
    return len(poller.poll(0))


# --- report ---------------------------------------------------------------------------------------------


def _triple(d: dict | None) -> str:
    if not d:
        return "-"
    return f"{d['p50']:.2f}/{d['p95']:.2f}/{d['p99']:.2f}"


def _num(v: float | None, fmt: str = ",.0f") -> str:
    return "-" if v is None else format(v, fmt)


def table_rows(rows: list[dict]) -> list[list[str]]:
    """The report as text cells (also what docs/BENCHMARKS.md pastes)."""
    out = []
    for row in rows:
        budget = row.get("budget")
        mark = "" if not budget else f"{'ok' if budget['ok'] else 'MISS'} {budget['text']}"
        t = row["targets"]
        if row["kind"] in ("latency", "scale"):
            cpu_key = "cpu_us_per_event" if row["metric"] == "gap_ms" else "cpu_us_per_req"
            cpu = [_num((t.get(n) or {}).get(cpu_key), ".1f") for n in ("gateway", "nginx")]
            ratio = "-" if row["ratio_p95"] is None else f"{row['ratio_p95']:.1f}x"
            cells = [_triple(t["direct"][row["metric"]]), _triple(row["added"].get("nginx")),
                     _triple(row["added"].get("gateway")), ratio, *cpu]
        else:
            key = row["metric"]
            gw = "gateway-w2" if row["id"].endswith("_w2") else "gateway"
            cpu_key = "cpu_us_per_req" if key == "rate_per_s" else "cpu_us_per_event"
            ratio = "-" if row["ratio"] is None else f"{row['ratio']:.2f}x"
            cells = [_num((t.get(n) or {}).get(key)) for n in ("direct", "nginx", gw)]
            cells += [ratio, _num((t.get(gw) or {}).get(cpu_key), ".1f"),
                      _num((t.get("nginx") or {}).get(cpu_key), ".1f")]
        out.append([row["label"], *cells, mark, str(row["errors"])])
    return out


COLUMNS = ("measure", "direct", "+nginx", "+gateway", "gw/nginx", "gw CPU us", "nginx CPU us", "budget",
           "err")


def render(rows: list[dict], meta: dict, notes: list[str], console) -> None:
    """Print the one table, then its footnotes."""
    from rich.table import Table

    table = Table(title=f"spotinference bench overhead -- {meta['date']} -- {meta['mode']}")
    for col in COLUMNS:
        table.add_column(col, justify="left" if col in ("measure", "budget") else "right")
    section = None
    for row, cells in zip(rows, table_rows(rows)):
        if section is not None and row["kind"] != section:
            table.add_section()
        section = row["kind"]
        table.add_row(*cells)
    console.print(table)
    console.print(
        "Latency rows (ms, P50/P95/P99): direct is absolute; +nginx and +gateway are ADDED (via - direct,\n"
        "per percentile, same cell, slices interleaved). TTFB = first complete SSE event. SSE gap rows\n"
        "compare inter-event gaps. gw/nginx = ratio of added P95. CPU = microseconds of the proxy's own\n"
        "CPU per request (per event on SSE rows). Throughput rows: sustained rate per target; gw/nginx =\n"
        "ratio of rates. direct in throughput rows is the ceiling of this load generator + sim.")
    for row in (r for r in rows if r.get("note")):
        console.print(f"- {row['label']}: {row['note']}")
    for note in notes:
        console.print(f"- {note}")


def markdown(rows: list[dict], meta: dict, notes: list[str], command: str) -> str:
    """The same table as Markdown, headed by the command, date, machine and versions (for docs)."""
    v, m = meta["versions"], meta["machine"]
    lines = [f"`{command}` -- {meta['date']}, {meta['mode']}", "",
             (f"Machine: {m['cpus']} CPUs ({m['cpu_model']}), Linux {m['kernel']}, load average "
             f"{'/'.join(str(x) for x in m['loadavg_start'])} at start, "
             f"{'/'.join(str(x) for x in m.get('loadavg_end', []))} at end. "
             f"Versions: spotinference {v['spotinference']} (commit {v['commit']}), Python {v['python']}, "
             f"trio {v['trio']}, h11 {v['h11']}, nginx {v['nginx']}."), "",
             "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(cells) + " |" for cells in table_rows(rows)]
    lines.append("")
    lines += [f"- {r['label']}: {r['note']}" for r in rows if r.get("note")]
    lines += [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def run_meta(args: argparse.Namespace, plan: Plan) -> dict:
    def version(dist: str) -> str | None:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return None

    nginx = procs.nginx_binary()
    nginx_version = None
    if nginx:
        out = subprocess.run([nginx, "-v"], check=False, capture_output=True, text=True, timeout=10)
        nginx_version = (out.stderr or out.stdout).strip().rsplit("/", 1)[-1]
    try:
        here = Path(__file__).parent
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], check=False, capture_output=True,
                                text=True, timeout=10, cwd=here).stdout.strip() or None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], check=False,
                               capture_output=True, text=True, timeout=10, cwd=here).stdout.strip()
        if commit and dirty:
            commit += "+uncommitted changes"
    except (OSError, subprocess.TimeoutExpired):
        commit = None
    cpu_model = next((line.split(":", 1)[1].strip() for line in
                      Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")), None)
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "mode": "quick" if args.quick else f"full, {args.duration_s:g} s per target per cell",
        "machine": {"cpus": os.cpu_count(), "cpu_model": cpu_model, "kernel": platform.release(),
                    "loadavg_start": [round(x, 2) for x in os.getloadavg()]},
        "versions": {"python": platform.python_version(), "spotinference": version("spotinference"),
                     "commit": commit, "trio": version("trio"), "h11": version("h11"),
                     "msgspec": version("msgspec"), "nginx": nginx_version},
        "plan": plan.__dict__.copy(),
        "profiles": PROFILES,
    }


# --- command line ------------------------------------------------------------------------------------


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="spotinference bench overhead",
        description="Latency the gateway adds over a direct connection, side by side with nginx, "
                    "plus CPU per request/event, saturation and scale checks. One table, optional JSON.")
    p.add_argument("--quick", action="store_true", help="smoke mode for CI: seconds, exit 1 on any error")
    p.add_argument("--json", type=Path, metavar="FILE", help="also write the results as JSON")
    p.add_argument("--duration-s", type=float, default=3.0,
                   help="seconds per target per latency cell, in 0.5 s interleaved slices (default 3)")
    p.add_argument("--markdown", type=Path, metavar="FILE", help="also write the table as Markdown")
    p.add_argument("--no-nginx", action="store_true", help="leave nginx out even if installed")
    p.add_argument("--workdir", type=Path, help="keep configs and process logs here (default: temp dir)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """`spotinference bench overhead ...`; 0 when every request succeeded."""
    from rich.console import Console

    args = parse_args(sys.argv[1:] if argv is None else argv)
    plan = Plan.quick() if args.quick else Plan.full(args.duration_s)
    nofile = procs.raise_nofile(plan.idle_conns + 4096)
    console = Console(width=None if sys.stdout.isatty() else 150)
    err = Console(stderr=True)
    meta = run_meta(args, plan)
    meta["nofile"] = nofile
    with ExitStack() as stack:
        if args.workdir:
            args.workdir.mkdir(parents=True, exist_ok=True)
            workdir = args.workdir
        else:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="spotinference-bench-")))
        err.print(f"starting sims, gateways and nginx in {workdir}")
        try:
            rig = start_rig(workdir, stack, use_nginx=not args.no_nginx)
        except procs.StartError as exc:
            err.print(f"[red]could not start the processes under test:[/red] {exc}")
            return 2
        for note in rig.notes:
            err.print(note)
        try:
            rows = trio.run(measure, rig, plan, None, lambda msg: err.print(msg))
            rig.check_alive()
        except ProcessDied as exc:
            err.print(f"[red]aborted:[/red] {exc}")
            return 2
        except Interrupted:
            err.print("interrupted: stopping every process started")
            return 130
    meta["machine"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    errors = sum(r["errors"] for r in rows)
    render(rows, meta, rig.notes, console)
    console.print(f"errors: {errors}")
    if args.json:
        args.json.write_text(json.dumps({"meta": meta, "rows": rows, "errors": errors,
                                         "nginx": rig.nginx is not None}, indent=1))
    if args.markdown:
        command = "spotinference bench overhead " + " ".join(argv if argv is not None else sys.argv[1:])
        args.markdown.write_text(markdown(rows, meta, rig.notes, command.strip()))
    return 0 if errors == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
