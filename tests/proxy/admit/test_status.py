"""admit/status.py and observe/recent.py: `/status.json` (who may read it, what it says) and `/status`.

Driven through `dispatch` on a real `Gateway` over a socket pair (tests/support/gateway.py
`dispatch_one`, whose client is 127.0.0.1), or a real in-process gateway in front of the simulated
vLLM where traffic must flow. Every answer is decoded into `status.Status` with msgspec, so a field
missing or of the wrong type fails the test. Wakers are the real `ops.waker.Waker` against moto and
the fleet simulator (tests/support/cloud.py) where the wake itself matters, else a small stand-in
that returns the waker's own view types (`WakerStatistics`, `WakerView`). The recent-traffic recorder
is fed hand-made records with chosen arrival times; the usage-store source reads a real SQLite file.
"""

from __future__ import annotations

import re
import time
import types

import msgspec
import pytest
import trio

from ops.waker import FinishedWake, TierState, WakerStatistics, WakerView
from proxy.admit import keys, status
from proxy.config import TierConfig, UsageConfig
from proxy.gateway import Gateway, build_runtime
from proxy.observe import recent
from proxy.usage.log import connect, insert_rows
from proxy.usage.store import UsageRow
from tests.support.cloud import cloud
from tests.support.gateway import (
    CHAT,
    dispatch_one,
    error_of,
    make_config,
    one_response,
    post,
    split_response,
    start_gateway,
    start_sim,
)

TIERS = [TierConfig(name="local", upstreams=["http://127.0.0.1:9", "http://127.0.0.1:10"],
                    models=["sim-chat"])]


@pytest.fixture
def keyring(tmp_path):
    path = tmp_path / "keys.toml"
    return str(path), {"admin": keys.add(path, "ops", admin=True), "user": keys.add(path, "alice")}


def gateway(keys_file: str | None = None, tiers=TIERS, **kw) -> Gateway:
    return Gateway(build_runtime(make_config([], tiers=tiers, keys_file=keys_file, **kw)))


async def get(gw, path: bytes = b"/status.json", secret: str | None = None, extra: bytes = b""):
    auth = b"" if secret is None else b"Authorization: Bearer " + secret.encode() + b"\r\n"
    raw = b"GET " + path + b" HTTP/1.1\r\nHost: x\r\n" + auth + extra + b"\r\n"
    return split_response((await dispatch_one(gw, raw))[0])


def decoded(body: bytes) -> status.Status:
    return msgspec.json.decode(body, type=status.Status)


# -- who may read it --------------------------------------------------------------------------------

@pytest.mark.parametrize("who, code, err", [
    (None, 401, "invalid_api_key"),
    ("wrong", 401, "invalid_api_key"),
    ("user", 403, "admin_required"),
    ("admin", 200, None),
])
async def test_auth_matrix(keyring, who, code, err):
    path, secrets = keyring
    secret = {"wrong": "sk-si-not-a-key"}.get(who) or secrets.get(who)
    st, headers, body = await get(gateway(path), secret=secret)
    assert st == code
    if err is None:
        assert headers["cache-control"] == "no-store" and headers["content-type"] == "application/json"
        assert decoded(body).tiers[0].name == "local"
        assert secrets["admin"] not in body.decode()
    else:
        e = error_of(body)
        assert e["code"] == err
        if code == 403:
            assert e["type"] == "permission_error" and "not an admin key" in e["message"]


async def test_open_gateway_answers_loopback_only():
    gw = gateway()
    st, _, body = await get(gw)
    assert st == 200 and decoded(body).gateway.pid > 0
    st, _, body = await get(gw, extra=b"X-Forwarded-For: 203.0.113.9\r\n")  # a proxy on this host
    assert st == 403 and error_of(body)["code"] == "admin_required"
    with pytest.raises(status.errors.ApiError) as caught:
        status.authorize(gw, "10.1.2.3", [], None)
    assert caught.value.status == 403 and "loopback" in caught.value.message


@pytest.mark.parametrize("client, local", [
    ("127.0.0.1", True), ("127.9.9.9", True), ("::1", True), ("::ffff:127.0.0.1", True), ("unix", True),
    ("10.0.0.1", False), ("::ffff:10.0.0.1", False), ("2001:db8::1", False), ("nonsense", False),
])
def test_loopback(client, local):
    assert status._loopback(client) is local


