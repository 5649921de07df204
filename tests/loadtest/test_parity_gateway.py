"""Parity between the gateway and its own upstream called directly: the gateway must change nothing.

A simulated vLLM runs in-process on the test's loop; the real `spotinference serve` runs as a
subprocess in front of it (started and stopped by tests/support/processes.py, which waits for its
`listening on` line). A = through the gateway, B = the sim directly: every case must match exactly,
with equal token counts and full tool-call and structured-output validity on both sides. Latency is reported
but not asserted (no speed thresholds in tests). Skips until the gateway and the sim exist.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import trio

from loadtest import parity
from tests.support.processes import started

if importlib.util.find_spec("proxy.gateway") is None:
    pytest.skip("the gateway (proxy/gateway.py) is not there yet", allow_module_level=True)
sim_server = pytest.importorskip("backends.sim.server", reason="the simulated vLLM is not there yet")
procs = pytest.importorskip("loadtest.procs")

SAMPLE = Path(__file__).resolve().parents[2] / "loadtest" / "golden" / "sample.jsonl"
PICK = ("greet", "multi-turn", "long-answer", "tool-weather", "tool-choose", "json-person", "json-todo")


async def test_gateway_and_direct_upstream_are_identical(tmp_path: Path) -> None:
    lines = {json.loads(line)["id"]: line for line in SAMPLE.read_text().splitlines() if line.strip()}
    golden = tmp_path / "golden.jsonl"
    golden.write_text("".join(lines[i] + "\n" for i in PICK))
    report_path = tmp_path / "report.json"
    with trio.fail_after(90):
        async with trio.open_nursery() as nursery:
            options = sim_server.SimOptions(models=("sim-chat",), tokens_per_s=2000.0, ttft_ms=5.0,
                                                  enable_auto_tool_choice=True, tool_call_parser="hermes")
            host, port = await nursery.start(sim_server.SimServer(options).serve, "127.0.0.1", 0)
            direct = f"http://{host}:{port}"
            config = tmp_path / "gateway.toml"
            config.write_text(procs.gateway_config([direct], models=("sim-chat",)))
            async with started(procs.gateway_argv(config), tmp_path, "gateway") as gateway:
                argv = ["--a", gateway.url, "--b", direct, "--golden", str(golden), "--out", str(tmp_path / "out"),
                        "--json", str(report_path), "--model-a", "sim-chat", "--model-b", "sim-chat"]
                rc = await trio.to_thread.run_sync(parity.main, argv)
            nursery.cancel_scope.cancel()
    assert rc == 0, gateway.logs()
    report = json.loads(report_path.read_text())
    a, b, cmp = report["a"], report["b"], report["comparison"]
    assert a["url"] == gateway.url + "/v1" and b["url"] == direct + "/v1"
    assert (a["errors"], b["errors"], a["requests"]) == (0, 0, 2 * len(PICK))
    assert cmp == {"compared_cases": len(PICK), "exact_cases": len(PICK), "mean_similarity": 1.0,
                   "min_similarity": 1.0, "token_mismatch_cases": 0}
    assert (a["prompt_tokens"], a["completion_tokens"]) == (b["prompt_tokens"], b["completion_tokens"]) != (0, 0)
    assert a["tool_valid_rate"] == b["tool_valid_rate"] == 1.0
    assert a["schema_valid_rate"] == b["schema_valid_rate"] == 1.0
    assert a["stream_consistency"] == b["stream_consistency"] == 1.0
    assert a["ttft_ms"]["n"] == b["ttft_ms"]["n"] == len(PICK)
