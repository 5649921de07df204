"""One wake for the cluster: two `spotinference serve` processes with one real redis-server in front of a
sleeping tier (moto's EC2 behind the call-counting tap, the fleet simulator as the GPU hosts). Twenty
concurrent requests spread over both hosts make exactly one StartInstances; a spot notice that one
host reads from SQS takes the host out of rotation on the other too; a lease whose holder died is
taken over once it expires."""

from __future__ import annotations

import json
from pathlib import Path

import openai
import trio

from proxy.cluster.lease import LEASE
from tests.support import aws
from tests.support.cloud import MODELS, TAG, Cloud, cloud, wait_for
from tests.support.notices import spot_warning
from tests.support.processes import SPOT, started

moto_url, aws_url = aws.moto_url, aws.aws_url  # fixtures

BOOT_S = 0.4
NOTICE_LINE = "spot notice: host out of rotation"  # the waker's log line, with `shared` true or false


def host_config(c: Cloud, path: Path, redis: str, **wake) -> Path:
    settings = {"region": "us-east-1", "endpoint_url": c.tap_url, "instance_ids": c.primary,
                "budget_s": 10.0, "hard_cap_s": 15.0, "idle_s": 60.0, "poll_s": 0.05, "heartbeat_s": 0.2,
                "probe_timeout_s": 0.5, "interruption_wait_s": 0, "upstream_tag": TAG, "start_retry_s": 10.0,
                **wake}
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = ["[server]", 'listen = "127.0.0.1:0"', "drain_s = 2.0", "[cluster]", f"redis_url = {json.dumps(redis)}",
             "lease_s = 3.0", "[[tiers]]", 'name = "gpu"', f"upstreams = {json.dumps(c.upstreams)}",
             f"models = {json.dumps(MODELS)}", "[tiers.wake]"]
    lines += [f"{k} = {json.dumps(v)}" for k, v in settings.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def chat(url: str, model: str = MODELS[0]):
    sdk = openai.OpenAI(base_url=f"{url}/v1", api_key="none", timeout=30, max_retries=0)
    return sdk.chat.completions.with_raw_response.create(
        model=model, messages=[{"role": "user", "content": "Wake up."}], max_tokens=4)


async def test_twenty_requests_across_two_hosts_make_one_start(aws_url, redis_url, tmp_path) -> None:
    with trio.fail_after(90):
        async with cloud(aws_url, primaries=2, boot_delay_s=BOOT_S) as c, \
                started([*SPOT, "serve", "--config", str(host_config(c, tmp_path / "a" / "g.toml", redis_url))],
                        tmp_path / "a", "gateway") as a, \
                started([*SPOT, "serve", "--config", str(host_config(c, tmp_path / "b" / "g.toml", redis_url))],
                        tmp_path / "b", "gateway") as b:
            statuses: list[int] = []

            async def one(n: int) -> None:
                raw = await trio.to_thread.run_sync(chat, (a, b)[n % 2].url, MODELS[n % 2])
                statuses.append(raw.http_response.status_code)

            async with trio.open_nursery() as nursery:
                for n in range(20):
                    nursery.start_soon(one, n)
            assert statuses == [200] * 20
            assert c.tap.count("StartInstances") == 1
            woke = [p for p in (a, b) if any(e.get("held") for e in p.events("wake_lease"))]
            assert len(woke) == 1, "exactly one host held the wake lease"


async def test_a_lease_left_by_a_dead_holder_is_taken_over_after_it_expires(aws_url, redis_url, tmp_path) -> None:
    from proxy.cluster.redis import RedisClient

    with trio.fail_after(90):
        async with cloud(aws_url, primaries=1, boot_delay_s=BOOT_S) as c:
            redis = RedisClient(redis_url)
            async with started([*SPOT, "serve", "--config", str(host_config(c, tmp_path / "g.toml", redis_url))],
                               tmp_path, "gateway") as gw, trio.open_nursery() as nursery:
                # A node that died mid-wake holds the lease for 3 s more (set once the gateway is up, so
                # however long its start took, the lease is the only thing it can wait for).
                await redis.execute("SET", LEASE + "gpu", "a-host-that-died", "PX", 3000)
                lapses_at = trio.current_time() + 3.0
                answers: list[int] = []

                async def ask() -> None:
                    raw = await trio.to_thread.run_sync(chat, gw.url)
                    answers.append(raw.http_response.status_code)

                nursery.start_soon(ask)
                while trio.current_time() < lapses_at - 0.3:  # the lease holds: nobody starts anything
                    assert c.tap.count("StartInstances") == 0
                    await trio.sleep(0.05)
                while not answers:
                    await trio.sleep(0.05)
            assert answers == [200]  # the lease lapsed, the waiting host took it and woke the tier
            assert c.tap.count("StartInstances") == 1
            await redis.aclose()


async def test_a_spot_notice_read_by_one_host_is_acted_on_by_both(aws_url, redis_url, tmp_path) -> None:
    with trio.fail_after(90):
        async with cloud(aws_url, primaries=2, boot_delay_s=BOOT_S) as c:
            sqs = c.boto("sqs")
            queue = sqs.create_queue(QueueName="spot-shared")["QueueUrl"]
            cfg_a = host_config(c, tmp_path / "a" / "g.toml", redis_url, interruption_queue_url=queue)
            cfg_b = host_config(c, tmp_path / "b" / "g.toml", redis_url)  # b reads no queue at all
            async with started([*SPOT, "serve", "--config", str(cfg_a)], tmp_path / "a", "gateway") as a, \
                    started([*SPOT, "serve", "--config", str(cfg_b)], tmp_path / "b", "gateway") as b:
                for url in (a.url, b.url):
                    assert (await trio.to_thread.run_sync(chat, url)).http_response.status_code == 200
                doomed, _ = c.primary
                await trio.to_thread.run_sync(lambda: sqs.send_message(QueueUrl=queue,
                                                                       MessageBody=spot_warning(doomed)))
                with trio.fail_after(20):  # b polls the shared notices every poll_s
                    await wait_for(lambda: any(e.get("shared") for e in b.events(NOTICE_LINE)), poll_s=0.1)
                before = c.fleet.server(doomed).statistics().finished_total
                for _ in range(6):
                    assert (await trio.to_thread.run_sync(chat, b.url)).http_response.status_code == 200
                assert c.fleet.server(doomed).statistics().finished_total == before  # b sends it nothing new

