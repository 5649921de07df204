"""ops.waker against moto's EC2/SQS server and the fleet simulator, with small budgets (seconds).

Every EC2 call the waker makes goes through an ApiTap: StartInstances is counted on the wire, and
faults (InsufficientInstanceCapacity, a `pending` view of the instances) are injected there.

moto answers from threads and the hosts are real sockets, so trio's clock here is the real one: no
assertion rests on how long something took. "Not ready yet" is checked after the waker has been seen
to look at EC2 again (`described_again`: two more DescribeInstances on the tap, so at least one
answer came back and was acted on), never after a sleep; a test whose point is not the budget gives
the wake a generous one, so a slow machine cannot push it over.
"""

from __future__ import annotations

import json

import httpx
import pytest
import trio

from ops.waker import TierState, WakeQueueFull
from tests.support.cloud import MODELS, Cloud, cloud, wait_for
from tests.support.notices import spot_warning

ROOMY = {"budget_s": 10.0, "hard_cap_s": 15.0}  # for tests about something else than the budget


async def described_again(c: Cloud, times: int = 2) -> None:
    """Until the waker has sent `times` more DescribeInstances (the tap sees only the waker's calls)."""
    seen = c.tap.count("DescribeInstances")
    await wait_for(lambda: c.tap.count("DescribeInstances") >= seen + times)


async def test_wake_succeeds_and_reports_a_timeline(aws_url: str) -> None:
    with trio.fail_after(30):
        async with cloud(aws_url) as c:
            waker = c.waker(**ROOMY)
            await c.start(waker)
            assert waker.statistics().state is TierState.ASLEEP and not waker.is_ready()
            assert waker.upstreams() == []
            await waker.wait_ready()
            assert waker.is_ready() and waker.upstreams() == c.upstreams
            stats = waker.statistics()
            assert (stats.wakes_total, stats.wake_budget_exceeded_total, stats.waiters) == (1, 0, 0)
            assert [p for p, _ in stats.last_timeline] == ["requested", "start_sent", "running", "healthy", "ready"]
            assert stats.last_wake_s is not None and 0.2 <= stats.last_wake_s  # at least the boot delay
            assert stats.last_wake_s < waker.settings.budget_s  # hence not counted as over budget (above)
            assert c.tap.count("StartInstances") == 1
            await waker.wait_ready()  # fast path
            assert c.tap.count("StartInstances") == 1


async def test_twenty_waiters_several_models_one_start(aws_url: str) -> None:
    with trio.fail_after(30):
        async with cloud(aws_url, primaries=2) as c:
            waker = c.waker(**ROOMY)
            await c.start(waker)
            done: list[int] = []

            async def request(n: int) -> None:
                with trio.fail_after(waker.settings.hard_cap_s):
                    await waker.wait_ready()
                done.append(n)

            async with trio.open_nursery() as nursery:
                for n in range(20):
                    nursery.start_soon(request, n)
                await wait_for(lambda: waker.statistics().waiters == 20 or len(done) == 20)
            assert sorted(done) == list(range(20))
            starts = [call for call in c.tap.calls if call.action == "StartInstances"]
            assert len(starts) == 1
            assert {starts[0].params["InstanceId.1"], starts[0].params["InstanceId.2"]} == set(c.primary)
            assert sorted(waker.upstreams()) == sorted(c.upstreams)


