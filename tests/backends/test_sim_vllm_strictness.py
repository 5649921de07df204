"""Where the simulated vLLM is exactly as unkind as vLLM: tool choices refused without the tool flags
(`--enable-auto-tool-choice`, `--tool-call-parser`), and the in-band stream error of a generation the
engine fails (the "inband_error" fault), on every generating endpoint -- through real sockets.

Every test binds 127.0.0.1 port 0, runs under `trio.fail_after`, and stops the server it started.
"""

from __future__ import annotations

import io
import json
import wave
from typing import Any

import httpx
import openai
import pytest
import trio

from backends import probe
from backends.sim.cli import _parser, main, options_from
from tests.support.sim_client import running

TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
ASK = [{"role": "user", "content": "Weather?"}]
AUTO = '"auto" tool choice requires --enable-auto-tool-choice and --tool-call-parser to be set'
INBAND = (b'data: {"error": {"message": "Internal server error", "type": "InternalServerError", "param": null, '
          b'"code": 500}}\n\ndata: [DONE]\n\n')




def chat(**fields: Any) -> dict[str, Any]:
    return {"model": "sim-chat", "messages": ASK, **fields}


def bad(message: str) -> dict[str, Any]:
    return {"error": {"message": message, "type": "BadRequestError", "param": None, "code": 400}}


async def test_tool_choices_need_the_flags_as_in_vllm() -> None:
    with trio.fail_after(15):
        async with running() as (server, port, c):
            for fields in ({"tools": TOOLS}, {"tools": TOOLS, "tool_choice": "auto"}, {"tools": [], "tool_choice": "auto"},
                           {"tools": TOOLS, "stream": True}):
                r = await c.post("/v1/chat/completions", json=chat(**fields))
                assert r.status_code == 400 and r.json() == bad(AUTO), fields
            r = await c.post("/v1/chat/completions", json=chat(tools=TOOLS, tool_choice="required"))
            assert r.json() == bad('tool_choice="required" requires --tool-call-parser to be set')
            r = await c.post("/v1/chat/completions", json=chat(tools=TOOLS, tool_choice={
                "type": "function", "function": {"name": "get_weather"}}))
            assert r.json() == bad('tool_choice=function "get_weather" requires --tool-call-parser to be set')
            # "none", or no tools at all, needs nothing
            r = await c.post("/v1/chat/completions", json=chat(tools=TOOLS, tool_choice="none", max_tokens=2))
            assert r.status_code == 200 and r.json()["choices"][0]["message"]["tool_calls"] == []
            assert (await c.post("/v1/chat/completions", json=chat(max_tokens=2))).status_code == 200
            # model lookup comes first, body validation before that
            r = await c.post("/v1/chat/completions", json={**chat(tools=TOOLS), "model": "nope"})
            assert r.status_code == 404
            assert (await c.post("/v1/chat/completions", json=chat(tool_choice="auto"))).json()["error"]["type"] == \
                "Bad Request"
            client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0, timeout=10)
            with pytest.raises(openai.BadRequestError, match="enable-auto-tool-choice"):
                await trio.to_thread.run_sync(lambda: client.chat.completions.create(
                    model="sim-chat", messages=ASK, tools=TOOLS))
            assert server.statistics().errors_total == 9 and server.statistics().finished_total == 2
        async with running(tool_call_parser="hermes") as (_server, _port, c):  # a parser, no auto choice
            assert (await c.post("/v1/chat/completions", json=chat(tools=TOOLS))).json() == bad(AUTO)
            r = await c.post("/v1/chat/completions", json=chat(tools=TOOLS, tool_choice="required"))
            assert r.status_code == 200 and r.json()["choices"][0]["message"]["tool_calls"][0]["function"][
                "name"] == "get_weather"
        async with running(enable_auto_tool_choice=True, tool_call_parser="hermes",
                           reasoning_parser="qwen3") as (_server, _port, c):
            r = await c.post("/v1/chat/completions", json=chat(tools=TOOLS))
            assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] == "tool_calls"


def test_cli_flags() -> None:
    args = _parser().parse_args(["--enable-auto-tool-choice", "--tool-call-parser", "hermes",
                                 "--reasoning-parser", "deepseek_r1", "--disable-responses-store"])
    options = options_from(args)
    assert (options.enable_auto_tool_choice, options.tool_call_parser, options.reasoning_parser) == (
        True, "hermes", "deepseek_r1")
    assert options.enable_responses_store is False and options.tool_parser == "hermes"
    defaults = options_from(_parser().parse_args([]))
    assert (defaults.enable_auto_tool_choice, defaults.tool_call_parser, defaults.enable_responses_store) == (
        False, None, True)
    assert main(["--listen", "127.0.0.1:0", "--enable-auto-tool-choice"]) == 2  # vLLM: needs --tool-call-parser


