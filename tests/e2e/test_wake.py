"""Wake on demand end to end: the real `spotinference serve` process in front of a sleeping tier whose EC2
API is moto's server (behind a tap that counts and faults calls on the wire) and whose GPU hosts are the
fleet simulator; clients are the unmodified OpenAI SDK (sync, run in threads) and plain httpx.

The gateway is a subprocess (tests/support/processes.py) and moto answers from threads, so no fake clock
applies: nothing here asserts how long a step took beyond lower bounds the code guarantees (a boot
delay, a hard cap). "While it waits" is a condition -- the gateway's own /metrics shows the waiters,
the tap shows it describing the instances again -- never a sleep. Budgets are roomy unless a test is
about them, so a slow machine cannot push a wake past its cap.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import openai
import pytest
import trio

from tests.support import aws
from tests.support.cloud import MODELS, TAG, Cloud, cloud, wait_for
from tests.support.notices import spot_warning
from tests.support.processes import SPOT, started
from tests.support.production import scrape

moto_url, aws_url = aws.moto_url, aws.aws_url  # fixtures

BOOT_S = 0.4


def _toml(value) -> str:
    return json.dumps(value)  # strings, numbers and lists of strings are spelled the same in TOML


def write_config(c: Cloud, path: Path, *, routing: str | None = None, **wake) -> Path:
    settings = {"region": "us-east-1", "endpoint_url": c.tap_url, "instance_ids": c.primary,
                "fallback_instance_ids": c.fallback, "budget_s": 10.0, "hard_cap_s": 15.0, "idle_s": 60.0,
                "poll_s": 0.05, "heartbeat_s": 0.2, "probe_timeout_s": 0.5, "interruption_wait_s": 0,
                "upstream_tag": TAG, "start_retry_s": 10.0}
    settings.update(wake)
    lines = ["[server]", 'listen = "127.0.0.1:0"', "drain_s = 2.0", "", "[[tiers]]", 'name = "gpu"',
             f"upstreams = {_toml(c.upstreams)}", f"models = {_toml(MODELS)}",
             *([f"routing = {_toml(routing)}"] if routing else []), "[tiers.wake]"]
    lines += [f"{k} = {_toml(v)}" for k, v in settings.items() if v is not None]
    path.write_text("\n".join(lines) + "\n")
    return path


@asynccontextmanager
async def served(config: Path) -> AsyncIterator[str]:
    """`spotinference serve --config FILE` as a subprocess (logs next to the config); yields its base URL.
    Its startup describes the tier through the tap this test's loop serves: the runner waits in a thread."""
    async with started([*SPOT, "serve", "--config", str(config)], config.parent, "gateway") as gw:
        yield gw.url


async def tier_waiters(url: str) -> float:
    """Requests waiting for tier `gpu` to wake, from the gateway's own /metrics."""
    metrics = await trio.to_thread.run_sync(scrape, url)
    return sum(v for labels, v in metrics.get("spotinference_tier_waiters", {}).items()
               if dict(labels).get("tier") == "gpu")


async def until_waiters(url: str, n: int) -> None:
    while await tier_waiters(url) != n:
        await trio.sleep(0.05)


async def described_again(c: Cloud, times: int = 2) -> None:
    """Until the gateway's waker has sent `times` more DescribeInstances (the tap sees only its calls):
    at least one answer came back and was acted on."""
    seen = c.tap.count("DescribeInstances")
    await wait_for(lambda: c.tap.count("DescribeInstances") >= seen + times)


@functools.lru_cache(maxsize=16)
def sdk(url: str, max_retries: int = 2) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="none", timeout=30, max_retries=max_retries)


def chat(url: str, model: str = MODELS[0], **kw):
    return sdk(url).chat.completions.with_raw_response.create(
        model=model, messages=[{"role": "user", "content": "Wake up."}], max_tokens=8, **kw)


