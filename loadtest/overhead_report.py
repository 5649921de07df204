"""The report of `spotinference bench overhead`: one table (terminal or Markdown) and the run's metadata.

Strategy: pure functions of the rows built by loadtest/overhead_cells.py. `table_rows` turns rows into
text cells once; `render` (rich, imported lazily) and `markdown` lay out the same cells, so the
terminal table, `--markdown` and what docs/BENCHMARKS.md pastes cannot drift apart. Latency rows show
direct as absolute and +nginx/+gateway as ADDED P50/P95/P99; throughput rows show sustained rates.
Rows of kind "limits" (`--limits`) get their own small table after it, with the cells of
loadtest/overhead_limits.py. `--pin` rows are ordinary rows after the shared-core ones (labels end in
" [pinned]", escaped for rich); `pin_text` says, under the legend and in the Markdown header, which CPUs
each side had (meta["pin"]). `run_meta` records what a reader needs to judge the numbers: date, mode,
machine (CPUs, model, kernel, load average), versions (spotinference and its commit, Python, trio, h11,
msgspec, nginx), the plan and the upstream profiles. Nothing here measures or starts anything but `nginx -v` and git.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import time
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING

from loadtest import overhead_limits as ol
from loadtest import procs
from loadtest.overhead_rig import PROFILES

if TYPE_CHECKING:
    from loadtest.overhead_cells import Plan


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
            gw = "gateway" if "gateway" in t else "gateway-w2"  # a _w2 row's only target is gateway-w2
            cpu_key = "cpu_us_per_req" if key == "rate_per_s" else "cpu_us_per_event"
            ratio = "-" if row["ratio"] is None else f"{row['ratio']:.2f}x"
            cells = [_num((t.get(n) or {}).get(key)) for n in ("direct", "nginx", gw)]
            cells += [ratio, _num((t.get(gw) or {}).get(cpu_key), ".1f"),
                      _num((t.get("nginx") or {}).get(cpu_key), ".1f")]
        out.append([row["label"], *cells, mark, str(row["errors"])])
    return out


COLUMNS = ("measure", "direct", "+nginx", "+gateway", "gw/nginx", "gw CPU us", "nginx CPU us", "budget",
           "err")


def pin_text(meta: dict) -> str | None:
    """What `--pin` did, for the legend and the Markdown header; None when it did not run."""
    pin = meta.get("pin")
    if not pin:
        return None
    return (f"Rows marked [pinned] (--pin): the gateways and nginx alone on CPU "
            f"{','.join(map(str, pin['proxies']))}, the sims and this load generator on CPU "
            f"{','.join(map(str, pin['sims_and_load']))} (sched_setaffinity); all other rows share every CPU.")


def render(rows: list[dict], meta: dict, notes: list[str], console) -> None:
    """Print the one table, then its footnotes (then the --limits table, when it ran)."""
    from rich.markup import escape
    from rich.table import Table

    rows, limits = _split(rows)
    table = Table(title=f"spotinference bench overhead -- {meta['date']} -- {meta['mode']}")
    for col in COLUMNS:
        table.add_column(col, justify="left" if col in ("measure", "budget") else "right")
    section = None
    for row, cells in zip(rows, table_rows(rows)):
        if section is not None and row["kind"] != section:
            table.add_section()
        section = row["kind"]
        table.add_row(*map(escape, cells))  # a label's "[pinned]" is text, not rich markup
    console.print(table)
    console.print(
        "Latency rows (ms, P50/P95/P99): direct is absolute; +nginx and +gateway are ADDED (via - direct,\n"
        "per percentile, same cell, slices interleaved). TTFB = first complete SSE event. SSE gap rows\n"
        "compare inter-event gaps. gw/nginx = ratio of added P95. CPU = microseconds of the proxy's own\n"
        "CPU per request (per event on SSE rows). Throughput rows: sustained rate per target; gw/nginx =\n"
        "ratio of rates. direct in throughput rows is the ceiling of this load generator + sim.")
    if pin_text(meta):
        console.print(pin_text(meta), markup=False)
    for row in (r for r in rows if r.get("note")):
        console.print(f"- {row['label']}: {row['note']}", markup=False)
    for note in notes:
        console.print(f"- {note}", markup=False)
    if limits:
        table = Table(title="--limits: a limited key, buckets in the mmap table vs in Redis")
        for col in ol.COLUMNS:
            table.add_column(col, justify="left" if col == ol.COLUMNS[0] else "right")
        for cells in ol.limits_table_rows(limits):
            table.add_row(*cells)
        console.print(table)
        console.print(ol.LEGEND, markup=False)
        for line in ol.limits_footer(limits):
            console.print(f"- {line}", markup=False)


def _split(rows: list[dict]) -> tuple[list[dict], list[dict]]:
    """(the main table's rows, the --limits rows): the limits rows have their own table."""
    return [r for r in rows if r["kind"] != "limits"], [r for r in rows if r["kind"] == "limits"]


def markdown(rows: list[dict], meta: dict, notes: list[str], command: str) -> str:
    """The same table as Markdown, headed by the command, date, machine and versions (for docs)."""
    v, m = meta["versions"], meta["machine"]
    rows, limits = _split(rows)
    lines = [f"`{command}` -- {meta['date']}, {meta['mode']}", "",
             (f"Machine: {m['cpus']} CPUs ({m['cpu_model']}), Linux {m['kernel']}, load average "
             f"{'/'.join(str(x) for x in m['loadavg_start'])} at start, "
             f"{'/'.join(str(x) for x in m.get('loadavg_end', []))} at end. "
             f"Versions: spotinference {v['spotinference']} (commit {v['commit']}), Python {v['python']}, "
             f"trio {v['trio']}, h11 {v['h11']}, nginx {v['nginx']}."), "",
             *([pin_text(meta), ""] if pin_text(meta) else []),
             "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(cells) + " |" for cells in table_rows(rows)]
    lines.append("")
    lines += [f"- {r['label']}: {r['note']}" for r in rows if r.get("note")]
    lines += [f"- {n}" for n in notes]
    if limits:
        info = meta.get("limits") or {}
        head = f"--limits (redis-server {info.get('redis_version')}, --workers {info.get('workers')}):"
        lines += ["", head, "", "| " + " | ".join(ol.COLUMNS) + " |", "|" + "---|" * len(ol.COLUMNS)]
        lines += ["| " + " | ".join(cells) + " |" for cells in ol.limits_table_rows(limits)]
        lines += ["", ol.LEGEND.replace("\n", " "), ""]
        lines += [f"- {line}" for line in ol.limits_footer(limits)]
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
        "machine": {"cpus": os.cpu_count(), "usable_cpus": procs.usable_cpus(), "cpu_model": cpu_model,
                    "kernel": platform.release(),
                    "loadavg_start": [round(x, 2) for x in os.getloadavg()]},
        "versions": {"python": platform.python_version(), "spotinference": version("spotinference"),
                     "commit": commit, "trio": version("trio"), "h11": version("h11"),
                     "msgspec": version("msgspec"), "nginx": nginx_version},
        "plan": plan.__dict__.copy(),
        "profiles": PROFILES,
    }
