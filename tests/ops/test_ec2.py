"""ops.ec2 against moto's EC2 server, through a tap that records and faults calls on the wire."""

from __future__ import annotations

import socket

import botocore.exceptions
import pytest
import trio

from backends.fleet import ApiTap
from ops.ec2 import (
    AuthError,
    Backoff,
    CapacityError,
    Clients,
    Ec2,
    Ec2Error,
    StateError,
    ThrottledError,
    UnavailableError,
    translate,
)
from tests.support.aws import client, states, stopped_instances

FAST = Backoff(attempts=3, base_s=0.01, max_s=0.02)


def _client_error(code: str) -> botocore.exceptions.ClientError:
    return botocore.exceptions.ClientError({"Error": {"Code": code, "Message": "m"}}, "StartInstances")


@pytest.mark.parametrize("code, kind", [
    ("InsufficientInstanceCapacity", CapacityError),
    ("InsufficientCapacity", CapacityError),
    ("MaxSpotInstanceCountExceeded", CapacityError),
    ("IncorrectInstanceState", StateError),
    ("RequestLimitExceeded", ThrottledError),
    ("AuthFailure", AuthError),
    ("UnauthorizedOperation", AuthError),
    ("InvalidInstanceID.NotFound", Ec2Error),
])
def test_translate_client_errors(code: str, kind: type) -> None:
    err = translate(_client_error(code))
    assert type(err) is kind and err.code == code


def test_translate_transport_errors() -> None:
    assert isinstance(translate(botocore.exceptions.NoCredentialsError()), AuthError)
    assert isinstance(translate(botocore.exceptions.EndpointConnectionError(endpoint_url="http://x")),
                      UnavailableError)


def test_backoff_is_bounded_full_jitter() -> None:
    b = Backoff(attempts=5, base_s=0.2, max_s=1.0)
    assert [b.delay_s(n, 1.0) for n in range(5)] == [0.2, 0.4, 0.8, 1.0, 1.0]
    assert b.delay_s(3, 0.5) == 0.5 and b.delay_s(0, 0.0) == 0.0


async def _tapped(nursery: trio.Nursery, url: str) -> tuple[ApiTap, Ec2]:
    tap = ApiTap(url)
    host, port = await nursery.start(tap.serve, "127.0.0.1", 0)
    return tap, Ec2(Clients("us-east-1", f"http://{host}:{port}"), backoff=FAST)


async def test_describe_start_stop_roundtrip(aws_url: str) -> None:
    ids = stopped_instances(aws_url, 2)
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            tap, ec2 = await _tapped(nursery, aws_url)
            found = await trio.to_thread.run_sync(ec2.describe, ids)
            assert {i: f.state for i, f in found.items()} == dict.fromkeys(ids, "stopped")
            assert all(f.private_ip for f in found.values())
            await trio.to_thread.run_sync(ec2.start, ids)
            assert set(states(aws_url, ids).values()) == {"running"}
            await trio.to_thread.run_sync(ec2.stop, ids)
            await trio.to_thread.run_sync(ec2.stop, ids)  # idempotent
            assert set(states(aws_url, ids).values()) == {"stopped"}
            assert tap.count("StartInstances") == 1 and tap.count("StopInstances") == 2
            nursery.cancel_scope.cancel()


async def test_faults_on_the_wire_become_our_exceptions(aws_url: str) -> None:
    ids = stopped_instances(aws_url, 1)
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            tap, ec2 = await _tapped(nursery, aws_url)
            tap.fail("StartInstances", "InsufficientInstanceCapacity")
            with pytest.raises(CapacityError):
                await trio.to_thread.run_sync(ec2.start, ids)
            tap.fail("StartInstances", "IncorrectInstanceState", status=400)
            with pytest.raises(StateError):
                await trio.to_thread.run_sync(ec2.start, ids)
            tap.fail("DescribeInstances", "UnauthorizedOperation", status=403)
            with pytest.raises(AuthError):
                await trio.to_thread.run_sync(ec2.describe, ids)
            assert states(aws_url, ids)[ids[0]] == "stopped"
            nursery.cancel_scope.cancel()


async def test_throttling_is_retried_then_bounded(aws_url: str) -> None:
    ids = stopped_instances(aws_url, 1)
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            tap, ec2 = await _tapped(nursery, aws_url)
            tap.fail("StartInstances", "RequestLimitExceeded", status=503, times=2)
            await trio.to_thread.run_sync(ec2.start, ids)  # third attempt passes
            assert tap.count("StartInstances") == 3
            assert states(aws_url, ids)[ids[0]] == "running"
            tap.fail("StopInstances", "RequestLimitExceeded", status=503, times=5)
            with pytest.raises(ThrottledError):
                await trio.to_thread.run_sync(ec2.stop, ids)
            assert tap.count("StopInstances") == FAST.attempts
            nursery.cancel_scope.cancel()


async def test_run_from_template_is_tagged_and_found_again(aws_url: str) -> None:
    client(aws_url).create_launch_template(
        LaunchTemplateName="gpu-fallback", LaunchTemplateData={"ImageId": "ami-12c6146b", "InstanceType": "g5.12xlarge"})
    ec2 = Ec2(Clients("us-east-1", aws_url), backoff=FAST)
    with trio.fail_after(20):
        launched = await trio.to_thread.run_sync(ec2.run_from_template, "gpu-fallback", 2, {"spotinference:tier": "t"},
                                                 "token-1")
        # EC2 launches as many as it can up to MaxCount (MinCount=1); moto launches MinCount.
        assert 1 <= len(launched) <= 2 and launched[0].tags["spotinference:tier"] == "t"
        found = await trio.to_thread.run_sync(ec2.describe_tagged, "spotinference:tier", "t")
        assert {i.id for i in found} == {i.id for i in launched}
        await trio.to_thread.run_sync(ec2.terminate, [i.id for i in launched])
        assert await trio.to_thread.run_sync(ec2.describe_tagged, "spotinference:tier", "t") == []


async def test_no_credentials_and_no_endpoint(aws_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name)
    with trio.fail_after(20):
        with pytest.raises(AuthError):
            await trio.to_thread.run_sync(Ec2(Clients("us-east-1", aws_url)).describe, ["i-0123456789abcdef0"])
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))  # bound, not listening: connection refused
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
        with trio.fail_after(20), pytest.raises(UnavailableError):
            await trio.to_thread.run_sync(Ec2(Clients("us-east-1", dead)).describe, ["i-0123456789abcdef0"])
