"""The downstream HTTP/1.1 side over real sockets: framing, limits, timeouts and abuse cases.

A tier whose upstream does not matter points at `dead_upstream()` (tests/support/refusing.py): an
address that refuses connections for the whole test. Responses are read to the end of their framing or
to the server's close, never "until a pause".
"""

from __future__ import annotations

import msgspec
import trio

from tests.support.gateway import (
    CHAT,
    error_of,
    make_config,
    one_response,
    post,
    raw_request,
    split_response,
    start_gateway,
    start_sim,
)


async def test_garbage_gets_400_and_close(nursery, dead_upstream):
    gw = await start_gateway(nursery, make_config([dead_upstream()]))
    with trio.fail_after(5):
        raw = await raw_request(gw.port, b"\x16\x03\x01 hello not http\r\n\r\n")
    status, headers, body = split_response(raw)
    assert status == 400
    assert error_of(body)["type"] == "invalid_request_error"
    assert headers["connection"] == "close"


async def test_head_too_large_gets_431(nursery, dead_upstream):
    gw = await start_gateway(nursery, make_config([dead_upstream()], server={"max_head_bytes": 4096}))
    big = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 8000 + b"\r\n\r\n"
    with trio.fail_after(5):
        raw = await raw_request(gw.port, big)
    assert split_response(raw)[0] == 431


async def test_content_length_and_transfer_encoding_together_is_400(nursery, dead_upstream):
    gw = await start_gateway(nursery, make_config([dead_upstream()]))
    req = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
           b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n")
    with trio.fail_after(5):
        raw = await raw_request(gw.port, req)
    status, headers, body = split_response(raw)
    assert status == 400 and error_of(body)["type"] == "invalid_request_error"
    assert headers["connection"] == "close"


async def test_oversized_content_length_refused_before_body_is_sent(nursery, dead_upstream):
    gw = await start_gateway(nursery, make_config([dead_upstream()], server={"max_body_bytes": 1000}))
    head = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 100000000\r\n\r\n")
    with trio.fail_after(5):
        raw = await raw_request(gw.port, head)  # the 100 MB body is never sent
    status, headers, body = split_response(raw)
    assert status == 413
    assert error_of(body)["code"] == "request_too_large"
    assert headers["connection"] == "close"


async def test_oversized_chunked_body_is_413(nursery, dead_upstream):
    gw = await start_gateway(nursery, make_config([dead_upstream()], server={"max_body_bytes": 1000}))
    chunk = b"x" * 800
    req = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
           b"Transfer-Encoding: chunked\r\n\r\n" + (b"320\r\n" + chunk + b"\r\n") * 2 + b"0\r\n\r\n")
    with trio.fail_after(5):
        raw = await raw_request(gw.port, req)
    assert split_response(raw)[0] == 413


async def test_slow_head_gets_408(nursery, dead_upstream):
    gw = await start_gateway(nursery, make_config([dead_upstream()], server={"request_head_s": 0.3}))
    with trio.fail_after(5):
        raw = await raw_request(gw.port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # never finished
    assert split_response(raw)[0] == 408


async def test_slow_body_gets_408(nursery, dead_upstream):
    gw = await start_gateway(nursery, make_config([dead_upstream()], server={"request_body_s": 0.3}))
    req = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
           b"Content-Length: 100\r\n\r\n{\"model\"")
    with trio.fail_after(5):
        raw = await raw_request(gw.port, req)
    assert split_response(raw)[0] == 408


async def test_idle_keepalive_connection_is_closed_quietly(nursery, dead_upstream):
    gw = await start_gateway(nursery, make_config([dead_upstream()], server={"keepalive_idle_s": 0.3}))
    with trio.fail_after(5):
        stream = await trio.open_tcp_stream("127.0.0.1", gw.port)
        async with stream:
            assert await stream.receive_some(100) == b""  # closed, nothing sent


async def test_keepalive_and_pipelining(nursery):
    _sim, url = await start_sim(nursery)
    gw = await start_gateway(nursery, make_config([url]))
    two = post(CHAT) + b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n" + post(CHAT)
    with trio.fail_after(10):
        stream = await trio.open_tcp_stream("127.0.0.1", gw.port)
        async with stream:
            await stream.send_all(two)
            data = b""
            while data.count(b"HTTP/1.1 200") < 3:
                chunk = await stream.receive_some(65536)
                assert chunk, data
                data += chunk
    assert data.count(b'"chat.completion"') == 2
    assert b'{"status":"ok"}' in data


async def test_non_json_content_type_is_400(nursery):
    sim, url = await start_sim(nursery)
    gw = await start_gateway(nursery, make_config([url]))
    req = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: text/plain\r\n"
           b"Content-Length: " + str(len(CHAT)).encode() + b"\r\n\r\n" + CHAT)
    with trio.fail_after(5):
        raw = await one_response(gw.port, req)
    status, _, body = split_response(raw)
    assert status == 400 and error_of(body)["code"] == "unsupported_content_type"
    assert len(sim.requests) == 0


async def test_malformed_json_is_400_and_never_reaches_upstream(nursery):
    sim, url = await start_sim(nursery)
    gw = await start_gateway(nursery, make_config([url]))
    with trio.fail_after(5):
        raw = await one_response(gw.port, post(b'{"model": "sim-chat", "messages": [}'))
    status, _, body = split_response(raw)
    assert status == 400 and error_of(body)["type"] == "invalid_request_error"
    assert len(sim.requests) == 0