def wav() -> bytes:
    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(8000)
        w.writeframes(b"\0\0" * 16000)  # 2 s: 5 words
    return out.getvalue()


async def test_inband_error_fault_on_every_generating_endpoint() -> None:
    with trio.fail_after(20):
        async with running() as (server, _port, c):
            r = await c.post("/_sim/fault", json={"mode": "inband_error"})
            assert r.json() == {"mode": "inband_error"} and server.fault == "inband_error"
            assert (await c.get("/health")).status_code == 200  # the host looks well

            r = await c.post("/v1/chat/completions", json=chat(max_tokens=10, stream=True))
            assert r.status_code == 200 and r.content.endswith(INBAND)
            frames = r.content.split(b"\n\n")[:-1]
            assert len(frames) == 1 + 3 + 2  # role chunk, three tokens, the error, [DONE]
            assert json.loads(frames[-2][6:]) == {"error": {"message": "Internal server error",
                                                            "type": "InternalServerError", "param": None, "code": 500}}
            r = await c.post("/v1/completions", json={"model": "sim-chat", "prompt": "hi", "max_tokens": 2,
                                                      "stream": True})
            assert r.content.endswith(INBAND) and len(r.content.split(b"\n\n")) == 1 + 2 + 1  # one token first
            r = await c.post("/v1/chat/completions", json=chat(max_tokens=10))
            assert r.status_code == 500 and r.json() == {"error": {
                "message": "Internal server error", "type": "InternalServerError", "param": None, "code": 500}}
            r = await c.post("/v1/audio/transcriptions", files={"file": ("a.wav", wav())}, data={"stream": "true"})
            assert r.content.endswith(INBAND) and r.content.count(b'"content"') == 3

            r = await c.post("/v1/messages", json={"model": "sim-chat", "max_tokens": 10, "stream": True,
                                                   "messages": ASK})
            last = r.text.split("\n\n")[-2]
            assert last.startswith("event: error\ndata: ") and "[DONE]" not in r.text
            error = json.loads(last.split("\n", 1)[1][6:])
            assert error["type"] == "error" and error["error"]["type"] == "internal_error"
            assert error["error"]["message"].startswith("2 validation errors for ChatCompletionStreamResponse")
            r = await c.post("/v1/messages", json={"model": "sim-chat", "max_tokens": 10, "messages": ASK})
            assert r.status_code == 500 and r.json()["type"] == "error"

            # vLLM's Responses stream cannot render its own error event: the stream breaks off
            with pytest.raises(httpx.RemoteProtocolError):
                await c.post("/v1/responses", json={"input": "hi", "stream": True, "max_output_tokens": 10})
            r = await c.post("/v1/responses", json={"input": "hi", "max_output_tokens": 10})
            assert r.status_code == 500

            stats = server.statistics()
            assert stats.finished_error == 7 and stats.cancelled_total == 1
            activity = probe.parse_activity((await c.get("/metrics")).text)
            assert activity.running == 0
            assert 'finished_reason="error",model_name="sim-chat"} 7.0' in (await c.get("/metrics")).text
            # 3 + 1 + 3 + 3 streamed tokens reached the wire, the cut Responses stream's 3 too
            assert stats.generation_tokens_total == 3 + 1 + 3 + 3 + 3

            assert (await c.post("/_sim/fault", json={"mode": None})).json() == {"mode": None}
            r = await c.post("/v1/chat/completions", json=chat(max_tokens=4, stream=True))
            assert r.content.endswith(b"data: [DONE]\n\n") and b'"error"' not in r.content
            assert (await c.post("/v1/embeddings", json={"input": "x"})).status_code == 200


async def test_inband_error_set_mid_stream() -> None:
    with trio.fail_after(15):
        async with running(tokens_per_s=100) as (server, _port, c):
            async with c.stream("POST", "/v1/chat/completions", json=chat(max_tokens=200, stream=True)) as r:
                body = b""
                async for piece in r.aiter_bytes():
                    body += piece
                    if body.count(b"\n\n") == 10:
                        server.set_fault("inband_error")
            assert body.endswith(INBAND) and 10 <= body.count(b'"content"') < 200
            assert server.statistics().finished_error == 1
            # pooling is not a generation: it answers as ever
            assert (await c.post("/pooling", json={"input": "x"})).status_code == 200
