"""The published decode rates, measured through the real gateway: one tier per simulated GPU type.

Two simulated vLLM servers run in-process (118.9 tokens/s as the dual-H100 tier, 106.6 as the
dual-A100 tier), the real `spotinference serve` runs as a subprocess with one tier for each, and
`spotinference bench throughput` (throughput.main, in a worker thread) must report each tier's rate
within 2 %, as it does directly (test_throughput; the figures are tests/support/throughput_figures.py's).
The gateway runs under tests/support/processes.py. Skips until the gateway and the sim exist.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import trio

from loadtest import throughput
from tests.support.processes import started
from tests.support.throughput_figures import REQUESTS, STREAMS, TOKENS, check_figures

if importlib.util.find_spec("proxy.gateway") is None:
    pytest.skip("the gateway (proxy/gateway.py) is not there yet", allow_module_level=True)
sim_server = pytest.importorskip("backends.sim.server", reason="the simulated vLLM is not there yet")
procs = pytest.importorskip("loadtest.procs")

TIERS = (("h100x2", "sim-h100", 118.9), ("a100x2", "sim-a100", 106.6))


def _config(upstreams: dict[str, str]) -> str:
    text = '[server]\nlisten = "127.0.0.1:0"\n'
    for tier, model, _ in TIERS:
        text += f'\n[[tiers]]\nname = "{tier}"\nupstreams = ["{upstreams[model]}"]\nmodels = ["{model}"]\n'
    return text


async def test_gateway_tiers_report_the_simulators_decode_rates_within_2_percent(tmp_path: Path) -> None:
    figures = {}
    with trio.fail_after(120):
        async with trio.open_nursery() as nursery:
            upstreams = {}
            for _, model, rate in TIERS:
                options = sim_server.SimOptions(models=(model,), tokens_per_s=rate, ttft_ms=20.0)
                host, port = await nursery.start(sim_server.SimServer(options).serve, "127.0.0.1", 0)
                upstreams[model] = f"http://{host}:{port}"
            config = tmp_path / "gateway.toml"
            config.write_text(_config(upstreams))
            async with started(procs.gateway_argv(config), tmp_path, "gateway") as gateway:
                for _, model, _ in TIERS:
                    out = tmp_path / f"{model}.json"
                    argv = ["--url", gateway.url, "--model", model, "--concurrency", str(STREAMS), "--requests",
                            str(REQUESTS), "--max-tokens", str(TOKENS), "--warmup", "1", "--json", str(out)]
                    rc = await trio.to_thread.run_sync(throughput.main, argv)
                    assert rc == 0, gateway.logs()
                    figures[model] = json.loads(out.read_text())
            nursery.cancel_scope.cancel()
    for _, model, rate in TIERS:
        assert figures[model]["url"] == gateway.url + "/v1"
        check_figures(figures[model], rate, model)
