"""Start and stop the processes a benchmark drives: simulated upstreams, the gateway, nginx.

Strategy: everything under test is a separate OS process started the way a user starts it -- the
`spotinference` command line (`sim`, `serve`) and Debian's nginx binary -- never imported, so loadtest/
measures what ships and imports nothing from proxy/, ops/ or backends/. Rules:
- Readiness is the process's own word: `sim` and `serve` print `... listening on http://HOST:PORT` on
  stdout (they bind port 0 and report the real port, so there is no port race); stdout and stderr go
  to files in a work directory that we poll, so a chatty process can never block on a full pipe and a
  failed start is reported with the tail of its log. nginx cannot report a port, so we pick free
  ports, render loadtest/nginx.conf, and wait until every port accepts a connection.
- Every child runs in its own session (one process group per child, so `stop()` reaches the
  gateway's worker processes too) with PR_SET_PDEATHSIG=SIGTERM, so a harness killed with SIGKILL
  does not leave orphans behind (the children shut their own workers down). `stop()` is SIGTERM to the group, a bounded wait, then SIGKILL.
- `cpus=` pins a child to those CPUs (sched_setaffinity before exec; its workers inherit it), and
  `pinned_to(cpus)` pins every thread of this process for a block: how `bench overhead --pin` gives
  the proxies under test a core of their own.
- CPU time and memory are read from /proc for the process and all its descendants: schedstat gives
  nanoseconds per thread (ticks from /proc/PID/stat are 10 ms, too coarse for short slices).
- Which program is "spotinference" is `$SPOTINFERENCE_CMD` (shell words) if set, else
  `python -m proxy` from this interpreter, so a benchmark can target another install.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import re
import resource
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

_READY = re.compile(rb"listening on (http://[^\s]+)")
_PR_SET_PDEATHSIG = 1
_NGINX_TEMPLATE = Path(__file__).with_name("nginx.conf")
# Set in every child's environment to its work directory, so a test can prove none outlived the run.
RUN_MARKER = "SPOTINFERENCE_BENCH_WORKDIR"


class StartError(RuntimeError):
    """A child process exited or stayed silent before it reported readiness."""


def spotinference_cmd() -> list[str]:
    """The command line prefix that runs `spotinference` (overridable with $SPOTINFERENCE_CMD)."""
    override = os.environ.get("SPOTINFERENCE_CMD")
    if override:
        return shlex.split(override)
    return [sys.executable, "-m", "proxy"]


def _child_setup(cpus: frozenset[int] | None = None) -> None:
    # Runs in the child between fork and exec: stop with the harness even if it is SIGKILLed. SIGTERM,
    # not SIGKILL, so that nginx's master and the gateway's supervisor take their workers down too.
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if cpus is not None:  # inherited by every process and thread the child starts
        os.sched_setaffinity(0, cpus)


def usable_cpus() -> list[int]:
    """The CPUs this process may run on (its affinity mask, not os.cpu_count()), ascending."""
    return sorted(os.sched_getaffinity(0))


def _set_affinity_all_threads(cpus: set[int] | frozenset[int]) -> None:
    # sched_setaffinity(0) moves only the calling thread: move every thread of this process.
    for tid in os.listdir("/proc/self/task"):
        with contextlib.suppress(ProcessLookupError):
            os.sched_setaffinity(int(tid), cpus)


@contextlib.contextmanager
def pinned_to(cpus: set[int]) -> Iterator[None]:
    """Every thread of this process on `cpus` for the block; the affinity it had is restored after."""
    before = os.sched_getaffinity(0)
    _set_affinity_all_threads(cpus)
    try:
        yield
    finally:
        _set_affinity_all_threads(before)


@dataclass
class Proc:
    """One started child process (and its process group)."""

    name: str
    popen: subprocess.Popen
    log_path: Path
    url: str = ""
    ports: list[int] = field(default_factory=list)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def pids(self) -> list[int]:
        """This process and all its live descendants (the gateway's workers, nginx's worker)."""
        return [self.pid, *descendants(self.pid)]

    def log_tail(self, n_bytes: int = 2000) -> str:
        try:
            data = self.log_path.read_bytes()
        except OSError:
            return ""
        return data[-n_bytes:].decode("utf-8", "replace")

    def stop(self, grace_s: float = 5.0) -> None:
        """SIGTERM the process group, wait up to `grace_s`, then SIGKILL it. Idempotent."""
        if self.popen.poll() is None:
            _killpg(self.pid, signal.SIGTERM)
            try:
                self.popen.wait(grace_s)
            except subprocess.TimeoutExpired:
                pass
        # Also reap stragglers of the group (workers that outlived their parent).
        _killpg(self.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(grace_s)


def _killpg(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def work_dir(stack: contextlib.ExitStack, given: Path | None, prefix: str) -> Path:
    """The run's folder for configs and process logs: `given` (made if missing; kept afterwards), or a
    temporary one removed when `stack` closes."""
    if given is not None:
        given.mkdir(parents=True, exist_ok=True)
        return given
    return Path(stack.enter_context(tempfile.TemporaryDirectory(prefix=prefix)))


def launch(name: str, argv: list[str], workdir: Path, env: dict[str, str] | None = None,
           cpus: set[int] | None = None) -> Proc:
    """Start `argv` in its own session with stdout+stderr to `workdir/NAME.log`; do not wait.

    `cpus`: run it (and everything it starts) only on these CPUs; None: wherever this process may."""
    log_path = workdir / f"{name}.log"
    setup = functools.partial(_child_setup, None if cpus is None else frozenset(cpus))
    with open(log_path, "wb") as log:
        popen = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            # Only prctl() and sched_setaffinity() run in the child; we launch from the main thread.
            preexec_fn=setup,  # noqa: PLW1509
            env={**os.environ, "PYTHONUNBUFFERED": "1", RUN_MARKER: str(workdir), **(env or {})},
        )
    return Proc(name=name, popen=popen, log_path=log_path)


def wait_ready(proc: Proc, timeout_s: float = 30.0) -> Proc:
    """Poll the process's log for its `listening on http://HOST:PORT` line; fill `url` and `ports`."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            match = _READY.search(proc.log_path.read_bytes())
        except OSError:
            match = None
        if match:
            proc.url = match.group(1).decode().rstrip("/")
            proc.ports = [int(proc.url.rsplit(":", 1)[1])]
            return proc
        if proc.popen.poll() is not None:
            raise StartError(f"{proc.name} exited with {proc.popen.returncode}:\n{proc.log_tail()}")
        if time.monotonic() > deadline:
            raise StartError(f"{proc.name} not ready after {timeout_s:.0f}s:\n{proc.log_tail()}")
        time.sleep(0.02)


