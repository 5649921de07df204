"""Wake settings of one tier (`[tiers.wake]` in the gateway's TOML).

Strategy: ops owns the shape of its own settings so that it never imports `proxy`; the gateway's
config embeds this Struct. Strict: unknown fields are errors; every field has a default, so old files
keep loading when fields are added. Range checks that a type cannot express live in `__post_init__`
(msgspec reports them with the TOML path of the table, e.g. "field 'tiers[0].wake': ..."); checks
across tables (hard cap below the budget, a fallback tier that does not exist) stay in
`proxy.config.validate`. Durations end in `_s`. The meaning of each knob is documented in docs/WAKE.md.
"""

from __future__ import annotations

import msgspec


class WakeConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    provider: str = "ec2"
    region: str = "us-east-1"
    # instance_ids[i] serves upstreams[i] of the tier (a stopped-then-started instance keeps its private IP).
    instance_ids: list[str] = msgspec.field(default_factory=list)
    # A local AWS emulator (moto server) for EC2 and SQS; None = the real regional endpoints.
    endpoint_url: str | None = None
    budget_s: float = 480.0
    hard_cap_s: float = 600.0
    idle_s: float = 900.0
    heartbeat_s: float = 5.0
    max_waiters: int = 1000
    # How often the waker re-describes / re-probes while waking, and re-checks health and activity when ready.
    poll_s: float = 2.0
    fallback_instance_ids: list[str] = msgspec.field(default_factory=list)
    fallback_launch_template: str | None = None  # "lt-..." id or a launch template name
    fallback_tier: str | None = None
    interruption_queue_url: str | None = None
    # One readiness / metrics probe (connect + answer) must finish within this.
    probe_timeout_s: float = 2.0
    # Consecutive failed /health probes before a ready upstream stops taking new requests.
    health_failures: int = 2
    # StartInstances is not re-sent to an instance within this window (EC2 is eventually consistent),
    # and an instance that had no capacity is retried no sooner than this.
    start_retry_s: float = 30.0
    # An interruption warning / rebalance recommendation keeps its host out of rotation this long
    # unless EC2 shows the instance stopped or terminated sooner (the spot notice is 2 minutes).
    interruption_hold_s: float = 150.0
    # SQS long-poll wait (0..20 s; 0 = short polls every poll_s).
    interruption_wait_s: int = 10
    # Fallback / launch-template instances have no configured upstream: their URL is the value of this
    # EC2 tag when set (hosts that register themselves, the local fleet simulator), otherwise
    # http://{PrivateIpAddress}:{upstream_port}.
    upstream_tag: str | None = None
    upstream_port: int | None = None  # None = the port of the tier's first upstream
    # Bounded, jittered retries of throttled EC2 calls (RequestLimitExceeded).
    api_attempts: int = 5

    def __post_init__(self) -> None:
        positive = {
            "budget_s": self.budget_s,
            "hard_cap_s": self.hard_cap_s,
            "idle_s": self.idle_s,
            "heartbeat_s": self.heartbeat_s,
            "poll_s": self.poll_s,
            "probe_timeout_s": self.probe_timeout_s,
            "start_retry_s": self.start_retry_s,
            "interruption_hold_s": self.interruption_hold_s,
        }
        for name, value in positive.items():
            if not value > 0:
                raise ValueError(f"{name} must be > 0, got {value}")
        for name, count in (("max_waiters", self.max_waiters), ("health_failures", self.health_failures),
                            ("api_attempts", self.api_attempts)):
            if count < 1:
                raise ValueError(f"{name} must be >= 1, got {count}")
        if not 0 <= self.interruption_wait_s <= 20:
            raise ValueError(f"interruption_wait_s must be within 0..20 (SQS limit), got {self.interruption_wait_s}")
        if self.upstream_port is not None and not 0 < self.upstream_port < 65536:
            raise ValueError(f"upstream_port out of range: {self.upstream_port}")
        overlap = set(self.instance_ids) & set(self.fallback_instance_ids)
        if overlap:
            raise ValueError(f"fallback_instance_ids repeats instance_ids: {sorted(overlap)}")
