"""The overhead harness's load engine: targets, samples, load shapes, and interleaved cells.

Strategy: a cell applies one `Shape` to several `Target`s (direct, nginx, gateway) in short slices
whose order rotates every round, so machine noise lands on all targets alike (`run_cell`). A slice is
either CLOSED loop (`concurrency` connections, each back to back) or OPEN loop (request i due at
t0 + i/rate, latency measured from that scheduled time: no coordinated omission; in-flight requests
are capped and the excess counts as an error). GC is paused inside slices. Each target's `Stat`
collects latencies (or stream TTFB) and SSE inter-event gaps as float arrays plus CPU seconds of the
proxy's own processes read from /proc before and after each of its slices; `summary()` turns that
into nearest-rank percentiles and CPU per request/event. Bounded throughout: a per-request timeout,
a slice deadline, a back-off after connection errors so a dead target is not a busy loop.
"""

from __future__ import annotations

import gc
import itertools
import json
import math
from array import array
from dataclasses import dataclass, field

import trio

from loadtest import procs
from loadtest.rawhttp import CLIENT_ERRORS, Pool, build_request

REQUEST_TIMEOUT_S = 30.0
DRAIN_TIMEOUT_S = 60.0
OPEN_LOOP_MAX_INFLIGHT = 4000
CONN_ERROR_BACKOFF_S = 0.05


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

    kind: str  # "chat" | "stream" (chat completions) | "responses" | "messages" (those APIs' streams)
    concurrency: int = 0  # closed loop: connections, back to back
    rate: float = 0.0  # open loop: requests per second on a fixed schedule
    max_tokens: int = 16


async def one_request(target: Target, request: bytes, stat: Stat, t_start: float,
                      stream: bool) -> bool:
    """One request on a pooled connection; latency from `t_start` (the scheduled time in open loop).

    Returns False when the connection failed (not on an HTTP error status)."""
    times: list[float] | None = [] if stream else None
    conn = None
    try:
        with trio.fail_after(REQUEST_TIMEOUT_S):
            conn = await target.pool.get()
            status = await conn.exchange(request, times)
    except CLIENT_ERRORS as exc:
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
    stream = shape.kind != "chat"
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
        if not await one_request(target, request, stat, t, stream):
            await trio.sleep(CONN_ERROR_BACKOFF_S)  # a dead target must not become a busy loop


async def _open_loop(nursery: trio.Nursery, target: Target, shape: Shape, request: bytes, stat: Stat,
                     slice_s: float, stream: bool) -> None:
    n = max(1, round(shape.rate * slice_s))
    interval = 1.0 / shape.rate
    t0 = trio.current_time() + 0.002
    inflight = [0]

    async def tracked(t_sched: float) -> None:
        try:
            await one_request(target, request, stat, t_sched, stream)
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
                   slice_s: float, around=None) -> dict[str, Stat]:
    """Interleave `rounds` slices per target, rotating the order each round. `around(target)`, when
    given, is called before each slice and returns what to call after it (a per-slice measurement of
    something else, e.g. a Redis server's CPU)."""
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
            after = around(t) if around is not None else None
            try:
                await run_slice(t, shape, requests[t.name], stats[t.name], slice_s)
            finally:
                gc.enable()
            if after is not None:
                after()
    return stats


# --- requests ------------------------------------------------------------------------------------------


def chat_body(stream: bool, max_tokens: int, model: str = "sim-chat") -> bytes:
    return json.dumps({
        "model": model,
        "messages": [{"role": "user", "content": "Say hello in a few words."}],
        "max_tokens": max_tokens,
        "stream": stream,
    }, separators=(",", ":")).encode()


def responses_body(max_tokens: int, model: str = "sim-chat") -> bytes:
    """A streamed Responses API request (what the Vercel AI SDK and Codex send)."""
    return json.dumps({"model": model, "input": "Say hello in a few words.", "max_output_tokens": max_tokens,
                       "stream": True}, separators=(",", ":")).encode()


def messages_body(max_tokens: int, model: str = "sim-chat") -> bytes:
    """A streamed Anthropic Messages request (what Claude Code and the Anthropic SDKs send)."""
    return json.dumps({"model": model, "max_tokens": max_tokens, "stream": True,
                       "messages": [{"role": "user", "content": "Say hello in a few words."}]},
                      separators=(",", ":")).encode()


def request_of(shape: Shape) -> tuple[bytes, str]:
    """(body, path) of one request of `shape`."""
    if shape.kind == "responses":
        return responses_body(shape.max_tokens), "/v1/responses"
    if shape.kind == "messages":
        return messages_body(shape.max_tokens), "/v1/messages"
    return chat_body(shape.kind == "stream", shape.max_tokens), "/v1/chat/completions"


def requests_for(targets: list[Target], shape: Shape, key: str | None) -> dict[str, bytes]:
    body, path = request_of(shape)
    return {t.name: build_request(t.port, body, path, key) for t in targets}