async def test_page_is_served_without_a_key_and_allows_only_its_own_script(keyring):
    path, _ = keyring
    st, headers, body = await get(gateway(path), b"/status")
    assert st == 200 and headers["content-type"] == "text/html; charset=utf-8"
    csp = headers["content-security-policy"]
    assert "default-src 'none'" in csp and "connect-src 'self'" in csp and "unsafe-inline" not in csp
    assert len(re.findall(r"'sha256-[A-Za-z0-9+/=]+'", csp)) == 2  # the one <script>, the one <style>
    assert b"status.json" in body and b"innerHTML" not in body
    assert re.findall(rb'(?:src|href)="([^"]*)"', body) == [b"data:,"]  # nothing loaded from elsewhere
    assert (await get(gateway(path), b"/status.json"))[0] == 401


# -- what it says -----------------------------------------------------------------------------------

async def test_fields_and_a_tier_without_a_waker():
    gw = gateway()
    st, _, body = await get(gw)
    assert st == 200
    s = decoded(body)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00", s.generated_at)
    assert s.gateway.workers == 1 and s.gateway.uptime_s >= 0 and s.gateway.version and s.gateway.node
    (tier,) = s.tiers
    assert (tier.name, tier.models, tier.state) == ("local", ["sim-chat"], "always_on")
    assert (tier.phase, tier.elapsed_s, tier.eta_s, tier.budget_s, tier.cost, tier.last_wakes) == (
        None, None, None, None, None, [])
    assert [(u.url, u.verdict, u.in_flight) for u in tier.upstreams] == [
        ("http://127.0.0.1:9", "healthy", 0), ("http://127.0.0.1:10", "healthy", 0)]
    raw = msgspec.json.decode(body)
    assert raw["tiers"][0]["cost"] is None and "eta_s" in raw["tiers"][0]
    t = s.traffic
    assert t.source == "this_process" and t.store_error is None and len(t.minutes) == recent.WINDOW
    assert all(b.start - a.start == 60 for a, b in zip(t.minutes, t.minutes[1:]))
    assert t.minutes[-1].start <= time.time() < t.minutes[-1].start + 60


async def test_health_records_give_the_verdicts_and_requests_in_flight():
    from backends.health import HealthBook

    gw = gateway()
    book = HealthBook(unhealthy_after=1)
    tier = gw.runtime.router.tiers["local"]
    tier.attach_health(book)
    down = book.record("http://127.0.0.1:9")
    down.failed(trio.current_time(), silent=False, reason="connection refused")
    busy = book.record("http://127.0.0.1:10")
    busy.inflight.update({object(), object()})
    busy.load = (3.0, 0.25, trio.current_time() - 2.0)  # a /metrics reading 2 s ago
    s = decoded((await get(gw))[2])
    a, b = s.tiers[0].upstreams
    assert (a.verdict, a.reason, a.in_flight, a.last_probe_s_ago) == ("down", "connection refused", 0, None)
    assert (b.verdict, b.in_flight, b.queue, b.kv_usage) == ("healthy", 2, 3.0, 0.25)
    assert 2.0 <= b.last_probe_s_ago < 60


class Viewer:
    """A waker as the status page reads it: its statistics, its view, its routable list."""

    def __init__(self, state: TierState, routable=(), hosts=(), wake=None, recent_wakes=(), progress=None):
        self.state, self.routable, self.hosts = state, list(routable), tuple(hosts)
        self.wake, self.recent_wakes = wake, tuple(recent_wakes)
        if progress is not None:
            self.wake_progress = lambda: progress

    def statistics(self) -> WakerStatistics:
        return WakerStatistics(tier="local", state=self.state, waiters=2, routable=len(self.routable),
                               wakes_total=1, wake_budget_exceeded_total=0, last_wake_s=None, stops_total=0,
                               interruptions_total=0, fallbacks_total=0, upstream_down_total=0,
                               fallback_tier=None, last_timeline=())

    def status_view(self) -> WakerView:
        return WakerView(hosts=self.hosts, wake=self.wake, wake_elapsed_s=None if self.wake is None else 42.0,
                         recent_wakes=self.recent_wakes, budget_s=480.0, hard_cap_s=600.0)

    def upstreams(self) -> list[str]:
        return list(self.routable)


U9, U10, U11 = "http://127.0.0.1:9", "http://127.0.0.1:10", "http://10.0.0.7:8000"


