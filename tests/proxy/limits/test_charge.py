"""limits/charge.py: what one request costs its key up front (`charge`) and at the end (`settle`).

A real `Gateway`, real views decoded by admit/schemas.py and real `KeyRecord`s. The gateway's limiter
is replaced by a `RateLimiter` on a fake clock (nothing refills unless a test says so) that also
records what it was asked, so the estimate and the per-worker share are checked as numbers, not
inferred. `limit_divisor` comes from the real `open_limiter` (two workers, no shared table).
"""

from __future__ import annotations

import pytest

from proxy.admit import keys
from proxy.admit.keys import KeyRecord
from proxy.admit.schemas import decode_chat, decode_completion, decode_embedding
from proxy.errors import ApiError
from proxy.exchange import Exchange
from proxy.gateway import Gateway, build_runtime
from proxy.limits.buckets import RateLimiter
from proxy.limits.charge import charge, settle
from proxy.limits.shared_table import ENV
from proxy.parse.request import RequestReader
from tests.support.gateway import make_config

CHAT = b'{"model":"sim-chat","messages":[{"role":"user","content":"hi"}],"max_tokens":20}'
assert len(CHAT) == 80  # prompt estimate 80 // 4 = 20, plus 20 max output tokens: 40
ESTIMATE = 40


class FakeClock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


class RecordingLimiter(RateLimiter):
    def __init__(self, clock) -> None:
        super().__init__(clock)
        self.clock = clock
        self.admits: list[tuple] = []
        self.reconciles: list[tuple] = []

    def admit(self, key_name, rpm, tpm, tokens_estimate):
        self.admits.append((key_name, rpm, tpm, tokens_estimate))
        return super().admit(key_name, rpm, tpm, tokens_estimate)

    def reconcile(self, key_name, charged, actual):
        self.reconciles.append((key_name, charged, actual))
        super().reconcile(key_name, charged, actual)


def gateway(*, workers: int = 1) -> Gateway:
    gw = Gateway(build_runtime(make_config(["http://127.0.0.1:9"])), workers=workers)
    gw.limiter = RecordingLimiter(FakeClock())
    return gw


