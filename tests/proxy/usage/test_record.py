"""usage/record.py: `usage_row`, the billing row of one finished request.

Built from real `Exchange` objects (request heads from the real parser) whose fields are filled
with distinct values, so that each `UsageRow` field is checked to come from its own Exchange field;
the key is a real record from a keys file, so "the name, never the secret" is checked against the
real secret and digest.
"""

from __future__ import annotations

import msgspec
import pytest

from proxy.admit import keys
from proxy.exchange import Exchange
from proxy.parse.request import RequestReader
from proxy.usage.log import UsageRow
from proxy.usage.record import BILLED, usage_row


def exchange(endpoint: str, *, rid: bytes = b"req-42") -> Exchange:
    reader = RequestReader()
    reader.feed(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nX-Request-Id: " + rid + b"\r\n"
                b"Content-Length: 0\r\n\r\n")
    ex = Exchange(None, reader.next_head(), "127.0.0.1")
    ex.endpoint = endpoint
    return ex


def filled(endpoint: str, key) -> Exchange:
    ex = exchange(endpoint)
    ex.ts = 1718000000.5
    ex.key = key
    ex.model = "sim-chat"
    ex.tier = "local"
    ex.stream = True
    ex.status = 200
    ex.prompt_tokens = 11
    ex.completion_tokens = 22
    ex.total_tokens = 33
    ex.estimated = True
    ex.t0 = 100.0
    ex.t_first_byte = 100.25
    ex.t_end = 101.5
    ex.wake_ms = 750.0
    ex.upstream = "127.0.0.1:8000"
    ex.error_type = "upstream_timeout"
    return ex


@pytest.fixture
def alice(tmp_path):
    path = tmp_path / "keys.toml"
    secret = keys.add(path, "alice", rpm=10)
    return keys.KeyStore.from_file(path).lookup(secret.encode()), secret


def test_billed_endpoints():
    # Every route that makes vLLM compute; not what costs no GPU time or is not new work.
    assert BILLED == {"chat", "completions", "embeddings", "responses", "messages", "transcriptions",
                      "translations", "rerank", "score", "pooling", "classify"}


@pytest.mark.parametrize("endpoint", ["models", "healthz", "metrics", "unknown", "", "count_tokens", "tokenize",
                                      "detokenize", "response", "response_cancel", "version", "preflight"])
def test_unbilled_endpoints_get_no_row(endpoint):
    ex = exchange(endpoint)
    ex.status = 200
    assert usage_row(ex) is None


@pytest.mark.parametrize("endpoint", ["chat", "completions", "embeddings"])
def test_every_field_is_copied_from_the_exchange(alice, endpoint):
    key, _ = alice
    row = usage_row(filled(endpoint, key))
    assert row == UsageRow(
        ts=1718000000.5, request_id="req-42", key_name="alice", model="sim-chat", tier="local",
        endpoint=endpoint, stream=True, status=200, prompt_tokens=11, completion_tokens=22, total_tokens=33,
        estimated=True, ttfb_ms=250.0, latency_ms=1500.0, wake_ms=750.0, upstream="127.0.0.1:8000",
        error_type="upstream_timeout",
    )
    assert set(msgspec.structs.asdict(row)) == set(UsageRow.__struct_fields__)


def test_a_fresh_exchange_gives_the_defaults():
    ex = exchange("chat")
    ex.t_end = ex.t0 + 0.002
    row = usage_row(ex)
    assert (row.key_name, row.model, row.tier, row.stream, row.status) == (None, None, None, False, 0)
    assert (row.prompt_tokens, row.completion_tokens, row.total_tokens, row.estimated) == (None, None, None, False)
    assert (row.ttfb_ms, row.wake_ms, row.upstream, row.error_type) == (None, None, None, None)
    assert row.latency_ms == pytest.approx(2.0)
    assert row.ts == ex.ts and row.request_id == "req-42"


def test_errors_are_billed_rows_too():
    ex = exchange("chat")
    ex.status, ex.error_type = 429, "rate_limit_exceeded"
    row = usage_row(ex)
    assert (row.status, row.error_type, row.endpoint) == (429, "rate_limit_exceeded", "chat")


def test_the_key_is_named_never_the_secret(alice):
    key, secret = alice
    row = usage_row(filled("chat", key))
    assert row.key_name == "alice"
    encoded = msgspec.json.encode(row).decode()
    assert secret not in encoded
    assert key.hash not in encoded and key.hash[7:] not in encoded
    assert key.prefix not in encoded


def test_generated_request_id_is_text():
    ex = exchange("chat", rid=b"not valid!")
    row = usage_row(ex)
    assert isinstance(row.request_id, str)
    assert row.request_id == ex.request_id.decode() and row.request_id != "not valid!"


def test_a_request_without_vllms_count_is_recorded_at_its_charge_and_estimated():
    ex = exchange("chat")
    ex.status, ex.t_upstream, ex.charged_tokens = 499, ex.t0, 40
    row = usage_row(ex)
    assert (row.prompt_tokens, row.completion_tokens, row.total_tokens, row.estimated) == (None, None, 40, True)
    ex.charged_tokens = 0  # a key without a token limit: nothing to report but that it is unknown
    row = usage_row(ex)
    assert (row.total_tokens, row.estimated) == (None, True)


def test_a_request_that_cost_nothing_is_not_estimated():
    ex = exchange("chat")
    ex.status, ex.charged_tokens = 503, 40  # never sent upstream
    assert (usage_row(ex).total_tokens, usage_row(ex).estimated) == (None, False)
    ex.t_upstream, ex.upstream, ex.status = ex.t0, "127.0.0.1:8000", 400  # refused by the upstream
    assert (usage_row(ex).total_tokens, usage_row(ex).estimated) == (None, False)