async def test_never_ready_callers_wait_to_the_cap_then_the_wake_is_abandoned(aws_url: str) -> None:
    with trio.fail_after(20):
        async with cloud(aws_url, served=("some-other-model",)) as c:  # /v1/models never lists ours
            # The cap is well past the budget, so the test sees the budget exceeded while all still wait.
            waker = c.waker(budget_s=0.5, hard_cap_s=2.0, fallback_tier="spare")
            await c.start(waker)
            outcomes: list[str] = []
            state_at_cap: list[TierState] = []

            async def request() -> None:
                with trio.move_on_after(waker.settings.hard_cap_s) as cap:  # what the gateway does per request
                    await waker.wait_ready()
                    outcomes.append("ready")
                    return
                assert cap.cancelled_caught  # released by its own cap, nothing else
                outcomes.append("cap")
                state_at_cap.append(waker.statistics().state)

            async with trio.open_nursery() as nursery:
                for _ in range(3):
                    nursery.start_soon(request)
                await wait_for(lambda: waker.statistics().wake_budget_exceeded_total == 1)  # at 0.5 s
                stats = waker.statistics()
                assert stats.state is TierState.WAKING and stats.waiters == 3 and stats.fallback_tier == "spare"
            assert outcomes == ["cap"] * 3
            # Each caller left at its cap while the wake went on: it is abandoned only once nobody waits.
            assert state_at_cap == [TierState.WAKING] * 3
            assert waker.statistics().waiters == 0
            # Nobody waits any more and the hard cap has passed: the wake stops the instances.
            await wait_for(lambda: waker.statistics().state is TierState.ASLEEP)
            assert c.tap.count("StartInstances") == 1 and c.tap.count("StopInstances") >= 1
            assert waker.statistics().fallback_tier is None


async def test_queue_of_waiters_is_bounded(aws_url: str) -> None:
    with trio.fail_after(20):
        async with cloud(aws_url, boot_delay_s=0.5) as c:
            waker = c.waker(max_waiters=2)
            await c.start(waker)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(waker.wait_ready)
                nursery.start_soon(waker.wait_ready)
                await wait_for(lambda: waker.statistics().waiters == 2)
                with pytest.raises(WakeQueueFull):
                    waker.check_room()  # what the gateway asks before a stream's early head
                with pytest.raises(WakeQueueFull) as info:
                    await waker.wait_ready()
                assert 1 <= info.value.retry_after_s <= waker.settings.hard_cap_s
            assert waker.is_ready()
            waker.check_room()  # a ready tier always has room


async def test_capacity_error_on_the_wire_starts_fallback_instances(aws_url: str) -> None:
    with trio.fail_after(20):
        async with cloud(aws_url, fallbacks=1) as c:
            c.tap.fail("StartInstances", "InsufficientInstanceCapacity", times=10,
                       match=lambda call: call.params.get("InstanceId.1") == c.primary[0])
            waker = c.waker(**ROOMY)  # the capacity error, not the budget, engages the fallback
            await c.start(waker)
            await waker.wait_ready()
            starts = [call.params["InstanceId.1"] for call in c.tap.calls if call.action == "StartInstances"]
            assert starts == [c.primary[0], c.fallback[0]]
            assert waker.upstreams() == [c.fleet.url(c.fallback[0])]
            stats = waker.statistics()
            assert stats.fallbacks_total == 1 and stats.wake_budget_exceeded_total == 0


async def test_capacity_error_launches_from_the_template(aws_url: str) -> None:
    with trio.fail_after(20):
        async with cloud(aws_url) as c:
            await c.ec2_call("create_launch_template", LaunchTemplateName="gpu-spare",
                             LaunchTemplateData={"ImageId": "ami-12c6146b", "InstanceType": "g5.12xlarge"})
            c.tap.fail("StartInstances", "InsufficientInstanceCapacity", times=10)
            waker = c.waker(fallback_launch_template="gpu-spare", idle_s=1.0)
            await c.start(waker)
            await waker.wait_ready()
            [run] = [call for call in c.tap.calls if call.action == "RunInstances"]
            assert run.params["LaunchTemplate.LaunchTemplateName"] == "gpu-spare"
            assert run.params["TagSpecification.1.Tag.1.Key"] == "spotinference:tier"
            [url] = waker.upstreams()
            assert url not in c.upstreams and url.startswith("http://127.0.0.1:")
            second = c.waker(fallback_launch_template="gpu-spare")
            restarted = await c.start(second)  # a restarted gateway finds the tagged capacity again
            assert second.is_ready() and second.upstreams() == [url]
            restarted.cancel()
            # Idle: launch-template capacity is terminated (it is disposable), the primaries stay stopped.
            await wait_for(lambda: waker.statistics().state is TierState.ASLEEP)
            [terminate] = [call for call in c.tap.calls if call.action == "TerminateInstances"]
            launched = terminate.params["InstanceId.1"]
            assert launched not in c.primary
            assert (await c.ec2_call("describe_instances", InstanceIds=[launched]))[
                "Reservations"][0]["Instances"][0]["State"]["Name"] == "terminated"


