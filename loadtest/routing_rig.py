"""The processes of `spotinference bench routing`: N simulated vLLMs and one router in front of them.

Strategy: everything is a separate process started through loadtest/procs.py (own session, death
signal, log file, bounded stop) and its stop is registered on the caller's ExitStack before anything
else starts, so nothing outlives a run. A router is either
- the gateway: `spotinference serve --config F`, one tier over the sims with `routing = POLICY`
  (readiness: its `listening on` line), or
- a peer: a command template with `{port}` (a free loopback port picked here) and `{upstreams}` (the
  sims' URLs: as separate words when the placeholder is a word of its own, as vLLM's `vllm-router
  --worker-urls A B` wants; `{upstreams_csv}` joins them with commas). The template is split like a
  shell line (shlex), never run through a shell; the interpreter's bin directory is put first on PATH,
  so a peer installed in the same venv is found. Readiness: the port answers GET /v1/models with 200.
Both kinds are also asked GET /v1/models before the run, so the first measured request finds a router
that already serves. Each sim's /metrics is read before and after a run (`scrape`): requests finished
(vllm:request_success_total over every reason), prefix-cache queries and hits (tokens).
"""

from __future__ import annotations

import contextlib
import os
import shlex
import sys
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from loadtest import procs

MODEL = "sim-chat"
READY_TIMEOUT_S = 60.0
SCRAPE_TIMEOUT_S = 5.0
COUNTERS = {
    "requests": "vllm:request_success_total",
    "prefix_queries": "vllm:prefix_cache_queries_total",
    "prefix_hits": "vllm:prefix_cache_hits_total",
    "prompt_tokens": "vllm:prompt_tokens_total",
    "generation_tokens": "vllm:generation_tokens_total",
}


@dataclass(frozen=True)
class Router:
    """One thing compared: the gateway with a routing policy, or a peer command template."""

    name: str
    kind: str  # "gateway" | "peer"
    policy: str | None = None
    template: str | None = None


@dataclass(frozen=True)
class SimFlags:
    tokens_per_s: float
    ttft_ms: float
    prefill_tokens_per_s: float
    kv_cache_tokens: int
    max_num_seqs: int
    max_model_len: int

    def argv(self) -> list[str]:
        return [*procs.sim_argv(model=MODEL, tokens_per_s=self.tokens_per_s, ttft_ms=self.ttft_ms),
                "--prefill-tokens-per-s", f"{self.prefill_tokens_per_s:g}",
                "--kv-cache-tokens", str(self.kv_cache_tokens), "--max-num-seqs", str(self.max_num_seqs),
                "--max-model-len", str(self.max_model_len)]


class ProcessDied(RuntimeError):
    """A process under test exited during the run."""


@dataclass
class Rig:
    sims: list[procs.Proc] = field(default_factory=list)
    router: procs.Proc | None = None
    url: str = ""  # the router's base URL, http://HOST:PORT
    argv: list[str] = field(default_factory=list)  # how the router was started

    def check_alive(self) -> None:
        for proc in [*self.sims, *([self.router] if self.router else [])]:
            if proc.popen.poll() is not None:
                raise ProcessDied(f"{proc.name} exited with {proc.popen.returncode} mid-run; log tail:\n"
                                  f"{proc.log_tail()}")


def parse_peer(spec: str) -> Router:
    """`NAME=CMD` -> a peer Router (ValueError when malformed)."""
    name, sep, template = spec.partition("=")
    name, template = name.strip(), template.strip()
    if not sep or not name or not template or any(c in name for c in " /"):
        raise ValueError(f"--peer wants NAME=COMMAND, got {spec!r}")
    if "{port}" not in template:
        raise ValueError(f"--peer {name}: the command needs a {{port}} placeholder")
    if "{upstreams" not in template:
        raise ValueError(f"--peer {name}: the command needs an {{upstreams}} (or {{upstreams_csv}}) "
                         "placeholder")
    return Router(name=name, kind="peer", template=template)


def peer_argv(template: str, port: int, upstreams: list[str]) -> list[str]:
    """The peer's argv: shlex words, `{upstreams}` alone expanded to one word per URL."""
    out: list[str] = []
    for word in shlex.split(template):
        if word == "{upstreams}":
            out += upstreams
            continue
        out.append(word.replace("{port}", str(port)).replace("{upstreams_csv}", ",".join(upstreams))
                   .replace("{upstreams}", " ".join(upstreams)))
    return out


