"""The cells of `spotinference bench overhead`: what is measured, in which order, and each row.

Strategy: `Plan` fixes the cells of a run (full, or the tiny `--quick` CI smoke plan); `measure`
runs them in order inside one trio run, cancelling cleanly on SIGTERM/SIGHUP (`Interrupted`) and
stopping at the first process that died (`ProcessDied`). Latency cells (closed loop c=1/16/64, open
loop 100/500/1,000 per second; TTFB; SSE inter-event gaps) use realistic upstream service times and
report ADDED latency: via-proxy minus direct, per percentile, from the same interleaved cell.
Saturation cells use the zero-latency upstream and report sustained rates and proxy CPU per
request/event. Scale checks are one burst per target (1,000 concurrent streams) and 10,000 idle
keep-alive connections held on one gateway worker while latency is probed. Every row is a plain
dict (id, label, kind, metric, targets, added, budget, errors, note): the JSON report and the input
of loadtest/overhead_report.py. The cells are data (`_latency_sections`, `_SATURATION`), so `steps`
counts what `_measure` runs, and `--pin` (`measure(..., pinned=True)` on a rig whose proxies have a
core of their own) repeats the subset `pinned_ids` -- chat c=1 and the highest c, TTFB c=1 and the
highest open rate, every SSE gap cell, chat and SSE saturation -- with ids suffixed `_pin` and labels
` [pinned]`, through the same cell code and row builders.
"""

from __future__ import annotations

import signal
from dataclasses import dataclass

import trio
from rich.markup import escape

from loadtest import procs
from loadtest.overhead_load import (
    DRAIN_TIMEOUT_S,
    REQUEST_TIMEOUT_S,
    Shape,
    Stat,
    Target,
    added,
    chat_body,
    one_request,
    requests_for,
    run_cell,
)
from loadtest.overhead_rig import ProcessDied, Rig
from loadtest.rawhttp import CLIENT_ERRORS, Conn, build_request, count_closed

