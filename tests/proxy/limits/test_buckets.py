"""RateLimiter: token buckets per key, driven by a fake clock (no event loop, no sleeping)."""

from __future__ import annotations

import pytest

from proxy.errors import rate_limited
from proxy.limits.buckets import Admission, RateLimiter, format_duration


class FakeClock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, dt: float) -> None:
        self.t += dt


def hdr(adm: Admission) -> dict[str, str]:
    d = {k.decode(): v.decode() for k, v in adm.headers}
    assert len(d) == len(adm.headers)  # no duplicates
    return d


def test_rpm_3_refuses_the_fourth_with_retry_after() -> None:
    clock = FakeClock()
    rl = RateLimiter(clock)
    for i in range(3):
        adm = rl.admit("alice", 3, None, 10)
        assert adm.allowed
        assert hdr(adm)["x-ratelimit-remaining-requests"] == str(2 - i)
    fourth = rl.admit("alice", 3, None, 10)
    assert not fourth.allowed
    assert fourth.exceeded == "requests"
    assert fourth.retry_after_s == pytest.approx(20.0)  # one request refills in 60/3 s
    h = hdr(fourth)
    assert h["x-ratelimit-limit-requests"] == "3"
    assert h["x-ratelimit-remaining-requests"] == "0"
    assert h["x-ratelimit-reset-requests"] == "1m0s"
    assert h["retry-after-ms"] == "20000"
    assert "x-ratelimit-limit-tokens" not in h
    # Another key is unaffected; after the refill time the key is admitted again.
    assert rl.admit("bob", 3, None, 10).allowed
    clock.advance(19.999)
    assert not rl.admit("alice", 3, None, 10).allowed
    clock.advance(0.001)
    assert rl.admit("alice", 3, None, 10).allowed


def test_refused_requests_consume_nothing() -> None:
    clock = FakeClock()
    rl = RateLimiter(clock)
    for _ in range(3):
        rl.admit("k", 3, 1000, 100)
    for _ in range(50):
        assert not rl.admit("k", 3, 1000, 100).allowed
    clock.advance(20.0)
    assert rl.admit("k", 3, 1000, 100).allowed


def test_tpm_limits_tokens_and_reports_them() -> None:
    clock = FakeClock()
    rl = RateLimiter(clock)
    a = rl.admit("k", None, 1000, 600)
    assert a.allowed
    h = hdr(a)
    assert h["x-ratelimit-limit-tokens"] == "1000"
    assert h["x-ratelimit-remaining-tokens"] == "400"
    assert h["x-ratelimit-reset-tokens"] == "36s"  # 600 tokens at 1000/60 per s
    assert "x-ratelimit-limit-requests" not in h
    b = rl.admit("k", None, 1000, 600)
    assert not b.allowed and b.exceeded == "tokens"
    assert b.retry_after_s == pytest.approx(12.0)  # 200 short at 16.67/s
    assert "Requested 600" in b.message("k") and "TPM" in b.message("k")
    clock.advance(12.0)
    assert rl.admit("k", None, 1000, 600).allowed


def test_reconcile_refunds_and_charges() -> None:
    clock = FakeClock()
    rl = RateLimiter(clock)
    assert rl.admit("k", None, 1000, 900).allowed
    assert not rl.admit("k", None, 1000, 500).allowed
    rl.reconcile("k", charged=900, actual=150)  # the answer was short: 750 back
    adm = rl.admit("k", None, 1000, 500)
    assert adm.allowed
    assert hdr(adm)["x-ratelimit-remaining-tokens"] == "350"
    # The answer used more than charged: the bucket goes into debt and later requests wait for it.
    rl.reconcile("k", charged=500, actual=1500)
    late = rl.admit("k", None, 1000, 1)
    assert not late.allowed
    assert late.retry_after_s == pytest.approx((650 + 1) / (1000 / 60))
    assert hdr(late)["x-ratelimit-remaining-tokens"] == "0"
    # A refund never lifts the level above the limit.
    rl.reconcile("k", charged=10**6, actual=0)
    assert hdr(rl.admit("k", None, 1000, 0))["x-ratelimit-remaining-tokens"] == "1000"
    rl.reconcile("nobody", 10, 5)  # unknown key: no-op


def test_a_request_larger_than_the_whole_limit_is_refused_at_once_and_never_retried() -> None:
    clock = FakeClock()
    rl = RateLimiter(clock)
    big = rl.admit("k", None, 1000, 5000)
    assert not big.allowed and big.never and big.exceeded == "tokens"
    assert hdr(big)["x-should-retry"] == "false"
    assert hdr(big)["x-ratelimit-remaining-tokens"] == "1000"  # it consumed nothing
    assert big.message("k").startswith("Request too large for key 'k' on tokens per min (TPM): Limit 1000, "
                                        "Requested 5000.")
    err = rate_limited(big.message("k"), big.retry_after_s, big.headers)
    h = dict(err.headers)
    assert err.status == 429 and h[b"x-should-retry"] == b"false" and b"retry-after" not in h
    assert list(h).count(b"x-should-retry") == 1
    assert rl.admit("k", None, 1000, 1000).allowed  # exactly the limit still fits a full bucket


