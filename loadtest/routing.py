"""`spotinference bench routing`: which upstream a request goes to, measured on an agent workload.

Strategy: N simulated vLLMs with the prefix-cache and scheduler model on (`--prefill-tokens-per-s`:
TTFT grows with the prompt tokens the sim has not cached; `--kv-cache-tokens`: a per-sim LRU of 16-token
prompt blocks, sized so one sim cannot hold every live conversation but N can; `--max-num-seqs`: a
concurrency limit, the rest wait FIFO), and in front of them, ONE router at a time: the gateway with
`[[tiers]] routing = POLICY` for each `--policies` entry, then each `--peer NAME=CMD` (vllm-router,
...). Every router gets fresh sims (cold caches: a fair start), and the same seeded workload
(loadtest/routing_workload.py): multi-turn agent conversations sharing long system prompts and tool
lists, with growing histories, run concurrently (loadtest/routing_client.py). Per router: TTFT and
end-to-end percentiles, the tier's output tokens/s, the prefix-cache hit ratio the sims saw and the
requests each sim served (deltas of their /metrics), errors. One rich table, `--json`, `--markdown`.
Runs are sequential and bounded (per-request timeout, per-router deadline, bounded starts); every
process is a separate OS process (loadtest/routing_rig.py over loadtest/procs.py), stopped in
`finally` through an ExitStack. `--quick` (CI): 2 sims, a few tiny conversations, seconds; exit 1 on
any error. Exit 2 when a process under test cannot start or dies.

vllm-router (`pip install vllm-router`, not a dependency) as a peer, the command that works:
  --peer 'vllm-router=vllm-router --host 127.0.0.1 --port {port} --worker-urls {upstreams}
          --policy cache_aware --log-level warning'
(with `tools` in a request it asks the worker to render the prompt first, which the sim cannot, and
routes without prefix affinity: `--tools inline` moves the tool lists into the system prompt; its
default `--balance-abs-threshold 64` is never reached by 24 requests in flight, add
`--balance-abs-threshold 4` for a load bound like the gateway's).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import trio

from loadtest import procs
from loadtest import routing_rig as rig_mod
from loadtest.routing_client import run_workload
from loadtest.routing_report import figures, markdown, render, run_meta
from loadtest.routing_workload import WorkloadSpec, build, summary

POLICIES = ("prefix", "round_robin", "least_loaded")
VLLM_ROUTER_PEER = ("vllm-router=vllm-router --host 127.0.0.1 --port {port} --worker-urls {upstreams} "
                    "--policy cache_aware --log-level warning")

# Full-run defaults: about a minute per router on a 2-core machine. --quick overrides them.
FULL = {"hosts": 4, "concurrency": 24, "tokens_per_s": 200.0, "ttft_ms": 20.0,
        "prefill_tokens_per_s": 20000.0,
        "kv_cache_tokens": 32768, "max_num_seqs": 8, "deadline_s": 600.0}
QUICK = {"hosts": 2, "concurrency": 4, "tokens_per_s": 2000.0, "ttft_ms": 5.0,
         "prefill_tokens_per_s": 20000.0,
         "kv_cache_tokens": 2048, "max_num_seqs": 4, "deadline_s": 60.0}


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="spotinference bench routing",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Routing inside a tier on a multi-turn agent workload: the gateway's policies (and "
                    "peers such as vllm-router) in front of N simulated vLLMs with a prefix cache. "
                    "TTFT, end-to-end latency, tier tokens/s, the sims' cache hit ratio, requests per host.",
        epilog="peer example (vllm-router installed in this venv: pip install vllm-router):\n"
               f"  --peer '{VLLM_ROUTER_PEER}'\n"
               "{port} is a free port picked by the bench, {upstreams} the sims' URLs as separate words\n"
               "({upstreams_csv}: comma-joined). The command is split like a shell line, never run by one.")
    p.add_argument("--quick", action="store_true", help="smoke mode for CI: 2 sims, tiny prompts, seconds; "
                                                        "exit 1 on any error")
    p.add_argument("--policies", default=",".join(POLICIES),
                   help="gateway routing policies to compare, comma-separated "
                        f"(default {','.join(POLICIES)}; "
                        "'' for none)")
    p.add_argument("--peer", action="append", default=[], metavar="NAME=CMD",
                   help="another router in front of the same sims; CMD has {port} and {upstreams} "
                        "(repeatable)")
    p.add_argument("--hosts", type=int,
                   help=f"simulated vLLMs (default {FULL['hosts']}, quick {QUICK['hosts']})")
    g = p.add_argument_group("workload (loadtest/routing_workload.py)")
    g.add_argument("--conversations", type=int, help="conversations (default 128)")
    g.add_argument("--turns", type=int, help="turns per conversation (default 10)")
    g.add_argument("--groups", type=int, help="system prompts shared by groups of conversations (default 4)")
    g.add_argument("--concurrency", type=int, help=f"conversations in flight (default {FULL['concurrency']})")
    g.add_argument("--seed", type=int, default=1, help="workload seed (default 1)")
    g.add_argument("--tools", choices=("schema", "inline"), default="schema",
                   help="tool lists as the request's `tools` (schema, default) or as JSON text inside the "
                        "system prompt (inline: for vllm-router, which wants the worker to render a prompt "
                        "with tools, an endpoint the sim lacks)")
    s = p.add_argument_group("simulated vLLMs")
    s.add_argument("--tokens-per-s", type=float,
                   help=f"decode rate per stream (default {FULL['tokens_per_s']:g})")
    s.add_argument("--ttft-ms", type=float, help=f"fixed part of TTFT (default {FULL['ttft_ms']:g})")
    s.add_argument("--prefill-tokens-per-s", type=float,
                   help=f"prefill rate of uncached prompt tokens (default {FULL['prefill_tokens_per_s']:g})")
    s.add_argument("--kv-cache-tokens", type=int,
                   help=f"prefix-cache capacity per sim, tokens (default {FULL['kv_cache_tokens']})")
    s.add_argument("--max-num-seqs", type=int,
                   help=f"concurrent sequences per sim (default {FULL['max_num_seqs']})")
    s.add_argument("--max-model-len", type=int, default=32768,
                   help="context length of the sims (default 32768)")
    p.add_argument("--load-bound", type=int, help="the tier's load_bound for the prefix policy (default: the "
                                                  "gateway's)")
    p.add_argument("--timeout-s", type=float, default=120.0, help="per-request timeout (default 120)")
    p.add_argument("--deadline-s", type=float, help=f"per-router limit on the whole workload (default "
                                                    f"{FULL['deadline_s']:g}, quick {QUICK['deadline_s']:g})")
    p.add_argument("--json", type=Path, metavar="FILE", help="also write the results as JSON")
    p.add_argument("--markdown", type=Path, metavar="FILE", help="also write the table as Markdown")
    p.add_argument("--workdir", type=Path, help="keep configs and process logs here (default: temp dir)")
    return p.parse_args(argv)


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    base = QUICK if args.quick else FULL
    return {k: (getattr(args, k) if getattr(args, k) is not None else v) for k, v in base.items()}


def _spec(args: argparse.Namespace) -> WorkloadSpec:
    spec = WorkloadSpec.quick(args.seed) if args.quick else WorkloadSpec(seed=args.seed)
    over = {k: getattr(args, k) for k in ("conversations", "turns", "groups") if getattr(args, k) is not None}
    if args.tools != spec.tools_mode:
        over["tools_mode"] = args.tools
    return WorkloadSpec(**{**spec.describe(), **over}) if over else spec


def _routers(args: argparse.Namespace) -> list[rig_mod.Router]:
    routers = []
    for name in (x.strip() for x in args.policies.split(",")):
        if not name:
            continue
        if name not in POLICIES:
            raise ValueError(f"unknown policy {name!r} (expected {', '.join(POLICIES)})")
        routers.append(rig_mod.Router(name=name, kind="gateway", policy=name))
    routers += [rig_mod.parse_peer(p) for p in args.peer]
    names = [r.name for r in routers]
    if len(set(names)) != len(names):
        raise ValueError(f"router names must differ: {names}")
    if not routers:
        raise ValueError("nothing to compare: give --policies and/or --peer")
    return routers


def run_one(router: rig_mod.Router, settings: dict[str, Any], flags: rig_mod.SimFlags, convs: list,
            args: argparse.Namespace, workdir: Path, say) -> dict[str, Any]:
    """Fresh sims, the router, the whole workload, the counters; everything stopped before returning."""
    with ExitStack() as stack:
        rig = rig_mod.start(router, settings["hosts"], flags, workdir, stack, args.load_bound)
        say(f"{router.name}: {' '.join(shlex.quote(a) for a in rig.argv)}")
        before = rig_mod.scrape(rig)
        samples, wall = trio.run(lambda: run_workload(
            rig.url, rig_mod.MODEL, convs, concurrency=settings["concurrency"], timeout_s=args.timeout_s,
            deadline_s=settings["deadline_s"]))
        rig.check_alive()
        after = rig_mod.scrape(rig)
    hosts = [{"url": p.url, **d} for p, d in zip(rig.sims, rig_mod.deltas(before, after))]
    return figures(router.name, router.kind, rig.argv, samples, wall, hosts)


def main(argv: list[str] | None = None) -> int:
    """`spotinference bench routing ...`; 0 when every request of every router succeeded."""
    from rich.console import Console

    raw = sys.argv[1:] if argv is None else argv
    args = parse_args(raw)
    err = Console(stderr=True, highlight=False, soft_wrap=True)
    try:
        routers = _routers(args)
        spec = _spec(args)
        convs = build(spec)
    except ValueError as exc:
        err.print(f"[bold red]routing:[/] {exc}")
        return 2
    settings = _settings(args)
    if min(settings["hosts"], settings["concurrency"], settings["max_num_seqs"]) < 1:
        err.print("[bold red]routing:[/] --hosts, --concurrency and --max-num-seqs must be at least 1")
        return 2
    flags = rig_mod.SimFlags(settings["tokens_per_s"], settings["ttft_ms"], settings["prefill_tokens_per_s"],
                             settings["kv_cache_tokens"], settings["max_num_seqs"], args.max_model_len)
    command = "spotinference bench routing " + " ".join(shlex.quote(a) for a in raw)
    meta = run_meta(command.strip(), "quick" if args.quick else "full")
    meta.update(hosts=settings["hosts"], concurrency=settings["concurrency"], sims=flags.__dict__.copy(),
                workload=spec.describe(), workload_sizes=summary(spec, convs), timeout_s=args.timeout_s,
                deadline_s=settings["deadline_s"], load_bound=args.load_bound)
    rows: list[dict[str, Any]] = []
    status = 0
    with ExitStack() as stack:
        workdir = procs.work_dir(stack, args.workdir, "spotinference-routing-")
        err.print(f"{len(routers)} routers x {len(convs)} conversations; processes and logs in {workdir}")
        for router in routers:
            try:
                row = run_one(router, settings, flags, convs, args, workdir, err.print)
            except (procs.StartError, rig_mod.ProcessDied, httpx.HTTPError) as exc:
                err.print(f"[red]{router.name}: {exc}[/red]", markup=True)
                rows.append({"router": router.name, "kind": router.kind, "failed": str(exc).splitlines()[0],
                             "errors": 1, "argv": []})
                status = 2
                continue
            except KeyboardInterrupt:
                err.print("interrupted: every process started has been stopped")
                return 130
            rows.append(row)
            err.print(f"{router.name}: {row['ok']}/{row['requests']} ok in {row['wall_s']:.1f} s")
    meta["machine"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    errors = sum(r["errors"] for r in rows)
    render(rows, meta, Console(width=None if sys.stdout.isatty() else 160))
    print(f"errors: {errors}")
    if args.json:
        args.json.write_text(json.dumps({"meta": meta, "routers": rows, "errors": errors}, indent=1))
    if args.markdown:
        args.markdown.write_text(markdown(rows, meta))
    return status or (1 if errors else 0)


if __name__ == "__main__":
    sys.exit(main())
