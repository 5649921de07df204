"""Test helpers: moto's server mode (a real HTTP EC2/SQS API on 127.0.0.1, port 0) and fake credentials.

Strategy: one ThreadedMotoServer per test session (moto keeps its state in process-global backends,
so each test starts from `POST /moto-api/reset`). boto3 is never mocked: it signs and sends real HTTP
to the emulator, or to an `ApiTap` in front of it. Credentials are fake and set in the environment;
shared config files and the instance-metadata lookup are switched off so no real account is touched.
tests/conftest.py registers the fixtures for every test.
"""

from __future__ import annotations

import logging
import urllib.request
from collections.abc import Iterator

import boto3
import pytest

REGION = "us-east-1"
AMI = "ami-12c6146b"


@pytest.fixture(scope="session")
def moto_url() -> Iterator[str]:
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@pytest.fixture
def aws_url(moto_url: str, monkeypatch: pytest.MonkeyPatch, tmp_path) -> str:
    """The emulator, reset, with fake credentials in the environment."""
    for name, value in {
        "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_SESSION_TOKEN": "testing",
        "AWS_DEFAULT_REGION": REGION, "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_CONFIG_FILE": str(tmp_path / "no-config"), "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "no-creds"),
    }.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    urllib.request.urlopen(urllib.request.Request(f"{moto_url}/moto-api/reset", method="POST"), timeout=5).read()
    return moto_url


def client(url: str, service: str = "ec2"):
    return boto3.client(service, endpoint_url=url, region_name=REGION)


def stopped_instances(url: str, n: int) -> list[str]:
    """n GPU-host-like instances, created and stopped (a sleeping tier)."""
    ec2 = client(url)
    ids = [i["InstanceId"] for i in ec2.run_instances(ImageId=AMI, MinCount=n, MaxCount=n,
                                                      InstanceType="g5.12xlarge")["Instances"]]
    ec2.stop_instances(InstanceIds=ids)
    return ids


def states(url: str, ids: list[str]) -> dict[str, str]:
    resp = client(url).describe_instances(InstanceIds=ids)
    return {i["InstanceId"]: i["State"]["Name"] for r in resp["Reservations"] for i in r["Instances"]}
