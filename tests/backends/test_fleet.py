"""backends.fleet (simulated hosts following EC2 state in moto) and backends.probe (readiness, activity)."""

from __future__ import annotations

import httpx
import pytest
import trio

from backends import probe
from backends.fleet import FleetSimulator
from backends.sim.server import SimOptions
from ops.ec2 import Clients, Ec2
from tests.support import aws
from tests.support.aws import AMI, client, stopped_instances

moto_url, aws_url = aws.moto_url, aws.aws_url  # fixtures shared with tests/ops

TAG = "spotinference:upstream"

METRICS = """# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="qwen3-coder"} 2.0
vllm:num_requests_running{engine="1",model_name="qwen3-coder"} 1.0
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="qwen3-coder"} 4.0
# TYPE vllm:request_success_total counter
vllm:request_success_total{engine="0",finished_reason="stop",model_name="qwen3-coder"} 10.0
vllm:request_success_total{engine="0",finished_reason="length",model_name="qwen3-coder"} 5.0
vllm:request_success_created{engine="0",finished_reason="stop",model_name="qwen3-coder"} 1.7e+09
vllm:num_requests_running_extra 99
"""


def test_parse_activity_sums_label_sets() -> None:
    a = probe.parse_activity(METRICS)
    assert (a.running, a.waiting, a.success_total, a.in_flight) == (3.0, 4.0, 15.0, 7.0)
    assert probe.parse_activity("vllm:num_requests_running 1\ngarbage\nvllm:request_success_total x\n") == \
        probe.Activity(running=1.0)


def test_parse_models() -> None:
    assert probe.parse_models(b'{"object":"list","data":[{"id":"a","object":"model"},{"id":"b"}]}') == ("a", "b")
    with pytest.raises(ValueError):
        probe.parse_models(b'{"data": 3}')


async def _ready(url: str, models: list[str]) -> probe.Readiness:
    async with probe.make_client(1.0) as c:
        return await probe.probe_ready(c, url, models)


async def test_reserved_host_follows_instance_state(aws_url: str) -> None:
    [iid] = stopped_instances(aws_url, 1)
    fleet = FleetSimulator(Ec2(Clients("us-east-1", aws_url)), SimOptions(models=("qwen3-coder",)),
                           boot_delay_s=0.2, poll_s=0.02)
    url = fleet.reserve(iid)
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            await nursery.start(fleet.run)
            down = await _ready(url, ["qwen3-coder"])
            assert not down.healthy and down.reason == "ConnectError"  # refused, like a stopped host
            await trio.to_thread.run_sync(lambda: client(aws_url).start_instances(InstanceIds=[iid]))
            while not (await _ready(url, ["qwen3-coder"])).ready:
                await trio.sleep(0.05)
            assert (await _ready(url, ["qwen3-coder", "absent"])).missing == ("absent",)
            fleet.server(iid).healthy = False
            assert (await _ready(url, ["qwen3-coder"])).reason == "health 503"
            await trio.to_thread.run_sync(lambda: client(aws_url).stop_instances(InstanceIds=[iid]))
            while (await _ready(url, ["qwen3-coder"])).healthy or fleet.server(iid) is not None:
                await trio.sleep(0.05)
            assert (await _ready(url, ["qwen3-coder"])).reason == "ConnectError"
            await trio.to_thread.run_sync(lambda: client(aws_url).start_instances(InstanceIds=[iid]))
            while not (await _ready(url, ["qwen3-coder"])).ready:  # same URL after a restart
                await trio.sleep(0.05)
            assert fleet.url(iid) == url
            nursery.cancel_scope.cancel()
    assert [e.what for e in fleet.events] == ["running", "up", "down", "running", "up"]
    assert fleet.events[1].at - fleet.events[0].at >= 0.2  # the boot delay


async def test_unreserved_host_announces_itself_in_a_tag(aws_url: str) -> None:
    fleet = FleetSimulator(Ec2(Clients("us-east-1", aws_url)), SimOptions(models=("m",)),
                           boot_delay_s=0.05, poll_s=0.02, upstream_tag=TAG)
    ec2 = client(aws_url)

    def tags(iid: str) -> dict[str, str]:
        res = ec2.describe_instances(InstanceIds=[iid])["Reservations"][0]["Instances"][0]
        return {t["Key"]: t["Value"] for t in res.get("Tags", [])}

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            await nursery.start(fleet.run)
            iid = (await trio.to_thread.run_sync(lambda: ec2.run_instances(
                ImageId=AMI, MinCount=1, MaxCount=1)))["Instances"][0]["InstanceId"]
            while TAG not in await trio.to_thread.run_sync(tags, iid):
                await trio.sleep(0.05)
            url = (await trio.to_thread.run_sync(tags, iid))[TAG]
            assert url.startswith("http://127.0.0.1:") and (await _ready(url, ["m"])).ready
            async with httpx.AsyncClient() as c:
                before = probe.parse_activity((await c.get(f"{url}/metrics")).text).success_total
                r = await c.post(f"{url}/v1/chat/completions",
                                 json={"model": "m", "messages": [{"role": "user", "content": "hi"}]})
                assert r.status_code == 200
                assert (await probe.probe_activity(c, url)).success_total == before + 1
            await trio.to_thread.run_sync(lambda: ec2.terminate_instances(InstanceIds=[iid]))
            while TAG in await trio.to_thread.run_sync(tags, iid):
                await trio.sleep(0.05)
            assert (await _ready(url, ["m"])).reason == "ConnectError"
            nursery.cancel_scope.cancel()