async def test_a_waking_tier_its_phase_eta_and_offline_hosts():
    gw = gateway()
    gw.runtime.router.tiers["local"].waker = Viewer(
        TierState.WAKING, wake=(("requested", 0.0), ("start_sent", 0.4), ("running", 20.5)),
        progress=("loading", 42.5, 97.25))
    (t,) = decoded((await get(gw))[2]).tiers
    assert (t.state, t.phase, t.elapsed_s, t.eta_s, t.waiters) == ("waking", "loading", 42.5, 97.25, 2)
    assert (t.budget_s, t.hard_cap_s) == (480.0, 600.0)
    assert {u.verdict for u in t.upstreams} == {"offline"}


async def test_without_an_estimate_the_eta_is_null():
    gw = gateway()
    gw.runtime.router.tiers["local"].waker = Viewer(TierState.WAKING, wake=(("requested", 0.0),))
    (t,) = decoded((await get(gw))[2]).tiers
    assert (t.phase, t.elapsed_s, t.eta_s) == ("starting", 42.0, None)


async def test_a_ready_tier_draining_and_down_hosts_and_its_last_wakes():
    gw = gateway()
    def timeline(n):
        return ("requested", 0.0), ("start_sent", 1.0), ("running", 60.0), ("ready", 300.0 + 100 * n)

    wakes = [FinishedWake(1_800_000_000.0 + n, 300.0 + 100 * n, timeline(n)) for n in range(3)]
    gw.runtime.router.tiers["local"].waker = Viewer(
        TierState.READY, routable=[U10], hosts=[(U9, True), (U10, False), (U11, False)], recent_wakes=wakes)
    (t,) = decoded((await get(gw))[2]).tiers
    assert [(u.url, u.verdict) for u in t.upstreams] == [(U9, "draining"), (U10, "healthy"), (U11, "down")]
    assert [w.total_s for w in t.last_wakes] == [500.0, 400.0, 300.0]  # newest first
    assert [w.over_budget for w in t.last_wakes] == [True, False, False]
    newest = t.last_wakes[0]
    assert newest.finished_at == "2027-01-15T08:00:02+00:00"
    assert (newest.budget_s, newest.hard_cap_s) == (480, 600)
    assert [(p.name, p.at_s, p.took_s) for p in newest.phases] == [
        ("requested", 0.0, 0.0), ("start_sent", 1.0, 1.0), ("running", 60.0, 59.0), ("ready", 500.0, 440.0)]


async def test_a_real_waker_after_a_wake(aws_url, tmp_path):
    with trio.fail_after(60):
        async with cloud(aws_url) as c:
            waker = c.waker(budget_s=10.0, hard_cap_s=15.0)
            gw = gateway(tiers=[TierConfig(name="gpu", upstreams=c.upstreams, models=["chat-a"])])
            gw.runtime.router.tiers["gpu"].waker = waker
            await c.start(waker)
            assert decoded((await get(gw))[2]).tiers[0].state == "asleep"
            await waker.wait_ready()
            (t,) = decoded((await get(gw))[2]).tiers
    assert t.state == "ready" and [u.verdict for u in t.upstreams] == ["healthy"]
    (w,) = t.last_wakes
    assert [p.name for p in w.phases] == ["requested", "start_sent", "running", "healthy", "ready"]
    assert (w.budget_s, w.hard_cap_s, w.over_budget) == (10.0, 15.0, False) and 0 < w.total_s < 10
    assert waker.status_view().recent_wakes[-1].total_s == w.total_s


# -- traffic ----------------------------------------------------------------------------------------

async def test_a_request_is_counted_in_traffic_and_top_keys(keyring):
    path, secrets = keyring
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            _, url = await start_sim(nursery)
            h = await start_gateway(nursery, make_config([url], keys_file=path))
            auth = b"Authorization: Bearer " + secrets["user"].encode() + b"\r\n"
            for _ in range(2):
                assert split_response(await one_response(h.port, post(CHAT, extra=auth)))[0] == 200
            bad = post(b'{"model": "nope", "messages": []}', extra=auth)
            assert split_response(await one_response(h.port, bad))[0] in (400, 404)
            admin = b"Authorization: Bearer " + secrets["admin"].encode() + b"\r\n"
            ask = b"GET /status.json HTTP/1.1\r\nHost: x\r\n" + admin + b"Connection: close\r\n\r\n"
            st, _, body = split_response(await one_response(h.port, ask))
            nursery.cancel_scope.cancel()
    assert st == 200
    t = decoded(body).traffic
    assert t.source == "this_process"
    assert sum(m.requests for m in t.minutes) == 3 and sum(m.errors for m in t.minutes) == 1
    assert sum(m.prompt_tokens for m in t.minutes) > 0 and sum(m.completion_tokens for m in t.minutes) > 0
    assert [(e.status, e.count) for e in t.errors_by_status] in ([(400, 1)], [(404, 1)])
    (alice,) = t.top_keys_today  # the status poll itself is not traffic
    assert (alice.name, alice.requests) == ("alice", 3) and alice.tokens > 0


