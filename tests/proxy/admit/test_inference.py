"""admit/inference.py: what is refused before a byte of the body is read, and what before an upstream.

`check_declared` is called on request heads from the real parser. `forward_inference` is driven through
`dispatch` on a real `Gateway` (a subclass that keeps the finished records) with a real `Downstream` over
a `socket.socketpair()`, in front of a real simulated vLLM (`start_sim`): every refusal is checked to
leave the sim's request counter at zero, and the happy path to reach it exactly once with the
client's original bytes.
"""

from __future__ import annotations

import msgspec
import pytest

from proxy import errors
from proxy.admit import keys
from proxy.admit.inference import check_declared
from proxy.gateway import build_runtime
from proxy.limits.buckets import RateLimiter
from proxy.parse.request import RequestReader
from tests.support.gateway import (
    CountingGateway,
    dispatch_one,
    error_of,
    make_config,
    split_response,
    start_sim,
)

CHAT = b'{"model":"sim-chat","messages":[{"role":"user","content":"hi"}],"max_tokens":5}'


def head(raw: bytes):
    reader = RequestReader()
    reader.feed(raw)
    return reader.next_head()


def post(body: bytes, *, path: bytes = b"/v1/chat/completions", ctype: bytes = b"application/json",
         secret: str | None = None) -> bytes:
    auth = b"" if secret is None else b"Authorization: Bearer " + secret.encode() + b"\r\n"
    return (b"POST " + path + b" HTTP/1.1\r\nHost: x\r\nContent-Type: " + ctype + b"\r\n" + auth
            + b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)


async def serve_one(gw, raw: bytes) -> bytes:
    return (await dispatch_one(gw, raw))[0]


class FakeClock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


@pytest.fixture
async def sim(nursery):
    server, url = await start_sim(nursery)
    return server, url


def requests_seen(server) -> int:
    return server.statistics().requests_total


def gateway(url: str, **kw) -> CountingGateway:
    return CountingGateway(build_runtime(make_config([url], **kw)))


# -- check_declared -----------------------------------------------------------------------------------


def declared(*lines: bytes):
    return head(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n" + b"".join(x + b"\r\n" for x in lines)
                + b"\r\n")


def test_declared_length_over_the_limit_is_413():
    with pytest.raises(errors.ApiError) as exc:
        check_declared(declared(b"Content-Type: application/json", b"Content-Length: 1001"), 1000)
    err = exc.value
    assert (err.status, err.type, err.code, err.param) == (413, "invalid_request_error", "request_too_large", None)
    assert err.message == "Request body exceeds the limit of 1000 bytes."


def test_declared_length_at_the_limit_passes():
    check_declared(declared(b"Content-Type: application/json", b"Content-Length: 1000"), 1000)
    check_declared(declared(b"Transfer-Encoding: chunked", b"Content-Type: application/json"), 1000)


@pytest.mark.parametrize("ctype, shown", [
    (b"text/plain", "text/plain"),
    (b"application/x-www-form-urlencoded", "application/x-www-form-urlencoded"),
    (b"Application/XML; charset=utf-8", "application/xml"),
    (b"application/json-seq", "application/json-seq"),
    (b"multipart/form-data; boundary=application/json", "multipart/form-data"),
])
def test_non_json_content_type_is_400(ctype, shown):
    with pytest.raises(errors.ApiError) as exc:
        check_declared(declared(b"Content-Type: " + ctype, b"Content-Length: 2"), 1000)
    err = exc.value
    assert (err.status, err.type, err.code, err.param) == (
        400, "invalid_request_error", "unsupported_content_type", None)
    assert err.message == f"Unsupported Content-Type '{shown}': send application/json."


@pytest.mark.parametrize("ctype", [
    b"application/json", b"application/json; charset=utf-8", b"application/json;charset=UTF-8",
    b"APPLICATION/JSON", b"application/json ; foo=bar; baz",
])
def test_json_content_type_parameters_are_ignored(ctype):
    check_declared(declared(b"Content-Type: " + ctype, b"Content-Length: 2"), 1000)


def test_size_is_checked_before_the_content_type():
    with pytest.raises(errors.ApiError) as exc:
        check_declared(declared(b"Content-Type: text/plain", b"Content-Length: 5000"), 1000)
    assert exc.value.status == 413


async def test_413_is_sent_before_the_body_is_read(sim):
    server, url = sim
    gw = gateway(url, server={"max_body_bytes": 1000})
    req = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
           b"Content-Length: 100000000\r\n\r\n")  # the body never comes: reading it would hang
    raw = await serve_one(gw, req)
    assert raw.startswith(b"HTTP/1.1 413 Content Too Large\r\n")
    _status, headers, body = split_response(raw)
    assert error_of(body)["code"] == "request_too_large"
    assert headers["connection"] == "close"
    assert requests_seen(server) == 0
    assert [(ex.status, ex.error_type) for ex in gw.finished] == [(413, "request_too_large")]


async def test_unsupported_content_type_over_the_wire(sim):
    server, url = sim
    gw = gateway(url)
    raw = await serve_one(gw, post(CHAT, ctype=b"text/plain; charset=utf-8"))
    assert raw.startswith(b"HTTP/1.1 400 Bad Request\r\n")
    assert error_of(split_response(raw)[2]) == {
        "message": "Unsupported Content-Type 'text/plain': send application/json.",
        "type": "invalid_request_error", "param": None, "code": "unsupported_content_type"}
    assert requests_seen(server) == 0