def gateway_config(upstreams: list[str], policy: str, load_bound: int | None) -> str:
    ups = ", ".join(f'"{u}"' for u in upstreams)
    text = ('[server]\nlisten = "127.0.0.1:0"\n\n'
            f'[[tiers]]\nname = "local"\nupstreams = [{ups}]\nmodels = ["{MODEL}"]\nrouting = "{policy}"\n')
    if load_bound is not None:
        text += f"load_bound = {load_bound}\n"
    return text


def _wait_serving(proc: procs.Proc, url: str, timeout_s: float) -> None:
    """Poll GET {url}/v1/models until 200 (bounded); StartError with the log tail otherwise."""
    deadline = time.monotonic() + timeout_s
    last = ""
    while time.monotonic() < deadline:
        if proc.popen.poll() is not None:
            raise procs.StartError(f"{proc.name} exited with {proc.popen.returncode}:\n{proc.log_tail()}")
        try:
            resp = httpx.get(url + "/v1/models", timeout=2.0)
            if resp.status_code == 200:
                return
            last = f"HTTP {resp.status_code}"
        except httpx.HTTPError as exc:
            last = type(exc).__name__
        time.sleep(0.1)
    raise procs.StartError(f"{proc.name} did not serve /v1/models within {timeout_s:.0f}s ({last}):\n"
                           f"{proc.log_tail()}")


def start(router: Router, hosts: int, flags: SimFlags, workdir: Path, stack: ExitStack,
          load_bound: int | None = None) -> Rig:
    """Fresh sims (cold caches) and `router` in front of them; every stop registered on `stack`."""
    rig = Rig()
    tag = router.name
    for i in range(hosts):
        proc = procs.launch(f"{tag}-sim{i}", flags.argv(), workdir)
        stack.callback(proc.stop)
        rig.sims.append(proc)
    for proc in rig.sims:
        procs.wait_ready(proc)
    upstreams = [p.url for p in rig.sims]
    if router.kind == "gateway":
        config = workdir / f"{tag}-gateway.toml"
        config.write_text(gateway_config(upstreams, router.policy or "round_robin", load_bound))
        rig.argv = procs.gateway_argv(config)
        proc = procs.launch(f"{tag}-gateway", rig.argv, workdir)
        stack.callback(proc.stop)
        rig.router = procs.wait_ready(proc, READY_TIMEOUT_S)
        rig.url = proc.url
    else:
        port = procs.free_port()
        rig.argv = peer_argv(router.template or "", port, upstreams)
        bindir = os.path.dirname(sys.executable)
        env = {"PATH": bindir + os.pathsep + os.environ.get("PATH", "")}
        try:
            proc = procs.launch(f"{tag}-peer", rig.argv, workdir, env=env)
        except OSError as exc:
            raise procs.StartError(f"peer {tag}: cannot run {rig.argv[0]!r}: {exc}") from exc
        stack.callback(proc.stop)
        rig.router = proc
        rig.url = f"http://127.0.0.1:{port}"
    _wait_serving(rig.router, rig.url, READY_TIMEOUT_S)
    return rig


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text -> {metric name: sum over its label sets}."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name = line.split("{", 1)[0].split(" ", 1)[0]
        with contextlib.suppress(ValueError, IndexError):
            out[name] = out.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
    return out


def scrape(rig: Rig) -> list[dict[str, float | None]]:
    """Each sim's counters of interest (None where the sim does not export one)."""
    out = []
    for proc in rig.sims:
        resp = httpx.get(proc.url + "/metrics", timeout=SCRAPE_TIMEOUT_S)
        resp.raise_for_status()
        metrics = parse_metrics(resp.text)
        out.append({key: metrics.get(name) for key, name in COUNTERS.items()})
    return out


def deltas(before: list[dict], after: list[dict]) -> list[dict[str, float | None]]:
    """after - before, per sim and counter (None when either side lacks it)."""
    return [{k: (None if a.get(k) is None or b.get(k) is None else a[k] - b[k]) for k in COUNTERS}
            for b, a in zip(before, after)]
