"""Metrics: exposition after hot-path calls, statistics() mirroring, multiprocess aggregation."""

from __future__ import annotations

import enum
import os
import subprocess
import sys
import textwrap

import msgspec
from prometheus_client.parser import text_string_to_metric_families

from proxy.observe.metrics import Metrics, render_directory, worker_exited


def samples(body: bytes) -> dict[tuple[str, tuple], float]:
    out = {}
    for fam in text_string_to_metric_families(body.decode()):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(s: dict, name: str, **labels: str) -> float | None:
    return s.get((name, tuple(sorted(labels.items()))))


def test_render_after_hot_path_calls(monkeypatch) -> None:
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    m = Metrics()
    assert not m.multiprocess
    for _ in range(3):
        m.request_done(200, "qwen3-coder", "h100x2", "/v1/chat/completions", 0.00012, 0.25, 10, 5)
    m.request_done(429, "qwen3-coder", "h100x2", "/v1/chat/completions", 0.00003)
    m.connection_opened()
    m.connection_opened()
    m.connection_closed()
    m.stream_opened()
    m.wake_ready("h100x2", 500.0)
    m.wake_ready("h100x2", 90.0)
    ctype, body = m.render()
    assert ctype.startswith(b"text/plain")
    s = samples(body)
    lbl = {"model": "qwen3-coder", "tier": "h100x2", "endpoint": "/v1/chat/completions"}
    assert value(s, "spotinference_requests_total", status="200", **lbl) == 3
    assert value(s, "spotinference_requests_total", status="429", **lbl) == 1
    ep = {"endpoint": "/v1/chat/completions"}
    assert value(s, "spotinference_gateway_latency_seconds_count", **ep) == 4
    assert value(s, "spotinference_gateway_latency_seconds_bucket", le="5e-05", **ep) == 1
    assert value(s, "spotinference_gateway_latency_seconds_bucket", le="0.00015", **ep) == 4
    assert value(s, "spotinference_ttfb_seconds_count", tier="h100x2") == 3
    assert value(s, "spotinference_prompt_tokens_total", model="qwen3-coder", tier="h100x2") == 30
    assert value(s, "spotinference_completion_tokens_total", model="qwen3-coder", tier="h100x2") == 15
    assert value(s, "spotinference_open_connections") == 1
    assert value(s, "spotinference_open_streams") == 1
    assert value(s, "spotinference_wake_duration_seconds_count", tier="h100x2") == 2
    assert value(s, "spotinference_wake_duration_seconds_bucket", tier="h100x2", le="120.0") == 1


class TierState(enum.Enum):
    ASLEEP = "asleep"
    READY = "ready"


class WakerStats(msgspec.Struct, frozen=True):
    state: TierState
    waiters: int
    wakes_total: int
    last_wake_s: float | None
    ready: bool


class UsageStats(msgspec.Struct, frozen=True):
    queued: int
    spilled_total: int


def test_stats_sources_are_mirrored(monkeypatch) -> None:
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    m = Metrics()
    tiers = {"h100x2": WakerStats(TierState.ASLEEP, 3, 1, None, False)}
    usage = UsageStats(queued=7, spilled_total=2)
    m.register_stats_source("tier", lambda: tiers, label="tier")
    m.register_stats_source("usage", lambda: usage)
    m.register_stats_source("broken", lambda: 1 / 0)  # logged, does not break the scrape
    s = samples(m.render()[1])
    assert value(s, "spotinference_tier_state", tier="h100x2", state="asleep") == 1
    assert value(s, "spotinference_tier_waiters", tier="h100x2") == 3
    assert value(s, "spotinference_tier_wakes_total", tier="h100x2") == 1
    assert value(s, "spotinference_tier_ready", tier="h100x2") == 0
    assert value(s, "spotinference_tier_last_wake_s", tier="h100x2") is None
    assert value(s, "spotinference_usage_queued") == 7
    assert value(s, "spotinference_usage_spilled_total") == 2
    # Second scrape: counters follow the record (by delta), the state moves, old states read 0.
    tiers["h100x2"] = WakerStats(TierState.READY, 0, 2, 95.5, True)
    usage = UsageStats(queued=0, spilled_total=2)
    s = samples(m.render()[1])
    assert value(s, "spotinference_tier_state", tier="h100x2", state="ready") == 1
    assert value(s, "spotinference_tier_state", tier="h100x2", state="asleep") == 0
    assert value(s, "spotinference_tier_wakes_total", tier="h100x2") == 2
    assert value(s, "spotinference_tier_last_wake_s", tier="h100x2") == 95.5
    assert value(s, "spotinference_usage_spilled_total") == 2
    # A replaced source (reload) starting again from zero still only moves the counter forward.
    m.register_stats_source("usage", lambda: UsageStats(queued=0, spilled_total=1))
    s = samples(m.render()[1])
    assert value(s, "spotinference_usage_spilled_total") == 3


WORKER = textwrap.dedent("""
    import sys
    from proxy.observe.metrics import Metrics
    m = Metrics()
    assert m.multiprocess, "multiprocess mode expected"
    n = int(sys.argv[1])
    for i in range(n):
        m.request_done(200, "sim-chat", "local", "/v1/chat/completions", 0.0002, 0.01, 3, 4)
    m.request_done(502, "sim-chat", "local", "/v1/chat/completions", 0.0001)
    m.connection_opened()
    m.register_stats_source("usage", lambda: {"queued": n, "spilled_total": 1})
    m.refresh()
    if len(sys.argv) > 2:
        sys.stdout.buffer.write(m.render()[1])
""")


def run_worker(env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", WORKER, *args], env=env, capture_output=True, timeout=120,
                          check=True, cwd=os.getcwd())


def test_multiprocess_aggregation_across_two_processes(tmp_path) -> None:
    d = tmp_path / "prom"
    d.mkdir()
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(d)}
    a = subprocess.Popen([sys.executable, "-c", WORKER, "5"], env=env)
    b = subprocess.Popen([sys.executable, "-c", WORKER, "7"], env=env)
    assert a.wait(timeout=120) == 0 and b.wait(timeout=120) == 0
    # A third worker answers the scrape: it sees everyone's values plus its own.
    s = samples(run_worker(env, "1", "render").stdout)
    lbl = {"model": "sim-chat", "tier": "local", "endpoint": "/v1/chat/completions"}
    assert value(s, "spotinference_requests_total", status="200", **lbl) == 5 + 7 + 1
    assert value(s, "spotinference_requests_total", status="502", **lbl) == 3
    assert value(s, "spotinference_gateway_latency_seconds_count", endpoint="/v1/chat/completions") == 16
    assert value(s, "spotinference_prompt_tokens_total", model="sim-chat", tier="local") == 3 * 13
    assert value(s, "spotinference_open_connections") == 3  # livesum over the three processes
    assert value(s, "spotinference_usage_queued") == 5 + 7 + 1
    assert value(s, "spotinference_usage_spilled_total") == 3
    # A worker exits: its live gauges go, its counters stay.
    worker_exited(a.pid, str(d))
    s = samples(render_directory(str(d))[1])
    assert value(s, "spotinference_open_connections") == 2
    assert value(s, "spotinference_usage_queued") == 7 + 1
    assert value(s, "spotinference_requests_total", status="200", **lbl) == 13
