"""The operator's view: ops/prometheus/alerts.yml and ops/grafana/spotinference.json.

Strategy: the rules are checked and unit-tested by promtool itself (`promtool check rules`, `promtool
test rules` with ops/prometheus/alerts_test.yml), and every PromQL expression of the dashboard is parsed
by promtool too (written as recording rules into a scratch file, Grafana's variables replaced by
plain values). Without promtool those tests skip, naming the package (Debian: `apt-get install -y
prometheus`). The dashboard's shape is checked as JSON: a Prometheus `datasource` variable every panel
uses, a `tier` variable from label values, unique panel ids on the 24-column grid.

Then the names: every `spotinference_*` identifier in alerts.yml and in the dashboard must be exposed
by a real gateway's /metrics. The gateway is `spotinference serve --workers 2` as an operator runs it,
with everything that makes the lazily created families appear: a plain tier in front of a simulated
vLLM (`spotinference sim`), a sleeping tier whose EC2 API is moto's server and whose GPU host is the
fleet simulator (tests/support/cloud.py) -- woken by a request, so the waker's and the wake histogram's
series exist --, a fixed host-hour price on both tiers (`[tiers.cost]`: the cost counters), a [usage]
SQLite path, a [cluster] section on the session's real redis-server, and one worker SIGKILLed so the
supervisor restarts it (the restart counter's series). Names in expressions must be exposed sample
names (`_bucket`, `_count`, `_total` spelled out); names in prose (descriptions, annotations) may also
be family names. Every wait is bounded; every process is stopped on the way out
(tests/support/processes.py).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
from pathlib import Path

import httpx
import pytest
import trio
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.support import aws
from tests.support.cloud import MODELS, TAG, cloud
from tests.support.processes import SPOT, started

moto_url, aws_url = aws.moto_url, aws.aws_url  # fixtures

ROOT = Path(__file__).resolve().parents[2]
ALERTS = ROOT / "ops" / "prometheus" / "alerts.yml"
ALERTS_TEST = ROOT / "ops" / "prometheus" / "alerts_test.yml"
DASHBOARD = ROOT / "ops" / "grafana" / "spotinference.json"
NAME = re.compile(r"\bspotinference_[a-z0-9_]+")
PROMTOOL = shutil.which("promtool")
INSTALL = "apt-get install -y prometheus"
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason=f"promtool is not installed ({INSTALL})")
ALERT_NAMES = {"SpotinferenceWakeOverBudget", "SpotinferenceTierStuckWaking", "SpotinferenceUpstreamDown",
               "SpotinferenceHigh5xxRatio", "SpotinferenceUsageSpilling", "SpotinferenceWorkerCrashLooping",
               "SpotinferenceRedisDown"}
# Grafana's variables, as plain values promtool can parse.
GRAFANA_VARS = {"$__rate_interval": "5m", "$__range": "6h", "$__interval": "1m", "$tier": ".*",
                "$budget_s": "480", "$hard_cap_s": "600"}


def _promtool(*args: str) -> subprocess.CompletedProcess:
    assert PROMTOOL is not None
    return subprocess.run([PROMTOOL, *args], capture_output=True, text=True, timeout=60, check=False)


def _dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def _panels(dash: dict) -> list[dict]:
    out = []
    for p in dash["panels"]:
        out.append(p)
        out.extend(p.get("panels", []))  # a collapsed row keeps its panels inside
    return out


def _expressions(dash: dict) -> list[str]:
    """Every PromQL expression: panel targets and the query variables."""
    exprs = [t["expr"] for p in _panels(dash) for t in p.get("targets", []) if t.get("expr")]
    for var in dash["templating"]["list"]:
        if var["type"] == "query":
            exprs.append(var["definition"])
    return exprs


def _rule_exprs() -> list[str]:
    rules = yaml.safe_load(ALERTS.read_text())
    return [r["expr"] for g in rules["groups"] for r in g["rules"]]


def _names(texts: list[str]) -> set[str]:
    """The metric names in `texts`; a prefix in prose (``spotinference_usage_*``) ends with "_"."""
    return {m for t in texts for m in NAME.findall(t)}


def _absent(names: set[str], exposed: set[str]) -> set[str]:
    """Names not exposed; a prefix counts as exposed when some exposed name starts with it."""
    def seen(n: str) -> bool:
        return n in exposed or (n.endswith("_") and any(e.startswith(n) for e in exposed))

    return {n for n in names if not seen(n)}


# -- the rules ---------------------------------------------------------------------------------------------

@needs_promtool
def test_alert_rules_pass_promtool_check() -> None:
    r = _promtool("check", "rules", str(ALERTS))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS: 7 rules found" in r.stdout


@needs_promtool
def test_alert_rules_unit_tests_pass() -> None:
    r = _promtool("test", "rules", str(ALERTS_TEST))
    assert r.returncode == 0, r.stdout + r.stderr


def test_every_alert_has_for_severity_summary_and_description() -> None:
    rules = [r for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"]]
    assert {r["alert"] for r in rules} == ALERT_NAMES
    for r in rules:
        assert "for" in r, r["alert"]
        assert r["labels"]["severity"] in ("warning", "critical"), r["alert"]
        assert r["annotations"]["summary"] and "{{ $labels." in r["annotations"]["description"], r["alert"]
    tested = yaml.safe_load(ALERTS_TEST.read_text())
    fired = {a["alertname"] for t in tested["tests"] for a in t["alert_rule_test"] if a["exp_alerts"]}
    quiet = {a["alertname"] for t in tested["tests"] for a in t["alert_rule_test"] if not a["exp_alerts"]}
    assert fired == quiet == ALERT_NAMES  # each alert is seen firing, and seen staying quiet


# -- the dashboard -----------------------------------------------------------------------------------------

def test_dashboard_is_a_grafana_dashboard_on_a_prometheus_variable() -> None:
    dash = _dashboard()
    assert 36 <= dash["schemaVersion"] <= 41 and dash["uid"] and dash["title"]
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    source = variables["datasource"]
    assert source["type"] == "datasource" and source["query"] == "prometheus"
    tier = variables["tier"]
    assert tier["type"] == "query" and tier["definition"].startswith("label_values(") and tier["includeAll"]
    assert tier["datasource"]["uid"] == "${datasource}"
    panels = _panels(dash)
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for p in panels:
        g = p["gridPos"]
        assert g["x"] >= 0 and g["w"] > 0 and g["x"] + g["w"] <= 24, p["title"]
        if p["type"] == "row":
            continue
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        assert p["targets"], p["title"]
        for t in p["targets"]:
            assert t["expr"] and t["refId"] and t["datasource"]["uid"] == "${datasource}", p["title"]
    titles = " | ".join(p["title"] for p in panels).lower()
    for topic in ("requests/s", "gateway-added latency", "first byte", "tier state", "budget",
                  "upstream health", "tokens/s", "usage queue", "usd/hour", "per million tokens",
                  "worker restarts", "redis", "connections"):
        assert topic in titles, topic


@needs_promtool
def test_dashboard_expressions_are_promql(tmp_path: Path) -> None:
    exprs = _expressions(_dashboard())
    rules = []
    for i, expr in enumerate(exprs):
        if expr.startswith("label_values("):
            continue  # Grafana's function, not PromQL; its metric name is checked below
        for var, value in GRAFANA_VARS.items():
            expr = expr.replace(var, value)
        assert "$" not in expr, f"a Grafana variable left unreplaced: {expr}"
        rules.append({"record": f"dashboard:expr_{i}", "expr": expr})
    scratch = tmp_path / "dashboard_rules.yml"
    scratch.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    r = _promtool("check", "rules", str(scratch))
    assert r.returncode == 0, r.stdout + r.stderr


# -- the names against a real gateway ----------------------------------------------------------------------

def _config(path: Path, sim_url: str, c, redis: str) -> Path:
    wake = {"region": "us-east-1", "endpoint_url": c.tap_url, "instance_ids": c.primary, "budget_s": 10.0,
            "hard_cap_s": 15.0, "idle_s": 60.0, "poll_s": 0.05, "heartbeat_s": 0.2, "probe_timeout_s": 0.5,
            "interruption_wait_s": 0, "upstream_tag": TAG, "start_retry_s": 10.0}
    lines = ["[server]", 'listen = "127.0.0.1:0"', "workers = 2", "drain_s = 2.0",
             "[usage]", f"path = {json.dumps(str(path.parent / 'usage.db'))}", "flush_s = 0.1",
             "[cluster]", f"redis_url = {json.dumps(redis)}", "lease_s = 3.0",
             "[[tiers]]", 'name = "local"', f"upstreams = {json.dumps([sim_url])}", 'models = ["sim-chat"]',
             "[tiers.cost]", "hourly_usd = 1.5",
             "[[tiers]]", 'name = "gpu"', f"upstreams = {json.dumps(c.upstreams)}",
             f"models = {json.dumps(MODELS)}",
             "[tiers.cost]", "hourly_usd = 2.5",  # the cost counters
             "[tiers.wake]", *(f"{k} = {json.dumps(v)}" for k, v in wake.items())]
    path.write_text("\n".join(lines) + "\n")
    return path


def _exposed(text: str) -> tuple[set[str], set[str]]:
    """(sample names, family names) of one exposition."""
    samples: set[str] = set()
    families: set[str] = set()
    for fam in text_string_to_metric_families(text):
        families.add(fam.name)
        samples.update(s.name for s in fam.samples)
    return samples, families


async def _until(pred, what: str, timeout: float = 30.0, poll_s: float = 0.1):
    with trio.move_on_after(timeout):
        while not (value := pred()):
            await trio.sleep(poll_s)
        return value
    raise AssertionError(f"timed out waiting for {what}")


async def test_every_metric_named_is_exposed_by_a_real_gateway(aws_url: str, redis_url: str,
                                                                tmp_path: Path) -> None:
    dash = _dashboard()
    in_exprs = _names(_expressions(dash)) | _names(_rule_exprs())
    in_prose = _names([DASHBOARD.read_text(), ALERTS.read_text()]) - in_exprs
    env = {**os.environ, "TMPDIR": str(tmp_path)}  # the supervisor's metrics directory lands here
    config = tmp_path / "gw.toml"
    with trio.fail_after(120):
        async with cloud(aws_url, primaries=1, boot_delay_s=0.2) as c, \
                started([*SPOT, "sim", "--listen", "127.0.0.1:0"], tmp_path, "sim") as sim, \
                started([*SPOT, "serve", "--config", str(_config(config, sim.url, c, redis_url))], tmp_path,
                        "gateway", env=env) as gw:
            await _until(lambda: len(gw.events("gateway_listening")) >= 2, "2 workers listening")
            # First a worker SIGKILLed: the supervisor restarts it (the restarts counter's series). Before the
            # wake: a killed worker's gauges go with it, and only the waker that woke knows the wake's time.
            os.kill(gw.events("supervisor_started")[0]["pids"][0], signal.SIGKILL)
            await _until(lambda: gw.events("worker_restarted"), "the worker restarted")
            await _until(lambda: len(gw.events("gateway_listening")) >= 3, "its replacement listening")
            async with httpx.AsyncClient(base_url=gw.url, timeout=30) as http:
                for model in ("sim-chat", MODELS[0]):  # the plain tier, then the sleeping one (a wake)
                    for stream in (False, True):
                        r = await http.post("/v1/chat/completions", json={
                            "model": model, "stream": stream, "max_tokens": 4,
                            "messages": [{"role": "user", "content": "hi"}]})
                        assert r.status_code == 200, r.text
                refused = await http.post("/v1/chat/completions", json={"model": "nope", "messages": []})
                assert refused.status_code >= 400

            missing: set[str] = set()

            def complete() -> bool:
                nonlocal missing
                r = httpx.get(gw.url + "/metrics", timeout=10, headers={"connection": "close"})
                assert r.status_code == 200
                samples, families = _exposed(r.text)
                missing = _absent(in_exprs, samples) | _absent(in_prose, samples | families)
                return not missing

            # Each worker mirrors its statistics every 5 s (the scraping one at once): a few scrapes at most.
            with trio.move_on_after(20):
                while not await trio.to_thread.run_sync(complete):
                    await trio.sleep(0.5)
            assert not missing, f"named in alerts.yml or the dashboard, not in /metrics: {sorted(missing)}"
            assert await trio.to_thread.run_sync(gw.stop) == 0
