"""`spotinference bench throughput`: the canned traffic behind the fleet's published decode rates.

Strategy: short prompts, a fixed output length (max_tokens, plus vLLM's `ignore_eos` so the model
cannot stop early), streaming, `--concurrency` streams in flight until `--requests` are done. The
client is trio + httpx reading raw SSE lines, timestamped with perf_counter as each line arrives, so
the figures are arrival times on this machine with no SDK parsing in between (`: waking` comments and
other SSE comments are skipped). Per stream:
- tokens: content deltas counted as they arrive, cross-checked with the final `usage` chunk
  (stream_options.include_usage); usage wins when they differ (a server may batch several tokens
  per event), and the mismatch is reported;
- decode tokens/s = tokens after the first event / time after the first event, i.e.
  (tokens - tokens_per_event) / (t_last - t_first) -- TTFT and queueing excluded by construction;
- TTFT = first content event - request sent; inter-token latency = gaps between content events.
Reported: per-stream decode rate (median, p5, p95, ...), TTFT and ITL P50/P95/P99 over all streams,
aggregate tokens/s (all completion tokens over the run's wall time). A table for people, `--json`
for machines, with the same figures. `--warmup` requests (default 1, not counted) absorb a cold
tier's wake; if the warmup fails, the run stops there with the reason (exit 2). Exit 1 if any
measured request failed, else 0. Talks HTTP like any client; imports nothing from the gateway.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import trio
from rich.console import Console
from rich.table import Table

from loadtest.parity_report import percentile
from loadtest.progress import progress

PROMPTS = (
    "Write a short poem about the sea.",
    "Explain what a hash map is.",
    "List three uses of a paperclip.",
    "Describe a sunrise in the mountains.",
    "Summarise the plot of a heist story.",
    "Give tips for learning to juggle.",
    "What makes a good cup of tea?",
    "Tell a story about a lighthouse keeper.",
)


class WarmupFailed(Exception):
    """A warmup request failed: the endpoint is unreachable, rejects the key, or errs."""


@dataclass(frozen=True)
class BenchConfig:
    url: str  # base URL ending in /v1
    model: str
    concurrency: int = 4
    requests: int = 16
    max_tokens: int = 256
    warmup: int = 1
    api_key: str | None = None
    timeout_s: float = 600.0
    ignore_eos: bool = True


@dataclass
class Stream:
    """What one streamed request measured (times in seconds, perf_counter based)."""

    sent: float = 0.0
    times: list[float] = field(default_factory=list)  # arrival of each content event
    events: int = 0
    usage_tokens: int | None = None
    done: float = 0.0
    error: str | None = None

    @property
    def tokens(self) -> int:
        return self.usage_tokens if self.usage_tokens is not None else self.events

    def ttft_s(self) -> float | None:
        return self.times[0] - self.sent if self.times else None

    def decode_tokens_per_s(self) -> float | None:
        """Tokens after the first event over the time after the first event."""
        if len(self.times) < 2 or self.times[-1] <= self.times[0]:
            return None
        per_event = self.tokens / self.events
        return (self.tokens - per_event) / (self.times[-1] - self.times[0])


def base_url(url: str) -> str:
    """Accept `http://host:port` or `http://host:port/v1`."""
    url = url.rstrip("/")
    return url if url.split("://", 1)[-1].partition("/")[2] else url + "/v1"


def _body(cfg: BenchConfig, i: int) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": cfg.model, "messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
        "max_tokens": cfg.max_tokens, "temperature": 0, "stream": True,
        "stream_options": {"include_usage": True},
    }
    if cfg.ignore_eos:
        body["ignore_eos"] = True  # vLLM extra: generate exactly max_tokens
    return body


def error_message(status: int, raw: bytes) -> str:
    """`HTTP <status>: <the envelope's message, or the body's start>` (both cut to 200 characters)."""
    try:
        err = json.loads(raw).get("error", {})
        msg = err.get("message") if isinstance(err, dict) else str(err)
    except (ValueError, AttributeError):
        msg = None
    return f"HTTP {status}: {(msg or raw[:200].decode('utf-8', 'replace'))[:200]}"


async def _one(client: httpx.AsyncClient, cfg: BenchConfig, i: int) -> Stream:
    s = Stream(sent=time.perf_counter())
    try:
        async with client.stream("POST", cfg.url + "/chat/completions", json=_body(cfg, i)) as resp:
            if resp.status_code != 200:
                s.error = error_message(resp.status_code, await resp.aread())
                return s
            async for line in resp.aiter_lines():
                now = time.perf_counter()
                if not line.startswith("data:"):
                    continue  # blank separators and SSE comments (`: waking`)
                payload = line[5:].strip()
                if payload == "[DONE]":
                    break
                _event(s, json.loads(payload), now)
                if s.error:
                    break
    except httpx.ConnectError as exc:
        s.error = f"cannot connect to {cfg.url}: {exc}"
    except httpx.TimeoutException:
        s.error = f"timed out after {cfg.timeout_s:g} s"
    except (httpx.HTTPError, ValueError) as exc:
        s.error = f"{type(exc).__name__}: {exc}"
    s.done = time.perf_counter()
    return s


def _event(s: Stream, obj: Any, now: float) -> None:
    if not isinstance(obj, dict):
        s.error = "malformed SSE event: not a JSON object"
        return
    if "error" in obj:
        err = obj["error"]
        s.error = "in-band error: " + str(err.get("message") if isinstance(err, dict) else err)
        return
    usage = obj.get("usage")
    if isinstance(usage, dict) and isinstance(usage.get("completion_tokens"), int):
        s.usage_tokens = usage["completion_tokens"]
    for choice in obj.get("choices") or ():
        delta = choice.get("delta") or {}
        if delta.get("content"):
            s.events += 1
            s.times.append(now)


async def run_bench(cfg: BenchConfig, on_done: Any = None) -> list[Stream]:
    """Run the warmup, then the measured streams; `on_done(stream)` is called after each one.

    Raises WarmupFailed with the reason if a warmup request fails.
    """
    headers = {"authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
    limits = httpx.Limits(max_connections=cfg.concurrency, max_keepalive_connections=cfg.concurrency)
    timeout = httpx.Timeout(cfg.timeout_s, connect=min(cfg.timeout_s, 30.0))
    async with httpx.AsyncClient(headers=headers, limits=limits, timeout=timeout) as client:
        for i in range(cfg.warmup):
            s = await _one(client, cfg, i)
            if s.error:
                raise WarmupFailed(f"warmup request failed: {s.error}")
        results: list[Stream] = []
        jobs = iter(range(cfg.requests))

        async def worker() -> None:
            for i in jobs:
                s = await _one(client, cfg, i)
                results.append(s)
                if on_done is not None:
                    on_done(s)

        async with trio.open_nursery() as nursery:
            for _ in range(min(cfg.concurrency, cfg.requests)):
                nursery.start_soon(worker)
    return results


def _dist(values: list[float]) -> dict[str, float | None]:
    return {f"p{q}": percentile(values, q) for q in (5, 50, 95, 99)}


def summarize(cfg: BenchConfig, streams: list[Stream]) -> dict[str, Any]:
    """The figures behind the table and --json."""
    ok = [s for s in streams if s.error is None]
    rates = [r for r in (s.decode_tokens_per_s() for s in ok) if r is not None]
    ttfts = [s.ttft_s() * 1000 for s in ok if s.times]
    itls = [(b - a) * 1000 for s in ok for a, b in zip(s.times, s.times[1:])]
    tokens = sum(s.tokens for s in ok)
    wall = (max(s.done for s in ok) - min(s.sent for s in ok)) if ok else 0.0
    errors: dict[str, int] = {}
    for s in streams:
        if s.error:
            errors[s.error] = errors.get(s.error, 0) + 1
    return {
        "url": cfg.url, "model": cfg.model, "concurrency": cfg.concurrency, "requests": cfg.requests,
        "max_tokens": cfg.max_tokens, "ok": len(ok), "errors": len(streams) - len(ok), "error_counts": errors,
        "decode_tokens_per_s": {
            "median": statistics.median(rates) if rates else None,
            "mean": statistics.fmean(rates) if rates else None,
            **_dist(rates), "min": min(rates, default=None), "max": max(rates, default=None), "streams": len(rates),
        },
        "ttft_ms": _dist(ttfts), "itl_ms": _dist(itls),
        "aggregate_tokens_per_s": tokens / wall if wall > 0 else None,
        "completion_tokens": tokens, "wall_s": wall,
        "token_count": {
            "events": sum(s.events for s in ok),
            "usage": sum(s.usage_tokens or 0 for s in ok),
            "streams_without_usage": sum(1 for s in ok if s.usage_tokens is None),
            "mismatched_streams": sum(1 for s in ok if s.usage_tokens not in (None, s.events)),
        },
    }


def _f(v: float | None, unit: str = "", digits: int = 1) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:,.{digits}f}{unit}"


def table(fig: dict[str, Any]) -> Table:
    """The terminal table for a summary: one row per distribution, then the totals."""
    d, tc = fig["decode_tokens_per_s"], fig["token_count"]
    t = Table(title=f"throughput: {fig['model']} at {fig['url']}\n{fig['concurrency']} streams, "
              f"{fig['requests']} requests x {fig['max_tokens']} tokens", title_justify="left")
    t.add_column("figure")
    for col in ("P5", "P50", "P95", "P99"):
        t.add_column(col, justify="right")
    t.add_row("decode tokens/s per stream", *(_f(d[f"p{q}"], "", 2) for q in (5, 50, 95, 99)))
    t.add_row("TTFT (ms)", *(_f(fig["ttft_ms"][f"p{q}"]) for q in (5, 50, 95, 99)))
    t.add_row("inter-token latency (ms)", *(_f(fig["itl_ms"][f"p{q}"], "", 2) for q in (5, 50, 95, 99)))
    t.add_section()
    t.add_row("aggregate tokens/s", _f(fig["aggregate_tokens_per_s"]))
    t.add_row("tokens: usage / events", f"{tc['usage']:,} / {tc['events']:,}")
    t.add_row("requests ok (errors)", f"{fig['ok']} ({fig['errors']})")
    t.add_row("wall time (s)", _f(fig["wall_s"], "", 2))
    return t


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="spotinference bench throughput",
                                description="Canned streaming traffic; per-stream decode tokens/s, TTFT, ITL.")
    p.add_argument("--url", required=True, help="endpoint base URL (http://HOST:PORT or .../v1)")
    p.add_argument("--model", required=True)
    p.add_argument("--concurrency", type=int, default=4, help="streams in flight (default 4)")
    p.add_argument("--requests", type=int, default=16, help="measured requests (default 16)")
    p.add_argument("--max-tokens", type=int, default=256, help="tokens per response (default 256)")
    p.add_argument("--warmup", type=int, default=1, help="unmeasured requests first, e.g. to wake a tier (default 1)")
    p.add_argument("--api-key-env", metavar="VAR", help="environment variable holding the API key")
    p.add_argument("--timeout-s", type=float, default=600.0, help="per-request timeout (default 600)")
    p.add_argument("--no-ignore-eos", action="store_true", help="do not send vLLM's ignore_eos extra")
    p.add_argument("--json", metavar="FILE", help="write the figures as JSON")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of `spotinference bench throughput`; returns the exit status."""
    args = _parser().parse_args(argv)
    err = Console(stderr=True, highlight=False, soft_wrap=True)
    if min(args.concurrency, args.requests, args.max_tokens) < 1 or args.warmup < 0 or args.timeout_s <= 0:
        err.print("[bold red]throughput:[/] --concurrency, --requests, --max-tokens, --timeout-s must be positive")
        return 2
    if "://" not in args.url:
        err.print(f"[bold red]throughput:[/] not a URL: {args.url!r}")
        return 2
    key = None
    if args.api_key_env:
        key = os.environ.get(args.api_key_env)
        if not key:
            err.print(f"[bold red]throughput:[/] environment variable {args.api_key_env} is not set")
            return 2
    cfg = BenchConfig(url=base_url(args.url), model=args.model, concurrency=args.concurrency,
                      requests=args.requests, max_tokens=args.max_tokens, warmup=args.warmup, api_key=key,
                      timeout_s=args.timeout_s, ignore_eos=not args.no_ignore_eos)
    failed = 0

    def done(s: Stream) -> None:
        nonlocal failed
        failed += s.error is not None
        bar.advance(status=f"{failed} errors")

    try:
        with progress("throughput", cfg.requests, console=err) as bar:
            if cfg.warmup:
                bar.advance(0, status="warmup")  # the live line only: a cold tier may take minutes to wake
            streams = trio.run(run_bench, cfg, done)
    except WarmupFailed as exc:
        err.print(f"[bold red]throughput:[/] {exc}")
        return 2
    fig = summarize(cfg, streams)
    Console(highlight=False).print(table(fig))
    for msg, n in fig["error_counts"].items():
        err.print(f"[yellow]throughput:[/] {n} x {msg}")
    if args.json:
        try:
            Path(args.json).write_text(json.dumps(fig, indent=1), encoding="utf-8")
        except OSError as exc:
            err.print(f"[bold red]throughput:[/] cannot write {args.json}: {exc}")
            return 2
    return 1 if fig["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
