"""Through real processes: per-key rate limits through the real gateway and the OpenAI SDK, 1 and 2 workers.

Strategy: keys made with `keys add --rpm/--tpm`; the SDK with max_retries=0 so a 429 surfaces as
openai.RateLimitError; headers read from `with_raw_response` (successes) and the exception's response
(refusals). With two workers the test first finds two keep-alive SDK clients answered by DIFFERENT
workers (a request id's 12-hex-digit prefix names the worker process), using an unlimited probe key,
then spends a limited key across both by overriding Authorization per request: a limit that holds
across the two connections is held across the two workers -- exactly, not per worker.

Expected header values follow from the bucket rules (proxy/limits/buckets.py): after n of 3 requests the
reset time is 20*n s minus the refill since the first, so it lies in [20n - elapsed, 20n] where elapsed
is measured around the calls by the client; OpenAI's duration text is parsed back to seconds.
"""

from __future__ import annotations

import re
import time

import openai
import pytest

from tests.support.production import ASK, add_key, client, gateway, sim, wait_for, worker_of, write_config

_UNIT = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}


def seconds(duration: str) -> float:
    """OpenAI's reset text (``1m0s``, ``39.987s``, ``20ms``) -> seconds."""
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", duration)
    assert parts and "".join(n + u for n, u in parts) == duration, duration
    return sum(float(n) * _UNIT[u] for n, u in parts)


def bearer(secret: str) -> dict:
    return {"Authorization": f"Bearer {secret}"}


def clients_on_distinct_workers(gw, probe_secret: str, workers: int) -> list[tuple[openai.OpenAI, str]]:
    """Two SDK clients (one keep-alive connection each) answered by different workers when workers > 1,
    each with the worker that answers it."""
    found: dict[str, openai.OpenAI] = {}
    for _ in range(40):
        c = client(gw, probe_secret)
        raw = c.chat.completions.with_raw_response.create(model="sim-chat", messages=ASK, max_tokens=1)
        found.setdefault(worker_of(raw.headers["x-request-id"]), c)
        if len(found) == min(2, workers):
            break
    assert len(found) == min(2, workers), "connections never reached the second worker"
    pair = [(c, w) for w, c in found.items()]
    return pair if len(pair) == 2 else [pair[0], (client(gw, probe_secret), pair[0][1])]


def ok(c: openai.OpenAI, secret: str, **kw):
    """A successful call with `secret` on client `c`: (headers, parsed body, worker prefix)."""
    raw = c.chat.completions.with_raw_response.create(model="sim-chat", messages=ASK, extra_headers=bearer(secret),
                                                      **kw)
    return raw.headers, raw.parse(), worker_of(raw.headers["x-request-id"])


def refused(c: openai.OpenAI, secret: str, **kw) -> openai.RateLimitError:
    with pytest.raises(openai.RateLimitError) as info:
        c.chat.completions.create(model="sim-chat", messages=ASK, extra_headers=bearer(secret), **kw)
    err = info.value
    assert err.status_code == 429 and err.code == "rate_limit_exceeded" and err.type == "rate_limit_error"
    return err


