"""The operator's view: `GET /status` (an HTML page) and `GET /status.json` (what it shows).

Strategy: nothing here touches an upstream or waits on one; a request reads the router's tiers, their
wakers' read-only views (ops/waker.py `statistics`, `status_view`), the health book's records and the
recent-traffic figures (proxy/observe/recent.py: this process's, or the usage store's, cached), and
encodes one msgspec `Status`. The page is a static file (status.html, package data) read once; it holds
no data and fetches /status.json every 5 s with the key it was given, so serving the shell to anyone
who can reach it gives nothing away. Its inline script and style are allowed by their SHA-256 in the
Content-Security-Policy (computed once, at load); nothing else may run or load. Whatever may be absent
(a fake or older waker, a health record without a probe time, the wake ETA another part provides) is
read defensively and shown as null. Nothing secret is in it: key names only, upstream URLs with any
password masked (observe/redact.py), never an upstream API key.

Auth (`/status.json`): the usual key check first (401 in the usual envelope without a key or with a
wrong one); then the key must be an admin key (`spotinference keys add NAME --admin`), else 403
`permission_error` / `admin_required`. A gateway running open (no keys configured) answers only a
loopback peer (127.0.0.0/8, ::1, a Unix socket) whose request carries no forwarding header
(X-Forwarded-For, Forwarded, X-Real-IP: a proxy on the same host would otherwise make everyone
local); anyone else gets 403. `/status` itself needs no key.

`/status.json`, field by field (names are stable; a null means unknown or not applicable):

- `generated_at`: ISO 8601 UTC time of this answer.
- `gateway`: `version` (the package's), `workers` (processes serving this listener), `uptime_s`
  (of the process that answered), `node` (the cluster node name with `[cluster]`, else the host
  name), `pid` (the answering process), `draining` (that process is draining).
- `tiers`: one object per configured tier, in configuration order:
  - `name`, `models` (the model names it serves);
  - `state`: the waker's `asleep` / `waking` / `ready` / `stopping` / `interrupted`, or `always_on` for
    a tier without `[tiers.wake]`;
  - `phase`: while waking, what the wake is doing (ops/budget.py `STAGES`): `starting` (asked for,
    StartInstances not sent yet), `booting` (sent, EC2 does not show the instance running yet),
    `loading` (running, vLLM not ready with the model yet), `finishing` (one host ready, waiting for
    the others), else null; `elapsed_s`: seconds since that wake was requested; `eta_s`: the
    expected seconds left, when the waker offers an estimate (`wake_progress()`), else null;
  - `waiters`: requests waiting for the tier to wake; `fallback_tier`: the tier requests are sent to
    instead while a wake is past its budget, else null;
  - `budget_s`, `hard_cap_s`: the wake budget and hard cap (null without a waker);
  - `upstreams`: one object per host: `url`; `verdict`: `healthy`, `down` (failing probes, or the
    waker took it out), `draining` (a spot notice holds it out of rotation), `stalled` (running
    requests, tokens frozen), `offline` (the tier is not up: asleep, waking or stopping); `reason`
    (the last failure, e.g. `timeout`), `in_flight` (this process's requests on it now),
    `last_probe_s_ago` (since its last probe that read vLLM's /metrics; null if none yet), `queue`
    (vLLM's running + waiting requests at that probe) and `kv_usage` (its KV cache fill, 0..1), null
    when unknown;
  - `last_wakes`: the last few finished wakes, newest first: `finished_at` (ISO 8601 UTC, null when
    unknown), `total_s` (requested -> ready), `budget_s`, `hard_cap_s`, `over_budget`, `phases` (each
    `name`, `at_s` seconds since requested, `took_s` since the milestone before);
  - `cost` (null without `[tiers.cost]`): what the tier's GPU time has cost since this process began
    recording (usage/gpu_time.py: running time x the price, wake time included): `gpu_seconds`, `usd`,
    `since` (unix time), `hosts_up` and `usd_per_hour` now, `price_sources`, this process's `tokens`
    on the tier and `usd_per_mtok`, and `idle` -- hosts up with no request for 5 minutes: cost without
    tokens, which is what the tier's `idle_s` tunes.
- `traffic` (only billed requests -- the usage log's rows -- count):
  - `source`: `usage_store` (the usage table: every worker and host) or `this_process`;
  - `minutes`: the last 15 minutes, oldest first, the current one last: `start` (unix time),
    `requests`, `prompt_tokens`, `completion_tokens`, `errors` (status >= 400, 499 included);
  - `errors_by_status`: the last hour's errors, `status` and `count`, by status;
  - `top_keys_today`: the ten keys with the most tokens since 00:00 UTC: `name` (null: no key),
    `requests`, `tokens` (billed totals);
  - `store_error`: why a configured usage store could not be read (this process's figures are shown
    instead), else null.
"""

