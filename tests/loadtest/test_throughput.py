"""loadtest/throughput against the simulated vLLM directly: the measured decode rate is the configured one.

The simulator paces tokens on an absolute timeline (first token at ttft, then one every 1/rate s), so
the per-stream decode rate the client measures is deterministic to well within the 2 % the fleet
figures are held to; no other timing is asserted. The sim runs in-process on the test's loop; the
command (`throughput.main`, which calls trio.run itself) runs in a worker thread. Runs are short:
8 concurrent streams of 128 tokens (a last token 10 ms late is then under 1 %).
"""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import trio

from loadtest import throughput
from tests.support.throughput_figures import REQUESTS, STREAMS, TOKENS, check_figures


async def _sim(nursery: trio.Nursery, rate: float, model: str = "sim-chat") -> str:
    sim_server = pytest.importorskip("backends.sim.server", reason="the simulated vLLM is not there yet")
    options = sim_server.SimOptions(models=(model,), tokens_per_s=rate, ttft_ms=20.0)
    host, port = await nursery.start(sim_server.SimServer(options).serve, "127.0.0.1", 0)
    return f"http://{host}:{port}"


@pytest.mark.parametrize("rate", [118.9, 106.6])
async def test_cli_reports_the_simulators_decode_rate_within_2_percent(tmp_path: Path, rate: float) -> None:
    out = tmp_path / "fig.json"
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            url = await _sim(nursery, rate)
            argv = ["--url", url, "--model", "sim-chat", "--concurrency", str(STREAMS), "--requests", str(REQUESTS),
                    "--max-tokens", str(TOKENS), "--warmup", "1", "--json", str(out)]
            rc = await trio.to_thread.run_sync(throughput.main, argv)
            nursery.cancel_scope.cancel()
    assert rc == 0
    fig = json.loads(out.read_text())
    check_figures(fig, rate)
    assert fig["url"] == url + "/v1" and fig["concurrency"] == STREAMS and fig["max_tokens"] == TOKENS


async def test_run_bench_in_process_and_summary() -> None:
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            url = await _sim(nursery, 118.9)
            cfg = throughput.BenchConfig(url=throughput.base_url(url), model="sim-chat", concurrency=2,
                                         requests=2, max_tokens=32, warmup=0)
            done: list[throughput.Stream] = []
            streams = await throughput.run_bench(cfg, done.append)
            nursery.cancel_scope.cancel()
    assert len(streams) == len(done) == 2
    assert all(s.error is None and s.events == s.usage_tokens == 32 for s in streams)
    fig = throughput.summarize(cfg, streams)
    # 2 short streams: a smoke check of the API; the 2 % accuracy is asserted above on 8 x 64 tokens
    assert fig["decode_tokens_per_s"]["median"] == pytest.approx(118.9, rel=0.1)


def test_decode_rate_definition_and_batched_events() -> None:
    s = throughput.Stream(sent=0.0, times=[0.5, 0.6, 0.7, 0.8, 0.9], events=5, usage_tokens=5)
    assert s.ttft_s() == 0.5 and s.decode_tokens_per_s() == pytest.approx(10.0)
    batched = throughput.Stream(sent=0.0, times=[0.5, 0.7, 0.9], events=3, usage_tokens=6)  # 2 tokens/event
    assert batched.decode_tokens_per_s() == pytest.approx(10.0)
    assert throughput.Stream(times=[1.0], events=1).decode_tokens_per_s() is None


def test_unreachable_url_is_a_clean_message(capsys) -> None:
    with socket.socket() as closed:  # bound, never listening: refused
        closed.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{closed.getsockname()[1]}"
        rc = throughput.main(["--url", url, "--model", "m", "--requests", "1"])
    err = capsys.readouterr().err
    assert rc == 2
    assert f"warmup request failed: cannot connect to {url}/v1" in err and "Traceback" not in err


def test_bad_arguments_exit_2(capsys) -> None:
    assert throughput.main(["--url", "http://h", "--model", "m", "--concurrency", "0"]) == 2
    assert throughput.main(["--url", "nohost", "--model", "m"]) == 2
    assert "not a URL" in capsys.readouterr().err