async def test_idle_sleep_then_next_request_wakes_again(aws_url: str) -> None:
    with trio.fail_after(20):
        async with cloud(aws_url) as c:
            waker = c.waker(idle_s=1.0)
            await c.start(waker)
            await waker.wait_ready()
            [url] = waker.upstreams()
            # Requests back to back for twice idle_s (on the waker's own clock): activity seen in vLLM's
            # own counters at every probe keeps the tier up past its idle time.
            busy_until = trio.current_time() + 2 * waker.settings.idle_s
            sent = 0
            async with httpx.AsyncClient() as http:
                while trio.current_time() < busy_until:
                    r = await http.post(f"{url}/v1/chat/completions",
                                        json={"model": MODELS[1], "messages": [{"role": "user", "content": "x"}]})
                    assert r.status_code == 200
                    sent += 1
                    assert waker.is_ready(), f"stopped after {sent} requests"
            assert waker.is_ready() and c.tap.count("StopInstances") == 0
            await wait_for(lambda: waker.statistics().state is TierState.ASLEEP)
            assert c.tap.count("StopInstances") >= 1 and waker.statistics().stops_total == 1
            assert waker.upstreams() == []
            await waker.wait_ready()
            assert c.tap.count("StartInstances") == 2 and waker.statistics().wakes_total == 2