async def test_unknown_path_404_and_wrong_method_405(nursery, dead_upstream):
    gw = await start_gateway(nursery, make_config([dead_upstream()]))
    with trio.fail_after(5):
        raw = await raw_request(gw.port, b"GET /v2/nothing HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert split_response(raw)[0] == 404
        raw = await raw_request(gw.port, b"GET /v1/chat/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert split_response(raw)[0] == 405


async def test_request_and_response_bytes_pass_unchanged(nursery):
    """What the client sent is what vLLM got; what vLLM sent is what the client got (SSE included)."""
    sim, url = await start_sim(nursery)
    gw = await start_gateway(nursery, make_config([url]))
    body = (b'{"model": "sim-chat",  "messages": [{"role": "user", "content": "h\\u00e9llo"}], '
            b'"top_k": 5, "repetition_penalty": 1.1, "guided_json": {"type": "object"}, '
            b'"chat_template_kwargs": {"enable_thinking": false}, "stream": true, '
            b'"stream_options": {"include_usage": true}}')
    with trio.fail_after(10):
        raw = await raw_request(gw.port, post(body, extra=b"Connection: close\r\nX-Custom: kept\r\n"))
    status, headers, chunked = split_response(raw)
    assert status == 200
    assert headers["content-type"].startswith("text/event-stream")
    assert headers["cache-control"] == "no-cache" and headers["x-accel-buffering"] == "no"
    assert sim.requests[-1].body == body
    got = _dechunk(chunked)
    assert got == sim.responses[-1]
    assert got.endswith(b"data: [DONE]\n\n")
    sent_headers = dict(sim.requests[-1].headers)
    assert sent_headers[b"x-custom"] == b"kept"
    assert b"connection" not in sent_headers or sent_headers[b"connection"] != b"close"


async def test_usage_is_requested_for_accounting_but_hidden_from_a_client_that_did_not_ask(nursery):
    sim, url = await start_sim(nursery)
    gw = await start_gateway(nursery, make_config([url]))
    body = b'{"model": "sim-chat", "stream": true, "max_tokens": 5, "messages": [{"role": "user", "content": "x"}]}'
    with trio.fail_after(10):
        raw = await raw_request(gw.port, post(body, extra=b"Connection: close\r\n"))
    got = _dechunk(split_response(raw)[2])
    sent = sim.responses[-1]
    assert b'"include_usage":true' in sim.requests[-1].body.replace(b" ", b"")
    events = sent.split(b"\n\n")
    usage_events = [e for e in events if b'"choices":[]' in e and b'"usage"' in e]
    assert len(usage_events) == 1
    assert got == sent.replace(usage_events[0] + b"\n\n", b"")  # everything else byte for byte
    assert got.endswith(b"data: [DONE]\n\n")


def _dechunk(data: bytes) -> bytes:
    out = b""
    while data:
        size_line, _, rest = data.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            break
        out += rest[:size]
        data = rest[size + 2:]
    return out


async def test_client_authorization_is_not_forwarded_and_upstream_key_is(nursery):
    sim, url = await start_sim(nursery, api_key="vllm-secret")
    gw = await start_gateway(nursery, make_config([url], upstream_api_key="vllm-secret"))
    with trio.fail_after(10):
        raw = await raw_request(gw.port, post(CHAT, extra=b"Authorization: Bearer client-token\r\nConnection: close\r\n"))
    assert split_response(raw)[0] == 200
    headers = sim.requests[-1].headers
    auths = [v for k, v in headers if k == b"authorization"]
    assert auths == [b"Bearer vllm-secret"]


async def test_models_answered_from_config_when_upstream_down(nursery, dead_upstream):
    gw = await start_gateway(nursery, make_config([dead_upstream()]))
    with trio.fail_after(5):
        raw = await raw_request(gw.port, b"GET /v1/models HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    status, _, body = split_response(raw)
    assert status == 200
    listing = msgspec.json.decode(body)
    assert listing["object"] == "list"
    assert {m["id"] for m in listing["data"]} == {"sim-chat", "sim-embed"}


async def test_unsupported_transfer_coding_501_and_http_version_505(nursery, dead_upstream):
    gw = await start_gateway(nursery, make_config([dead_upstream()]))
    with trio.fail_after(5):
        raw = await raw_request(gw.port, b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                                         b"Transfer-Encoding: gzip\r\n\r\n")
        status, headers, body = split_response(raw)
        assert status == 501 and headers["connection"] == "close"
        assert error_of(body)["type"] == "invalid_request_error"
        raw = await raw_request(gw.port, b"GET /healthz HTTP/2.0\r\nHost: x\r\n\r\n")
        assert split_response(raw)[0] == 505


async def test_http10_client_gets_a_close_delimited_stream(nursery):
    _sim, url = await start_sim(nursery)
    gw = await start_gateway(nursery, make_config([url]))
    body = b'{"model": "sim-chat", "stream": true, "max_tokens": 3, "messages": [{"role": "user", "content": "x"}]}'
    req = (b"POST /v1/chat/completions HTTP/1.0\r\nContent-Type: application/json\r\nContent-Length: "
           + str(len(body)).encode() + b"\r\n\r\n" + body)
    with trio.fail_after(10):
        raw = await raw_request(gw.port, req)
    status, headers, got = split_response(raw)
    assert status == 200 and "transfer-encoding" not in headers and headers["connection"] == "close"
    assert got.endswith(b"data: [DONE]\n\n")  # raw SSE bytes, no chunk framing
