"""ops.settings.WakeConfig: strict, defaulted, range-checked; errors name the TOML table."""

from __future__ import annotations

import pytest

from ops.settings import WakeConfig
from proxy.config import ConfigError, loads

BASE = """
[[tiers]]
name = "gpu"
upstreams = ["http://10.0.1.5:8000"]
models = ["m"]
[tiers.wake]
instance_ids = ["i-0123456789abcdef0"]
"""


def test_defaults_match_the_design() -> None:
    w = loads(BASE).tiers[0].wake
    assert w == WakeConfig(instance_ids=["i-0123456789abcdef0"])
    assert (w.budget_s, w.hard_cap_s, w.idle_s, w.poll_s) == (480.0, 600.0, 900.0, 2.0)


@pytest.mark.parametrize("line, message", [
    ("poll_s = 0", "poll_s must be > 0"),
    ("health_failures = 0", "health_failures must be >= 1"),
    ("interruption_wait_s = 21", "interruption_wait_s must be within 0..20"),
    ("upstream_port = 70000", "upstream_port out of range"),
    ('fallback_instance_ids = ["i-0123456789abcdef0"]', "fallback_instance_ids repeats instance_ids"),
    ("budget_s = -1", "budget_s must be > 0"),
    ("idle_secs = 5", "unknown field 'tiers[0].wake.idle_secs'"),
])
def test_bad_values_name_the_table(line: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        loads(BASE + line + "\n")
    assert message in str(info.value)
    if "unknown" not in message:
        assert "tiers[0].wake" in str(info.value)
