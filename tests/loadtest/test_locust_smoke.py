"""Smoke test of loadtest/locustfile.py: a 5-second headless locust run against a sim and the gateway.

Strategy: start `spotinference sim` and `spotinference serve` as subprocesses on port 0 (readiness
from their own stdout line; tests/support/processes.py runs them, and locust), run locust headless with --host at the gateway and LOADTEST_DIRECT_HOST
at the sim, so one run covers both sides, then read the CSV: every request name of the mix is there
with requests and no failures, including the separate "chat stream TTFB" metric. No timing checks.
"""

from __future__ import annotations

import csv
import importlib.util
import os
import sys
from pathlib import Path

import pytest

from loadtest import procs
from tests.support.processes import run_to_end, start

# Never import locust here: it monkey-patches the whole process with gevent (ssl included), which
# breaks every test that runs after it. It runs in its own subprocess below.
if importlib.util.find_spec("locust") is None:
    pytest.skip("locust is not installed", allow_module_level=True)

LOCUSTFILE = Path(__file__).resolve().parents[2] / "loadtest" / "locustfile.py"
NAMES = ("chat", "chat stream", "chat stream TTFB", "embeddings")


def test_locust_headless_against_sim_and_gateway(tmp_path):
    config = tmp_path / "gateway.toml"
    with start(procs.sim_argv(latency_ms=2, ttft_ms=2, tokens_per_s=500), tmp_path, "sim") as sim:
        config.write_text(procs.gateway_config([sim.url]))
        with start(procs.gateway_argv(config), tmp_path, "gateway") as gateway:
            csv_prefix = tmp_path / "locust"
            argv = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "-u", "6", "-r", "6",
                    "-t", "5s", "--host", gateway.url, "--csv", str(csv_prefix), "--only-summary",
                    "--stop-timeout", "5"]
            env = {**os.environ, "LOADTEST_DIRECT_HOST": sim.url, "LOADTEST_LABEL": "gateway",
                   "LOADTEST_MAX_TOKENS": "8"}
            locust = run_to_end(argv, tmp_path, "locust", timeout=120, env=env, cwd=tmp_path)

    assert locust.returncode == 0, locust.logs()
    with open(f"{csv_prefix}_stats.csv", newline="") as f:
        stats = {row["Name"]: row for row in csv.DictReader(f)}
    for side in ("gateway", "direct"):
        for name in NAMES:
            row = stats.get(f"[{side}] {name}")
            assert row is not None, (side, name, sorted(stats))
            assert int(row["Request Count"]) > 0, (side, name)
            assert int(row["Failure Count"]) == 0, (side, name)
            for col in ("50%", "95%", "99%"):
                assert row[col] not in ("", "N/A"), (side, name, col)
    assert int(stats["Aggregated"]["Failure Count"]) == 0
