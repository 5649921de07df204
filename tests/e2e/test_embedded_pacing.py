"""The embedded default is paced like a real tier: a stream arrives token by token, not in one burst.

`spotinference serve` (no config) runs as a child process; one chat completion is streamed through it
with httpx and each SSE event's arrival is stamped on this side. Only lower bounds are asserted (the
first token no earlier than the configured TTFT allows, later tokens spaced by the decode rate):
a slow, shared machine can only make them later, never earlier.
"""

from __future__ import annotations

import time

import httpx

from tests.support.processes import SPOT, start

ASK = {"model": "sim-chat", "stream": True, "max_tokens": 6,
       "messages": [{"role": "user", "content": "Count to five."}]}


def stream_arrivals(base: str) -> tuple[float, list[float]]:
    """(seconds from sending to the first content event, arrival times of the content events)."""
    arrivals = []
    with httpx.Client(timeout=30) as client:
        sent = time.perf_counter()
        with client.stream("POST", f"{base}/v1/chat/completions", json=ASK) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if line.startswith("data: {") and '"content":"' in line and '"content":""' not in line:
                    arrivals.append(time.perf_counter())
    assert arrivals, "no content events"
    return arrivals[0] - sent, arrivals


def test_the_default_tier_is_paced(tmp_path):
    with start([*SPOT, "serve", "--listen", "127.0.0.1:0"], tmp_path, "serve") as served:
        base = served.wait_listening()
        assert "paced: first token after 300 ms, then 30 tokens/s" in served.stdout()
        ttft, arrivals = stream_arrivals(base)
    assert ttft >= 0.25, served.logs()
    assert len(arrivals) >= 5 and arrivals[-1] - arrivals[0] >= 4 / 30 * 0.8, arrivals


def test_the_pace_is_set_by_flags_and_zero_is_unpaced(tmp_path):
    argv = [*SPOT, "serve", "--listen", "127.0.0.1:0", "--sim-ttft-ms", "600", "--sim-tokens-per-s", "10"]
    with start(argv, tmp_path, "slow") as served:
        ttft, arrivals = stream_arrivals(served.wait_listening())
    assert ttft >= 0.55
    assert arrivals[-1] - arrivals[0] >= 4 / 10 * 0.8, arrivals
    argv = [*SPOT, "serve", "--listen", "127.0.0.1:0", "--sim-ttft-ms", "0", "--sim-tokens-per-s", "0"]
    with start(argv, tmp_path, "unpaced") as served:
        assert "unpaced" in served.stdout()
        _, arrivals = stream_arrivals(served.wait_listening())
    assert len(arrivals) >= 5


def test_a_negative_pace_is_refused(tmp_path):
    from tests.support.processes import run_to_end

    proc = run_to_end([*SPOT, "serve", "--sim-tokens-per-s", "-1"], tmp_path, "bad", timeout=30)
    assert proc.returncode == 2
    assert "--sim-ttft-ms and --sim-tokens-per-s must be >= 0" in proc.stderr()


def test_the_pace_flags_are_refused_with_a_config(tmp_path):
    from tests.support.processes import run_to_end

    cfg = tmp_path / "gw.toml"
    cfg.write_text('[server]\nlisten = "127.0.0.1:0"\n[[tiers]]\nname = "t"\nupstreams = ["http://127.0.0.1:9"]\n'
                   'models = ["m"]\n')
    proc = run_to_end([*SPOT, "serve", "--config", str(cfg), "--sim-ttft-ms", "5"], tmp_path, "cfg", timeout=30)
    assert proc.returncode == 2
    assert "apply to the embedded default only" in proc.stderr()