async def test_request_to_a_sleeping_tier_waits_and_succeeds(aws_url: str, tmp_path: Path) -> None:
    with trio.fail_after(60):
        async with cloud(aws_url, boot_delay_s=BOOT_S) as c, served(write_config(c, tmp_path / "g.toml")) as url:
            raw = await trio.to_thread.run_sync(chat, url)
            assert raw.http_response.status_code == 200
            assert int(raw.headers["x-spotinference-wake-ms"]) >= BOOT_S * 1000 * 0.9
            assert raw.parse().choices[0].message.content  # an ordinary ChatCompletion
            again = await trio.to_thread.run_sync(chat, url)
            assert "x-spotinference-wake-ms" not in again.headers  # it did not wait
            assert c.tap.count("StartInstances") == 1
            metrics = await trio.to_thread.run_sync(scrape, url)
            assert metrics["spotinference_wake_duration_seconds_count"] == {(("tier", "gpu"),): 1.0}
            assert metrics["spotinference_wake_duration_seconds_sum"][(("tier", "gpu"),)] >= BOOT_S


async def test_twenty_concurrent_requests_for_two_models_one_start(aws_url: str, tmp_path: Path) -> None:
    with trio.fail_after(60):
        async with cloud(aws_url, primaries=2, boot_delay_s=BOOT_S) as c, served(
                write_config(c, tmp_path / "g.toml")) as url:
            statuses: list[int] = []

            async def one(n: int) -> None:
                raw = await trio.to_thread.run_sync(chat, url, MODELS[n % 2])
                statuses.append(raw.http_response.status_code)

            async with trio.open_nursery() as nursery:
                for n in range(20):
                    nursery.start_soon(one, n)
            assert statuses == [200] * 20
            assert c.tap.count("StartInstances") == 1


async def test_never_ready_ends_in_504_at_the_hard_cap_without_sdk_retries(aws_url: str, tmp_path: Path) -> None:
    with trio.fail_after(60):
        async with cloud(aws_url, served=("not-our-model",)) as c, served(
                write_config(c, tmp_path / "g.toml", budget_s=1.0, hard_cap_s=1.5)) as url:
            attempts: list[httpx.Request] = []  # every HTTP request the SDK sends
            with httpx.Client(event_hooks={"request": [attempts.append]}) as http:
                retrying = openai.OpenAI(base_url=f"{url}/v1", api_key="none", timeout=30, max_retries=2,
                                         http_client=http)
                begun = trio.current_time()
                with pytest.raises(openai.InternalServerError) as info:
                    await trio.to_thread.run_sync(lambda: retrying.chat.completions.create(
                        model=MODELS[0], messages=[{"role": "user", "content": "hi"}]))
                waited = trio.current_time() - begun
            assert waited >= 1.5  # it was held to the hard cap
            assert len(attempts) == 1  # sent once: x-should-retry false stopped the SDK's two retries
            err = info.value
            assert err.status_code == 504 and err.response.headers["x-should-retry"] == "false"
            assert err.body["code"] == "wake_timeout" and err.body["type"] == "server_error"


async def test_waiting_stream_gets_heartbeats_then_an_in_band_error(aws_url: str, tmp_path: Path) -> None:
    with trio.fail_after(60):
        async with cloud(aws_url, served=("not-our-model",)) as c, served(write_config(
                c, tmp_path / "g.toml", budget_s=1.0, hard_cap_s=1.5, heartbeat_s=0.05)) as url:
            body = {"model": MODELS[0], "stream": True, "messages": [{"role": "user", "content": "hi"}]}
            lines: list[str] = []
            async with httpx.AsyncClient(timeout=10) as http, \
                    http.stream("POST", f"{url}/v1/chat/completions", json=body) as resp:
                assert resp.status_code == 200  # the head went out early
                assert resp.headers["content-type"].startswith("text/event-stream")
                with pytest.raises(httpx.RemoteProtocolError):  # closed without the last chunk
                    async for line in resp.aiter_lines():
                        lines.append(line)
            # Every heartbeat_s (0.05 s) for the 1.5 s cap: about 30; at least 3 even on a crawling machine.
            waking = [x for x in lines if x.startswith(": waking")]
            assert len(waking) >= 3
            # The stable form: the stage, whole seconds since the wake began, the expected rest.
            assert all(re.fullmatch(r": waking( phase=(starting|booting|loading|finishing) elapsed_s=\d+ eta_s=\d+)?",
                                    x) for x in waking), waking
            assert any(" phase=" in x for x in waking)
            [event] = [x for x in lines if x.startswith("data: ")]
            assert json.loads(event[6:])["error"]["code"] == "wake_timeout"
            assert max(i for i, x in enumerate(lines) if x.startswith(": waking")) < lines.index(event)  # then the error
            assert "data: [DONE]" not in lines