def exchange(gw) -> Exchange:
    reader = RequestReader()
    reader.feed(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
    return Exchange(gw, reader.next_head(), "127.0.0.1")


def key(name: str = "alice", **limits) -> KeyRecord:
    return KeyRecord(name=name, hash=keys.digest("sk-si-" + name), **limits)


def now(coro):
    """Run a coroutine that never suspends (charge with a local limiter) to its result, no event loop."""
    try:
        coro.send(None)
    except StopIteration as stop:
        return stop.value
    coro.close()
    raise AssertionError("charge() suspended: a local limiter must answer at once")


def do_charge(gw, k, body: bytes = CHAT, decode=decode_chat):
    ex = exchange(gw)
    ex.key = k
    return ex, now(charge(gw, ex, k, decode(body), len(body)))


def hdr(headers) -> dict[str, str]:
    d = {k.decode(): v.decode() for k, v in headers}
    assert len(d) == len(headers)
    return d


@pytest.mark.parametrize("k", [None, key(), key(tiers=["local"])])
def test_no_key_or_unlimited_key_costs_nothing(k):
    gw = gateway()
    ex, headers = do_charge(gw, k)
    assert headers == ()
    assert ex.charged_tokens == 0
    assert gw.limiter.admits == []
    settle(gw, ex)
    assert gw.limiter.reconciles == []


def test_rpm_only_charges_one_request_and_no_tokens():
    gw = gateway()
    ex, headers = do_charge(gw, key(rpm=3))
    assert gw.limiter.admits == [("alice", 3.0, None, ESTIMATE)]
    assert hdr(headers) == {"x-ratelimit-limit-requests": "3", "x-ratelimit-remaining-requests": "2",
                            "x-ratelimit-reset-requests": "20s"}
    assert ex.charged_tokens == 0
    settle(gw, ex)
    assert gw.limiter.reconciles == []


def test_tpm_charges_the_estimate():
    gw = gateway()
    ex, headers = do_charge(gw, key(tpm=1000))
    assert gw.limiter.admits == [("alice", None, 1000.0, ESTIMATE)]
    assert hdr(headers) == {"x-ratelimit-limit-tokens": "1000", "x-ratelimit-remaining-tokens": "960",
                            "x-ratelimit-reset-tokens": "2.4s"}
    assert ex.charged_tokens == ESTIMATE


def test_rpm_and_tpm_together():
    gw = gateway()
    ex, headers = do_charge(gw, key(rpm=3, tpm=1000))
    h = hdr(headers)
    assert list(h) == ["x-ratelimit-limit-requests", "x-ratelimit-remaining-requests", "x-ratelimit-reset-requests",
                       "x-ratelimit-limit-tokens", "x-ratelimit-remaining-tokens", "x-ratelimit-reset-tokens"]
    assert (h["x-ratelimit-remaining-requests"], h["x-ratelimit-remaining-tokens"]) == ("2", "960")
    assert ex.charged_tokens == ESTIMATE


@pytest.mark.parametrize("body, decode, estimate", [
    (CHAT, decode_chat, 80 // 4 + 20),
    (b'{"model":"sim-chat","messages":[{"role":"user","content":"hi"}]}', decode_chat, 64 // 4),
    ((b'{"model":"sim-chat","messages":[{"role":"user","content":"hi"}],"max_tokens":20,'
     b'"max_completion_tokens":7}'), decode_chat, 106 // 4 + 7),
    (b'{"model":"sim-chat","prompt":"hello","max_tokens":100}', decode_completion, 54 // 4 + 100),
    (b'{"model":"sim-embed","input":"hello there"}', decode_embedding, 43 // 4),
])
def test_estimate_is_prompt_estimate_plus_max_output(body, decode, estimate):
    gw = gateway()
    ex, _ = do_charge(gw, key(tpm=100000), body, decode)
    assert gw.limiter.admits[0][3] == estimate
    assert ex.charged_tokens == estimate


def test_over_rpm_is_429_with_retry_after():
    gw = gateway()
    k = key(rpm=2)
    do_charge(gw, k)
    do_charge(gw, k)
    ex = exchange(gw)
    with pytest.raises(ApiError) as exc:
        now(charge(gw, ex, k, decode_chat(CHAT), len(CHAT)))
    err = exc.value
    assert (err.status, err.type, err.code, err.param) == (429, "rate_limit_error", "rate_limit_exceeded", None)
    assert err.message == ("Rate limit reached for key 'alice' on requests per min (RPM): Limit 2. "
                           "Please try again in 30s.")
    assert err.headers[0] == (b"retry-after", b"30")
    assert hdr(err.headers[1:]) == {"x-ratelimit-limit-requests": "2", "x-ratelimit-remaining-requests": "0",
                                    "x-ratelimit-reset-requests": "1m0s", "retry-after-ms": "30000"}
    assert ex.charged_tokens == 0


def test_over_tpm_is_429_naming_the_tokens():
    gw = gateway()
    k = key(tpm=60)  # refills one token a second
    do_charge(gw, k)  # 60 -> 20
    ex = exchange(gw)
    with pytest.raises(ApiError) as exc:
        now(charge(gw, ex, k, decode_chat(CHAT), len(CHAT)))
    err = exc.value
    assert err.status == 429
    assert err.message == ("Rate limit reached for key 'alice' on tokens per min (TPM): Limit 60, "
                           "Requested 40. Please try again in 20s.")
    assert err.headers[0] == (b"retry-after", b"20")
    assert hdr(err.headers)["retry-after-ms"] == "20000"
    assert ex.charged_tokens == 0  # refused: nothing charged, nothing to settle
    gw.limiter.clock.t += 20.0
    ex, headers = do_charge(gw, k)
    assert hdr(headers)["x-ratelimit-remaining-tokens"] == "0"


def test_a_refusal_consumes_nothing():
    gw = gateway()
    k = key(rpm=1)
    do_charge(gw, k)
    for _ in range(5):
        with pytest.raises(ApiError):
            do_charge(gw, k)
    gw.limiter.clock.t += 60.0  # exactly one request refilled: had a refusal charged, this would still fail
    _, headers = do_charge(gw, k)
    assert hdr(headers)["x-ratelimit-remaining-requests"] == "0"


def test_limit_divisor_splits_the_limit_between_workers(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    gw = gateway(workers=2)
    assert gw.limit_divisor == 2
    _ex, headers = do_charge(gw, key(rpm=10, tpm=1000))
    assert gw.limiter.admits == [("alice", 5.0, 500.0, ESTIMATE)]
    h = hdr(headers)
    assert (h["x-ratelimit-limit-requests"], h["x-ratelimit-limit-tokens"]) == ("5", "500")
    assert (h["x-ratelimit-remaining-requests"], h["x-ratelimit-remaining-tokens"]) == ("4", "460")


def test_limit_divisor_refuses_at_the_workers_share(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    gw = gateway(workers=2)
    k = key(rpm=2)
    do_charge(gw, k)
    with pytest.raises(ApiError) as exc:
        do_charge(gw, k)
    assert "Limit 1." in exc.value.message


def test_one_process_has_divisor_1():
    assert gateway().limit_divisor == 1


def test_settle_replaces_the_estimate_with_the_reported_total():
    gw = gateway()
    k = key(tpm=1000)
    ex, _ = do_charge(gw, k)  # 1000 -> 960
    ex.total_tokens = 7
    settle(gw, ex)
    assert gw.limiter.reconciles == [("alice", ESTIMATE, 7)]
    _, headers = do_charge(gw, k)  # 993 -> 953
    assert hdr(headers)["x-ratelimit-remaining-tokens"] == "953"


def test_settle_with_nothing_reported_refunds_the_estimate():
    gw = gateway()
    k = key(tpm=1000)
    ex, _ = do_charge(gw, k)
    assert ex.total_tokens is None
    settle(gw, ex)
    assert gw.limiter.reconciles == [("alice", ESTIMATE, 0)]
    _, headers = do_charge(gw, k)
    assert hdr(headers)["x-ratelimit-remaining-tokens"] == "960"


def test_settle_above_the_estimate_puts_the_key_in_debt():
    gw = gateway()
    k = key(tpm=1000)
    ex, _ = do_charge(gw, k)
    ex.total_tokens = 1500  # 960 + 40 - 1500 = -500
    settle(gw, ex)
    with pytest.raises(ApiError) as exc:
        do_charge(gw, k)
    assert exc.value.headers[0] == (b"retry-after", b"33")  # (40 + 500) / (1000 / 60) = 32.4 s
    assert hdr(exc.value.headers)["x-ratelimit-remaining-tokens"] == "0"


def test_finish_settles_through_the_gateway():
    gw = gateway()
    ex, _ = do_charge(gw, key(tpm=1000))
    ex.status, ex.total_tokens = 200, 12
    ex.finish(False)
    ex.finish(False)
    assert gw.limiter.reconciles == [("alice", ESTIMATE, 12)]


# -- settling without vLLM's count (usage/taps.py `settlement`) ------------------------------------------


def test_settle_without_a_count_after_the_upstream_got_the_request_keeps_the_charge():
    # Sent upstream (t_upstream), no usage came back (client gone, upstream failed): never refunded to 0.
    gw = gateway()
    ex, _ = do_charge(gw, key(tpm=1000))
    ex.t_upstream = ex.t0
    settle(gw, ex)
    assert gw.limiter.reconciles == [("alice", ESTIMATE, ESTIMATE)]
    assert ex.estimated is False  # the record itself is not changed; usage_row reports it (settlement)


def test_settle_at_the_streams_counted_events():
    gw = gateway()
    ex, _ = do_charge(gw, key(tpm=1000))
    ex.t_upstream = ex.t0
    ex.prompt_tokens, ex.completion_tokens, ex.total_tokens, ex.estimated = 20, 3, 23, True  # read_tap's
    settle(gw, ex)
    assert gw.limiter.reconciles == [("alice", ESTIMATE, 23)]


@pytest.mark.parametrize("status", [400, 404, 422, 429])
def test_settle_refunds_an_upstream_refusal(status):
    gw = gateway()
    ex, _ = do_charge(gw, key(tpm=1000))
    ex.t_upstream, ex.upstream, ex.status = ex.t0, "127.0.0.1:8000", status
    settle(gw, ex)
    assert gw.limiter.reconciles == [("alice", ESTIMATE, 0)]


@pytest.mark.parametrize("status", [499, 500, 502, 503])
def test_settle_keeps_the_charge_after_an_answer_without_usage(status):
    gw = gateway()
    ex, _ = do_charge(gw, key(tpm=1000))
    ex.t_upstream, ex.upstream, ex.status = ex.t0, "127.0.0.1:8000", status
    settle(gw, ex)
    assert gw.limiter.reconciles == [("alice", ESTIMATE, ESTIMATE)]
