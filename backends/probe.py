"""Readiness and activity probes of one vLLM OpenAI server (shared by the waker and the fleet tools).

Strategy: a backend is READY when `GET /health` answers 200 (vLLM answers 200 once the engine is up and
503 once it is dead; a host whose spot-interruption agent fired refuses new connections) AND every model
the tier serves is listed by `GET /v1/models` (`{"object": "list", "data": [{"id": ...}]}`). Activity
comes from vLLM's Prometheus text at `GET /metrics`: the gauges `vllm:num_requests_running` and
`vllm:num_requests_waiting` and the counters `vllm:request_success_total` and
`vllm:generation_tokens_total` (progress, for stall detection: backends/health.py), summed over their
label sets (model_name, finished_reason, engine). Liveness (`probe_health`) is `GET /health` alone; it
says whether a failure was silence (a timeout: a black hole) or an answer (refused, reset, non-200).
`/health` and `/metrics` are outside vLLM's `--api-key` check; `/v1/models` is inside it, so the probe
sends the tier's upstream key there.

Rules: probes never raise for a backend that is down -- they return a result saying why (the reason is
a short class name, never a body or a header). Each probe opens a fresh connection (the client built by
`make_client` keeps none alive): a pooled keep-alive connection would hide a host that stopped accepting
new ones, and would go stale across an instance stop/start. Time limits are the caller's cancel scope
plus the client's own connect/read timeouts. Every probe says `User-Agent: spotinference-probe` (the
simulated vLLM serves those without recording them: they are the gateway's background traffic).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import httpx
import msgspec


class _Model(msgspec.Struct):
    id: str


class _ModelList(msgspec.Struct):
    data: list[_Model] = msgspec.field(default_factory=list)


_models_decoder = msgspec.json.Decoder(_ModelList)

# httpx logs every request at INFO: a waker probing every few seconds would flood the gateway's log.
if logging.getLogger("httpx").level == logging.NOTSET:
    logging.getLogger("httpx").setLevel(logging.WARNING)

RUNNING = "vllm:num_requests_running"
WAITING = "vllm:num_requests_waiting"
SUCCESS = "vllm:request_success_total"
GENERATION = "vllm:generation_tokens_total"
KV_USAGE = "vllm:kv_cache_usage_perc"  # 0..1 (vLLM v1; older releases: vllm:gpu_cache_usage_perc)
KV_USAGE_OLD = "vllm:gpu_cache_usage_perc"
USER_AGENT = "spotinference-probe"


@dataclass(frozen=True)
class Readiness:
    """The outcome of one readiness probe of one upstream."""

    upstream: str
    healthy: bool
    missing: tuple[str, ...] = ()
    reason: str | None = None
    timed_out: bool = False  # no answer within the client's timeout (silence, not a refusal)

    @property
    def ready(self) -> bool:
        return self.healthy and not self.missing


@dataclass(frozen=True)
class Activity:
    """vLLM's own view of its load: requests in flight and requests finished so far."""

    running: float = 0.0
    waiting: float = 0.0
    success_total: float = 0.0
    generation_tokens: float | None = None  # None: the counter is not exposed
    kv_usage: float | None = None  # the KV cache's fill, 0..1 (the largest over label sets); None: absent

    @property
    def in_flight(self) -> float:
        return self.running + self.waiting


@dataclass(frozen=True)
class Health:
    """The outcome of one liveness probe (`GET /health`): ok, or why not and whether it was silence."""

    ok: bool
    silent: bool = False  # timed out: the host accepted (or not) and never answered
    reason: str | None = None


def make_client(timeout_s: float) -> httpx.AsyncClient:
    """An httpx client for probes: no keep-alive, no proxies from the environment, bounded timeouts."""
    return httpx.AsyncClient(
        timeout=httpx.Timeout(timeout_s),
        limits=httpx.Limits(max_keepalive_connections=0),
        headers={"user-agent": USER_AGENT},
        trust_env=False,
        follow_redirects=False,
    )