async def test_waiting_stream_is_served_once_the_tier_is_up(aws_url: str, tmp_path: Path) -> None:
    with trio.fail_after(60):
        async with cloud(aws_url, boot_delay_s=BOOT_S) as c, served(write_config(c, tmp_path / "g.toml")) as url:
            def stream() -> str:
                chunks = sdk(url).chat.completions.create(
                    model=MODELS[1], stream=True, max_tokens=6, messages=[{"role": "user", "content": "hi"}])
                return "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)

            assert await trio.to_thread.run_sync(stream)  # the SDK ignores the ': waking' comments


async def test_capacity_error_is_served_by_fallback_within_the_cap(aws_url: str, tmp_path: Path) -> None:
    with trio.fail_after(60):
        async with cloud(aws_url, fallbacks=1, boot_delay_s=BOOT_S) as c, served(
                write_config(c, tmp_path / "g.toml")) as url:
            c.tap.fail("StartInstances", "InsufficientInstanceCapacity", times=10,
                       match=lambda call: call.params.get("InstanceId.1") == c.primary[0])
            raw = await trio.to_thread.run_sync(chat, url)
            assert raw.http_response.status_code == 200
            started = [call.params["InstanceId.1"] for call in c.tap.calls if call.action == "StartInstances"]
            assert started == [c.primary[0], c.fallback[0]]
            assert c.fleet.server(c.fallback[0]).statistics().finished_total == 1


async def _read_stream(url: str, lines: list[str]) -> None:
    body = {"model": MODELS[0], "stream": True, "max_tokens": 2000, "messages": [{"role": "user", "content": "go"}]}
    async with httpx.AsyncClient(timeout=30) as http, \
            http.stream("POST", f"{url}/v1/chat/completions", json=body) as resp:
        try:
            async for line in resp.aiter_lines():
                lines.append(line)
        except httpx.RemoteProtocolError:
            lines.append("<closed without the last chunk>")


async def test_spot_warning_stops_routing_to_the_host_and_the_tier_recovers(aws_url: str, tmp_path: Path) -> None:
    with trio.fail_after(60):
        async with cloud(aws_url, primaries=2, boot_delay_s=BOOT_S, tokens_per_s=20.0) as c:  # 100 s streams
            sqs = c.boto("sqs")
            queue = sqs.create_queue(QueueName="spot")["QueueUrl"]

            def queue_empty() -> bool:
                a = sqs.get_queue_attributes(QueueUrl=queue, AttributeNames=["All"])["Attributes"]
                return a["ApproximateNumberOfMessages"] == a["ApproximateNumberOfMessagesNotVisible"] == "0"

            # The rotation: one long stream on each host, by construction (two identical prompts would
            # share a home under the default prefix policy).
            async with served(write_config(c, tmp_path / "g.toml", routing="round_robin",
                                           interruption_queue_url=queue)) as url, \
                    trio.open_nursery() as streams:
                await trio.to_thread.run_sync(chat, url)
                doomed, _ = c.primary
                streamed: list[list[str]] = [[], []]
                for lines in streamed:  # round robin: one long stream in flight on each host
                    streams.start_soon(_read_stream, url, lines)
                await wait_for(lambda: all(c.fleet.server(i).statistics().running == 1 for i in c.primary))
                await trio.to_thread.run_sync(lambda: sqs.send_message(QueueUrl=queue, MessageBody=spot_warning(doomed)))
                # Handled, then deleted by the waker: the host left the rotation before the message went.
                while not await trio.to_thread.run_sync(queue_empty):
                    await trio.sleep(0.1)
                before = c.fleet.server(doomed).statistics().finished_total
                for _ in range(6):
                    assert (await trio.to_thread.run_sync(chat, url)).http_response.status_code == 200
                assert c.fleet.server(doomed).statistics().finished_total == before  # no new requests there
                c.fleet.kill(doomed)  # two minutes later: the interruption takes the host down
                await c.ec2_call("stop_instances", InstanceIds=[doomed])
                await wait_for(lambda: any(lines and lines[-1] == "<closed without the last chunk>"
                                           for lines in streamed))
                cut = next(lines for lines in streamed if lines and lines[-1] == "<closed without the last chunk>")
                events = [x for x in cut if x.startswith("data: ")]
                assert json.loads(events[-1][6:])["error"]["type"] == "server_error"  # in-band, then closed
                assert "data: [DONE]" not in cut
                await wait_for(lambda: c.tap.count("StartInstances") == 2)  # the waker restarts the host
                await wait_for(lambda: c.fleet.server(doomed) is not None)
                for _ in range(4):
                    assert (await trio.to_thread.run_sync(chat, url)).http_response.status_code == 200
                streams.cancel_scope.cancel()