from __future__ import annotations

import base64
import datetime
import functools
import hashlib
import importlib.resources
import ipaddress
import math
import os
import re
import socket
import time

import msgspec
import trio

from ops import budget as wake_budget
from proxy import errors
from proxy.accept.downstream import Downstream
from proxy.exchange import Exchange
from proxy.observe.recent import Traffic
from proxy.observe.redact import redact_url, scrub

_FORWARDED = frozenset((b"x-forwarded-for", b"forwarded", b"x-real-ip"))
_NO_STORE = (b"cache-control", b"no-store")
_NOSNIFF = (b"x-content-type-options", b"nosniff")
_SERVING = frozenset(("ready", "interrupted"))  # a waker tier in these states is expected to answer


class GatewayInfo(msgspec.Struct):
    version: str
    workers: int
    uptime_s: float
    node: str
    pid: int
    draining: bool


class UpstreamStatus(msgspec.Struct):
    url: str
    verdict: str
    reason: str | None
    in_flight: int
    last_probe_s_ago: float | None
    queue: float | None
    kv_usage: float | None


class PhaseTime(msgspec.Struct):
    name: str
    at_s: float
    took_s: float


class WakeRecord(msgspec.Struct):
    finished_at: str | None
    total_s: float
    budget_s: float
    hard_cap_s: float
    over_budget: bool
    phases: list[PhaseTime]


IDLE_S = 300.0  # a tier awake this long without a request is "paying for idle GPUs"


class TierCost(msgspec.Struct):
    """What a tier's GPU time has cost since this process started (usage/gpu_time.py)."""

    gpu_seconds: float  # paid host-seconds, wake time included
    usd: float
    since: float  # unix time the recording began
    hosts_up: int  # hosts paid for right now
    usd_per_hour: float  # what they cost per hour now
    price_sources: list[str]  # "fixed", "spot:<zone>", ...
    tokens: int  # this process's tokens on the tier in the same time
    usd_per_mtok: float | None  # usd / tokens x 1e6 (None without tokens)
    idle: bool  # hosts up and no request for IDLE_S: cost without tokens (tune the tier's idle_s)


class TierStatus(msgspec.Struct):
    name: str
    models: list[str]
    state: str
    phase: str | None
    elapsed_s: float | None
    eta_s: float | None
    waiters: int
    fallback_tier: str | None
    budget_s: float | None
    hard_cap_s: float | None
    upstreams: list[UpstreamStatus]
    last_wakes: list[WakeRecord]
    cost: TierCost | None = None  # with [tiers.cost]


class Status(msgspec.Struct):
    generated_at: str
    gateway: GatewayInfo
    tiers: list[TierStatus]
    traffic: Traffic


# -- auth -------------------------------------------------------------------------------------------

def _loopback(client: str) -> bool:
    if client == "unix":
        return True
    try:
        ip = ipaddress.ip_address(client)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def authorize(gw, client: str, headers, key) -> None:
    """Raise the 403 unless this request may read the status (see the module comment); the key check
    itself (401) is the route table's."""
    if gw.runtime.keys.open:
        if not _loopback(client) or any(name in _FORWARDED for name, _ in headers):
            raise errors.admin_required("This gateway runs without API keys: its status is served to "
                                        "loopback clients only.")
        return
    if key is None or not getattr(key, "admin", False):
        raise errors.admin_required("This API key is not an admin key (create one with "
                                    "`spotinference keys add NAME --admin`).")


# -- the document -----------------------------------------------------------------------------------

@functools.cache
def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("spotinference")
    except PackageNotFoundError:  # a source tree that was never installed
        return "0+unknown"


def _iso(ts: float) -> str:
    return datetime.datetime.fromtimestamp(ts, datetime.UTC).isoformat(timespec="seconds")


def _text(value) -> str:
    return str(getattr(value, "value", value))


def _number(value) -> float | None:
    return round(float(value), 3) if isinstance(value, int | float) and math.isfinite(value) else None


def _stage(milestone: str) -> str:
    """The stage a wake is in once it has reached `milestone` (a `Phase` value)."""
    for phase, stage in getattr(wake_budget, "STAGES", {}).items():
        if phase.value == milestone:
            return stage
    return milestone


