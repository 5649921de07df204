"""A thin synchronous boto3 wrapper: describe, start, stop, terminate, run from a launch template.

Strategy: everything here blocks (HTTP to the EC2 API), so the waker calls it only through
`trio.to_thread.run_sync(..., limiter=...)`, never on the event loop. Credentials come from boto3's
default chain (environment, shared config/profile, instance role); `endpoint_url` points the clients at
a local emulator (moto server) in tests and the demo. botocore's own retries are switched off so that
one policy, ours, applies: throttling (`RequestLimitExceeded` and friends) is retried a bounded number of
times with full-jitter exponential backoff; every other error is translated at once into one of a few
exceptions the waker acts on:

- `CapacityError`    no spot/on-demand capacity now (InsufficientInstanceCapacity, ...): fall back.
- `StateError`       the instance is in the wrong state for the call (IncorrectInstanceState): re-describe.
- `ThrottledError`   still throttled after the bounded retries: back off.
- `AuthError`        credentials missing/invalid or the IAM policy lacks the action: log loudly, no retry.
- `UnavailableError` the API could not be reached (connect/read timeout, DNS): retry later.
- `Ec2Error`         anything else, with the AWS error code kept in `.code`.

Error codes: EC2 API reference, "Error codes for the Amazon EC2 API". Messages are AWS's, which name
instance ids and actions but never credentials.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import boto3
import botocore.config
import botocore.exceptions
import botocore.loaders
import botocore.session

logger = logging.getLogger(__name__)

T = TypeVar("T")

CAPACITY_CODES = frozenset({
    "InsufficientInstanceCapacity", "InsufficientCapacity", "InsufficientHostCapacity",
    "MaxSpotInstanceCountExceeded", "SpotMaxPriceTooLow", "InstanceLimitExceeded", "VcpuLimitExceeded",
})
STATE_CODES = frozenset({"IncorrectInstanceState", "IncorrectState"})
THROTTLE_CODES = frozenset({"RequestLimitExceeded", "Throttling", "ThrottlingException", "RequestThrottled"})
AUTH_CODES = frozenset({
    "AuthFailure", "UnauthorizedOperation", "InvalidClientTokenId", "SignatureDoesNotMatch",
    "ExpiredToken", "RequestExpired", "OptInRequired", "AccessDenied", "AccessDeniedException",
})


class Ec2Error(Exception):
    """An EC2/SQS API call failed; `code` is AWS's error code (or our own for non-API failures)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class CapacityError(Ec2Error):
    """No capacity for the instance (type, AZ, spot pool) right now."""


class StateError(Ec2Error):
    """The instance is in a state that does not allow the call (e.g. start while stopping)."""


class ThrottledError(Ec2Error):
    """Throttled, still, after the bounded retries."""


class AuthError(Ec2Error):
    """No usable credentials, or the IAM policy does not allow the action."""


class UnavailableError(Ec2Error):
    """The API endpoint could not be reached or did not answer in time."""


def translate(exc: BaseException) -> Ec2Error:
    """Map a botocore exception onto our small set (pure; unit tested)."""
    if isinstance(exc, botocore.exceptions.ClientError):
        err = exc.response.get("Error", {})
        code = str(err.get("Code") or "Unknown")
        message = str(err.get("Message") or "")
        if code in CAPACITY_CODES:
            return CapacityError(code, message)
        if code in STATE_CODES:
            return StateError(code, message)
        if code in THROTTLE_CODES:
            return ThrottledError(code, message)
        if code in AUTH_CODES:
            return AuthError(code, message)
        return Ec2Error(code, message)
    if isinstance(exc, (botocore.exceptions.NoCredentialsError, botocore.exceptions.PartialCredentialsError)):
        return AuthError("NoCredentials", "no AWS credentials found in the default chain")
    if isinstance(exc, (botocore.exceptions.EndpointConnectionError, botocore.exceptions.ConnectTimeoutError,
                        botocore.exceptions.ReadTimeoutError, botocore.exceptions.ConnectionClosedError)):
        return UnavailableError("Unavailable", type(exc).__name__)
    return Ec2Error(type(exc).__name__, "unexpected botocore failure")