def _pending(body: bytes) -> bytes:
    return body.replace(b"<code>16</code>", b"<code>0</code>").replace(b"<name>running</name>", b"<name>pending</name>")


async def test_gateway_restart_while_waking_does_not_start_twice(aws_url: str, tmp_path: Path) -> None:
    with trio.fail_after(60):
        async with cloud(aws_url, primaries=2, boot_delay_s=BOOT_S) as c:
            config = write_config(c, tmp_path / "g.toml", hard_cap_s=10.0, budget_s=8.0)
            c.tap.rewrite("DescribeInstances", _pending)
            async with served(config) as url, trio.open_nursery() as nursery:
                nursery.start_soon(_in_thread, url)
                await wait_for(lambda: c.tap.count("StartInstances") == 1)
                await described_again(c)  # it has seen the instances pending since
                nursery.cancel_scope.cancel()
            async with served(config) as url:  # a new gateway process, mid-wake
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(_in_thread, url)
                    await until_waiters(url, 1)
                    await described_again(c)  # with a request waiting, it sees them pending: it waits ...
                    assert c.tap.count("StartInstances") == 1  # ... and never starts them again
                    c.tap.rewrite("DescribeInstances", None)  # EC2 now says running
                raw = await trio.to_thread.run_sync(chat, url)
                assert raw.http_response.status_code == 200
            assert c.tap.count("StartInstances") == 1


async def _in_thread(url: str) -> None:
    """A request whose gateway may be restarted under it (its failure is expected and ignored)."""
    def call() -> None:
        try:
            chat(url)
        except openai.APIError:
            pass

    await trio.to_thread.run_sync(call, abandon_on_cancel=True)


async def test_a_flood_of_waits_past_max_waiters_gets_503_with_retry_after(aws_url: str, tmp_path: Path) -> None:
    """DESIGN's DoS list: waits on a sleeping tier are bounded; past the bound, 503 + Retry-After at once."""
    with trio.fail_after(60):
        async with cloud(aws_url, boot_delay_s=2.0) as c, served(
                write_config(c, tmp_path / "g.toml", max_waiters=2, hard_cap_s=8.0, budget_s=6.0)) as url:
            # EC2 shows the instance pending until the third request has been answered: the two keep waiting
            # however long the checks take (the boot delay alone would be a race against this machine).
            c.tap.rewrite("DescribeInstances", _pending)
            body = {"model": MODELS[0], "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]}
            results: list[httpx.Response] = []

            async def one() -> None:
                async with httpx.AsyncClient(timeout=30) as http:
                    results.append(await http.post(f"{url}/v1/chat/completions", json=body))

            async with trio.open_nursery() as nursery:
                for _ in range(2):
                    nursery.start_soon(one)
                await wait_for(lambda: c.tap.count("StartInstances") == 1)
                await until_waiters(url, 2)  # both are waiting now (the gateway says so)
                async with httpx.AsyncClient(timeout=5) as http:
                    refused = await http.post(f"{url}/v1/chat/completions", json=body)
                    # A stream is refused with the status too, before any early 200 SSE head.
                    refused_stream = await http.post(f"{url}/v1/chat/completions", json={**body, "stream": True})
                assert results == []  # refused at once, while the two still wait
                c.tap.rewrite("DescribeInstances", None)  # now running: the two are served
            assert refused.status_code == 503
            assert refused.json()["error"]["code"] == "overloaded" and int(refused.headers["retry-after"]) >= 1
            assert refused_stream.status_code == 503 and refused_stream.json()["error"]["code"] == "overloaded"
            assert sorted(r.status_code for r in results) == [200, 200]  # the two within the bound are served