def sim_argv(
    *,
    model: str = "sim-chat",
    tokens_per_s: float | None = None,
    ttft_ms: float | None = None,
    latency_ms: float | None = None,
) -> list[str]:
    """`spotinference sim` on 127.0.0.1, port 0."""
    argv = [*spotinference_cmd(), "sim", "--listen", "127.0.0.1:0", "--model", model]
    if tokens_per_s is not None:
        argv += ["--tokens-per-s", f"{tokens_per_s:g}"]
    if ttft_ms is not None:
        argv += ["--ttft-ms", f"{ttft_ms:g}"]
    if latency_ms is not None:
        argv += ["--latency-ms", f"{latency_ms:g}"]
    return argv


def gateway_config(upstreams: list[str], models: tuple[str, ...] = ("sim-chat", "sim-embed")) -> str:
    """The smallest gateway TOML: one tier, no keys file (no auth on loopback)."""
    ups = ", ".join(f'"{u}"' for u in upstreams)
    mods = ", ".join(f'"{m}"' for m in models)
    return (
        '[server]\nlisten = "127.0.0.1:0"\n\n'
        f'[[tiers]]\nname = "local"\nupstreams = [{ups}]\nmodels = [{mods}]\n'
    )


def gateway_argv(config_path: Path, workers: int = 1) -> list[str]:
    """`spotinference serve` for a config file written by `gateway_config`."""
    argv = [*spotinference_cmd(), "serve", "--config", str(config_path)]
    if workers != 1:
        argv += ["--workers", str(workers)]
    return argv


def launch_gateway(name: str, upstreams: list[str], workdir: Path, workers: int = 1,
                   cpus: set[int] | None = None) -> Proc:
    """Write a config for `upstreams` and launch `spotinference serve` on it (call wait_ready next)."""
    config_path = workdir / f"{name}.toml"
    config_path.write_text(gateway_config(upstreams))
    return launch(name, gateway_argv(config_path, workers), workdir, cpus=cpus)


# --- nginx -----------------------------------------------------------------------------------------


def nginx_binary() -> str | None:
    """Path of the nginx binary, or None when it is not installed."""
    return shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if os.access(p, os.X_OK)), None
    )


