"""The kit of the production tests (tests/e2e/test_production.py, test_prod_*.py): the product as an
operator runs it -- `spotinference sim` as the upstream, `spotinference keys ...` for keys,
`spotinference serve --config FILE [--workers N]` as the gateway -- and the OpenAI SDK as the client.

Processes are `tests.support.processes.Proc`s (own process group, stdout and stderr to files in the
test's directory, killed as a group on the way out). Every wait is a bounded poll (`wait_for`). Requests
are matched to usage rows by an `x-request-id` the client sends (`rid`); a gateway-generated request
id's first 12 hex digits are a per-process prefix (proxy/exchange.py): which worker answered
(`worker_of`).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import openai
from prometheus_client.parser import text_string_to_metric_families

from tests.support import gateway as gateway_kit
from tests.support.processes import SPOT, Proc, start

ASK = [{"role": "user", "content": "Count the sheep, please."}]
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}}]


# -- processes ------------------------------------------------------------------------------------

@contextlib.contextmanager
def sim(tmp_path: Path, *args: str) -> Iterator[Proc]:
    """`spotinference sim --listen 127.0.0.1:0 ARGS`, its URL read from its listening line."""
    with start([*SPOT, "sim", "--listen", "127.0.0.1:0", *args], tmp_path, "sim") as p:
        yield p


@contextlib.contextmanager
def gateway(config: Path, *args: str, cpus: list[int] | None = None) -> Iterator[Proc]:
    """`spotinference serve --config FILE ...`; TMPDIR is the test's directory, so the supervisor's
    metrics directory and rate-limit table land there (and can be checked). `cpus`: run it under
    `taskset -c` (its CPU affinity, as a cgroup or systemd's CPUAffinity= would set it)."""
    env = {**os.environ, "TMPDIR": str(config.parent)}
    pin = ["taskset", "-c", ",".join(map(str, cpus))] if cpus else []
    with start([*pin, *SPOT, "serve", "--config", str(config), *args], config.parent, "gateway", env=env) as p:
        yield p


def add_key(keys_file: Path, name: str, *flags: str) -> str:
    """`spotinference keys add NAME` -> the new secret."""
    r = subprocess.run([*SPOT, "keys", "add", name, "--keys-file", str(keys_file), *flags],
                       check=False, capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def revoke_key(keys_file: Path, name: str) -> None:
    r = subprocess.run([*SPOT, "keys", "revoke", name, "--keys-file", str(keys_file)],
                       check=False, capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr


def write_config(tmp_path: Path, upstream: str, *, keys_file: Path | None = None, usage_db: Path | None = None,
                 drain_s: float = 30.0, workers: int | str = 1, name: str = "gw.toml") -> Path:
    """A gateway config: one tier `local` serving `sim-chat` from `upstream`, on 127.0.0.1 port 0
    (`workers` is written as given: `'"auto"'` for the string)."""
    cfg = tmp_path / name
    text = f'[server]\nlisten = "127.0.0.1:0"\nworkers = {workers}\ndrain_s = {drain_s}\n'
    if keys_file is not None:
        text += f'[auth]\nkeys_file = "{keys_file}"\n'
    if usage_db is not None:
        text += f'[usage]\npath = "{usage_db}"\nflush_s = 0.1\n'
    text += f'[[tiers]]\nname = "local"\nupstreams = ["{upstream}"]\nmodels = ["sim-chat"]\n'
    cfg.write_text(text)
    return cfg


# -- clients --------------------------------------------------------------------------------------

def client(gw: Proc, key: str = "none", **kw) -> openai.OpenAI:
    """An SDK client of the gateway: no retries (a failure shows as it happened), 30 s timeout."""
    return openai.OpenAI(base_url=gw.url + "/v1", api_key=key, max_retries=0, timeout=30, **kw)


def rid(request_id: str) -> dict:
    return {"x-request-id": request_id}


def worker_of(request_id: str) -> str:
    """The per-process prefix of a gateway-generated request id: which worker answered."""
    return request_id[:12]


def children(pid: int) -> set[int]:
    """Child pids of `pid`, from /proc/<pid>/task/*/children."""
    out: set[int] = set()
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):
            out.update(int(x) for x in (task / "children").read_text().split())
    return out


def wait_for(pred: Callable[[], object], what: str, timeout: float = 15.0, interval: float = 0.05):
    """Poll `pred` until it returns something truthy (returned), at most `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(interval)


def run_threads(fns: list[Callable[[], None]], timeout: float = 60.0) -> None:
    """Run each function in its own thread; all must finish within `timeout` seconds."""
    threads = [threading.Thread(target=f, daemon=True) for f in fns]
    for t in threads:
        t.start()
    deadline = time.monotonic() + timeout
    for t in threads:
        t.join(max(0.1, deadline - time.monotonic()))
    assert not any(t.is_alive() for t in threads), "client threads did not finish"


def scrape(url: str) -> dict[str, dict]:
    """One GET URL/metrics on a fresh connection -> {sample name: {sorted label tuple: value}}."""
    r = httpx.get(url + "/metrics", timeout=10, headers={"connection": "close"})
    assert r.status_code == 200
    out: dict[str, dict] = {}
    for fam in text_string_to_metric_families(r.text):
        for s in fam.samples:
            out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return out


def by_label(samples: dict, label: str) -> dict[str, float]:
    """Samples of one metric summed per value of `label`."""
    out: dict[str, float] = {}
    for labels, value in samples.items():
        key = dict(labels)[label]
        out[key] = out.get(key, 0) + value
    return out


# -- usage rows -----------------------------------------------------------------------------------

usage_rows = gateway_kit.usage_rows  # every row of the usage table, in insertion order


def by_request_id(rows: list[dict]) -> dict[str, dict]:
    out = {r["request_id"]: r for r in rows}
    assert len(out) == len(rows), "a request id has several rows"
    return out


def tokens(u) -> tuple[int, int, int]:
    """(prompt, completion, total) of an SDK usage object."""
    return (u.prompt_tokens, u.completion_tokens, u.total_tokens)


def row_tokens(row: dict) -> tuple[int, int, int]:
    """(prompt, completion, total) of a usage row."""
    return (row["prompt_tokens"], row["completion_tokens"], row["total_tokens"])
