"""Cost per token end to end: the real `spotinference serve` in front of a sleeping tier priced at EC2's spot
price (moto's server behind a tap, the fleet simulator as the GPU host), GPU time recorded every second,
then the real `spotinference usage --cost`.

One cycle: alice's first request wakes the tier, alice and bob are served, the tier idles and is
stopped. Waits are conditions with deadlines, never sleeps: the tier is asleep when the gateway's own
/metrics say so, and the recording is complete once the recorded seconds cover the span the tap saw
from StartInstances to StopInstances (a host is paid at least that long). moto prices every zone at
0.00001 USD per hour (tests/ops/test_pricing.py), so the cost is tiny but exact.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
from pathlib import Path

import openai
import pytest
import trio

from tests.support import aws
from tests.support.cloud import MODELS, TAG, Cloud, cloud
from tests.support.processes import SPOT, started
from tests.support.production import add_key, scrape

moto_url, aws_url = aws.moto_url, aws.aws_url  # fixtures

MOTO_PRICE = 0.00001


def write_config(c: Cloud, tmp_path: Path, db: Path, keys_file: Path) -> Path:
    wake = {"region": "us-east-1", "endpoint_url": c.tap_url, "instance_ids": c.primary, "budget_s": 10.0,
            "hard_cap_s": 15.0, "idle_s": 1.0, "poll_s": 0.05, "probe_timeout_s": 0.5,
            "interruption_wait_s": 0, "upstream_tag": TAG, "start_retry_s": 10.0}
    lines = ["[server]", 'listen = "127.0.0.1:0"', "drain_s = 2.0",
             "[auth]", f"keys_file = {json.dumps(str(keys_file))}",
             "[usage]", f"path = {json.dumps(str(db))}", "gpu_time_s = 1", "flush_s = 0.05",
             "[[tiers]]", 'name = "gpu"', f"upstreams = {json.dumps(c.upstreams)}",
             f"models = {json.dumps(MODELS)}",
             "[tiers.wake]", *(f"{k} = {json.dumps(v)}" for k, v in wake.items()),
             "[tiers.cost]", "spot = true", 'instance_type = "g5.12xlarge"']
    path = tmp_path / "gw.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def chat(url: str, key: str) -> None:
    sdk = openai.OpenAI(base_url=f"{url}/v1", api_key=key, timeout=30, max_retries=0)
    resp = sdk.chat.completions.create(model=MODELS[0], messages=[{"role": "user", "content": "Wake up."}],
                                       max_tokens=8)
    assert resp.usage is not None and resp.usage.total_tokens > 0


def tier_state(url: str) -> str | None:
    for labels, value in scrape(url).get("spotinference_tier_state", {}).items():
        d = dict(labels)
        if d.get("tier") == "gpu" and value == 1:
            return d.get("state")
    return None


def recorded(db: Path) -> list[tuple]:
    with sqlite3.connect(db, timeout=10) as conn:
        try:
            return conn.execute("SELECT ts, host, seconds, usd, price_source FROM gpu_time ORDER BY ts"
                                ).fetchall()
        except sqlite3.OperationalError:  # not created yet
            return []


async def until(predicate, what: str) -> None:
    while not await trio.to_thread.run_sync(predicate):
        await trio.sleep(0.05)


async def test_a_wake_serve_sleep_cycle_is_priced_and_shared_by_tokens(aws_url: str, tmp_path: Path) -> None:
    db, keys_file = tmp_path / "usage.sqlite3", tmp_path / "keys.toml"
    secrets = {name: await trio.to_thread.run_sync(add_key, keys_file, name) for name in ("alice", "bob")}
    with trio.fail_after(90):
        async with cloud(aws_url, boot_delay_s=0.4) as c, started(
                [*SPOT, "serve", "--config", str(write_config(c, tmp_path, db, keys_file))], tmp_path,
                "gateway") as gw:
            for name in ("alice", "alice", "bob"):
                await trio.to_thread.run_sync(chat, gw.url, secrets[name])
            await until(lambda: c.tap.count("StopInstances") >= 1 and tier_state(gw.url) == "asleep",
                        "the tier to sleep again")
            (start,) = [call.at for call in c.tap.calls if call.action == "StartInstances"]
            stop = next(call.at for call in c.tap.calls if call.action == "StopInstances")
            paid_at_least = stop - start
            await until(lambda: sum(r[2] for r in recorded(db)) >= paid_at_least, "the GPU time recorded")
            rows = recorded(db)
            assert sum(r[2] for r in rows) <= trio.current_time() - start + 1.0  # never more than it ran
            assert {r[1] for r in rows} == set(c.primary) and {r[4] for r in rows} == {"spot:us-east-1a"}
            assert c.tap.count("DescribeSpotPriceHistory") >= 1
            metrics = await trio.to_thread.run_sync(scrape, gw.url)
            assert metrics["spotinference_tier_gpu_seconds_total"][(("tier", "gpu"),)] >= paid_at_least
            assert await trio.to_thread.run_sync(gw.stop) == 0  # SIGTERM: drain, flush the usage log
    seconds = sum(r[2] for r in recorded(db))
    report = await trio.to_thread.run_sync(lambda: subprocess.run(
        [*SPOT, "usage", "--db", str(db), "--cost", "--format", "json"], capture_output=True, text=True,
        timeout=60, check=False))
    assert report.returncode == 0, report.stderr
    doc = json.loads(report.stdout)
    groups = {g["key"]: g for g in doc["groups"]}
    tier = doc["cost"]["tiers"]["gpu"]
    assert tier["gpu_seconds"] == pytest.approx(seconds)
    assert tier["usd"] == pytest.approx(seconds * MOTO_PRICE / 3600)
    assert groups["alice"]["usd"] + groups["bob"]["usd"] == pytest.approx(tier["usd"], rel=0.01)
    assert groups["alice"]["usd"] == pytest.approx(2 * groups["bob"]["usd"], rel=0.01)  # twice the tokens
    assert groups["alice"]["usd_per_mtok"] == pytest.approx(tier["usd"] / tier["tokens"] * 1e6, rel=1e-6)
    assert "(idle)" not in groups  # the tier served tokens: its idle minutes are on its requests
