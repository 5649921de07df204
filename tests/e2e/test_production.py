"""Issue 4 acceptance, end to end: usage accounting through real processes; helpers for test_prod_*.

Strategy: everything runs as an operator runs it -- `python -m proxy sim` as the upstream,
`python -m proxy keys add` for keys, `python -m proxy serve --config FILE [--workers N]` as the gateway,
the official OpenAI SDK as the client (its blocking calls in plain threads; there is no event loop in
these tests), `spotinference usage` for the report and the SQLite file read directly for the rows.
Every process binds 127.0.0.1 port 0, runs in its own process group and is killed as a group in a
`finally`; every wait is a bounded poll; stderr goes to a file (an unread pipe would fill and block
the gateway's JSON logs). Nothing asserts speed: the simulated upstream's pacing (tokens per second)
only makes streams long enough to be "in flight" when a signal arrives.

Requests are matched to usage rows by an `x-request-id` the client sends; responses carry the gateway's
request id, whose first 12 hex digits are a per-process prefix (proxy/exchange.py) -- which worker
answered. The helpers here (`Proc`, `gateway`, `sim`, `add_key`, ...) serve the other test_prod_* files.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import select
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import openai
import pytest

SPOT = [sys.executable, "-m", "proxy"]
ASK = [{"role": "user", "content": "Count the sheep, please."}]
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}}]


# -- processes ------------------------------------------------------------------------------------

class Proc:
    """A `spotinference` subprocess in its own process group; the URL from its `listening on` line."""

    def __init__(self, args: list[str], log_path: Path, *, env: dict | None = None) -> None:
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 -- lives as long as the process; close() closes it
        self.proc = subprocess.Popen([*SPOT, *args], stdout=subprocess.PIPE, stderr=self._log, text=True,
                                     start_new_session=True, env=env)
        self.url = ""
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not self.url:
            ready, _, _ = select.select([self.proc.stdout], [], [], 0.5)
            if ready:
                line = self.proc.stdout.readline()
                if not line:
                    break
                m = re.search(r"listening on (http://\S+)", line)
                if m:
                    self.url = m.group(1)
        if not self.url:
            self.close()
            raise AssertionError(f"{args[0]} did not start: {self.stderr()[-2000:]}")
        self.port = int(self.url.rsplit(":", 1)[1])

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stderr(self) -> str:
        return self.log_path.read_text(errors="replace")

    def events(self, name: str) -> list[dict]:
        """The JSON log lines on stderr whose "event" is `name`."""
        out = []
        for line in self.stderr().splitlines():
            if line.startswith("{") and f'"{name}"' in line:
                with contextlib.suppress(ValueError):
                    rec = json.loads(line)
                    if rec.get("event") == name:
                        out.append(rec)
        return out

    def send(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 40) -> int:
        return self.proc.wait(timeout=timeout)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 40) -> int:
        """Signal, wait (bounded), return the exit status; SIGKILL to the group past the bound."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.kill_group()
                self.proc.wait(timeout=10)
        return self.proc.returncode

    def kill_group(self) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)

    def close(self) -> None:
        """Whatever happened: nothing of this group survives the test."""
        try:
            if self.proc.poll() is None:
                self.stop(signal.SIGTERM, timeout=20)
        finally:
            self.kill_group()
            self.proc.stdout.close()
            self._log.close()


@contextlib.contextmanager
def sim(tmp_path: Path, *args: str) -> Iterator[Proc]:
    p = Proc(["sim", "--listen", "127.0.0.1:0", *args], tmp_path / "sim.stderr")
    try:
        yield p
    finally:
        p.close()


@contextlib.contextmanager
def gateway(config: Path, *args: str) -> Iterator[Proc]:
    """`spotinference serve --config FILE ...`; TMPDIR is the test's directory, so the supervisor's
    metrics directory and rate-limit table land there (and can be checked)."""
    env = {**os.environ, "TMPDIR": str(config.parent)}
    p = Proc(["serve", "--config", str(config), *args], config.parent / "gateway.stderr", env=env)
    try:
        yield p
    finally:
        p.close()


