"""The cluster's limiter against a real redis-server: the same answers as the in-process buckets, one
limit for every host, atomic under concurrency, and the outage policies ("local", "closed") with the
automatic switch back."""

from __future__ import annotations

import time

import pytest
import trio

from proxy.cluster.link import ClusterLink
from proxy.config import ClusterConfig
from proxy.errors import ApiError
from proxy.limits.buckets import RateLimiter
from proxy.limits.redis_buckets import PREFIX, RedisRateLimiter
from proxy.observe import logs


def limiter(url: str, **cluster) -> RedisRateLimiter:
    link = ClusterLink(ClusterConfig(redis_url=url, **{"timeout_s": 0.5, "retry_s": 0.05, **cluster}))
    return RedisRateLimiter(link, RateLimiter(time.monotonic))


def hdr(adm) -> dict[str, str]:
    return {k.decode(): v.decode() for k, v in adm.headers}


async def test_rpm_three_is_three_then_429_with_the_same_headers_as_the_local_limiter(redis_url):
    with trio.fail_after(10):
        remote, local = limiter(redis_url), RateLimiter(time.monotonic)
        got = [await remote.admit("alice", 3.0, None, 10) for _ in range(4)]
        want = [local.admit("alice", 3.0, None, 10) for _ in range(4)]
        assert [a.allowed for a in got] == [True, True, True, False]
        assert [hdr(a)["x-ratelimit-remaining-requests"] for a in got] == \
               [hdr(a)["x-ratelimit-remaining-requests"] for a in want] == ["2", "1", "0", "0"]
        refused = got[3]
        assert refused.exceeded == "requests" and 19.0 < refused.retry_after_s <= 20.0
        same = "Rate limit reached for key 'alice' on requests per min (RPM): Limit 3. Please try again in "
        assert refused.message("alice").startswith(same) and want[3].message("alice").startswith(same)
        assert hdr(refused)["x-ratelimit-reset-requests"].endswith("s")
        assert "retry-after-ms" in hdr(refused)
        await remote.link.client.aclose()


async def test_tokens_charged_up_front_settled_later_and_too_large_is_never(redis_url):
    with trio.fail_after(10):
        lim = limiter(redis_url)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lim.run)
            a = await lim.admit("bob", None, 1000.0, 400)
            assert a.allowed and hdr(a)["x-ratelimit-remaining-tokens"] == "600"
            b = await lim.admit("bob", None, 1000.0, 700)
            assert not b.allowed and b.exceeded == "tokens"
            lim.reconcile("bob", 400, 100)  # vLLM counted 100: 300 back
            for _ in range(200):
                c = await lim.admit("bob", None, 1000.0, 0)
                if int(hdr(c)["x-ratelimit-remaining-tokens"]) >= 900:
                    break
                await trio.sleep(0.01)
            assert int(hdr(c)["x-ratelimit-remaining-tokens"]) >= 900
            never = await lim.admit("bob", None, 1000.0, 1001)
            assert not never.allowed and never.never and ("x-should-retry", "false") in hdr(never).items()
            nursery.cancel_scope.cancel()
        await lim.link.client.aclose()


async def test_two_hosts_share_one_limit_and_concurrent_admits_are_atomic(redis_url):
    with trio.fail_after(20):
        hosts = [limiter(redis_url), limiter(redis_url)]
        allowed = []

        async def one(n: int) -> None:
            adm = await hosts[n % 2].admit("carol", 10.0, None, 1)
            allowed.append(adm.allowed)

        async with trio.open_nursery() as nursery:
            for n in range(40):
                nursery.start_soon(one, n)
        assert allowed.count(True) == 10
        for h in hosts:
            await h.link.client.aclose()


async def test_the_bucket_expires_once_it_would_be_full_again(redis_url):
    with trio.fail_after(10):
        lim = limiter(redis_url)
        await lim.admit("dave", 600.0, None, 1)  # 1 of 600 used: full again in 0.1 s
        ttl = await lim.link.client.execute("PTTL", PREFIX + "dave")
        assert 60_000 <= ttl <= 60_200
        await lim.link.client.aclose()


async def test_redis_down_local_serves_on_this_hosts_limits_then_shares_again(fresh_redis, caplog):
    with trio.fail_after(30):
        lim = limiter(fresh_redis.url(0), on_redis_failure="local")
        async with trio.open_nursery() as nursery:
            await nursery.start(lim.link.run)
            assert (await lim.admit("erin", 2.0, None, 1)).allowed
            fresh_redis.stop()
            second = await lim.admit("erin", 2.0, None, 1)  # fails over within the call
            assert second.allowed and not lim.link.up
            assert lim.link.statistics().redis_failures_total == 1
            third = await lim.admit("erin", 2.0, None, 1)  # this host's own buckets: full limit
            assert third.allowed and lim.link.statistics().redis_fallbacks_total == 2
            fresh_redis.start()
            while not lim.link.up:
                await trio.sleep(0.02)
            # Shared again: the Redis bucket still holds the first request of the minute.
            back = await lim.admit("erin", 2.0, None, 1)
            assert back.allowed and hdr(back)["x-ratelimit-remaining-requests"] in ("0", "1")
            nursery.cancel_scope.cancel()


async def test_redis_down_closed_answers_503_in_the_envelope(fresh_redis):
    with trio.fail_after(30):
        lim = limiter(fresh_redis.url(0), on_redis_failure="closed")
        fresh_redis.stop()
        with pytest.raises(ApiError) as exc:
            await lim.admit("frank", 2.0, None, 1)
        err = exc.value
        assert err.status == 503 and err.code == "limits_unavailable"
        assert b'"type":"server_error"' in err.body()
        assert (b"retry-after", b"1") in err.headers
        assert (await lim.admit("frank", None, None, 1)).allowed  # an unlimited key needs no Redis
        assert lim.link.statistics().redis_refused_total == 1


def test_no_secret_in_the_down_event(capsys):
    link = ClusterLink(ClusterConfig(redis_url="redis://:hunter2@127.0.0.1:1/0"))
    assert "hunter2" not in link.where
    link.failed(OSError("refused"))
    logs.flush()
    assert "hunter2" not in capsys.readouterr().err