def parse_models(body: bytes) -> tuple[str, ...]:
    """Model ids from a `/v1/models` body; ValueError if it is not the OpenAI list shape."""
    try:
        return tuple(m.id for m in _models_decoder.decode(body).data)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise ValueError(f"not a model list: {exc}") from None


def parse_activity(text: str) -> Activity:
    """Sum vLLM's running/waiting gauges and success counter over all label sets (Prometheus text 0.0.4);
    the KV cache's usage is the largest over them."""
    sums = {RUNNING: 0.0, WAITING: 0.0, SUCCESS: 0.0, GENERATION: 0.0, KV_USAGE: 0.0, KV_USAGE_OLD: 0.0}
    seen_generation = seen_kv = False
    for line in text.splitlines():
        if not line or line[0] == "#":
            continue
        brace = line.find("{")
        space = line.find(" ")
        end = brace if brace != -1 and (space == -1 or brace < space) else space
        if end <= 0:
            continue
        name = line[:end]
        if name not in sums:
            continue
        rest = line[line.rfind("}") + 1:] if brace == end else line[end:]
        fields = rest.split()
        if not fields:
            continue
        try:
            value = float(fields[0])
        except ValueError:
            continue
        if name in (KV_USAGE, KV_USAGE_OLD):
            seen_kv = True
            sums[name] = max(sums[name], value)
            continue
        sums[name] += value
        if name == GENERATION:
            seen_generation = True
    return Activity(running=sums[RUNNING], waiting=sums[WAITING], success_total=sums[SUCCESS],
                    generation_tokens=sums[GENERATION] if seen_generation else None,
                    kv_usage=max(sums[KV_USAGE], sums[KV_USAGE_OLD]) if seen_kv else None)


async def probe_ready(client: httpx.AsyncClient, upstream: str, models: list[str] | tuple[str, ...],
                      *, api_key: str | None = None) -> Readiness:
    """GET /health then GET /v1/models on `upstream` ("http://host:port")."""
    base = upstream.rstrip("/")
    try:
        health = await client.get(f"{base}/health")
    except httpx.HTTPError as exc:
        return Readiness(upstream, False, reason=type(exc).__name__,
                         timed_out=isinstance(exc, httpx.TimeoutException))
    if health.status_code != 200:
        return Readiness(upstream, False, reason=f"health {health.status_code}")
    headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        listed = await client.get(f"{base}/v1/models", headers=headers)
    except httpx.HTTPError as exc:
        return Readiness(upstream, False, reason=type(exc).__name__,
                         timed_out=isinstance(exc, httpx.TimeoutException))
    if listed.status_code != 200:
        return Readiness(upstream, True, missing=tuple(models), reason=f"models {listed.status_code}")
    try:
        have = set(parse_models(listed.content))
    except ValueError:
        return Readiness(upstream, True, missing=tuple(models), reason="models unreadable")
    missing = tuple(m for m in models if m not in have)
    return Readiness(upstream, True, missing=missing, reason="models missing" if missing else None)


async def probe_health(client: httpx.AsyncClient, upstream: str) -> Health:
    """GET /health on `upstream`: 200 is alive. A timeout is `silent`; a refusal, reset or other status
    is an answer (the host is there and says no -- a draining host refuses new connections)."""
    try:
        resp = await client.get(f"{upstream.rstrip('/')}/health")
    except httpx.TimeoutException as exc:
        return Health(False, silent=True, reason=type(exc).__name__)
    except httpx.HTTPError as exc:
        return Health(False, reason=type(exc).__name__)
    if resp.status_code != 200:
        return Health(False, reason=f"health {resp.status_code}")
    return Health(True)


async def probe_activity(client: httpx.AsyncClient, upstream: str) -> Activity | None:
    """vLLM's activity from GET /metrics, or None when it cannot be read."""
    try:
        resp = await client.get(f"{upstream.rstrip('/')}/metrics")
    except httpx.HTTPError:
        return None
    if resp.status_code != 200:
        return None
    return parse_activity(resp.text)
