"""The simulated vLLM server through real sockets: the openai SDK as client, plus raw HTTP/1.1 for the
bytes the SDK hides (headers, chunking, keep-alive, disconnects, pacing).

Every test binds 127.0.0.1 port 0, runs under `trio.fail_after`, and stops the server it started.
The SDK is synchronous, so it runs in a worker thread (`trio.to_thread.run_sync`) while the trio loop
keeps serving.
"""

from __future__ import annotations

import contextlib
import json
import socket
import struct
from collections.abc import AsyncIterator, Callable
from typing import Any

import msgspec
import openai
import pytest
import trio

import backends.sim.wire
from backends.sim import SimOptions, SimServer

TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer", "minimum": 1}},
    "required": ["city", "days"]}}}]
HELLO = [{"role": "user", "content": "Say hello."}]


@contextlib.asynccontextmanager
async def running(**options: Any) -> AsyncIterator[tuple[SimServer, int]]:
    server = SimServer(SimOptions(**options))
    async with trio.open_nursery() as nursery:
        _, port = await nursery.start(server.serve, "127.0.0.1", 0)
        yield server, port
        nursery.cancel_scope.cancel()


def sdk(port: int, key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=key, max_retries=0, timeout=10)


async def call(fn: Callable[[], Any]) -> Any:
    return await trio.to_thread.run_sync(fn)


def post(path: str, body: Any, *extra: bytes) -> bytes:
    data = body if isinstance(body, bytes) else msgspec.json.encode(body)
    return (b"POST %s HTTP/1.1\r\nHost: sim\r\nContent-Type: application/json\r\nContent-Length: %d\r\n%s\r\n%s"
            % (path.encode(), len(data), b"".join(h + b"\r\n" for h in extra), data))


def get(path: str) -> bytes:
    return b"GET %s HTTP/1.1\r\nHost: sim\r\n\r\n" % path.encode()


