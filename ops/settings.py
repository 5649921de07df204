"""Wake settings of one tier (`[tiers.wake]` in the gateway's TOML).

Strategy: ops owns the shape of its own settings so that it never imports `proxy`; the gateway's
config embeds this Struct. Strict: unknown fields are errors; every field has a default.
"""

from __future__ import annotations

import msgspec


class WakeConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    provider: str = "ec2"
    region: str = "us-east-1"
    instance_ids: list[str] = msgspec.field(default_factory=list)
    endpoint_url: str | None = None
    budget_s: float = 480.0
    hard_cap_s: float = 600.0
    idle_s: float = 900.0
    heartbeat_s: float = 5.0
    max_waiters: int = 1000
    poll_s: float = 2.0
    fallback_instance_ids: list[str] = msgspec.field(default_factory=list)
    fallback_launch_template: str | None = None
    fallback_tier: str | None = None
    interruption_queue_url: str | None = None
