"""Parity between two simulated vLLM servers, one told to differ; the report must say what they were told.

Sim A is quick and well-behaved. Sim B answers with other text, waits longer before the first token,
and breaks tool-call JSON. Both sims run in-process on the test's trio loop; `parity.main` runs in a
worker thread (it drives the sync OpenAI SDK), so it never blocks the loop that serves it. Token
counts are checked against the `usage` the sims return to a direct request for the same case.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import httpx
import pytest
import trio

from loadtest import golden_io, parity

sim_server = pytest.importorskip("backends.sim.server", reason="the simulated vLLM is not there yet")

SAMPLE = Path(__file__).resolve().parents[2] / "loadtest" / "golden" / "sample.jsonl"
PICK = ("greet", "haiku", "explain-tcp", "multi-turn", "tool-weather", "tool-order", "json-person", "json-todo")
B_REPLY = "Entirely different words come back from endpoint B, every time."
TTFT_A_MS, TTFT_B_MS = 5.0, 150.0


def _golden(tmp_path: Path) -> Path:
    lines = {json.loads(line)["id"]: line for line in SAMPLE.read_text().splitlines() if line.strip()}
    path = tmp_path / "golden.jsonl"
    path.write_text("".join(lines[i] + "\n" for i in PICK))
    return path


async def _start(nursery: trio.Nursery, **opts: object) -> str:
    options = sim_server.SimOptions(models=("sim-chat",), tokens_per_s=2000.0, enable_auto_tool_choice=True,
                                    tool_call_parser="hermes", **opts)
    host, port = await nursery.start(sim_server.SimServer(options).serve, "127.0.0.1", 0)
    return f"http://{host}:{port}"


async def _direct_usage(url: str, case: golden_io.GoldenCase) -> tuple[int, int]:
    body = {"model": "sim-chat", "messages": case.messages, **case.params}
    if case.tools:
        body["tools"] = case.tools
    if case.tool_choice is not None:
        body["tool_choice"] = case.tool_choice
    if case.response_format:
        body["response_format"] = case.response_format
    async with httpx.AsyncClient(timeout=10) as client:
        resp = await client.post(url + "/v1/chat/completions", json=body)
    usage = resp.json()["usage"]
    return usage["prompt_tokens"], usage["completion_tokens"]


async def test_parity_between_two_sims_reports_what_they_were_told(tmp_path: Path) -> None:
    golden = _golden(tmp_path)
    cases = {c.id: c for c in golden_io.load_golden(golden)}
    out, report_path = tmp_path / "out", tmp_path / "report.json"
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            url_a = await _start(nursery, ttft_ms=TTFT_A_MS)
            url_b = await _start(nursery, ttft_ms=TTFT_B_MS, reply=B_REPLY, break_tool_json=True)
            argv = ["--a", url_a, "--b", url_b, "--golden", str(golden), "--out", str(out),
                    "--json", str(report_path), "--concurrency", "4"]
            rc = await trio.to_thread.run_sync(parity.main, argv)
            usage_a = {i: await _direct_usage(url_a, c) for i, c in cases.items()}
            usage_b = {i: await _direct_usage(url_b, c) for i, c in cases.items()}
            nursery.cancel_scope.cancel()
    assert rc == 0
    report = json.loads(report_path.read_text())
    a, b, by_id = report["a"], report["b"], {c["id"]: c for c in report["cases"]}
    assert (a["requests"], a["errors"], b["requests"], b["errors"]) == (2 * len(PICK), 0, 2 * len(PICK), 0)

    # other reply text: plain chat cases are not equal, and not similar
    for cid in ("greet", "haiku", "explain-tcp", "multi-turn"):
        assert by_id[cid]["exact"] is False and by_id[cid]["similarity"] < 0.9
        assert by_id[cid]["b"]["text"] == B_REPLY or B_REPLY in by_id[cid]["b"]["text"]
    # broken tool-call JSON: validity 0 % on B, 100 % on A, streaming and not
    assert a["tool_valid_rate"] == 1.0 and b["tool_valid_rate"] == 0.0
    assert any("not JSON" in p for p in by_id["tool-weather"]["b"]["problems"])
    # structured output stays valid on both
    assert a["schema_valid_rate"] == 1.0 and b["schema_valid_rate"] == 1.0
    # slower first token on B: every B TTFT at least what B was told (a lower bound: a slow machine
    # only adds), and A's median below it (A's max is not compared: one stall of a shared machine can
    # put any single request of A past B)
    b_ttfts = [r["ttft_ms"] for c in report["cases"] for r in c["attempts"] if r["side"] == "b" and r["stream"]]
    assert min(b_ttfts) >= TTFT_B_MS
    assert b["ttft_ms"]["p50"] >= TTFT_B_MS and a["ttft_ms"]["p50"] < TTFT_B_MS
    # token counts are the sims' own usage, per case
    for cid in PICK:
        assert (by_id[cid]["a"]["prompt_tokens"], by_id[cid]["a"]["completion_tokens"]) == usage_a[cid]
        assert (by_id[cid]["b"]["prompt_tokens"], by_id[cid]["b"]["completion_tokens"]) == usage_b[cid]
        if by_id[cid]["kind"] != "tools":  # a streamed tool call spends one token on the name delta
            assert by_id[cid]["a"]["usage_stable"] and by_id[cid]["b"]["usage_stable"]
    assert a["prompt_tokens"] == 2 * sum(p for p, _ in usage_a.values())
    assert a["stream_consistency"] == 1.0

    html = (out / "report.html").read_text()
    assert html.startswith("<!doctype html>") and "<script" not in html and " src=" not in html
    assert len(re.findall(r'<svg class="plot"', html)) == 4
    for plot in ("plot-latency", "plot-percentiles", "plot-cdf-ttft_ms", "plot-cdf-latency_ms"):
        assert f'id="{plot}"' in html
    assert html.count("<circle ") == 6 * len(PICK)  # a dot per attempt: 3 metrics x A, B
    assert html.count("<polyline ") == 4  # CDF lines: 2 metrics x A, B
    assert len(re.findall(r'<tr class="case', html)) == len(PICK)
    assert html.count('<tr class="case differs"') == sum(1 for c in report["cases"] if not c["exact"])
    assert f"<ins>{B_REPLY.split()[0]}" in html  # B's words marked in the greet diff


async def test_failing_requests_are_reported_and_exit_1(tmp_path: Path, capsys) -> None:
    golden = tmp_path / "golden.jsonl"
    golden.write_text(next(line for line in SAMPLE.read_text().splitlines() if '"id": "greet"' in line) + "\n")
    report_path = tmp_path / "report.json"
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            url = await _start(nursery)
            argv = ["--a", url, "--b", url, "--model-b", "no-such-model", "--golden", str(golden),
                    "--out", str(tmp_path / "out"), "--json", str(report_path)]
            rc = await trio.to_thread.run_sync(parity.main, argv)
            nursery.cancel_scope.cancel()
    err = capsys.readouterr().err
    assert rc == 1
    assert "endpoint B does not list model 'no-such-model'" in err and "2 request(s) failed" in err
    report = json.loads(report_path.read_text())
    assert (report["a"]["errors"], report["b"]["errors"], report["b"]["requests"]) == (0, 2, 2)
    [message] = report["b"]["error_counts"]
    assert message.startswith("HTTP 404: ") and "no-such-model" in message
    assert report["cases"][0]["similarity"] is None and report["comparison"]["compared_cases"] == 0
    html = (tmp_path / "out" / "report.html").read_text()
    assert "B: HTTP 404: " in html and "<details id=\"d-greet\" open>" in html