async def test_spot_warning_on_sqs_drops_the_host_and_the_tier_recovers(aws_url: str) -> None:
    with trio.fail_after(20):
        async with cloud(aws_url, primaries=2) as c:
            sqs = c.boto("sqs")
            queue = sqs.create_queue(QueueName="spot-notices")["QueueUrl"]
            waker = c.waker(interruption_queue_url=queue)
            await c.start(waker)
            await waker.wait_ready()
            doomed, _ = c.primary
            await trio.to_thread.run_sync(lambda: sqs.send_message(QueueUrl=queue, MessageBody=spot_warning(doomed)))
            await wait_for(lambda: waker.upstreams() == [c.upstreams[1]])
            assert waker.is_ready() and waker.statistics().interruptions_total == 1
            await c.ec2_call("stop_instances", InstanceIds=[doomed])  # two minutes later, EC2 takes it
            await wait_for(lambda: sorted(waker.upstreams()) == sorted(c.upstreams))  # restarted, healthy
            starts = [call.params["InstanceId.1"] for call in c.tap.calls if call.action == "StartInstances"]
            assert starts[-1] == doomed and len(starts) == 2
            attrs = await trio.to_thread.run_sync(lambda: sqs.get_queue_attributes(
                QueueUrl=queue, AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"]))
            assert set(attrs["Attributes"].values()) == {"0"}  # handled and deleted


async def test_spot_warning_on_the_only_host_rewakes_the_tier(aws_url: str) -> None:
    with trio.fail_after(20):
        async with cloud(aws_url) as c:
            sqs = c.boto("sqs")
            queue = sqs.create_queue(QueueName="spot-notices")["QueueUrl"]
            waker = c.waker(interruption_queue_url=queue)
            await c.start(waker)
            await waker.wait_ready()
            [iid] = c.primary
            await trio.to_thread.run_sync(lambda: sqs.send_message(
                QueueUrl=queue, MessageBody=json.dumps({"Type": "Notification", "Message": spot_warning(iid, "stop")})))
            await wait_for(lambda: not waker.is_ready())
            assert waker.upstreams() == []
            async with trio.open_nursery() as nursery:
                nursery.start_soon(waker.wait_ready)
                await wait_for(lambda: waker.statistics().waiters == 1)
                await described_again(c)  # with a caller waiting, the waker looked at EC2 again ...
                # ... and the host is still running and healthy, but doomed: not routed to
                assert c.fleet.server(iid) is not None and c.fleet.server(iid).healthy
                assert not waker.is_ready() and waker.upstreams() == []
                await c.ec2_call("stop_instances", InstanceIds=[iid])
            assert waker.is_ready() and waker.upstreams() == c.upstreams
            assert c.tap.count("StartInstances") == 2


async def test_failing_health_and_unreachable_reports_take_hosts_out(aws_url: str) -> None:
    with trio.fail_after(20):
        async with cloud(aws_url, primaries=2) as c:
            waker = c.waker(health_failures=2)
            await c.start(waker)
            await waker.wait_ready()
            a, b = c.upstreams
            c.fleet.server(c.primary[0]).healthy = False  # what the host agent's notice looks like to /health
            await wait_for(lambda: waker.upstreams() == [b])
            c.fleet.server(c.primary[0]).healthy = True
            await wait_for(lambda: sorted(waker.upstreams()) == sorted([a, b]))
            waker.report_unreachable(b)  # the gateway saw a reset before the first byte
            assert waker.upstreams() == [a]
            waker.report_unreachable(a)
            assert not waker.is_ready()
            await waker.wait_ready()  # re-probed: both fine, no new StartInstances
            assert sorted(waker.upstreams()) == sorted([a, b]) and c.tap.count("StartInstances") == 1
            assert waker.statistics().upstream_down_total >= 3


def _pending(body: bytes) -> bytes:
    return body.replace(b"<code>16</code>", b"<code>0</code>").replace(b"<name>running</name>", b"<name>pending</name>")


async def test_restart_while_pending_describes_first_and_never_starts_twice(aws_url: str) -> None:
    with trio.fail_after(20):
        async with cloud(aws_url, primaries=2) as c:
            c.tap.rewrite("DescribeInstances", _pending)  # EC2 shows them pending for a while
            first = c.waker()
            scope = await c.start(first)
            c.nursery.start_soon(first.wait_ready)
            await wait_for(lambda: c.tap.count("StartInstances") == 1)
            await described_again(c)  # the first waker has seen them pending since
            scope.cancel()  # the gateway restarts mid-wake
            second = c.waker()
            await c.start(second)
            assert second.statistics().state is TierState.WAKING
            async with trio.open_nursery() as nursery:
                nursery.start_soon(second.wait_ready)
                await wait_for(lambda: second.statistics().waiters == 1)
                await described_again(c)  # the second one too, with a caller waiting: it waits, never restarts
                assert not second.is_ready() and c.tap.count("StartInstances") == 1
                c.tap.rewrite("DescribeInstances", None)  # now running
            assert second.is_ready() and c.tap.count("StartInstances") == 1


async def test_restart_when_ready_is_ready_at_once(aws_url: str) -> None:
    with trio.fail_after(20):
        async with cloud(aws_url) as c:
            first = c.waker()
            scope = await c.start(first)
            await first.wait_ready()
            scope.cancel()
            second = c.waker()
            await c.start(second)
            assert second.is_ready() and second.upstreams() == c.upstreams
            assert c.tap.count("StartInstances") == 1


async def test_terminated_primary_fails_over_at_once(aws_url: str) -> None:
    with trio.fail_after(20):
        async with cloud(aws_url, fallbacks=1) as c:
            await c.ec2_call("terminate_instances", InstanceIds=c.primary)  # the spot pool took it for good
            waker = c.waker(**ROOMY)
            await c.start(waker)
            await waker.wait_ready()  # no waiting for the budget: nothing is left to wait for
            assert waker.upstreams() == [c.fleet.url(c.fallback[0])]
            assert waker.statistics().wake_budget_exceeded_total == 0
            waker2 = c.waker(idle_s=0.3)
            await c.start(waker2)
            assert waker2.is_ready()
            await wait_for(lambda: waker2.statistics().state is TierState.ASLEEP)  # stopping ends despite it
