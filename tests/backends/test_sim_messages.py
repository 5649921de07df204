"""The simulated vLLM's Anthropic Messages API through real sockets: the anthropic SDK as client
(messages.create, messages.stream, messages.count_tokens), raw HTTP for the exact bytes vLLM's
converter writes (exclude_unset/exclude_none dumps, event framing), errors in Anthropic's envelope,
tool use behind the tool-choice flags, and the books.

Every test binds 127.0.0.1 port 0, runs under `trio.fail_after`, and stops the server it started.
"""

from __future__ import annotations

import json
from typing import Any

import anthropic
import pytest
import trio

from tests.support.sim_client import anthropic_client as client
from tests.support.sim_client import off_loop as call
from tests.support.sim_client import running

ASK = [{"role": "user", "content": "Say hello."}]
TOOLS = [{"name": "get_weather", "description": "Weather", "input_schema": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}]




def events(text: str) -> list[tuple[str, dict[str, Any]]]:
    assert text.endswith("\n\n") and "[DONE]" not in text
    out = []
    for frame in text[:-2].split("\n\n"):
        name, data = frame.split("\n")
        assert name.startswith("event: ") and data.startswith("data: ")
        payload = json.loads(data[6:])
        assert payload["type"] == name[7:]
        out.append((name[7:], payload))
    return out


PROMPT = 3 + 4 + 3  # the chat rule for one 10-character user message


async def test_create_with_the_sdk_and_the_exact_body() -> None:
    with trio.fail_after(15):
        async with running() as (server, port, c):
            msg = await call(lambda: client(port).messages.create(model="sim-chat", max_tokens=5, messages=ASK))
            assert msg.type == "message" and msg.role == "assistant" and msg.id.startswith("chatcmpl-")
            assert msg.stop_reason == "max_tokens" and msg.usage.input_tokens == PROMPT
            assert msg.usage.output_tokens == 5 and len(msg.content[0].text.split()) == 5
            r = await c.post("/v1/messages", json={"model": "sim-chat", "max_tokens": 100, "messages": ASK,
                                                   "system": [{"type": "text", "text": "Be "}, {"type": "text",
                                                                                             "text": "brief."}]})
            body = r.json()
            assert r.status_code == 200
            assert list(body) == ["id", "type", "role", "content", "model", "stop_reason", "usage"]  # no nulls
            assert body["stop_reason"] == "end_turn" and body["content"][0]["type"] == "text"
            assert body["usage"] == {"input_tokens": PROMPT + 4 + 3, "output_tokens": 16}  # system "Be brief."
            r = await c.post("/v1/messages", json={"model": "sim-chat", "max_tokens": 3, "messages": ASK},
                             headers={"x-request-id": "abc"})
            assert r.json()["id"] == "chatcmpl-abc"
            stats = server.statistics()
            assert stats.finished_total == 3 and stats.generation_tokens_total == 5 + 16 + 3


async def test_stream_events_exactly_as_vllm_converts_them() -> None:
    with trio.fail_after(15):
        async with running() as (server, port, c):
            r = await c.post("/v1/messages", json={"model": "sim-chat", "max_tokens": 2, "stream": True,
                                                   "messages": ASK})
            got = events(r.text)
            assert [k for k, _ in got] == ["message_start", "content_block_start", "content_block_delta",
                                           "content_block_delta", "content_block_stop", "message_delta",
                                           "message_stop"]
            start = got[0][1]
            assert list(start) == ["type", "message"]
            assert list(start["message"]) == ["id", "content", "model", "stop_reason", "stop_sequence", "usage"]
            assert start["message"]["usage"] == {"input_tokens": PROMPT, "output_tokens": 0}
            assert got[1][1] == {"type": "content_block_start", "content_block": {"type": "text", "text": ""},
                                 "index": 0}
            assert list(got[2][1]) == ["type", "delta", "index"] and got[2][1]["delta"]["type"] == "text_delta"
            assert got[4][1] == {"type": "content_block_stop", "index": 0}
            assert got[5][1] == {"type": "message_delta", "delta": {"stop_reason": "max_tokens"},
                                 "usage": {"input_tokens": PROMPT, "output_tokens": 2}}
            assert got[6][1] == {"type": "message_stop"}

            def streamed() -> tuple[str, Any]:
                with client(port).messages.stream(model="sim-chat", max_tokens=50, messages=ASK) as stream:
                    text = "".join(stream.text_stream)
                    return text, stream.get_final_message()
            text, final = await call(streamed)
            assert final.content[0].text == text and len(text.split()) == 16
            assert final.stop_reason == "end_turn" and final.usage.output_tokens == 16
            assert server.statistics().generation_tokens_total == 2 + 16


