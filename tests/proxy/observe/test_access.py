"""observe/access.py: `access_fields`, the access log line of one finished request.

Unit checks on real `Exchange` objects with chosen timings (exact keys, values, rounding), and one
request through a real gateway in front of a real simulated vLLM with a keyed client and a marked
prompt: a `Gateway` subclass builds the line from the finished record, which must carry neither the
secret nor a byte of the prompt or the answer.
"""

from __future__ import annotations

import functools

import msgspec
import pytest
import trio

from proxy.admit import keys
from proxy.exchange import Exchange
from proxy.gateway import Gateway, build_runtime
from proxy.observe.access import access_fields
from proxy.parse.request import RequestReader
from proxy.process.services import run_gateway
from tests.support.gateway import make_config, raw_request, split_response, start_sim

KEYS = {"ts", "event", "request_id", "method", "endpoint", "key", "model", "tier", "stream", "status", "error",
        "upstream", "latency_ms", "ttfb_ms", "wake_ms", "prompt_tokens", "completion_tokens"}


def exchange(method: bytes = b"POST") -> Exchange:
    reader = RequestReader()
    reader.feed(method + b" /v1/chat/completions HTTP/1.1\r\nHost: x\r\nX-Request-Id: rid-7\r\n\r\n")
    return Exchange(None, reader.next_head(), "10.0.0.9")


def test_exact_keys_and_values(tmp_path):
    path = tmp_path / "keys.toml"
    secret = keys.add(path, "alice")
    ex = exchange()
    ex.ts = 1718000000.123456
    ex.endpoint, ex.key = "chat", keys.KeyStore.from_file(path).lookup(secret.encode())
    ex.model, ex.tier, ex.stream, ex.status = "sim-chat", "local", True, 200
    ex.error_type, ex.upstream, ex.wake_ms = None, "127.0.0.1:8000", 1234.5
    ex.prompt_tokens, ex.completion_tokens, ex.total_tokens = 5, 6, 11
    ex.t0, ex.t_first_byte, ex.t_end = 10.0, 10.0043219, 10.0123456
    fields = access_fields(ex)
    assert set(fields) == KEYS
    assert fields == {
        "ts": 1718000000.123, "event": "access", "request_id": "rid-7", "method": "POST", "endpoint": "chat",
        "key": "alice", "model": "sim-chat", "tier": "local", "stream": True, "status": 200, "error": None,
        "upstream": "127.0.0.1:8000", "latency_ms": 12.346, "ttfb_ms": 4.322, "wake_ms": 1234.5,
        "prompt_tokens": 5, "completion_tokens": 6,
    }
    line = msgspec.json.encode(fields).decode()
    assert secret not in line and ex.key.hash[7:] not in line


def test_no_key_no_first_byte():
    ex = exchange(b"GET")
    ex.endpoint, ex.status, ex.error_type = "unknown", 404, "unknown_url"
    ex.t0, ex.t_end = 5.0, 5.0005
    fields = access_fields(ex)
    assert set(fields) == KEYS
    assert (fields["method"], fields["key"], fields["ttfb_ms"], fields["error"]) == ("GET", None, None, "unknown_url")
    assert (fields["model"], fields["tier"], fields["upstream"], fields["wake_ms"]) == (None, None, None, None)
    assert fields["latency_ms"] == 0.5


@pytest.mark.parametrize("seconds, ms", [(0.0, 0.0), (0.0000004, 0.0), (0.0000006, 0.001), (1.23456789, 1234.568)])
def test_latency_is_rounded_to_microseconds(seconds, ms):
    ex = exchange()
    ex.t0 = 100.0
    ex.t_end = ex.t_first_byte = 100.0 + seconds
    fields = access_fields(ex)
    assert fields["latency_ms"] == ms and fields["ttfb_ms"] == ms


def test_the_total_is_not_in_the_line():
    # The line carries prompt and completion counts; the total is the usage row's.
    assert "total_tokens" not in access_fields(exchange())


class Recording(Gateway):
    def __init__(self, runtime) -> None:
        super().__init__(runtime)
        self.lines: list[dict] = []

    def request_finished(self, ex) -> None:
        super().request_finished(ex)
        self.lines.append(access_fields(ex))


async def test_a_real_request_logs_no_secret_and_no_content(nursery, tmp_path):
    _sim, url = await start_sim(nursery, reply="ANSWER-TEXT-CANARY")
    path = tmp_path / "keys.toml"
    secret = keys.add(path, "alice")
    config = make_config([url], keys_file=str(path))
    gw = Recording(build_runtime(config))
    _host, port = await nursery.start(functools.partial(run_gateway, config, gateway=gw))
    body = b'{"model":"sim-chat","messages":[{"role":"user","content":"PROMPT-TEXT-CANARY"}]}'
    req = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nConnection: close\r\n"
           b"Authorization: Bearer " + secret.encode() + b"\r\nContent-Length: " + str(len(body)).encode()
           + b"\r\n\r\n" + body)
    with trio.fail_after(10):
        raw = await raw_request(port, req)
    status, _, answer = split_response(raw)
    assert status == 200 and b"ANSWER-TEXT-CANARY" in answer
    [fields] = gw.lines
    assert (fields["key"], fields["status"], fields["model"], fields["endpoint"]) == ("alice", 200, "sim-chat", "chat")
    assert fields["prompt_tokens"] > 0 and fields["completion_tokens"] > 0
    line = msgspec.json.encode(fields)
    for secret_or_content in (secret.encode(), secret[:10].encode(), b"PROMPT-TEXT-CANARY", b"ANSWER-TEXT-CANARY",
                              b"Bearer"):
        assert secret_or_content not in line
    gw.server.drain()