def _progress(waker) -> tuple[str | None, float | None, float | None] | None:
    """(phase, elapsed_s, eta_s) from the waker's own estimate, if it offers one."""
    for name in ("wake_progress", "eta"):
        fn = getattr(waker, name, None)
        if not callable(fn):
            continue
        try:
            got = fn()
        except Exception:  # noqa: BLE001 -- an estimate is optional: never fail the page over it
            return None
        if got is None:
            return None
        if isinstance(got, tuple) and len(got) == 3:
            phase, elapsed, eta = got
        else:
            phase, elapsed, eta = (getattr(got, f, None) for f in ("phase", "elapsed_s", "eta_s"))
        return (None if phase is None else _text(phase)), _number(elapsed), _number(eta)
    return None


def _verdict(rec, *, held: bool, waker_state: str | None, routable: bool | None) -> str:
    if held:
        return "draining"
    if waker_state is not None and not routable and waker_state not in _SERVING:
        return "offline"
    verdict = None if rec is None else _text(rec.verdict)
    if verdict in ("stalled", "down"):
        return verdict
    if routable is False:
        return "down"
    return "healthy"


def _upstream(url: str, rec, now: float, *, held: bool = False, waker_state: str | None = None,
              routable: bool | None = None) -> UpstreamStatus:
    probed = getattr(rec, "probed_at", None)
    load = getattr(rec, "load", None)
    if not (isinstance(load, tuple) and len(load) == 3):
        load = None
    if probed is None and load is not None:
        probed = load[2]
    reason = None if rec is None or rec.up or rec.reason is None else scrub(rec.reason, url)
    return UpstreamStatus(
        url=redact_url(url), verdict=_verdict(rec, held=held, waker_state=waker_state, routable=routable),
        reason=reason,
        in_flight=0 if rec is None else len(rec.inflight),
        last_probe_s_ago=None if probed is None else round(max(0.0, now - probed), 1),
        queue=None if load is None else _number(load[0]),
        kv_usage=None if load is None else _number(load[1]))


def _wake(timeline, total_s: float, finished_at: float | None, budget_s: float,
          hard_cap_s: float) -> WakeRecord:
    phases, before = [], 0.0
    for name, at in timeline:
        phases.append(PhaseTime(str(name), round(at, 3), round(max(0.0, at - before), 3)))
        before = at
    return WakeRecord(finished_at=None if finished_at is None else _iso(finished_at),
                      total_s=round(total_s, 3), budget_s=budget_s, hard_cap_s=hard_cap_s,
                      over_budget=total_s > budget_s, phases=phases)


def _call(obj, name: str):
    fn = getattr(obj, name, None)
    return fn() if callable(fn) else None


def _last_wakes(view, stats, budget_s, hard_cap_s) -> list[WakeRecord]:
    """Newest first: the waker's history, or (a waker without one) its last timeline."""
    if view is not None:
        return [_wake(w.timeline, w.total_s, w.finished_at, view.budget_s, view.hard_cap_s)
                for w in reversed(view.recent_wakes)]
    timeline = getattr(stats, "last_timeline", None)
    if not timeline or budget_s is None or hard_cap_s is None:
        return []
    total_s = getattr(stats, "last_wake_s", None) or timeline[-1][1]
    return [_wake(timeline, total_s, None, budget_s, hard_cap_s)]


def _always_on(tier, record, now: float) -> TierStatus:
    return TierStatus(name=tier.name, models=list(tier.models), state="always_on", phase=None, elapsed_s=None,
                      eta_s=None, waiters=0, fallback_tier=None, budget_s=None, hard_cap_s=None,
                      upstreams=[_upstream(url, record(url), now) for url in tier.urls], last_wakes=[])


