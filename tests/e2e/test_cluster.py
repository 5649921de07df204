"""Several gateway hosts, for real: two `spotinference serve` processes sharing one real redis-server and
one real PostgreSQL (tests/support/servers.py), in front of one simulated vLLM; keys made and revoked
with `spotinference keys ... --database-url`; clients are the OpenAI SDK and httpx.

What "one cluster" must mean, checked from outside: a key's rpm and tpm are the cluster's (alternating
hosts, the 4th request of an rpm-3 key is refused on either host); every request has exactly one usage
row in PostgreSQL; a key revoked on the CLI is refused by both hosts within 5 s; PostgreSQL stopped and
started under traffic loses and doubles no row; Redis stopped: the "local" host keeps serving, the
"closed" host answers 503 in the envelope, and both share limits again once Redis is back. (One wake
for the cluster is tests/e2e/test_cluster_wake.py.)
"""

from __future__ import annotations

import contextlib
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import psycopg
import pytest

from tests.support.processes import SPOT
from tests.support.production import ASK, client, gateway, rid, scrape, sim, wait_for


def keys_cli(pg: str, *args: str) -> str:
    r = subprocess.run([*SPOT, "keys", *args, "--database-url", pg], check=False, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def cluster_config(folder: Path, upstream: str, redis: str, pg: str, *, policy: str = "local") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    cfg = folder / "gw.toml"
    cfg.write_text(
        f'[server]\nlisten = "127.0.0.1:0"\ndrain_s = 5.0\n'
        f'[auth]\ndatabase_url = "{pg}"\nrefresh_s = 0.5\n'
        f'[usage]\ndatabase_url = "{pg}"\nflush_s = 0.1\nretry_s = 0.2\n'
        f'[cluster]\nredis_url = "{redis}"\non_redis_failure = "{policy}"\nretry_s = 0.2\ntimeout_s = 0.5\n'
        f'[[tiers]]\nname = "local"\nupstreams = ["{upstream}"]\nmodels = ["sim-chat"]\n')
    return cfg


@contextlib.contextmanager
def two_hosts(tmp_path: Path, redis: str, pg: str, policies=("local", "local")) -> Iterator[list]:
    with sim(tmp_path) as up, \
            gateway(cluster_config(tmp_path / "a", up.url, redis, pg, policy=policies[0])) as a, \
            gateway(cluster_config(tmp_path / "b", up.url, redis, pg, policy=policies[1])) as b:
        yield [a, b]


def chat(gw, secret: str, request_id: str | None = None, **kw):
    return client(gw, secret).chat.completions.with_raw_response.create(
        model="sim-chat", messages=ASK, max_tokens=kw.pop("max_tokens", 4),
        extra_headers=rid(request_id) if request_id else None, **kw)


def refused(gw, secret: str, **kw) -> openai.RateLimitError:
    with pytest.raises(openai.RateLimitError) as info:
        chat(gw, secret, **kw)
    return info.value


def _served(host, secret: str) -> bool:
    """One request: True when served, False while the host does not know the key yet (401)."""
    try:
        return chat(host, secret).http_response.status_code == 200
    except openai.AuthenticationError:
        return False


def rows(pg: str) -> list[tuple]:
    with psycopg.connect(pg, connect_timeout=5) as conn:
        return conn.execute("SELECT request_id, key_name, status, uid FROM usage ORDER BY id").fetchall()


def test_limits_usage_and_revocation_are_the_clusters(tmp_path, redis_url, pg_url):
    rpm3 = keys_cli(pg_url, "add", "rpm3", "--rpm", "3")
    tpm = keys_cli(pg_url, "add", "tpm", "--tpm", "120")
    free = keys_cli(pg_url, "add", "free")
    with two_hosts(tmp_path, redis_url, pg_url) as hosts:
        sent: list[str] = []

        def ok(host, secret, **kw):
            request_id = "req-" + uuid.uuid4().hex
            raw = chat(host, secret, request_id, **kw)
            assert raw.http_response.status_code == 200
            sent.append(request_id)
            return raw

        for n in range(3):  # a, b, a: the whole minute's allowance
            raw = ok(hosts[n % 2], rpm3)
            assert raw.headers["x-ratelimit-remaining-requests"] == str(2 - n)
        for host in hosts:  # the 4th is refused on either host
            err = refused(host, rpm3)
            assert err.code == "rate_limit_exceeded" and int(err.response.headers["retry-after"]) >= 1
        # tpm 120: each request is charged its prompt estimate plus max_tokens 40, settled at vLLM's count
        ok(hosts[0], tpm, max_tokens=40)
        ok(hosts[1], tpm, max_tokens=40)
        err = refused(hosts[0], tpm, max_tokens=100)
        assert "tokens per min (TPM): Limit 120" in err.message
        for n in range(4):
            ok(hosts[n % 2], free)
        # every request that reached vLLM: exactly one row, whichever host served it
        want = set(sent)

        def complete():
            got = rows(pg_url)
            return got if {r[0] for r in got} >= want else None

        got = wait_for(complete, "usage rows in PostgreSQL")
        mine = [r for r in got if r[0] in want]
        assert len(mine) == len(want) and len({r[3] for r in got}) == len(got)
        assert {r[1] for r in mine} == {"rpm3", "tpm", "free"}
        # revoked on the CLI: refused by both hosts within 5 s, no reload
        keys_cli(pg_url, "revoke", "free")
        t0 = time.monotonic()
        for host in hosts:
            def gone(host=host):
                try:
                    chat(host, free)
                except openai.AuthenticationError:
                    return True
                return False
            wait_for(gone, "the revoked key refused", timeout=5.0, interval=0.1)
        assert time.monotonic() - t0 < 5.0


def test_postgres_stopped_and_started_under_traffic_loses_and_doubles_no_row(tmp_path, redis_url, fresh_postgres):
    pg = fresh_postgres.url()
    secret = keys_cli(pg, "add", "steady")
    with two_hosts(tmp_path, redis_url, pg) as hosts:
        sent: list[str] = []

        def burst(n: int) -> None:
            for i in range(n):
                request_id = f"pg-{len(sent)}-{uuid.uuid4().hex[:8]}"
                raw = chat(hosts[i % 2], secret, request_id)
                assert raw.http_response.status_code == 200
                sent.append(request_id)

        burst(6)
        fresh_postgres.stop()
        burst(10)  # keys are cached, usage waits in the queue / spill file
        fresh_postgres.start()
        burst(6)
        want = set(sent)

        def complete():
            try:
                got = rows(pg)
            except psycopg.OperationalError:
                return None
            return got if {r[0] for r in got} >= want else None

        got = wait_for(complete, "every row in PostgreSQL after the restart", timeout=30)
        ids = [r[0] for r in got if r[0] in want]
        assert sorted(ids) == sorted(want), "a row was lost or doubled"
        assert len({r[3] for r in got}) == len(got)


def test_redis_outage_local_serves_closed_refuses_and_both_share_again(tmp_path, pg_url, fresh_redis):
    secret = keys_cli(pg_url, "add", "limited", "--rpm", "100")
    with two_hosts(tmp_path, fresh_redis.url(0), pg_url, policies=("local", "closed")) as (local, closed):
        assert chat(local, secret).http_response.status_code == 200
        assert chat(closed, secret).http_response.status_code == 200
        fresh_redis.stop()
        assert chat(local, secret).http_response.status_code == 200  # this host's own limits
        r = httpx.post(closed.url + "/v1/chat/completions", headers={"authorization": f"Bearer {secret}"},
                       json={"model": "sim-chat", "messages": ASK, "max_tokens": 4}, timeout=30)
        assert r.status_code == 503 and r.headers["retry-after"]
        assert r.json()["error"]["code"] == "limits_unavailable" and r.json()["error"]["type"] == "server_error"
        fresh_redis.start()
        # Back: a new rpm-2 key is one limit across both hosts again (Redis restarted empty).
        pair = keys_cli(pg_url, "add", "pair", "--rpm", "2")

        def shared_again() -> bool:
            try:
                return chat(closed, pair).http_response.status_code == 200
            except openai.APIStatusError as exc:
                assert exc.status_code in (503, 401)  # Redis not seen back yet, or the key not loaded yet
                return False

        wait_for(shared_again, "the closed host serving again", timeout=15)
        wait_for(lambda: scrape(local.url).get("spotinference_cluster_redis_up") == {(): 1.0},
                 "the local host back on Redis", timeout=15)
        wait_for(lambda: _served(local, pair), "the local host knowing the new key", timeout=10)
        for host in (local, closed):
            refused(host, pair)
        assert local.events("redis_down") and local.events("redis_up")
