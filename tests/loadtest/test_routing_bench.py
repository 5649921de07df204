"""Smoke test of `spotinference bench routing --quick`, and the pure parts it is built from.

Strategy: run the harness exactly as CI and users do -- a subprocess of the real command, with a work
directory under tmp_path -- then check the JSON: every default policy has figures, no request failed,
and the requests the sims counted (their /metrics) add up to the requests sent, i.e. the per-host
figures account for every request. No peer (vllm-router is not installed in CI) and never a
wall-clock threshold. Afterwards no process started by the run may survive (they carry a marker in
their environment). The workload generator and the peer command template are checked in-process.
"""

from __future__ import annotations

import json
import sys

import pytest

from loadtest import procs
from loadtest.routing import POLICIES
from loadtest.routing_rig import parse_peer, peer_argv
from loadtest.routing_workload import WorkloadSpec, build, messages, request_body
from tests.support.processes import run_harness

RUN_TIMEOUT_S = 240


def test_quick_mode_runs_clean_and_accounts_for_every_request(tmp_path):
    out = tmp_path / "routing.json"
    workdir = tmp_path / "work"
    argv = [sys.executable, "-m", "proxy", "bench", "routing", "--quick", "--json", str(out),
            "--workdir", str(workdir)]
    done = run_harness(argv, tmp_path, workdir, timeout=RUN_TIMEOUT_S)
    assert done.returncode == 0, done.logs()
    assert procs.marked_pids(workdir) == [], "a process of the run outlived it"
    assert "spotinference bench routing" in done.stdout() and "errors: 0" in done.stdout()

    report = json.loads(out.read_text())
    assert report["errors"] == 0
    meta = report["meta"]
    for key in ("command", "date", "machine", "versions", "sims", "workload", "workload_sizes"):
        assert key in meta
    assert meta["mode"] == "quick" and meta["hosts"] == 2
    expected = meta["workload_sizes"]["requests"]
    rows = {r["router"]: r for r in report["routers"]}
    assert set(rows) == set(POLICIES)
    for name, r in rows.items():
        assert r["kind"] == "gateway" and not r.get("failed"), name
        assert r["errors"] == 0 and r["ok"] == r["requests"] == expected, (name, r["error_counts"])
        ttft = r["ttft_ms"]
        assert ttft["p50"] is not None and ttft["p50"] <= ttft["p95"] <= ttft["p99"]
        assert r["e2e_s"]["p50"] is not None and r["e2e_s"]["p50"] <= r["e2e_s"]["p95"]
        assert r["completion_tokens"] > 0 and r["output_tokens_per_s"] > 0
        per_host = r["requests_per_host"]
        assert len(per_host) == 2 and None not in per_host
        assert sum(per_host) == r["requests"], (name, per_host)
        cache = r["prefix_cache"]
        assert cache["queries"] is not None and cache["queries"] > 0, name
        assert 0.0 <= cache["hit_ratio"] <= 1.0, name


def test_workload_is_deterministic_and_grows_its_history():
    spec = WorkloadSpec(conversations=8, turns=4, groups=2, seed=7)
    convs = build(spec)
    assert convs == build(spec)
    assert build(WorkloadSpec(conversations=8, turns=4, groups=2, seed=8)) != convs
    # A group shares its system prompt's head and its tools; conversations add their own specifics.
    a, b, c = convs[0], convs[2], convs[1]
    assert a.group == b.group != c.group and a.tools == b.tools != c.tools
    head = a.system.split("\n\nSession ")[0]
    assert b.system.startswith(head) and a.system != b.system and not c.system.startswith(head)
    # Turn k resends the whole history: every earlier user message and answer, in order.
    answers = ["first answer", "second answer", "third answer"]
    msgs = messages(a, 3, answers)
    assert [m["role"] for m in msgs] == ["system"] + ["user", "assistant"] * 3 + ["user"]
    assert [m["content"] for m in msgs[2:7:2]] == answers
    assert messages(a, 2, answers[:2]) == msgs[:5] + [{"role": "user", "content": a.turns[2].user}]
    body = request_body(a, 0, [], "sim-chat")
    assert body["stream"] and body["stream_options"] == {"include_usage": True}
    assert body["tool_choice"] == "none" and body["tools"] == a.tools
    with pytest.raises(ValueError):
        messages(a, 2, answers[:1])
    # Inline tools: the same conversations, the tool JSON inside the system prompt, no `tools` field.
    inline = build(WorkloadSpec(conversations=8, turns=4, groups=2, seed=7, tools_mode="inline"))
    assert [c.turns for c in inline] == [c.turns for c in convs]
    assert "tools" not in request_body(inline[0], 0, [], "sim-chat")
    assert json.dumps(a.tools) in inline[0].system and inline[0].system.startswith(head)


def test_default_workload_has_the_advertised_shape():
    spec = WorkloadSpec()
    convs = build(spec)
    turns = [t for c in convs for t in c.turns]
    system_tokens = [len(c.system) / 4 for c in convs]
    assert 1500 <= min(system_tokens) and max(system_tokens) <= 3100
    long = sum(t.max_tokens == spec.long_max_tokens for t in turns)
    assert 0.05 < long / len(turns) < 0.15
    assert all(t.max_tokens == spec.long_max_tokens or 32 <= t.max_tokens <= 128 for t in turns)


def test_peer_template_expands_upstreams_as_words():
    ups = ["http://127.0.0.1:1", "http://127.0.0.1:2"]
    peer = parse_peer("vllm-router=vllm-router --port {port} --worker-urls {upstreams} --policy cache_aware")
    assert peer.name == "vllm-router" and peer.kind == "peer"
    assert peer_argv(peer.template, 9, ups) == ["vllm-router", "--port", "9", "--worker-urls", *ups,
                                                "--policy", "cache_aware"]
    assert peer_argv("r --port={port} --workers {upstreams_csv}", 9, ups) == \
        ["r", "--port=9", "--workers", ",".join(ups)]
    for bad in ("no-equals", "=cmd {port} {upstreams}", "x=cmd {upstreams}", "x=cmd {port}"):
        with pytest.raises(ValueError):
            parse_peer(bad)