async def test_the_usage_store_is_preferred_and_cached(tmp_path, monkeypatch):
    db = str(tmp_path / "usage.sqlite3")
    now = time.time()
    minute = int(now // 60) * 60

    def row(ts, key, status=200, tokens=(10, 5)):
        return UsageRow(ts=ts, request_id=f"r{ts}{key}", key_name=key, model="sim-chat", tier="local",
                        endpoint="chat", status=status, prompt_tokens=tokens[0], completion_tokens=tokens[1],
                        total_tokens=sum(tokens))

    conn = connect(db)
    insert_rows(conn, [
        row(minute + 1, "alice"), row(minute + 2, "alice"), row(minute + 3, "bob", status=429, tokens=(0, 0)),
        row(minute - 600 + 5, "carol", tokens=(1000, 1000)),  # ten minutes ago
        row(minute - 7200, "dave", status=500),  # two hours ago: not in the window, not in the last hour
        row(now - 2 * 86400, "erin", tokens=(10**6, 10**6)),  # two days ago: not today
    ])
    conn.close()
    gw = gateway()
    gw.runtime = gw.runtime._replace(
        config=msgspec.structs.replace(gw.runtime.config, usage=UsageConfig(path=db)))
    t = decoded((await get(gw))[2]).traffic
    assert t.source == "usage_store" and t.store_error is None
    assert (t.minutes[-1].requests, t.minutes[-1].prompt_tokens, t.minutes[-1].errors) == (3, 20, 1)
    assert t.minutes[-11].requests == 1 and t.minutes[-11].completion_tokens == 1000
    assert sum(m.requests for m in t.minutes) == 4
    assert [(e.status, e.count) for e in t.errors_by_status] == [(429, 1)]
    top = [(k.name, k.requests, k.tokens) for k in t.top_keys_today]
    if minute - 600 >= int(now // 86400) * 86400:  # carol's row is today unless it is just after 00:00
        assert top[0] == ("carol", 1, 2000)
    assert ("alice", 2, 30) in top and ("bob", 1, 0) in top and "erin" not in [k for k, _, _ in top]

    conn = connect(db)
    insert_rows(conn, [row(minute + 4, "alice")])
    conn.close()
    again = decoded((await get(gw))[2]).traffic
    assert again.minutes[-1].requests == 3  # cached for CACHE_S
    gw.recent.store.invalidate()
    assert decoded((await get(gw))[2]).traffic.minutes[-1].requests == 4


async def test_an_unreadable_store_falls_back_to_this_process(tmp_path):
    gw = gateway()
    missing = str(tmp_path / "nothing-here.sqlite3")
    gw.runtime = gw.runtime._replace(
        config=msgspec.structs.replace(gw.runtime.config, usage=UsageConfig(path=missing)))
    t = decoded((await get(gw))[2]).traffic
    assert t.source == "this_process" and t.store_error and "OperationalError" in t.store_error


# -- the recorder on its own ------------------------------------------------------------------------

def record(ts: float, *, key: str | None = "alice", status: int = 200, endpoint: str = "chat",
           prompt: int = 10, completion: int = 5):
    return types.SimpleNamespace(
        ts=ts, endpoint=endpoint, status=status, prompt_tokens=prompt, completion_tokens=completion,
        total_tokens=prompt + completion, estimated=False, t_upstream=1.0, upstream="u", charged_tokens=0,
        tier="local", key=None if key is None else types.SimpleNamespace(name=key))


def test_recorder_minutes_statuses_and_keys():
    r = recent.RecentTraffic()
    t0 = 1_800_000_000.0 - 1_800_000_000.0 % 86400 + 3600  # 01:00 UTC
    r.record(record(t0 - 30 * 60, status=503))  # 30 minutes ago: the hour's errors, not the window
    r.record(record(t0 + 1))
    r.record(record(t0 + 2, key="bob", status=429, prompt=0, completion=0))
    r.record(record(t0 + 61, key=None))
    r.record(record(t0 + 62, endpoint="models"))  # not billed: not traffic
    s = r.snapshot(t0 + 90)
    assert [(m.requests, m.prompt_tokens, m.completion_tokens, m.errors) for m in s.minutes[-2:]] == [
        (2, 10, 5, 1), (1, 10, 5, 0)]
    assert sum(m.requests for m in s.minutes) == 3
    assert [(e.status, e.count) for e in s.errors_by_status] == [(429, 1), (503, 1)]
    assert [(k.name, k.requests, k.tokens) for k in s.top_keys_today] == [
        ("alice", 2, 30), (None, 1, 15), ("bob", 1, 0)]
    later = r.snapshot(t0 + 3600 * 2)  # two hours on: every bucket is out of the window and the hour
    assert sum(m.requests for m in later.minutes) == 0 and later.errors_by_status == []
    assert r.snapshot(t0 + 86400).top_keys_today == []  # tomorrow


def test_recorder_ring_reuse_and_the_key_cap(monkeypatch):
    r = recent.RecentTraffic()
    t0 = 1_800_000_000.0
    r.record(record(t0))
    r.record(record(t0 + 3600))  # the same ring slot an hour later: reset first
    assert [m.requests for m in r.snapshot(t0 + 3600).minutes[-1:]] == [1]
    r.record(record(t0))  # arrived before the slot's minute: only its key total counts
    assert r.snapshot(t0 + 3600).minutes[-1].requests == 1
    monkeypatch.setattr(recent, "MAX_KEYS", 3)
    for n in range(6):
        r.record(record(t0 + 3600, key=f"k{n}", prompt=100, completion=0))
    names = [k.name for k in r.snapshot(t0 + 3600).top_keys_today]
    assert recent.OTHER in names and len(names) <= 4


async def test_an_upstream_password_is_never_shown():
    secret_url = "http://vllm:hunter2pw@127.0.0.1:9"
    gw = gateway(tiers=[TierConfig(name="local", upstreams=[secret_url], models=["m"], upstream_api_key="sk-up")])
    st, _, body = await get(gw)
    assert st == 200 and b"hunter2pw" not in body and b"sk-up" not in body
    assert decoded(body).tiers[0].upstreams[0].url == "http://vllm:***@127.0.0.1:9"


async def test_a_costed_tier_shows_its_cost_per_token_and_an_idle_one_says_so(keyring, monkeypatch):
    from ops.pricing import CostConfig

    path, secrets = keyring
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            _, url = await start_sim(nursery)
            _, idle_url = await start_sim(nursery)
            tiers = [TierConfig(name="local", upstreams=[url], models=["sim-chat"], cost=CostConfig(hourly_usd=36.0)),
                     TierConfig(name="spare", upstreams=[idle_url], models=["other"], cost=CostConfig(hourly_usd=3.6))]
            h = await start_gateway(nursery, make_config([], tiers=tiers, keys_file=path))
            auth = b"Authorization: Bearer " + secrets["user"].encode() + b"\r\n"
            assert split_response(await one_response(h.port, post(CHAT, extra=auth)))[0] == 200
            await trio.sleep(1.1)  # GPU time accrues: 36 USD/h is 1 cent a second
            monkeypatch.setattr(status, "IDLE_S", 0.5)  # "no request for a while", shortened
            admin = b"Authorization: Bearer " + secrets["admin"].encode() + b"\r\n"
            ask = b"GET /status.json HTTP/1.1\r\nHost: x\r\n" + admin + b"Connection: close\r\n\r\n"
            st, _, body = split_response(await one_response(h.port, ask))
            nursery.cancel_scope.cancel()
    assert st == 200
    local, spare = decoded(body).tiers
    assert local.cost is not None and spare.cost is not None
    assert local.cost.hosts_up == 1 and local.cost.usd_per_hour == 36.0 and local.cost.price_sources == ["fixed"]
    assert local.cost.usd >= 0.01 and local.cost.tokens > 0
    assert local.cost.usd_per_mtok == pytest.approx(local.cost.usd / local.cost.tokens * 1e6, rel=1e-3)
    assert (spare.cost.tokens, spare.cost.usd_per_mtok, spare.cost.idle) == (0, None, True)  # cost, no tokens