def add_key(keys_file: Path, name: str, *flags: str) -> str:
    r = subprocess.run([*SPOT, "keys", "add", name, "--keys-file", str(keys_file), *flags],
                       check=False, capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def revoke_key(keys_file: Path, name: str) -> None:
    r = subprocess.run([*SPOT, "keys", "revoke", name, "--keys-file", str(keys_file)],
                       check=False, capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr


def write_config(tmp_path: Path, upstream: str, *, keys_file: Path | None = None, usage_db: Path | None = None,
                 drain_s: float = 30.0, workers: int = 1, name: str = "gw.toml") -> Path:
    cfg = tmp_path / name
    text = f'[server]\nlisten = "127.0.0.1:0"\nworkers = {workers}\ndrain_s = {drain_s}\n'
    if keys_file is not None:
        text += f'[auth]\nkeys_file = "{keys_file}"\n'
    if usage_db is not None:
        text += f'[usage]\npath = "{usage_db}"\nflush_s = 0.1\n'
    text += f'[[tiers]]\nname = "local"\nupstreams = ["{upstream}"]\nmodels = ["sim-chat"]\n'
    cfg.write_text(text)
    return cfg


def client(gw: Proc, key: str = "none", **kw) -> openai.OpenAI:
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


def usage_rows(db: Path) -> list[dict]:
    conn = sqlite3.connect(db, timeout=10)
    try:
        conn.row_factory = sqlite3.Row
        return [dict(r) for r in conn.execute("SELECT * FROM usage ORDER BY id")]
    finally:
        conn.close()


def by_request_id(rows: list[dict]) -> dict[str, dict]:
    out = {r["request_id"]: r for r in rows}
    assert len(out) == len(rows), "a request id has several rows"
    return out


def run_threads(fns: list[Callable[[], None]], timeout: float = 60.0) -> None:
    threads = [threading.Thread(target=f, daemon=True) for f in fns]
    for t in threads:
        t.start()
    deadline = time.monotonic() + timeout
    for t in threads:
        t.join(max(0.1, deadline - time.monotonic()))
    assert not any(t.is_alive() for t in threads), "client threads did not finish"


def tokens(u) -> tuple[int, int, int]:
    return (u.prompt_tokens, u.completion_tokens, u.total_tokens)


def row_tokens(row: dict) -> tuple[int, int, int]:
    return (row["prompt_tokens"], row["completion_tokens"], row["total_tokens"])


# -- 1. usage: one row per request, vLLM's own counts ------------------------------------------------

def test_mixed_traffic_leaves_one_exact_usage_row_per_request(tmp_path):
    keys_file = tmp_path / "keys.toml"
    secret = add_key(keys_file, "alice")
    db = tmp_path / "usage.sqlite3"
    with sim(tmp_path, "--tokens-per-s", "200") as up:
        cfg = write_config(tmp_path, up.url, keys_file=keys_file, usage_db=db)
        with gateway(cfg) as gw:
            c = client(gw, secret)
            expect: dict[str, tuple[int, int, int]] = {}  # request id -> usage the upstream reported

            r = c.chat.completions.create(model="sim-chat", messages=ASK, max_tokens=5, extra_headers=rid("u-plain"))
            expect["u-plain"] = tokens(r.usage)

            chunks = list(c.chat.completions.create(
                model="sim-chat", messages=ASK, max_tokens=7, stream=True, stream_options={"include_usage": True},
                extra_headers=rid("u-include")))
            usage_chunks = [ch for ch in chunks if ch.usage is not None]
            assert len(usage_chunks) == 1 and chunks[-1] is usage_chunks[0] and chunks[-1].choices == []
            expect["u-include"] = tokens(chunks[-1].usage)

            # The same request without include_usage: the gateway asks vLLM for usage and hides it.
            chunks = list(c.chat.completions.create(model="sim-chat", messages=ASK, max_tokens=7, stream=True,
                                                    extra_headers=rid("u-hidden")))
            assert all(ch.usage is None and ch.choices for ch in chunks)
            assert chunks[-1].choices[0].finish_reason == "length"
            expect["u-hidden"] = expect["u-include"]  # the simulator's counts are deterministic

            r = c.chat.completions.create(model="sim-chat", messages=ASK, tools=TOOLS, tool_choice="required",
                                          extra_headers=rid("u-tools"))
            assert r.choices[0].message.tool_calls[0].function.name == "get_weather"
            expect["u-tools"] = tokens(r.usage)

            chunks = list(c.chat.completions.create(
                model="sim-chat", messages=ASK, tools=TOOLS, tool_choice="required", stream=True,
                stream_options={"include_usage": True}, extra_headers=rid("u-tools-stream")))
            assert any(ch.choices and ch.choices[0].delta.tool_calls for ch in chunks)
            expect["u-tools-stream"] = tokens(chunks[-1].usage)

            r = c.completions.create(model="sim-chat", prompt="Once upon a time", max_tokens=4,
                                     extra_headers=rid("u-legacy"))
            expect["u-legacy"] = tokens(r.usage)

            errors = {}
            with pytest.raises(openai.NotFoundError):
                c.chat.completions.create(model="no-such-model", messages=ASK, extra_headers=rid("u-404"))
            errors["u-404"] = 404
            with pytest.raises(openai.BadRequestError) as bad:  # refused by the gateway's validation
                c.chat.completions.create(model="sim-chat", messages=ASK, temperature=5, extra_headers=rid("u-400"))
            assert bad.value.body["param"] == "temperature"
            errors["u-400"] = 400
            with pytest.raises(openai.BadRequestError):  # vLLM's context-length 400, passed through
                c.chat.completions.create(model="sim-chat", messages=ASK, max_tokens=100000,
                                          extra_headers=rid("u-400-upstream"))
            errors["u-400-upstream"] = 400

            # A client that goes away mid-stream: 10 s of tokens, it reads three chunks and closes.
            stream = c.chat.completions.create(model="sim-chat", messages=ASK, max_tokens=2000, stream=True,
                                               extra_headers=rid("u-gone"))
            it = iter(stream)
            seen = [next(it) for _ in range(3)]
            assert all(ch.choices for ch in seen)
            stream.close()
            # The row is written when the gateway notices (its next write fails); drain then flushes.
            wait_for(lambda: any(e.get("request_id") == "u-gone" for e in gw.events("access")),
                     "the access line of the abandoned stream")
            assert gw.stop() == 0

    rows = usage_rows(db)
    got = by_request_id(rows)
    assert set(got) == set(expect) | set(errors) | {"u-gone"}  # exactly one row per request, no other
    for request_id, counts in expect.items():
        row = got[request_id]
        assert (row["status"], row["estimated"], row["key_name"]) == (200, 0, "alice"), request_id
        assert row_tokens(row) == counts, request_id
    assert got["u-include"]["stream"] == 1 and got["u-plain"]["stream"] == 0
    assert got["u-legacy"]["endpoint"] == "completions"
    for request_id, status in errors.items():
        row = got[request_id]
        assert row["status"] == status and row["completion_tokens"] is None, request_id
    assert got["u-400-upstream"]["tier"] == "local"  # it reached the upstream, which refused it
    gone = got["u-gone"]
    assert gone["status"] == 499 and gone["estimated"] == 1 and gone["error_type"] == "client_closed"
    assert 3 <= gone["completion_tokens"] < 2000  # tokens relayed so far (one per SSE event)
    secret_free = json.dumps(rows)
    assert secret not in secret_free and "sheep" not in secret_free  # no secret, no prompt text

    report = subprocess.run([*SPOT, "usage", "--db", str(db), "--format", "json"], check=False,
                            capture_output=True, text=True, timeout=30)
    assert report.returncode == 0, report.stderr
    groups = json.loads(report.stdout)["groups"]
    assert len(groups) == 1 and groups[0]["key"] == "alice"
    g = groups[0]
    assert g["requests"] == len(rows) == 10
    assert g["errors"] == 4  # 404, two 400s, the 499
    assert g["estimated"] == 1
    assert g["prompt_tokens"] == sum(p for p, _, _ in expect.values()) + (gone["prompt_tokens"] or 0)
    assert g["completion_tokens"] == sum(c for _, c, _ in expect.values()) + gone["completion_tokens"]