# -- forward_inference: refusals before an upstream ---------------------------------------------------


async def test_invalid_body_is_400_naming_the_field(sim):
    server, url = sim
    gw = gateway(url)
    raw = await serve_one(gw, post(b'{"model":"sim-chat"}'))
    status, _, body = split_response(raw)
    assert status == 400
    err = error_of(body)
    assert (err["type"], err["param"]) == ("invalid_request_error", "messages")
    assert requests_seen(server) == 0


async def test_unknown_model_is_404(sim):
    server, url = sim
    gw = gateway(url)
    raw = await serve_one(gw, post(b'{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}]}'))
    assert raw.startswith(b"HTTP/1.1 404 Not Found\r\n")
    assert error_of(split_response(raw)[2]) == {
        "message": "The model 'gpt-4o' does not exist or you do not have access to it.",
        "type": "invalid_request_error", "param": "model", "code": "model_not_found"}
    assert requests_seen(server) == 0
    [ex] = gw.finished
    assert (ex.status, ex.model, ex.tier, ex.endpoint) == (404, "gpt-4o", None, "chat")


async def test_a_key_without_the_tier_is_403(sim, tmp_path):
    server, url = sim
    path = tmp_path / "keys.toml"
    secret = keys.add(path, "alice", tiers=["elsewhere"])
    gw = gateway(url, keys_file=str(path))
    raw = await serve_one(gw, post(CHAT, secret=secret))
    assert raw.startswith(b"HTTP/1.1 403 Forbidden\r\n")
    assert error_of(split_response(raw)[2]) == {
        "message": "This API key may not use tier 'local' (model 'sim-chat').",
        "type": "permission_error", "param": None, "code": "tier_not_allowed"}
    assert requests_seen(server) == 0
    [ex] = gw.finished
    assert (ex.status, ex.error_type, ex.key.name, ex.tier) == (403, "tier_not_allowed", "alice", "local")


async def test_over_the_keys_limit_is_429_before_the_upstream(sim, tmp_path):
    server, url = sim
    path = tmp_path / "keys.toml"
    secret = keys.add(path, "alice", rpm=1, tiers=["local"])
    gw = gateway(url, keys_file=str(path))
    gw.limiter = RateLimiter(FakeClock())  # no refill between the two requests
    try:
        first = await serve_one(gw, post(CHAT, secret=secret))
    finally:
        gw.pool.close_all()
    status, headers, _ = split_response(first)
    assert status == 200
    assert (headers["x-ratelimit-limit-requests"], headers["x-ratelimit-remaining-requests"]) == ("1", "0")
    assert requests_seen(server) == 1
    second = await serve_one(gw, post(CHAT, secret=secret))
    assert second.startswith(b"HTTP/1.1 429 Too Many Requests\r\n")
    status, headers, body = split_response(second)
    assert headers["retry-after"] == "60"
    assert headers["retry-after-ms"] == "60000"
    assert headers["x-ratelimit-reset-requests"] == "1m0s"
    assert error_of(body) == {
        "message": "Rate limit reached for key 'alice' on requests per min (RPM): Limit 1. "
                   "Please try again in 1m0s.",
        "type": "rate_limit_error", "param": None, "code": "rate_limit_exceeded"}
    assert requests_seen(server) == 1  # the refused request never reached it
    assert [ex.status for ex in gw.finished] == [200, 429]


# -- forward_inference: the happy path ----------------------------------------------------------------


async def test_chat_reaches_the_sim_once_with_the_original_bytes(sim):
    server, url = sim
    gw = gateway(url)
    body = CHAT.replace(b'"hi"', b'"hi",  "name" : "u1"')  # odd spacing: must arrive unchanged
    try:
        raw = await serve_one(gw, post(body, ctype=b"application/json; charset=utf-8"))
    finally:
        gw.pool.close_all()
    status, _headers, answer = split_response(raw)
    assert status == 200
    assert msgspec.json.decode(answer)["object"] == "chat.completion"
    assert requests_seen(server) == 1
    [seen] = server.requests
    assert (seen.method, seen.target, seen.body) == ("POST", "/v1/chat/completions", body)
    [ex] = gw.finished
    assert (ex.status, ex.model, ex.tier, ex.stream, ex.endpoint) == (200, "sim-chat", "local", False, "chat")
    assert ex.upstream == url.removeprefix("http://")
    assert ex.total_tokens == ex.prompt_tokens + ex.completion_tokens and ex.completion_tokens > 0


async def test_embeddings_reach_the_sim(sim, tmp_path):
    server, url = sim
    path = tmp_path / "keys.toml"
    secret = keys.add(path, "alice", tiers=["local"])
    gw = gateway(url, keys_file=str(path))
    body = b'{"model":"sim-embed","input":"hello"}'
    try:
        raw = await serve_one(gw, post(body, path=b"/v1/embeddings", secret=secret))
    finally:
        gw.pool.close_all()
    status, _, answer = split_response(raw)
    assert status == 200
    assert msgspec.json.decode(answer)["object"] == "list"
    assert requests_seen(server) == 1
    [ex] = gw.finished
    assert (ex.status, ex.endpoint, ex.key.name) == (200, "embeddings", "alice")