def free_port() -> int:
    """A port that was free a moment ago (only for nginx, which cannot report a port-0 bind)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def render_nginx_conf(prefix: Path, routes: list[tuple[int, str]], nofile: int) -> str:
    """nginx.conf from the template: one `server` per (listen port, upstream http://host:port)."""
    blocks = []
    for i, (port, upstream) in enumerate(routes):
        hostport = upstream.split("://", 1)[1].rstrip("/")
        blocks.append(
            f"    upstream up{i} {{\n        server {hostport};\n        keepalive 512;\n"
            # Below the 5 s after which uvicorn (vLLM, and the sim) drops idle keep-alive connections:
            # otherwise nginx reuses one the upstream is closing and answers 502.
            "        keepalive_requests 1000000;\n        keepalive_timeout 4s;\n    }\n"
            f"    server {{\n        listen 127.0.0.1:{port} backlog=4096;\n"
            f"        location / {{\n            proxy_pass http://up{i};\n"
            "        }\n    }\n"
        )
    text = _NGINX_TEMPLATE.read_text()
    user = "user root;" if os.geteuid() == 0 else ""
    return (
        text.replace("@@PREFIX@@", str(prefix))
        .replace("@@USER@@", user)
        .replace("@@NOFILE@@", str(nofile))
        .replace("@@CONNECTIONS@@", str(max(1024, nofile // 2)))
        .replace("@@SERVERS@@", "\n".join(blocks))
    )


def start_nginx(upstreams: list[str], workdir: Path, timeout_s: float = 15.0,
                cpus: set[int] | None = None) -> Proc:
    """Run nginx (non-daemon, one worker) with one reverse-proxy port per upstream; wait for all ports.

    `proc.ports[i]` fronts `upstreams[i]`; `proc.url` is the first; `cpus` as for `launch`. Raises
    StartError if nginx is missing or does not come up (three tries, in case a picked port was taken).
    """
    binary = nginx_binary()
    if binary is None:
        raise StartError("nginx is not installed")
    prefix = workdir / "nginx"
    (prefix / "tmp").mkdir(parents=True, exist_ok=True)
    nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    last_error = ""
    for attempt in range(3):
        ports = [free_port() for _ in upstreams]
        conf = prefix / "nginx.conf"
        conf.write_text(render_nginx_conf(prefix, list(zip(ports, upstreams)), nofile))
        proc = launch(
            "nginx" if attempt == 0 else f"nginx-{attempt}",
            [binary, "-p", str(prefix), "-c", str(conf), "-e", str(prefix / "error.log"),
             "-g", "daemon off;"],
            workdir,
            cpus=cpus,
        )
        if _wait_ports(proc, ports, timeout_s):
            proc.ports = ports
            proc.url = f"http://127.0.0.1:{ports[0]}"
            return proc
        err = (prefix / "error.log").read_text(errors="replace") if (prefix / "error.log").exists() else ""
        last_error = f"{proc.log_tail()}\n{err[-2000:]}"
        proc.stop()
    raise StartError(f"nginx did not start:\n{last_error}")


def _wait_ports(proc: Proc, ports: list[int], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    pending = list(ports)
    while pending:
        if proc.popen.poll() is not None or time.monotonic() > deadline:
            return False
        try:
            with socket.create_connection(("127.0.0.1", pending[0]), timeout=0.5):
                pending.pop(0)
        except OSError:
            time.sleep(0.02)
    return True


# --- /proc accounting ------------------------------------------------------------------------------


def marked_pids(workdir: Path) -> list[int]:
    """Live processes whose environment carries RUN_MARKER=workdir (children of a `launch`)."""
    needle = f"{RUN_MARKER}={workdir}".encode() + b"\0"
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if needle in Path(f"/proc/{entry}/environ").read_bytes() + b"\0":
                    found.append(int(entry))
            except OSError:
                continue
    return found


def descendants(pid: int) -> list[int]:
    """Live descendants of `pid`, from the ppid field of /proc/*/stat."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_bytes()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(b")") + 2 :].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    out, stack = [], [pid]
    while stack:
        for child in children.get(stack.pop(), ()):
            out.append(child)
            stack.append(child)
    return out


def cpu_seconds(pids: list[int]) -> float:
    """On-CPU time (user + system) of the given processes, all threads, in seconds."""
    total = 0.0
    for pid in pids:
        total += _cpu_one(pid)
    return total


def _cpu_one(pid: int) -> float:
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return 0.0
    ns = 0
    for tid in tasks:
        try:
            ns += int(Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return _cpu_ticks(pid)  # no schedstat on this kernel: fall back to 10 ms ticks
    return ns / 1e9


def _cpu_ticks(pid: int) -> float:
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return 0.0
    fields = stat[stat.rindex(b")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_bytes(pids: list[int]) -> int:
    """Resident set size of the given processes, summed, in bytes."""
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
                    break
        except OSError:
            continue
    return total


def raise_nofile(want: int) -> int:
    """Raise this process's soft RLIMIT_NOFILE toward `want` (capped by the hard limit); return it.

    Children started afterwards inherit it, which is how the gateway gets room for 10,000 sockets.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = want if hard == resource.RLIM_INFINITY else min(want, hard)
    if target > soft:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]
