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
- By default everything shares every CPU, as on a small host. `--pin` then ALSO measures a subset of
  the cells with the proxies under test alone on a core: the first rig is stopped (its own ExitStack),
  a second one starts with the gateways and nginx on the lowest usable CPU and the sims on the rest,
  and this process is pinned to the rest too for those cells (its affinity restored afterwards). Its
  rows carry `_pin` / ` [pinned]`; meta["pin"] says which CPUs each side had. Fewer than 2 usable
  CPUs: a note, and no pinned rows.

Layout: this module is the command (`main(argv)`: arguments, the run, the outputs). The HTTP client is
loadtest/rawhttp.py; targets, stats and the interleaved slices loadtest/overhead_load.py; the
processes under test loadtest/overhead_rig.py; the plan, the cells and their rows
loadtest/overhead_cells.py; `--limits` (a limited key, buckets in the mmap table vs Redis)
loadtest/overhead_limits.py; the table, Markdown and metadata loadtest/overhead_report.py. Their public
names are re-exported here, so `from loadtest import overhead as o; o.run_cell(...)` keeps working.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from contextlib import ExitStack
from pathlib import Path

import trio

from loadtest import procs
from loadtest.overhead_cells import (
    BIG_STREAMS_RAMP_S,
    Interrupted,
    Plan,
    big_streams,
    idle_connections,
    latency_row,
    measure,
    steps,
    throughput_row,
)
from loadtest.overhead_limits import CELLS as LIMITS_CELLS
from loadtest.overhead_limits import run_limits
from loadtest.overhead_load import (
    CONN_ERROR_BACKOFF_S,
    DRAIN_TIMEOUT_S,
    OPEN_LOOP_MAX_INFLIGHT,
    REQUEST_TIMEOUT_S,
    Shape,
    Stat,
    Target,
    added,
    chat_body,
    percentiles,
    requests_for,
    run_cell,
    run_slice,
)
from loadtest.overhead_report import COLUMNS, markdown, render, run_meta, table_rows
from loadtest.overhead_rig import GATEWAYS, PROFILES, ProcessDied, Rig, start_rig
from loadtest.progress import progress
from loadtest.rawhttp import (
    CONNECT_TIMEOUT_S,
    MAX_IDLE_S,
    STALE_CHECK_AFTER_S,
    Conn,
    HttpProtocolError,
    Pool,
    build_request,
)

__all__ = [
    "BIG_STREAMS_RAMP_S", "COLUMNS", "CONNECT_TIMEOUT_S", "CONN_ERROR_BACKOFF_S", "DRAIN_TIMEOUT_S",
    "GATEWAYS", "MAX_IDLE_S", "OPEN_LOOP_MAX_INFLIGHT", "PROFILES", "REQUEST_TIMEOUT_S",
    "STALE_CHECK_AFTER_S", "Conn", "HttpProtocolError", "Interrupted", "Plan", "Pool", "ProcessDied", "Rig",
    "Shape", "Stat", "Target", "added", "big_streams", "build_request", "chat_body", "idle_connections",
    "latency_row", "main", "markdown", "measure", "parse_args", "percentiles", "pin_split", "render", "requests_for",
    "run_cell", "run_meta", "run_slice", "start_rig", "table_rows", "throughput_row",
]


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
    p.add_argument("--limits", action="store_true",
                   help="also measure a rate-limited key: buckets in the workers' mmap table vs in Redis "
                        "(starts its own redis-server; skipped with a note if it is not installed)")
    p.add_argument("--pin", action="store_true",
                   help="also measure a subset of the cells with the gateways and nginx alone on one CPU "
                        "and the sims and this load generator on the others (needs 2 usable CPUs)")
    p.add_argument("--workdir", type=Path, help="keep configs and process logs here (default: temp dir)")
    return p.parse_args(argv)


def pin_split(cpus: list[int]) -> tuple[set[int], set[int]] | None:
    """(proxy CPUs, sims' and load generator's CPUs) for `--pin`: the lowest CPU, the rest; None if < 2."""
    return ({cpus[0]}, set(cpus[1:])) if len(cpus) >= 2 else None


def main(argv: list[str] | None = None) -> int:
    """`spotinference bench overhead ...`; 0 when every request succeeded."""
    from rich.console import Console

    args = parse_args(sys.argv[1:] if argv is None else argv)
    plan = Plan.quick() if args.quick else Plan.full(args.duration_s)
    nofile = procs.raise_nofile(plan.idle_conns + 4096)
    console = Console(width=None if sys.stdout.isatty() else 160)  # room for the " [pinned]" labels
    err = Console(stderr=True)
    meta = run_meta(args, plan)
    meta["nofile"] = nofile
    pin = pin_split(procs.usable_cpus()) if args.pin else None
    with ExitStack() as stack:
        workdir = procs.work_dir(stack, args.workdir, "spotinference-bench-")
        try:
            # The shared-core rig has its own stack: every process of it is gone before a pinned one starts.
            with ExitStack() as rig_stack:
                err.print(f"starting sims, gateways and nginx in {workdir}")
                try:
                    rig = start_rig(workdir, rig_stack, use_nginx=not args.no_nginx)
                except procs.StartError as exc:
                    err.print(f"[red]could not start the processes under test:[/red] {exc}")
                    return 2
                for note in rig.notes:
                    err.print(note)
                total = steps(plan) + (1 + len(LIMITS_CELLS) if args.limits else 0)
                with progress("overhead", total, console=err) as bar:  # one line per step unless a terminal
                    rows = trio.run(measure, rig, plan, None, bar.step)
                    rig.check_alive()
                    if args.limits:
                        limit_rows, meta["limits"] = run_limits(rig, plan, workdir, rig_stack, bar.step)
                        rows += limit_rows
            if args.pin and pin is None:
                rig.notes.append("--pin: needs 2 usable CPUs, skipped")
            elif pin:
                with progress("overhead --pin", steps(plan, pinned=True), console=err) as bar:
                    rows += _run_pinned(workdir / "pinned", plan, pin, not args.no_nginx, rig, meta, bar)
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


def _run_pinned(workdir: Path, plan: Plan, pin: tuple[set[int], set[int]], use_nginx: bool, first: Rig,
                meta: dict, bar) -> list[dict]:
    """`--pin`: a second rig in `workdir` (its own logs), proxies on pin[0] and sims on pin[1], measured
    with this process on pin[1], all of it stopped before returning. Its notes join `first.notes` (those
    not already there); a failed start is a note and no rows."""
    proxy_cpus, other_cpus = pin
    workdir.mkdir(parents=True, exist_ok=True)
    bar.note(f"--pin: gateways and nginx on CPU {_cpu_list(proxy_cpus)}, sims and this load generator on "
             f"CPU {_cpu_list(other_cpus)}; starting them in {workdir}")
    with ExitStack() as stack:
        try:
            rig = start_rig(workdir, stack, use_nginx=use_nginx, pin=pin)
        except procs.StartError as exc:
            first.notes.append(f"--pin: could not start the pinned processes, skipped "
                               f"({exc.args[0].strip().splitlines()[-1][:160]})")
            return []
        first.notes += [n for n in rig.notes if n not in first.notes]
        meta["pin"] = {"proxies": sorted(proxy_cpus), "sims_and_load": sorted(other_cpus)}
        with procs.pinned_to(other_cpus):
            rows = trio.run(measure, rig, plan, None, bar.step, True)
            rig.check_alive()
    return rows


def _cpu_list(cpus: set[int]) -> str:
    return ",".join(str(c) for c in sorted(cpus))


if __name__ == "__main__":
    sys.exit(main())
