"""The figures and the report of `spotinference bench routing`: one row per router, terminal or Markdown.

Strategy: `figures` turns one router's samples and its sims' /metrics deltas into a plain dict (what
--json writes); `table_rows` turns those dicts into text cells once, and `render` (rich) and `markdown`
lay out the same cells, so the terminal, --markdown and docs/BENCHMARKS.md cannot drift apart.
Definitions: TTFT = first content delta - request sent; end-to-end = last byte - request sent (both at
the client, so they include the router); output tokens/s = all completion tokens of the run / its wall
time (first request sent to last one ended): what the whole tier delivered; prefix-cache hit ratio =
sum over the sims of the hits delta / sum of the queries delta (tokens: the share of prompt tokens the
sims did not have to prefill); requests per host = each sim's vllm:request_success_total delta.
`run_meta` records the command line, date, machine (CPUs, model, kernel, load average), versions and
the whole setup (sim flags, workload spec and sizes). Nothing here starts a process but git.
"""

from __future__ import annotations

import os
import platform
import subprocess
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from loadtest.parity_report import percentile
from loadtest.routing_client import Sample

COLUMNS = ("router", "requests", "TTFT P50/P95/P99 ms", "e2e P50/P95 s", "out tok/s", "cache hit",
           "requests per host", "err")


def figures(name: str, kind: str, argv: list[str], samples: list[Sample], wall_s: float,
            hosts: list[dict[str, Any]]) -> dict[str, Any]:
    """One router's row: latency percentiles, tier throughput, the sims' cache and request counters."""
    ok = [s for s in samples if s.error is None]
    ttft = [s.ttft_s() * 1000 for s in ok if s.first is not None]
    e2e = [s.e2e_s() for s in ok]
    tokens = sum(s.completion_tokens for s in ok)
    errors: dict[str, int] = {}
    for s in samples:
        if s.error:
            errors[s.error] = errors.get(s.error, 0) + 1
    hits = [h.get("prefix_hits") for h in hosts]
    queries = [h.get("prefix_queries") for h in hosts]
    have_cache = all(v is not None for v in hits + queries)
    q_sum = sum(queries) if have_cache else 0
    return {
        "router": name, "kind": kind, "argv": argv,
        "requests": len(samples), "ok": len(ok), "errors": len(samples) - len(ok), "error_counts": errors,
        "ttft_ms": {f"p{q}": percentile(ttft, q) for q in (50, 95, 99)},
        "e2e_s": {f"p{q}": percentile(e2e, q) for q in (50, 95, 99)},
        "completion_tokens": tokens, "prompt_tokens": sum(s.prompt_tokens or 0 for s in ok),
        "wall_s": wall_s, "output_tokens_per_s": tokens / wall_s if wall_s and wall_s > 0 else None,
        "prefix_cache": {
            "hits": sum(hits) if have_cache else None, "queries": q_sum if have_cache else None,
            "hit_ratio": (sum(hits) / q_sum) if have_cache and q_sum > 0 else None,
        },
        "requests_per_host": [int(h["requests"]) if h.get("requests") is not None else None for h in hosts],
        "hosts": hosts,
    }


def _triple(d: dict[str, float | None], keys: tuple[str, ...], fmt: str) -> str:
    if any(d.get(k) is None for k in keys):
        return "-"
    return "/".join(format(d[k], fmt) for k in keys)


def table_rows(rows: list[dict[str, Any]]) -> list[list[str]]:
    """The report as text cells (also what docs/BENCHMARKS.md pastes)."""
    out = []
    for r in rows:
        if r.get("failed"):
            out.append([r["router"], "-", "-", "-", "-", "-", "-", f"did not run: {r['failed'][:60]}"])
            continue
        ratio = r["prefix_cache"]["hit_ratio"]
        per_host = r["requests_per_host"]
        out.append([
            r["router"], str(r["requests"]),
            _triple(r["ttft_ms"], ("p50", "p95", "p99"), ".0f"),
            _triple(r["e2e_s"], ("p50", "p95"), ".2f"),
            "-" if r["output_tokens_per_s"] is None else f"{r['output_tokens_per_s']:,.0f}",
            "-" if ratio is None else f"{ratio:.1%}",
            "/".join("-" if n is None else str(n) for n in per_host),
            str(r["errors"]),
        ])
    return out