async def test_count_tokens() -> None:
    with trio.fail_after(15):
        async with running() as (_server, port, c):
            counted = await call(lambda: client(port).messages.count_tokens(model="sim-chat", messages=ASK))
            assert counted.input_tokens == PROMPT
            r = await c.post("/v1/messages/count_tokens", json={"model": "sim-chat", "messages": ASK,
                                                                "system": "Be brief."})
            assert r.json() == {"input_tokens": PROMPT + 7, "context_management": {"original_input_tokens": PROMPT + 7}}
            r = await c.post("/v1/messages/count_tokens", json={"model": "sim-chat", "messages": ASK,
                                                                "tools": TOOLS})
            assert r.status_code == 400  # tools imply tool_choice "auto", refused without the flags
            assert r.json() == {"type": "error", "error": {
                "type": "BadRequestError",
                "message": '"auto" tool choice requires --enable-auto-tool-choice and --tool-call-parser to be set'}}


async def test_errors_in_anthropic_envelope() -> None:
    with trio.fail_after(15):
        async with running(max_model_len=30) as (_server, port, c):
            r = await c.post("/v1/messages", json={"model": "nope", "max_tokens": 5, "messages": ASK})
            assert r.status_code == 404 and r.json() == {"type": "error", "error": {
                "type": "NotFoundError", "message": "The model `nope` does not exist."}}
            with pytest.raises(anthropic.NotFoundError):
                await call(lambda: client(port).messages.create(model="nope", max_tokens=5, messages=ASK))
            r = await c.post("/v1/messages", json={"model": "sim-chat", "max_tokens": 500, "messages": ASK})
            assert r.status_code == 400 and r.json()["error"]["type"] == "BadRequestError"
            assert "max_completion_tokens=500" in r.json()["error"]["message"]
            # request-body validation goes through vLLM's global handler: the OpenAI envelope
            r = await c.post("/v1/messages", json={"model": "sim-chat", "messages": ASK})
            assert r.status_code == 400 and r.json()["error"]["type"] == "Bad Request"
            r = await c.post("/v1/messages", json={"model": "sim-chat", "max_tokens": 0, "messages": ASK})
            assert "max_tokens must be positive" in r.json()["error"]["message"]
            r = await c.post("/v1/messages", json={"model": "sim-chat", "max_tokens": 1, "messages": ASK,
                                                   "tool_choice": {"type": "tool"}, "tools": TOOLS})
            assert "tool_choice.name is required" in r.json()["error"]["message"]


async def test_tool_use_with_the_flags() -> None:
    with trio.fail_after(15):
        async with running(enable_auto_tool_choice=True, tool_call_parser="hermes") as (_server, port, c):
            msg = await call(lambda: client(port).messages.create(model="sim-chat", max_tokens=200, messages=ASK,
                                                                  tools=TOOLS))
            use = msg.content[0]
            assert msg.stop_reason == "tool_use" and use.type == "tool_use" and use.name == "get_weather"
            assert use.input == {"city": "sim"} and use.id.startswith("chatcmpl-tool-")
            r = await c.post("/v1/messages", json={"model": "sim-chat", "max_tokens": 200, "stream": True,
                                                   "messages": ASK, "tools": TOOLS})
            got = events(r.text)
            block = got[1][1]["content_block"]
            assert block == {"type": "tool_use", "id": block["id"], "name": "get_weather", "input": {}}
            partial = "".join(d["delta"]["partial_json"] for k, d in got if k == "content_block_delta")
            assert json.loads(partial) == {"city": "sim"}
            assert got[-2][1]["delta"] == {"stop_reason": "tool_use"}

            def final_tool() -> Any:
                with client(port).messages.stream(model="sim-chat", max_tokens=200, messages=ASK,
                                                  tools=TOOLS, tool_choice={"type": "any"}) as stream:
                    return stream.get_final_message()
            final = await call(final_tool)
            assert final.content[0].input == {"city": "sim"}
            # after a tool result the model answers in text
            turn = [*ASK, {"role": "assistant", "content": [{"type": "tool_use", "id": use.id, "name": use.name,
                                                            "input": use.input}]},
                    {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "sunny"}]}]
            r = await c.post("/v1/messages", json={"model": "sim-chat", "max_tokens": 50, "messages": turn,
                                                   "tools": TOOLS})
            assert r.json()["content"][0]["type"] == "text" and r.json()["stop_reason"] == "end_turn"
        async with running(enable_auto_tool_choice=True, break_tool_json=True) as (_server, _port, c):
            r = await c.post("/v1/messages", json={"model": "sim-chat", "max_tokens": 200, "messages": ASK,
                                                   "tools": TOOLS})
            assert r.status_code == 500 and r.json()["error"]["type"] == "internal_error"


async def test_disconnect_mid_stream_is_an_abort() -> None:
    with trio.fail_after(15):
        async with running(tokens_per_s=50) as (server, _port, c):
            async with c.stream("POST", "/v1/messages", json={"model": "sim-chat", "max_tokens": 500, "stream": True,
                                                              "messages": ASK}) as r:
                async for line in r.aiter_lines():
                    if "text_delta" in line:
                        break
            while server.statistics().running:
                await trio.sleep(0.01)
            stats = server.statistics()
            assert stats.cancelled_total == 1 and 1 <= stats.generation_tokens_total < 500
