"""What a correct `spotinference bench throughput` run against the simulated vLLM must report: shared by
tests/loadtest/test_throughput.py (the sim directly) and test_throughput_gateway.py (through the gateway).

The simulator paces tokens on an absolute timeline (first token at ttft, then one every 1/rate s), so
the per-stream decode rate the client measures is the configured one to well within 2 %: 8 concurrent
streams of 128 tokens, one wave (a last token 10 ms late is then under 1 %).
"""

from __future__ import annotations

import pytest

STREAMS, REQUESTS, TOKENS = 8, 8, 128  # one wave of 8 concurrent streams


def check_figures(fig: dict, rate: float, model: str = "sim-chat") -> None:
    """The figures a correct run of REQUESTS streams of TOKENS tokens at `rate` tokens/s must show."""
    decode = fig["decode_tokens_per_s"]
    assert (fig["ok"], fig["errors"], fig["model"]) == (REQUESTS, 0, model)
    assert decode["streams"] == REQUESTS
    assert decode["median"] == pytest.approx(rate, rel=0.02)
    assert decode["p5"] == pytest.approx(rate, rel=0.05) and decode["p95"] == pytest.approx(rate, rel=0.05)
    tc = fig["token_count"]
    assert tc == {"events": REQUESTS * TOKENS, "usage": REQUESTS * TOKENS, "streams_without_usage": 0,
                  "mismatched_streams": 0}
    assert fig["completion_tokens"] == REQUESTS * TOKENS
    assert fig["itl_ms"]["p50"] == pytest.approx(1000.0 / rate, rel=0.1)
    assert fig["ttft_ms"]["p50"] >= 20.0
    assert fig["aggregate_tokens_per_s"] > 0