def _tier(tier, now: float) -> TierStatus:
    book = tier.health
    record = (lambda url: None) if book is None else book.get
    waker = tier.waker
    if waker is None:
        return _always_on(tier, record, now)
    stats = _call(waker, "statistics")
    state = _text(getattr(stats, "state", "unknown")) if stats is not None else (
        "ready" if waker.is_ready() else "unknown")
    view = _call(waker, "status_view")
    settings = getattr(waker, "settings", None)
    budget_s = view.budget_s if view is not None else getattr(settings, "budget_s", None)
    hard_cap_s = view.hard_cap_s if view is not None else getattr(settings, "hard_cap_s", None)
    hosts = dict.fromkeys(tier.urls, False)
    if view is not None:
        hosts.update(view.hosts)
    routable = set(waker.upstreams())
    upstreams = [_upstream(url, record(url), now, held=held, waker_state=state, routable=url in routable)
                 for url, held in hosts.items()]
    phase = elapsed = eta = None
    if state == "waking":
        if view is not None and view.wake:
            phase, elapsed = _stage(view.wake[-1][0]), view.wake_elapsed_s
        got = _progress(waker)
        if got is not None:
            phase, elapsed, eta = got[0] or phase, elapsed if got[1] is None else got[1], got[2]
    return TierStatus(name=tier.name, models=list(tier.models), state=state, phase=phase, elapsed_s=elapsed,
                      eta_s=eta, waiters=getattr(stats, "waiters", 0),
                      fallback_tier=getattr(stats, "fallback_tier", None), budget_s=budget_s,
                      hard_cap_s=hard_cap_s, upstreams=upstreams,
                      last_wakes=_last_wakes(view, stats, budget_s, hard_cap_s))


def _cost(gw, tier: str, wall: float) -> TierCost | None:
    recorder = gw.gpu_time  # usage/gpu_time.py, None until it runs (no [tiers.cost] anywhere: no view)
    view = None if recorder is None else recorder.cost_view(tier)
    if view is None:
        return None
    tokens, last = gw.recent.tiers.get(tier, (0, 0.0))
    tokens = int(tokens)
    return TierCost(gpu_seconds=round(view["gpu_seconds"], 1), usd=round(view["usd"], 6), since=view["since"],
                    hosts_up=view["hosts_up"], usd_per_hour=round(view["usd_per_hour"], 6),
                    price_sources=list(view["price_sources"]), tokens=tokens,
                    usd_per_mtok=round(view["usd"] / tokens * 1e6, 4) if tokens else None,
                    idle=view["hosts_up"] > 0 and wall - max(last, view["since"]) >= IDLE_S)


async def build(gw) -> Status:
    """The whole document (reads the usage store, cached, when one is configured)."""
    recent = gw.recent
    traffic, error = await recent.store.read(gw.runtime.config.usage)
    if traffic is None:
        traffic = recent.snapshot()
        if error is not None:
            traffic = msgspec.structs.replace(traffic, store_error=error)
    now = trio.current_time()
    tiers = [_tier(t, now) for t in gw.runtime.router.tiers.values()]
    for t in tiers:
        t.cost = _cost(gw, t.name, time.time())
    info = GatewayInfo(version=_version(), workers=gw.workers,
                       uptime_s=round(time.monotonic() - recent.started_mono, 1),
                       node=gw.cluster.node if gw.cluster is not None else socket.gethostname(),
                       pid=os.getpid(), draining=gw.draining)
    return Status(generated_at=_iso(time.time()), gateway=info, tiers=tiers, traffic=traffic)


# -- the handlers -----------------------------------------------------------------------------------

async def handle_status_json(gw, ds: Downstream, ex: Exchange, request, key, rest: bytes) -> None:
    authorize(gw, ds.client, request.headers, key)
    body = msgspec.json.encode(await build(gw))
    ex.status = 200
    await ds.send_response(200, [(b"content-type", b"application/json"), _NO_STORE, _NOSNIFF,
                                 (b"x-request-id", ex.request_id)], body)


def _csp(html: bytes) -> bytes:
    """The page's Content-Security-Policy: its own inline script and style (by hash), fetches to itself
    only."""
    def hashes(tag: bytes) -> bytes:
        found = re.findall(rb"<" + tag + rb">(.*?)</" + tag + rb">", html, re.DOTALL)
        return b" ".join(b"'sha256-" + base64.b64encode(hashlib.sha256(x).digest()) + b"'" for x in found)

    return (b"default-src 'none'; script-src " + hashes(b"script") + b"; style-src " + hashes(b"style")
            + b"; connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'; "
            b"frame-ancestors 'none'")


@functools.cache
def page() -> tuple[bytes, list[tuple[bytes, bytes]]]:
    """(the page, its headers): read from the package once."""
    html = importlib.resources.files("proxy.admit").joinpath("status.html").read_bytes()
    return html, [(b"content-type", b"text/html; charset=utf-8"), _NO_STORE, _NOSNIFF,
                  (b"content-security-policy", _csp(html)), (b"referrer-policy", b"no-referrer"),
                  (b"x-frame-options", b"DENY")]


async def handle_status_page(gw, ds: Downstream, ex: Exchange, request, key, rest: bytes) -> None:
    html, headers = page()
    ex.status = 200
    await ds.send_response(200, headers, html)