BIG_STREAMS_RAMP_S = 1.0  # spread of the starts in the 1,000-stream check (streams last ~2 s)


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
                   budget: float | None, note: str = "", own_core: bool = False) -> dict:
    targets = {name: s.summary() for name, s in stats.items()}
    key = "rate_per_s" if per == "req" else "events_per_s"
    gw = targets.get("gateway", {}).get(key)
    ng = targets.get("nginx", {}).get(key)
    cpu = targets.get("gateway", {}).get("cpu_us_per_req" if per == "req" else "cpu_us_per_event")
    per_core = round(1e6 / cpu) if cpu else None
    if per_core and not note:
        unit = "req" if per == "req" else "event"
        note = (f"gateway CPU {cpu:.1f} us/{unit} -> ~{per_core:,}/s at one full core; here it had a "
                "core of its own (the sim and this load generator on other CPUs)" if own_core else
                f"gateway CPU {cpu:.1f} us/{unit} -> ~{per_core:,}/s if one core were its own "
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


async def measure(rig: Rig, plan: Plan, key: str | None, log, pinned: bool = False) -> list[dict]:
    """All cells of one run, in order; returns the rows of the report. `pinned` (`--pin`, on the pinned
    rig): only the cells of `pinned_ids`, ids suffixed PIN_ID and labels PIN_LABEL.

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
                rows = await _measure(rig, plan, key, log, pinned)
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


PIN_ID, PIN_LABEL = "_pin", " [pinned]"  # what `--pin` appends to the id and label of its rows
PIN_HEADER = "pinned: "  # and prepends to its section headers (progress lines)


def pinned_ids(plan: Plan) -> set[str]:
    """The cells `measure(..., pinned=True)` repeats on the pinned rig (their ids without PIN_ID)."""
    return {"chat_c1", f"chat_c{max(plan.concurrency)}", "ttfb_c1", f"ttfb_open{plan.rates[-1]:g}",
            *(f"sse_{n}" for n in plan.sse_streams), "sat_chat", "sat_sse"}


def _latency_sections(plan: Plan, pinned: bool = False) -> list[tuple[str, str, str, list[tuple]]]:
    """The latency cells of `plan` as (header, profile, metric, [(id, label, shape, budget_ms, slice_s)]);
    `pinned`: only the cells of `pinned_ids`, tagged, and no section left empty."""
    other = plan.sse_streams[1:2] or plan.sse_streams[:1]
    sections = [
        ("non-streaming chat, upstream answers in 20 ms", "chat", "latency_ms", [
            *[(f"chat_c{c}", f"chat c={c}", Shape("chat", concurrency=c),
               0.5 if c == 1 else None, plan.slice_s) for c in plan.concurrency],
            *[(f"chat_open{r:g}", f"chat open {r:g}/s", Shape("chat", rate=r), 1.0, plan.slice_s)
              for r in plan.rates],
        ]),
        ("streaming chat: time to first event (20 ms TTFT, 4 tokens at 100/s)", "stream", "latency_ms", [
            ("ttfb_c1", "TTFB c=1", Shape("stream", concurrency=1, max_tokens=4), 0.5, plan.slice_s),
            *[(f"ttfb_open{r:g}", f"TTFB open {r:g}/s", Shape("stream", rate=r, max_tokens=4),
               1.0, plan.slice_s) for r in plan.rates],
        ]),
        ("streaming chat: per-event gaps (100 tokens/s, 16 tokens per stream)", "stream", "gap_ms", [
            (f"sse_{n}", f"SSE gap, {n} streams", Shape("stream", concurrency=n, max_tokens=16), 0.2,
             plan.stream_slice_s) for n in plan.sse_streams
        ]),
        ("other streaming APIs: per-event gaps, 100 streams (Responses API, Anthropic Messages vs chat)",
         "stream", "gap_ms", [
            (f"sse_{kind}_{n}", f"SSE gap, {n} {label} str.", Shape(kind, concurrency=n, max_tokens=16),
             0.2, plan.stream_slice_s)
            for kind, label in (("responses", "responses"), ("messages", "messages")) for n in other
        ]),
    ]
    if not pinned:
        return sections
    keep = pinned_ids(plan)
    tagged = [(PIN_HEADER + header, profile, metric,
               [(row_id + PIN_ID, label + PIN_LABEL, *rest) for row_id, label, *rest in cells if row_id in keep])
              for header, profile, metric, cells in sections]
    return [section for section in tagged if section[3]]


# Saturation cells on the zero-latency upstream: (id, label, shape, per, budget, label of the w2 row).
_SATURATION = (
    ("sat_chat", "max chat req/s, 64 conns", Shape("chat", concurrency=64, max_tokens=16), "req", 3000.0,
     "max chat req/s, 2 workers"),
    ("sat_sse", "max SSE events/s, 16 str.", Shape("stream", concurrency=16, max_tokens=200), "event",
     50000.0, "max SSE events/s, 2 workers"),
    *[(f"sat_sse_{kind}", f"max {kind} events/s, 16 str.", Shape(kind, concurrency=16, max_tokens=200),
       "event", 50000.0, None) for kind in ("responses", "messages")],
)


def steps(plan: Plan, pinned: bool = False) -> int:
    """How many `log` lines `measure` sends for `plan` (section headers and cells): the progress total.
    Counted from the same sections `_measure` runs; only the saturation and scale headers are fixed."""
    sections = _latency_sections(plan, pinned)
    return len(sections) + sum(len(cells) for *_, cells in sections) + 1 + (0 if pinned else 2)


async def _measure(rig: Rig, plan: Plan, key: str | None, log, pinned: bool = False) -> list[dict]:
    rows: list[dict] = []
    for header, profile, metric, cells in _latency_sections(plan, pinned):
        log(header)
        targets = rig.side_by_side(profile)
        for row_id, label, shape, budget, slice_s in cells:
            rig.check_alive()
            log(f"  {escape(label)}")  # `log` renders rich markup: " [pinned]" is text
            stats = await run_cell(targets, shape, requests_for(targets, shape, key), plan.rounds(slice_s),
                                   slice_s)
            rows.append(latency_row(row_id, label, shape, stats, metric, budget))
        for t in targets:
            t.pool.close_all()

    rig.check_alive()
    log((PIN_HEADER if pinned else "") + "saturation, zero-latency upstream")
    targets = rig.side_by_side("zero", ("gateway-w2",))
    note = "--workers 2 on 2 cores shared with the load generator and the sim: shape, not limit"
    keep = pinned_ids(plan) if pinned else None
    for row_id, label, shape, per, budget, w2_label in _SATURATION:
        if keep is not None and row_id not in keep:
            continue
        stats = await run_cell(targets, shape, requests_for(targets, shape, key), plan.rounds(plan.sat_slice_s),
                               plan.sat_slice_s)
        if pinned:
            row_id, label = row_id + PIN_ID, label + PIN_LABEL
        rows.append(throughput_row(row_id, label, shape, stats, per, budget, own_core=pinned))
        if w2_label and "zero-w2" in rig.gateways:
            rows.append(_w2_row(f"{row_id}_w2", w2_label, rows[-1], note))
    for t in targets:
        t.pool.close_all()
    if pinned:
        return rows

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
                await one_request(t, requests[t.name], stat, trio.current_time(), True)
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
            except CLIENT_ERRORS as exc:
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
        closed = count_closed(held)
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
