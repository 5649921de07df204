"""The processes under test of `spotinference bench overhead`, and a Target for each address.

Strategy: one `spotinference sim` per upstream profile (20 ms chat, 100 tokens/s streams, zero
latency for saturation, slow streams for the 1,000-stream check); a gateway in front of each (a
second, two-worker one on the zero-latency sim); one nginx (when installed) with a port in front of
every sim. All are separate processes started through loadtest/procs.py, and every stop is
registered on the caller's ExitStack before the next start, so nothing outlives the run. Sims are
waited for before gateways start; a multi-worker gateway that fails to start is noted, not fatal.
`Rig.check_alive` turns a process that died mid-run into `ProcessDied`: its numbers would be
meaningless. The load generator reaches all of them only through TCP (loadtest/rawhttp.py).
`pin=(proxy_cpus, other_cpus)` (`--pin`) starts the same rig with the gateways and nginx pinned to
proxy_cpus and the sims to other_cpus (sched_setaffinity in the child, loadtest/procs.py); gateways
with more workers than proxy_cpus has CPUs are left out.
"""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

from loadtest import procs
from loadtest.overhead_load import Target

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


def start_rig(workdir: Path, stack: ExitStack, use_nginx: bool,
              pin: tuple[set[int], set[int]] | None = None,
              gateways: dict[str, tuple[str, int]] = GATEWAYS) -> Rig:
    """Start sims, then gateways and nginx in front of them; register every stop on `stack`.

    `pin=(proxy_cpus, other_cpus)`: gateways and nginx only on proxy_cpus, sims only on other_cpus, and
    no gateway with more workers than proxy_cpus has CPUs. None: everything wherever it may run."""
    proxy_cpus, sim_cpus = pin if pin is not None else (None, None)
    if proxy_cpus is not None:
        gateways = {name: g for name, g in gateways.items() if g[1] <= len(proxy_cpus)}
    rig = Rig()
    for name, flags in PROFILES.items():
        proc = procs.launch(f"sim-{name}", procs.sim_argv(**flags), workdir, cpus=sim_cpus)
        stack.callback(proc.stop)
        rig.sims[name] = proc
    for proc in rig.sims.values():
        procs.wait_ready(proc)
    for name, (profile, workers) in gateways.items():
        proc = procs.launch_gateway(f"gateway-{name}", [rig.sims[profile].url], workdir, workers, proxy_cpus)
        stack.callback(proc.stop)
        rig.gateways[name] = proc
    if use_nginx and procs.nginx_binary():
        rig.nginx = procs.start_nginx([p.url for p in rig.sims.values()], workdir, cpus=proxy_cpus)
        stack.callback(rig.nginx.stop)
    else:
        rig.notes.append("nginx: skipped (--no-nginx)" if not use_nginx else
                         "nginx: not installed (apt-get install nginx), its column is empty")
    for name, proc in list(rig.gateways.items()):
        try:
            procs.wait_ready(proc)
        except procs.StartError as exc:
            if gateways[name][1] == 1:
                raise
            # Multi-worker mode is reported, not required: say why it is missing and go on.
            first = exc.args[0].strip().splitlines()
            rig.notes.append(f"gateway --workers {gateways[name][1]} did not start ({first[-1][:120]})")
            proc.stop()
            del rig.gateways[name]
    nginx_pids = rig.nginx.pids() if rig.nginx else []
    for i, (profile, sim) in enumerate(rig.sims.items()):
        rig.targets[(profile, "direct")] = Target("direct", sim.ports[0])
        if rig.nginx:
            rig.targets[(profile, "nginx")] = Target("nginx", rig.nginx.ports[i], nginx_pids)
    for name, gw in rig.gateways.items():
        profile, workers = gateways[name]
        side = "gateway" if workers == 1 else f"gateway-w{workers}"
        rig.targets[(profile, side)] = Target(side, gw.ports[0], gw.pids())
    return rig