@dataclass(frozen=True)
class Backoff:
    """Bounded full-jitter exponential backoff for throttled calls."""

    attempts: int = 5
    base_s: float = 0.2
    max_s: float = 5.0

    def delay_s(self, attempt: int, rnd: float) -> float:
        """Delay before retry number `attempt` (0-based), `rnd` uniform in [0, 1)."""
        return min(self.max_s, self.base_s * (2 ** attempt)) * rnd


def call(fn: Callable[..., T], /, *, backoff: Backoff, what: str,
         sleep: Callable[[float], None] = time.sleep, rng: Callable[[], float] = random.random,
         **kwargs: Any) -> T:
    """Run one boto3 call with our throttling policy; raise our exceptions, never botocore's."""
    for attempt in range(backoff.attempts):
        try:
            return fn(**kwargs)
        except botocore.exceptions.BotoCoreError as exc:
            raise translate(exc) from None
        except botocore.exceptions.ClientError as exc:
            err = translate(exc)
            if not isinstance(err, ThrottledError) or attempt + 1 >= backoff.attempts:
                raise err from None
            delay = backoff.delay_s(attempt, rng())
            logger.warning("aws call throttled, backing off",
                           extra={"call": what, "attempt": attempt + 1, "delay_s": round(delay, 3)})
            sleep(delay)
    raise AssertionError("unreachable")  # pragma: no cover


_CREATE_LOCK = threading.Lock()
_LOADER: botocore.loaders.Loader | None = None


class Clients:
    """boto3 clients for one region/endpoint, created lazily and once each. Creation is serialised (it is
    not thread-safe; use is) and shares one botocore data loader across instances, so the large EC2
    service model is parsed once per process. Each Clients has its own session, so the default
    credential chain is resolved per waker, at first use."""

    def __init__(self, region: str, endpoint_url: str | None = None) -> None:
        self.region = region
        self.endpoint_url = endpoint_url
        self._clients: dict[str, Any] = {}
        self._session: boto3.session.Session | None = None
        self._config = botocore.config.Config(
            region_name=region,
            retries={"total_max_attempts": 1},  # ours, in `call`
            connect_timeout=5,
            read_timeout=30,  # above the 20 s SQS long-poll maximum
            user_agent_extra="spotinference",
        )

    def get(self, service: str) -> Any:
        global _LOADER
        with _CREATE_LOCK:
            client = self._clients.get(service)
            if client is None:
                if self._session is None:
                    if _LOADER is None:
                        _LOADER = botocore.loaders.create_loader()
                    core = botocore.session.get_session()
                    core.register_component("data_loader", _LOADER)
                    self._session = boto3.session.Session(botocore_session=core)
                client = self._session.client(service, endpoint_url=self.endpoint_url, config=self._config)
                self._clients[service] = client
            return client


@dataclass(frozen=True)
class Instance:
    """What the waker needs to know about one instance."""

    id: str
    state: str  # pending | running | shutting-down | terminated | stopping | stopped
    private_ip: str | None = None
    tags: dict[str, str] = field(default_factory=dict)


def _instance(raw: dict[str, Any]) -> Instance:
    return Instance(
        id=raw["InstanceId"],
        state=raw.get("State", {}).get("Name", "unknown"),
        private_ip=raw.get("PrivateIpAddress"),
        tags={t["Key"]: t.get("Value", "") for t in raw.get("Tags", [])},
    )