def test_a_wait_longer_than_the_sdks_honour_says_do_not_retry() -> None:
    clock = FakeClock()
    rl = RateLimiter(clock)
    assert rl.admit("k", None, 1000, 1000).allowed  # bucket empty: 60 s to refill 1000
    at_60 = rl.admit("k", None, 1000, 1000)
    err = rate_limited(at_60.message("k"), at_60.retry_after_s, at_60.headers)
    assert dict(err.headers)[b"retry-after"] == b"60" and b"x-should-retry" not in dict(err.headers)
    rl.reconcile("k", 1000, 1500)  # the answer used more than charged: a debt of 500
    over = rl.admit("k", None, 1000, 1000)
    assert over.retry_after_s == pytest.approx(90.0)
    err = rate_limited(over.message("k"), over.retry_after_s, over.headers)
    assert dict(err.headers)[b"retry-after"] == b"90" and dict(err.headers)[b"x-should-retry"] == b"false"


def test_both_limits_report_the_longer_wait() -> None:
    clock = FakeClock()
    rl = RateLimiter(clock)
    assert rl.admit("k", 60, 100, 100).allowed  # tokens now empty, requests 59 left
    adm = rl.admit("k", 60, 100, 50)
    assert not adm.allowed and adm.exceeded == "tokens"
    assert adm.retry_after_s == pytest.approx(30.0)
    assert set(hdr(adm)) == {
        "x-ratelimit-limit-requests", "x-ratelimit-remaining-requests", "x-ratelimit-reset-requests",
        "x-ratelimit-limit-tokens", "x-ratelimit-remaining-tokens", "x-ratelimit-reset-tokens",
        "retry-after-ms",
    }


def test_unlimited_key_gets_no_headers() -> None:
    rl = RateLimiter(FakeClock())
    for _ in range(1000):
        adm = rl.admit("free", None, None, 10**6)
        assert adm.allowed and adm.headers == ()


def test_limit_change_on_reload_and_forget() -> None:
    clock = FakeClock()
    rl = RateLimiter(clock)
    for _ in range(10):
        assert rl.admit("k", 10, None, 0).allowed
    assert not rl.admit("k", 10, None, 0).allowed
    # Raised limit: what was used stays used, the extra room is available at once... after refill.
    adm = rl.admit("k", 20, None, 0)
    assert not adm.allowed and hdr(adm)["x-ratelimit-limit-requests"] == "20"
    clock.advance(3.0)  # 20/min -> 1 per 3 s
    assert rl.admit("k", 20, None, 0).allowed
    rl.forget("k")
    assert hdr(rl.admit("k", 20, None, 0))["x-ratelimit-remaining-requests"] == "19"


def test_fractional_per_worker_limits_and_zero_limit() -> None:
    clock = FakeClock()
    rl = RateLimiter(clock)
    # rpm 3 divided over 2 workers: this worker admits 1, then 1.5 per minute.
    assert rl.admit("k", 1.5, None, 0).allowed
    adm = rl.admit("k", 1.5, None, 0)
    assert not adm.allowed and adm.retry_after_s == pytest.approx(20.0)
    assert hdr(adm)["x-ratelimit-limit-requests"] == "1.5"
    zero = rl.admit("z", 0, None, 0)
    assert not zero.allowed and zero.retry_after_s == 60.0


def test_refusal_renders_as_openai_429() -> None:
    clock = FakeClock()
    rl = RateLimiter(clock)
    for _ in range(3):
        rl.admit("alice", 3, None, 1)
    adm = rl.admit("alice", 3, None, 1)
    err = rate_limited(adm.message("alice"), adm.retry_after_s, adm.headers)
    assert err.status == 429 and err.code == "rate_limit_exceeded"
    h = dict(err.headers)
    assert h[b"retry-after"] == b"20"
    assert h[b"x-ratelimit-reset-requests"] == b"1m0s"
    assert b"alice" in err.body() and b"RPM" in err.body()


@pytest.mark.parametrize(("seconds", "text"), [
    (0, "0s"), (-1, "0s"), (0.0000001, "1ms"), (0.012, "12ms"), (0.02, "20ms"), (0.999, "999ms"),
    (0.9991, "1s"), (1, "1s"), (1.5, "1.5s"), (8.64, "8.64s"), (59.999, "59.999s"), (60, "1m0s"),
    (90.25, "1m30.25s"), (360, "6m0s"), (3600, "1h0m0s"), (3725, "1h2m5s"),
])
def test_duration_format(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text
