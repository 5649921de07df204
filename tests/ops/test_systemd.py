"""ops/systemd: the gateway unit carries the hardening and timing the operator docs promise."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from proxy.config import ServerConfig
from tests.support.systemd import verify_units

UNITS = Path(__file__).resolve().parents[2] / "ops" / "systemd"


def _directives(text: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    section = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        out.setdefault(f"{section}.{key}", []).append(value)
    return out


def test_gateway_unit_is_hardened_and_outlasts_the_drain() -> None:
    d = _directives((UNITS / "spotinference.service").read_text())
    one = {k: v[-1] for k, v in d.items()}
    assert one["Service.User"] == "spotinference" and one["Service.Group"] == "spotinference"
    assert one["Service.ExecStart"].endswith("spotinference serve --config /etc/spotinference/gateway.toml")
    assert one["Service.ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert one["Service.Restart"] == "on-failure"
    for key, value in {"NoNewPrivileges": "yes", "ProtectSystem": "strict", "ProtectHome": "yes",
                       "PrivateTmp": "yes", "StateDirectory": "spotinference", "CapabilityBoundingSet": ""}.items():
        assert one[f"Service.{key}"] == value, key
    # The supervisor waits drain_s + 10 s for its workers; systemd must wait longer before SIGKILL.
    assert float(one["Service.TimeoutStopSec"]) > ServerConfig().drain_s + 10.0
    assert one["Install.WantedBy"] == "multi-user.target"


def test_sysusers_declares_the_dedicated_user() -> None:
    lines = [x for x in (UNITS / "spotinference.sysusers.conf").read_text().splitlines()
             if x and not x.startswith("#")]
    assert lines == ['u spotinference - "spotinference gateway" /var/lib/spotinference /usr/sbin/nologin']


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_systemd_analyze_accepts_the_unit(tmp_path: Path) -> None:
    unit = tmp_path / "spotinference.service"
    unit.write_text((UNITS / "spotinference.service").read_text())
    assert verify_units([unit]) == []