class Ec2:
    """The EC2 calls the waker and the fleet simulator make. Every method blocks."""

    def __init__(self, clients: Clients, *, backoff: Backoff | None = None,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self._clients = clients
        self._backoff = backoff or Backoff()
        self._sleep = sleep

    def _call(self, action: str, **kwargs: Any) -> Any:
        client = self._clients.get("ec2")
        fn = getattr(client, action)
        return call(fn, backoff=self._backoff, what=f"ec2.{action}", sleep=self._sleep, **kwargs)

    def _reservations(self, **kwargs: Any) -> list[Instance]:
        out: list[Instance] = []
        token: str | None = None
        while True:
            page = self._call("describe_instances", **kwargs, **({"NextToken": token} if token else {}))
            for res in page.get("Reservations", []):
                out.extend(_instance(raw) for raw in res.get("Instances", []))
            token = page.get("NextToken")
            if not token:
                return out

    def describe(self, ids: Iterable[str]) -> dict[str, Instance]:
        """State, private IP and tags of the given instances (all of them exist or Ec2Error)."""
        ids = list(dict.fromkeys(ids))
        if not ids:
            return {}
        return {i.id: i for i in self._reservations(InstanceIds=ids)}

    def describe_tagged(self, key: str, value: str) -> list[Instance]:
        """Instances carrying tag key=value that are not terminated (launch-template capacity we own)."""
        return self._reservations(Filters=[
            {"Name": f"tag:{key}", "Values": [value]},
            {"Name": "instance-state-name", "Values": ["pending", "running", "stopping", "stopped"]},
        ])

    def describe_all(self) -> list[Instance]:
        """Every instance in the region (the fleet simulator's view of the emulator)."""
        return self._reservations()

    def start(self, ids: Iterable[str]) -> dict[str, str]:
        """StartInstances; returns id -> current state. Starting a running instance is a no-op in EC2."""
        ids = list(ids)
        if not ids:
            return {}
        resp = self._call("start_instances", InstanceIds=ids)
        return {c["InstanceId"]: c.get("CurrentState", {}).get("Name", "unknown")
                for c in resp.get("StartingInstances", [])}

    def stop(self, ids: Iterable[str]) -> dict[str, str]:
        """StopInstances; idempotent: stopping a stopped/stopping instance is not an error here."""
        ids = list(ids)
        if not ids:
            return {}
        # A pending instance answers IncorrectInstanceState (StateError): the caller re-describes and retries.
        resp = self._call("stop_instances", InstanceIds=ids)
        return {c["InstanceId"]: c.get("CurrentState", {}).get("Name", "unknown")
                for c in resp.get("StoppingInstances", [])}

    def terminate(self, ids: Iterable[str]) -> dict[str, str]:
        """TerminateInstances (launch-template capacity is disposable)."""
        ids = list(ids)
        if not ids:
            return {}
        resp = self._call("terminate_instances", InstanceIds=ids)
        return {c["InstanceId"]: c.get("CurrentState", {}).get("Name", "unknown")
                for c in resp.get("TerminatingInstances", [])}

    def run_from_template(self, template: str, count: int, tags: dict[str, str],
                          client_token: str | None = None) -> list[Instance]:
        """RunInstances from a launch template ("lt-..." id or name), up to `count` instances, tagged.
        `client_token` makes a retried call idempotent (EC2 returns the first call's instances)."""
        spec = {"LaunchTemplateId": template} if template.startswith("lt-") else {"LaunchTemplateName": template}
        kwargs: dict[str, Any] = {
            "LaunchTemplate": spec,
            "MinCount": 1,
            "MaxCount": max(1, count),
            "TagSpecifications": [{"ResourceType": "instance",
                                   "Tags": [{"Key": k, "Value": v} for k, v in tags.items()]}],
        }
        if client_token:
            kwargs["ClientToken"] = client_token
        resp = self._call("run_instances", **kwargs)
        return [_instance(raw) for raw in resp.get("Instances", [])]

    def set_tag(self, instance_id: str, key: str, value: str | None) -> None:
        """CreateTags / DeleteTags of one tag (the fleet simulator announcing a host's address)."""
        if value is None:
            self._call("delete_tags", Resources=[instance_id], Tags=[{"Key": key}])
        else:
            self._call("create_tags", Resources=[instance_id], Tags=[{"Key": key, "Value": value}])