async def exchange(port: int, request: bytes) -> bytes:
    """Send one request on a fresh connection (Connection: close) and read until EOF."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(request.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n", 1))
        data = b""
        while chunk := await stream.receive_some():
            data += chunk
    return data


def split(response: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = response.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), {k.lower(): v for k, v in headers.items()}, body


def dechunk(body: bytes) -> bytes:
    out = b""
    while body:
        size, _, rest = body.partition(b"\r\n")
        n = int(size, 16)
        if n == 0:
            break
        out, body = out + rest[:n], rest[n + 2:]
    return out


async def wait_for(predicate: Callable[[], bool]) -> None:
    while not predicate():
        await trio.sleep(0.005)


async def test_non_streaming_chat_through_the_sdk() -> None:
    with trio.fail_after(15):
        async with running() as (server, port):
            reply = await call(lambda: sdk(port).chat.completions.create(model="sim-chat", messages=HELLO))
            assert reply.id.startswith("chatcmpl-") and reply.object == "chat.completion"
            assert reply.choices[0].message.role == "assistant" and reply.choices[0].finish_reason == "stop"
            assert len(reply.choices[0].message.content.split()) == 16
            assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (10, 16)
            recorded = server.requests[-1]
            assert (recorded.method, recorded.target) == ("POST", "/v1/chat/completions")
            assert json.loads(recorded.body)["messages"] == HELLO
            assert json.loads(server.responses[-1])["id"] == reply.id
            stats = server.statistics()
            assert (stats.finished_total, stats.finished_stop, stats.running) == (1, 1, 0)


async def test_raw_response_head_matches_uvicorn_and_recording() -> None:
    with trio.fail_after(10):
        async with running() as (server, port):
            status, headers, body = split(await exchange(port, post("/v1/chat/completions", {
                "model": "sim-chat", "messages": HELLO, "max_tokens": 3})))
            assert status == 200 and list(headers) == ["date", "server", "content-length", "content-type",
                                                       "connection"]
            assert headers["server"] == "uvicorn" and headers["content-type"] == "application/json"
            assert int(headers["content-length"]) == len(body) and server.responses[-1] == body
            assert json.loads(body)["choices"][0]["finish_reason"] == "length"
            _, _, body = split(await exchange(port, post("/v1/completions", {
                "model": "sim-chat", "prompt": "x", "max_tokens": 1}, b"X-Request-Id: trace-7")))
            assert json.loads(body)["id"] == "cmpl-trace-7"  # vLLM honours X-Request-Id


async def test_streaming_chat_chunks_usage_and_done() -> None:
    with trio.fail_after(15):
        async with running() as (server, port):
            def stream() -> list[Any]:
                return list(sdk(port).chat.completions.create(
                    model="sim-chat", messages=HELLO, max_tokens=5, stream=True,
                    stream_options={"include_usage": True}))
            chunks = await call(stream)
            assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].choices[0].delta.content == ""
            tokens = chunks[1:-1]
            assert len(tokens) == 5 and all(c.choices[0].delta.content for c in tokens)
            assert [c.choices[0].finish_reason for c in tokens] == [None] * 4 + ["length"]
            assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 5
            assert server.responses[-1].endswith(b"data: [DONE]\n\n")
            status, headers, body = split(await exchange(port, post("/v1/chat/completions", {
                "model": "sim-chat", "messages": HELLO, "max_tokens": 2, "stream": True})))
            assert status == 200 and headers["content-type"] == "text/event-stream; charset=utf-8"
            assert headers["transfer-encoding"] == "chunked" and body.endswith(b"\r\n0\r\n\r\n")
            events = dechunk(body).split(b"\n\n")[:-1]
            assert len(events) == 4 and events[-1] == b"data: [DONE]"
            assert server.statistics().finished_length == 2


async def test_tool_calls_plain_and_streamed() -> None:
    with trio.fail_after(15):
        async with running(enable_auto_tool_choice=True, tool_call_parser="hermes") as (_, port):
            client = sdk(port)
            reply = await call(lambda: client.chat.completions.create(model="sim-chat", messages=HELLO, tools=TOOLS))
            call0 = reply.choices[0].message.tool_calls[0]
            assert reply.choices[0].finish_reason == "tool_calls" and call0.id.startswith("chatcmpl-tool-")
            assert json.loads(call0.function.arguments) == {"city": "sim", "days": 1}

            def streamed() -> tuple[str, str, str, str | None]:
                name, args, ident, finish = "", "", "", None
                for chunk in client.chat.completions.create(model="sim-chat", messages=HELLO, tools=TOOLS,
                                                            stream=True):
                    for delta in chunk.choices[0].delta.tool_calls or ():
                        ident = delta.id or ident
                        name += (delta.function.name or "") if delta.function else ""
                        args += (delta.function.arguments or "") if delta.function else ""
                    finish = chunk.choices[0].finish_reason or finish
                return ident, name, args, finish
            ident, name, args, finish = await call(streamed)
            assert ident.startswith("chatcmpl-tool-") and name == "get_weather" and finish == "tool_calls"
            assert json.loads(args) == {"city": "sim", "days": 1}


async def test_json_schema_output() -> None:
    schema = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer", "minimum": 18},
                                               "tags": {"type": "array", "items": {"type": "string"}, "minItems": 1}},
              "required": ["name", "age", "tags"], "additionalProperties": False}
    with trio.fail_after(15):
        async with running() as (_, port):
            reply = await call(lambda: sdk(port).chat.completions.create(
                model="sim-chat", messages=HELLO,
                response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": schema}}))
            assert json.loads(reply.choices[0].message.content) == {"name": "sim", "age": 18, "tags": ["sim"]}
            assert reply.choices[0].finish_reason == "stop"


async def test_errors_reach_the_sdk_as_vllm_sends_them() -> None:
    with trio.fail_after(15):
        async with running(max_model_len=64) as (server, port):
            client = sdk(port)
            with pytest.raises(openai.NotFoundError) as missing:
                await call(lambda: client.chat.completions.create(model="nope", messages=HELLO))
            assert missing.value.body["type"] == "NotFoundError" and missing.value.body["code"] == 404
            with pytest.raises(openai.BadRequestError) as overflow:
                await call(lambda: client.chat.completions.create(
                    model="sim-chat", messages=[{"role": "user", "content": "x" * 400}]))
            assert "context length is only 64 tokens" in overflow.value.message
            assert overflow.value.body["param"] == "input_tokens"
            status, _, body = split(await exchange(port, post("/v1/chat/completions", b"{oops")))
            assert status == 400 and json.loads(body)["error"]["type"] == "Bad Request"
            status, headers, body = split(await exchange(port, get("/v1/chat/completions")))
            assert (status, headers["allow"], body) == (405, "POST", b'{"detail":"Method Not Allowed"}')
            assert split(await exchange(port, get("/nope")))[0] == 404
            assert server.statistics().errors_total == 5


async def test_completions_embeddings_models_version() -> None:
    with trio.fail_after(15):
        async with running(embedding_dim=4) as (_, port):
            client = sdk(port)
            done = await call(lambda: client.completions.create(model="sim-chat", prompt="Once", max_tokens=3))
            assert done.object == "text_completion" and done.choices[0].finish_reason == "length"
            pieces = await call(lambda: [c.choices[0].text for c in client.completions.create(
                model="sim-chat", prompt="Once", max_tokens=3, stream=True)])
            assert "".join(pieces) == done.choices[0].text
            vectors = await call(lambda: client.embeddings.create(model="sim-embed", input=["a", "b"]))
            assert [len(d.embedding) for d in vectors.data] == [4, 4] and vectors.usage.prompt_tokens == 2
            assert abs(sum(v * v for v in vectors.data[0].embedding) - 1) < 1e-5  # base64 float32 decoded
            models = await call(lambda: [m.id for m in client.models.list()])
            assert models == ["sim-chat", "sim-embed"]
            status, _, body = split(await exchange(port, get("/v1/models")))
            card = json.loads(body)["data"][0]
            assert status == 200
            assert card["owned_by"] == "vllm" and card["max_model_len"] == 4096
            assert card["permission"][0]["object"] == "model_permission"
            assert json.loads(split(await exchange(port, get("/version")))[2]) == {"version": "0.17.0"}


async def test_keep_alive_serves_several_requests_on_one_connection() -> None:
    with trio.fail_after(10):
        async with running() as (server, port):
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            async with stream:
                # two pipelined requests in one write, then a third after the answers
                await stream.send_all(get("/health") + get("/version"))
                data = b""
                while data.count(b"HTTP/1.1 200 OK") < 2 or not data.endswith(b"}"):
                    data += await stream.receive_some()
                await stream.send_all(get("/health"))
                assert (await stream.receive_some()).startswith(b"HTTP/1.1 200 OK")
                assert server.statistics().open_connections == 1
            assert server.statistics().requests_total == 3


async def test_health_flag_and_api_key() -> None:
    with trio.fail_after(15):
        async with running(api_key="sekret") as (server, port):
            status, headers, body = split(await exchange(port, get("/health")))
            assert (status, headers["content-length"], body) == (200, "0", b"")
            server.healthy = False
            assert split(await exchange(port, get("/health")))[0] == 503
            with pytest.raises(openai.AuthenticationError):
                await call(lambda: sdk(port, "wrong").models.list())
            assert split(await exchange(port, get("/v1/models")))[2] == b'{"error":"Unauthorized"}'
            assert await call(lambda: len(sdk(port, "sekret").models.list().data)) == 2
            assert split(await exchange(port, get("/metrics")))[0] == 200  # outside /v1: no key


async def test_metrics_gauges_follow_a_running_stream() -> None:
    with trio.fail_after(10):
        async with running(tokens_per_s=200) as (server, port):
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            async with stream:
                await stream.send_all(post("/v1/chat/completions", {"model": "sim-chat", "messages": HELLO,
                                                                    "max_tokens": 40, "stream": True}))
                data = await stream.receive_some()
                while b"data: " not in data:
                    data += await stream.receive_some()
                metrics = split(await exchange(port, get("/metrics")))[2].decode()
                assert 'vllm:num_requests_running{engine="0",model_name="sim-chat"} 1.0' in metrics
                assert 'vllm:num_requests_waiting{engine="0",model_name="sim-chat"} 0.0' in metrics
                while not data.endswith(b"0\r\n\r\n"):
                    data += await stream.receive_some()
            await wait_for(lambda: server.statistics().running == 0)
            metrics = split(await exchange(port, get("/metrics")))[2].decode()
            assert 'vllm:num_requests_running{engine="0",model_name="sim-chat"} 0.0' in metrics
            assert ('vllm:request_success_total{engine="0",finished_reason="length",model_name="sim-chat"} 1.0'
                    in metrics)
            assert 'vllm:generation_tokens_total{engine="0",model_name="sim-chat"} 40.0' in metrics
            assert 'vllm:prompt_tokens_total{engine="0",model_name="sim-chat"} 10.0' in metrics


async def test_client_disconnect_cancels_generation() -> None:
    with trio.fail_after(10):
        async with running(tokens_per_s=20, latency_ms=60_000) as (server, port):
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            await stream.send_all(post("/v1/chat/completions", {"model": "sim-chat", "messages": HELLO,
                                                                "max_tokens": 200, "stream": True}))
            data = b""
            while data.count(b"data: ") < 2:
                data += await stream.receive_some()
            assert server.statistics().running == 1
            await stream.aclose()
            await wait_for(lambda: server.statistics().cancelled_total == 1)
            assert server.statistics().running == 0 and server.statistics().finished_total == 0
            # a non-streaming answer still being "generated" is cancelled the same way
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            await stream.send_all(post("/v1/chat/completions", {"model": "sim-chat", "messages": HELLO}))
            await wait_for(lambda: server.statistics().running == 1)
            await stream.aclose()
            await wait_for(lambda: server.statistics().cancelled_total == 2)
            stats = server.statistics()
            assert (stats.running, stats.open_connections) == (0, 0)
            assert 'finished_reason="abort",model_name="sim-chat"} 2.0' in server.metrics_text().decode()


async def test_die_after_events_cuts_the_stream_abruptly() -> None:
    with trio.fail_after(10):
        async with running() as (server, port):
            server.die_after_events = 3
            status, _, body = split(await exchange(port, post("/v1/chat/completions", {
                "model": "sim-chat", "messages": HELLO, "max_tokens": 10, "stream": True})))
            assert status == 200 and not body.endswith(b"0\r\n\r\n")
            events = dechunk(body).split(b"\n\n")[:-1]
            assert len(events) == 3 and b"[DONE]" not in body
            assert server.statistics().cancelled_total == 1
            server.die_after_events = 2
            with pytest.raises(openai.APIConnectionError):  # httpx: incomplete chunked body
                await call(lambda: list(sdk(port).chat.completions.create(
                    model="sim-chat", messages=HELLO, max_tokens=10, stream=True)))


async def test_pacing_follows_the_configured_rate() -> None:
    rate, tokens = 100.0, 60
    with trio.fail_after(10):
        async with running(tokens_per_s=rate, ttft_ms=50) as (_, port):
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            async with stream:
                sent = trio.current_time()
                await stream.send_all(post("/v1/chat/completions", {"model": "sim-chat", "messages": HELLO,
                                                                    "max_tokens": tokens, "stream": True}))
                data, seen, stamps = b"", 0, []
                while not data.endswith(b"0\r\n\r\n"):
                    data += await stream.receive_some()
                    now, count = trio.current_time(), data.count(b'"delta":{"content"')
                    stamps += [now] * (count - seen)
                    seen = count
    assert len(stamps) == tokens and stamps[0] - sent >= 0.05
    measured = (tokens - 1) / (stamps[-1] - stamps[0])
    assert abs(measured - rate) / rate < 0.05, measured


async def test_bad_input_and_idle_connections_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(backends.sim.wire, "KEEPALIVE_IDLE_S", 0.05)
    monkeypatch.setattr(backends.sim.wire, "MAX_BODY_BYTES", 1000)
    with trio.fail_after(10):
        async with running() as (server, port):
            status, headers, body = split(await exchange(port, b"\x16\x03\x01garbage\r\n\r\n"))
            assert (status, body, headers["connection"]) == (400, b"Invalid HTTP request received.", "close")
            status, _, _ = split(await exchange(port, post("/v1/chat/completions", b"x" * 1001)))
            assert status == 413
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            async with stream:  # an idle keep-alive connection is closed by the server
                assert await stream.receive_some() == b""
            await wait_for(lambda: server.statistics().open_connections == 0)


@pytest.mark.parametrize("rate", [0.0, 2000.0])
async def test_reset_mid_stream_aborts_only_that_generation(rate: float) -> None:
    # Pipelined bytes past MAX_HEAD_BYTES end the disconnect watch while pacing, so the failed write is
    # what notices the reset -- the path that must not take the whole server down.
    junk = b"x" * (backends.sim.wire.MAX_HEAD_BYTES + 1024)
    with trio.fail_after(10):
        async with running(tokens_per_s=rate) as (server, port):
            for _ in range(3):
                stream = await trio.open_tcp_stream("127.0.0.1", port)
                await stream.send_all(post("/v1/chat/completions", {
                    "model": "sim-chat", "messages": HELLO, "max_tokens": 4000, "stream": True}) + junk)
                data = b""
                while data.count(b"data: ") < 3:
                    data += await stream.receive_some()
                stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                await stream.aclose()  # RST: the server's next write fails
            await wait_for(lambda: server.statistics().cancelled_total == 3)
            assert split(await exchange(port, get("/health")))[0] == 200
            assert server.statistics().running == 0