LEGEND = ("TTFT = first content delta, e2e = last byte, both from request sent, at the client (router "
          "included). out tok/s = completion tokens of the whole tier / wall time. cache hit = prompt tokens "
          "the sims found in their prefix caches / prompt tokens looked up (delta of the sims' counters). "
          "Sims restarted (cold caches) before every router; the same seeded workload each time.")


def render(rows: list[dict[str, Any]], meta: dict[str, Any], console) -> None:
    from rich.table import Table

    table = Table(title=f"spotinference bench routing -- {meta['date']} -- {meta['mode']}")
    for col in COLUMNS:
        table.add_column(col, justify="left" if col in ("router", "requests per host") else "right")
    for cells in table_rows(rows):
        table.add_row(*cells)
    console.print(table)
    console.print(LEGEND, markup=False)
    console.print(setup_line(meta), markup=False)
    for r in rows:
        for msg, n in (r.get("error_counts") or {}).items():
            console.print(f"- {r['router']}: {n} x {msg}", markup=False)


def setup_line(meta: dict[str, Any]) -> str:
    s, w, ws = meta["sims"], meta["workload"], meta["workload_sizes"]
    if w.get("tools_mode") == "inline":
        tools = " (tool lists inline, --tools inline)"
    else:
        tools = f" + tools of {ws['tools_tokens']['min']}-{ws['tools_tokens']['max']} (request `tools`)"
    return (f"Setup: {meta['hosts']} sims (--tokens-per-s {s['tokens_per_s']:g} --ttft-ms {s['ttft_ms']:g} "
            f"--prefill-tokens-per-s {s['prefill_tokens_per_s']:g} --kv-cache-tokens {s['kv_cache_tokens']} "
            f"--max-num-seqs {s['max_num_seqs']}); {w['conversations']} conversations x {w['turns']} turns "
            f"({ws['requests']} requests), {meta['concurrency']} in flight, {w['groups']} shared system "
            f"prompts of {ws['system_tokens']['min']}-{ws['system_tokens']['max']} tokens{tools}, "
            f"{ws['long_turns']} long turns (max_tokens {w['long_max_tokens']}), seed {w['seed']}.")


def markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    m, v = meta["machine"], meta["versions"]
    lines = [f"`{meta['command']}` -- {meta['date']}, {meta['mode']}", "",
             (f"Machine: {m['cpus']} CPUs ({m['cpu_model']}), Linux {m['kernel']}, load average "
              f"{'/'.join(str(x) for x in m['loadavg_start'])} at start, "
              f"{'/'.join(str(x) for x in m.get('loadavg_end', []))} at end. Versions: spotinference "
              f"{v['spotinference']} (commit {v['commit']}), Python {v['python']}, vllm-router "
              f"{v['vllm-router']}."), "",
             setup_line(meta), "",
             "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(cells) + " |" for cells in table_rows(rows)]
    lines += ["", LEGEND, ""]
    for r in rows:
        if r["kind"] == "peer" and r.get("argv"):
            lines.append(f"- {r['router']}: `{' '.join(r['argv'])}`")
        for msg, n in (r.get("error_counts") or {}).items():
            lines.append(f"- {r['router']}: {n} x {msg}")
    return "\n".join(lines) + "\n"


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _commit() -> str | None:
    here = Path(__file__).parent
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], check=False, capture_output=True,
                                text=True, timeout=10, cwd=here).stdout.strip() or None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], check=False,
                               capture_output=True, text=True, timeout=10, cwd=here).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return None
    return commit + "+uncommitted changes" if commit and dirty else commit


def run_meta(command: str, mode: str) -> dict[str, Any]:
    """Date, machine and versions; the caller adds the setup."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        cpu_model = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), None)
    except OSError:
        cpu_model = None
    return {
        "command": command, "mode": mode,
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "machine": {"cpus": os.cpu_count(), "cpu_model": cpu_model, "kernel": platform.release(),
                    "loadavg_start": [round(x, 2) for x in os.getloadavg()]},
        "versions": {"python": platform.python_version(), "spotinference": _version("spotinference"),
                     "commit": _commit(), "trio": _version("trio"), "httpx": _version("httpx"),
                     "vllm-router": _version("vllm-router")},
    }
