"""SIGHUP's reload and the tiers' wakers: one controller per tier, always.

A real gateway in-process (`run_gateway`) whose tier `gpu` sleeps behind moto's EC2 server and the
fleet simulator (tests/support/cloud.py); `reload` is called as the SIGHUP handler calls it, with real
config files. After a reload that changes or removes `[tiers.wake]`, the old waker's control loop has
ended (it cannot start or stop instances the new one controls), the new one runs, /metrics shows one
`tier` record, and a request still wakes the tier exactly once.
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import trio

from proxy.config import load
from proxy.gateway import Gateway, build_runtime
from proxy.process.reload import reload
from proxy.process.services import run_gateway
from tests.support import aws
from tests.support.cloud import MODELS, TAG, cloud, wait_for

moto_url, aws_url = aws.moto_url, aws.aws_url  # fixtures


def write(path: Path, c, *, wake: bool = True, **settings) -> str:
    base = {"region": "us-east-1", "endpoint_url": c.tap_url, "instance_ids": c.primary, "budget_s": 10.0,
            "hard_cap_s": 15.0, "idle_s": 60.0, "poll_s": 0.05, "heartbeat_s": 0.2, "probe_timeout_s": 0.5,
            "interruption_wait_s": 0, "upstream_tag": TAG, "start_retry_s": 10.0, **settings}
    lines = ["[server]", 'listen = "127.0.0.1:0"', "drain_s = 1.0", "[upstream]", "health_interval_s = 3600.0",
             "[[tiers]]", 'name = "gpu"', f"upstreams = {json.dumps(c.upstreams)}", f"models = {json.dumps(MODELS)}"]
    if wake:
        lines.append("[tiers.wake]")
        lines += [f"{k} = {json.dumps(v)}" for k, v in base.items()]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


async def serve(nursery, path: str) -> tuple[Gateway, str]:
    config = load(path)
    gw = Gateway(build_runtime(config))
    host, port = await nursery.start(lambda task_status: run_gateway(config, gateway=gw, task_status=task_status))
    return gw, f"http://{host}:{port}"


async def test_a_changed_wake_section_stops_the_old_waker_and_the_new_one_wakes_once(aws_url, tmp_path):
    with trio.fail_after(60):
        async with cloud(aws_url, boot_delay_s=0.2) as c, trio.open_nursery() as nursery:
            path = write(tmp_path / "gw.toml", c, budget_s=10.0)
            gw, url = await serve(nursery, path)
            old = gw.runtime.router.tiers["gpu"].waker
            assert gw.running_wakers() == [old]
            write(tmp_path / "gw.toml", c, budget_s=12.0)
            assert reload(gw, path)
            new = gw.runtime.router.tiers["gpu"].waker
            assert new is not old and new.settings.budget_s == 12.0
            await wait_for(lambda: gw.running_wakers() == [new])  # the old loop has ended
            async with httpx.AsyncClient(timeout=30) as http:
                r = await http.post(f"{url}/v1/chat/completions", json={
                    "model": MODELS[0], "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]})
                assert r.status_code == 200
                metrics = (await http.get(f"{url}/metrics")).text
            assert c.tap.count("StartInstances") == 1  # one controller, one start
            assert metrics.count('spotinference_tier_wakes_total{tier="gpu"}') == 1
            nursery.cancel_scope.cancel()


async def test_a_removed_wake_section_stops_the_waker(aws_url, tmp_path):
    with trio.fail_after(60):
        async with cloud(aws_url, boot_delay_s=0.2) as c, trio.open_nursery() as nursery:
            path = write(tmp_path / "gw.toml", c)
            gw, _ = await serve(nursery, path)
            assert len(gw.running_wakers()) == 1
            write(tmp_path / "gw.toml", c, wake=False)
            assert reload(gw, path)
            assert gw.runtime.router.tiers["gpu"].waker is None
            await wait_for(lambda: gw.running_wakers() == [])
            nursery.cancel_scope.cancel()


async def test_an_unchanged_wake_section_keeps_its_waker_running(aws_url, tmp_path):
    with trio.fail_after(60):
        async with cloud(aws_url, boot_delay_s=0.2) as c, trio.open_nursery() as nursery:
            path = write(tmp_path / "gw.toml", c)
            gw, _ = await serve(nursery, path)
            [waker] = gw.running_wakers()
            assert reload(gw, path)
            await trio.sleep(0.2)  # time for a wrongly stopped loop to end
            assert gw.running_wakers() == [waker] and gw.runtime.router.tiers["gpu"].waker is waker
            nursery.cancel_scope.cancel()
