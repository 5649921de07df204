"""Test helper: a sleeping tier on one machine -- moto's EC2/SQS behind an ApiTap, and a fleet simulator
whose hosts follow the instances. The Waker under test talks to the tap (so calls are counted and can
be faulted on the wire); the fleet and the test's own boto3 calls go to moto directly."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import msgspec
import trio

from backends.fleet import ApiTap, FleetSimulator
from backends.sim.server import SimOptions
from ops.ec2 import Clients, Ec2
from ops.settings import WakeConfig
from ops.waker import Waker
from tests.support.aws import AMI, client, stopped_instances

TAG = "spotinference:upstream"
MODELS = ["chat-a", "chat-b"]


@dataclass
class Cloud:
    aws_url: str
    tap: ApiTap
    tap_url: str
    fleet: FleetSimulator
    primary: list[str]
    upstreams: list[str]
    fallback: list[str] = field(default_factory=list)
    nursery: trio.Nursery | None = None

    def settings(self, **overrides) -> WakeConfig:
        base = WakeConfig(
            region="us-east-1", endpoint_url=self.tap_url, instance_ids=self.primary,
            fallback_instance_ids=self.fallback, budget_s=3.0, hard_cap_s=6.0, idle_s=60.0, poll_s=0.05,
            probe_timeout_s=1.0, start_retry_s=10.0, interruption_wait_s=0, upstream_tag=TAG, api_attempts=2)
        return msgspec.structs.replace(base, **overrides)

    def waker(self, **overrides) -> Waker:
        return Waker("gpu", self.settings(**overrides), self.upstreams, MODELS)

    async def start(self, waker: Waker) -> trio.CancelScope:
        """Run a waker in the cloud's nursery until it has described the tier (its `started()`);
        cancel the returned scope to 'restart the gateway'."""
        assert self.nursery is not None
        scope = trio.CancelScope()

        async def run(task_status=trio.TASK_STATUS_IGNORED) -> None:
            with scope:
                await waker.run(task_status=task_status)

        await self.nursery.start(run)
        return scope

    def boto(self, service: str = "ec2"):
        return client(self.aws_url, service)

    async def ec2_call(self, action: str, **kwargs):
        return await trio.to_thread.run_sync(lambda: getattr(self.boto(), action)(**kwargs))


async def wait_for(predicate, poll_s: float = 0.02) -> None:
    while not predicate():
        await trio.sleep(poll_s)


@asynccontextmanager
async def cloud(aws_url: str, *, primaries: int = 1, fallbacks: int = 0, boot_delay_s: float = 0.2,
                served: tuple[str, ...] = tuple(MODELS), tokens_per_s: float = 0.0) -> AsyncIterator[Cloud]:
    ids = await trio.to_thread.run_sync(stopped_instances, aws_url, primaries + fallbacks)
    async with trio.open_nursery() as nursery:
        tap = ApiTap(aws_url)
        host, port = await nursery.start(tap.serve, "127.0.0.1", 0)
        fleet = FleetSimulator(Ec2(Clients("us-east-1", aws_url)), SimOptions(models=served, tokens_per_s=tokens_per_s),
                               boot_delay_s=boot_delay_s, poll_s=0.05, upstream_tag=TAG)
        upstreams = [fleet.reserve(i) for i in ids[:primaries]]
        await nursery.start(fleet.run)
        yield Cloud(aws_url, tap, f"http://{host}:{port}", fleet, ids[:primaries], upstreams, ids[primaries:],
                    nursery)
        nursery.cancel_scope.cancel()


__all__ = ["AMI", "Cloud", "cloud", "wait_for"]