@pytest.mark.parametrize("workers", [1, 2])
def test_rpm_and_tpm_limits_are_exact(tmp_path, workers):
    keys_file = tmp_path / "keys.toml"
    probe = add_key(keys_file, "probe")
    solo = add_key(keys_file, "solo", "--rpm", "3")
    shared = add_key(keys_file, "shared", "--rpm", "3")
    tpm = add_key(keys_file, "tokens", "--tpm", "100")
    with sim(tmp_path) as up:
        cfg = write_config(tmp_path, up.url, keys_file=keys_file)
        with gateway(cfg, "--workers", str(workers)) as gw:
            (a, wa), (b, _) = clients_on_distinct_workers(gw, probe, workers)

            # One SDK client, one connection, one worker: 3 requests pass, the 4th is refused.
            t0 = time.monotonic()
            for n in (1, 2, 3):
                h, body, w = ok(a, solo, max_tokens=2)
                elapsed = time.monotonic() - t0
                assert w == wa and body.choices
                assert h["x-ratelimit-limit-requests"] == "3"
                assert h["x-ratelimit-remaining-requests"] == str(3 - n)
                assert 20 * n - elapsed <= seconds(h["x-ratelimit-reset-requests"]) <= 20 * n + 0.001
                assert "x-ratelimit-limit-tokens" not in h
            err = refused(a, solo, max_tokens=2)
            elapsed = time.monotonic() - t0
            h = err.response.headers
            assert "solo" in err.message and "RPM" in err.message and solo not in err.message
            assert h["x-ratelimit-limit-requests"] == "3" and h["x-ratelimit-remaining-requests"] == "0"
            assert 60 - elapsed <= seconds(h["x-ratelimit-reset-requests"]) <= 60.001
            assert 20 - elapsed - 1 <= int(h["retry-after"]) <= 20  # whole seconds, rounded up
            assert (20 - elapsed) * 1000 - 1 <= int(h["retry-after-ms"]) <= 20000
            assert worker_of(h["x-request-id"]) == wa

            # One key over two connections (two workers when workers == 2): still 3 in all.
            t0 = time.monotonic()
            seen = set()
            for n, c in enumerate((a, b, a), start=1):
                h, _, w = ok(c, shared, max_tokens=2)
                seen.add(w)
                elapsed = time.monotonic() - t0
                assert h["x-ratelimit-remaining-requests"] == str(3 - n)
                assert 20 * n - elapsed <= seconds(h["x-ratelimit-reset-requests"]) <= 20 * n + 0.001
            assert len(seen) == min(2, workers)
            for c in (b, a):
                h = refused(c, shared, max_tokens=2).response.headers
                assert h["x-ratelimit-limit-requests"] == "3" and h["x-ratelimit-remaining-requests"] == "0"

            # Tokens: charged max_tokens + a prompt estimate up front, reconciled with vLLM's usage after.
            t0 = time.monotonic()
            h, body, _ = ok(a, tpm, max_tokens=60)
            charged = 100 - int(h["x-ratelimit-remaining-tokens"])  # a new, full bucket: exact
            assert h["x-ratelimit-limit-tokens"] == "100" and "x-ratelimit-limit-requests" not in h
            assert 60 < charged <= 100
            assert seconds(h["x-ratelimit-reset-tokens"]) == pytest.approx(charged * 0.6, abs=0.0011)
            used = body.usage.total_tokens
            assert body.usage.completion_tokens == 60 and used < charged  # the estimate is on the high side
            for c in (a, b):  # the same request again: over what is left, from either worker
                err = refused(c, tpm, max_tokens=60)
                elapsed = time.monotonic() - t0
                h = err.response.headers
                assert "TPM" in err.message and "Limit 100" in err.message and f"Requested {charged}" in err.message
                left = int(h["x-ratelimit-remaining-tokens"])
                assert 100 - used <= left <= 100 - used + elapsed * 100 / 60 + 1  # refunded to actual usage
                wait_ms = int(h["retry-after-ms"])
                assert (charged - (100 - used) - elapsed * 100 / 60) * 600 - 1 <= wait_ms <= (charged - (100 - used)) * 600 + 1
            assert gw.stop() == 0


def test_a_request_larger_than_the_whole_tpm_is_refused_once_and_the_sdk_does_not_retry(tmp_path):
    keys_file = tmp_path / "keys.toml"
    secret = add_key(keys_file, "small", "--tpm", "2000")
    with sim(tmp_path) as up:
        cfg = write_config(tmp_path, up.url, keys_file=keys_file)
        with gateway(cfg) as gw:
            # The SDK's own retry policy (2 retries): x-should-retry: false must stop it.
            c = openai.OpenAI(base_url=gw.url + "/v1", api_key=secret, max_retries=2, timeout=30)
            t0 = time.monotonic()
            with pytest.raises(openai.RateLimitError) as info:
                c.chat.completions.create(model="sim-chat", messages=ASK, max_tokens=5000)
            assert time.monotonic() - t0 < 5  # no back-off sleeps: refused once
            err = info.value
            assert err.response.headers["x-should-retry"] == "false"
            assert "retry-after" not in err.response.headers
            assert err.message.startswith("Error code: 429 - ")
            assert "Request too large for key 'small' on tokens per min (TPM): Limit 2000, Requested" in err.message
            # A request that fits is still served: nothing was charged for the refused one.
            assert c.chat.completions.create(model="sim-chat", messages=ASK, max_tokens=5).choices
            wait_for(lambda: len(gw.events("access")) >= 2, "the access lines")
            statuses = [e["status"] for e in gw.events("access")]
            assert statuses == [429, 200]  # the SDK sent the refused request once
