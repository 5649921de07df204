"""The official OpenAI Python SDK against the gateway: the contract as a client sees it."""

from __future__ import annotations

import json

import openai
import pytest
import trio

from proxy.admit import keys
from proxy.config import TierConfig
from tests.support.gateway import make_config, start_gateway, start_sim

TOOLS = [{
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather for a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
            "required": ["city", "days"],
        },
    },
}]


def client(gw, key="none", **kw) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.api, api_key=key, max_retries=0, timeout=10, **kw)


async def sdk(fn, *args, **kwargs):
    """Run a blocking SDK call off the loop that serves it."""
    return await trio.to_thread.run_sync(lambda: fn(*args, **kwargs))


@pytest.fixture
async def open_gateway(nursery):
    sim, url = await start_sim(nursery, enable_auto_tool_choice=True, tool_call_parser="hermes")
    gw = await start_gateway(nursery, make_config([url]))
    return sim, gw


async def test_chat_non_streaming(open_gateway):
    _sim, gw = open_gateway
    with trio.fail_after(10):
        resp = await sdk(client(gw).chat.completions.create, model="sim-chat", max_tokens=5,
                         messages=[{"role": "user", "content": "Say hello."}])
    assert resp.object == "chat.completion"
    assert resp.choices[0].message.role == "assistant" and resp.choices[0].message.content
    assert resp.usage.completion_tokens == 5
    assert resp.choices[0].finish_reason == "length"


async def test_chat_streaming_with_usage(open_gateway):
    _sim, gw = open_gateway

    def run():
        chunks = list(client(gw).chat.completions.create(
            model="sim-chat", max_tokens=6, stream=True, stream_options={"include_usage": True},
            messages=[{"role": "user", "content": "Count."}]))
        return chunks

    with trio.fail_after(10):
        chunks = await trio.to_thread.run_sync(run)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 6
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"]


async def test_tool_calls_pass_through(open_gateway):
    _sim, gw = open_gateway
    with trio.fail_after(10):
        resp = await sdk(client(gw).chat.completions.create, model="sim-chat", tools=TOOLS, tool_choice="required",
                         messages=[{"role": "user", "content": "Weather in Paris?"}])
    call = resp.choices[0].message.tool_calls[0]
    assert call.function.name == "get_weather"
    args = json.loads(call.function.arguments)
    assert isinstance(args["city"], str) and isinstance(args["days"], int)
    assert resp.choices[0].finish_reason == "tool_calls"


async def test_streamed_tool_call_fragments_reassemble(open_gateway):
    _sim, gw = open_gateway

    def run():
        parts = {}
        for chunk in client(gw).chat.completions.create(
                model="sim-chat", tools=TOOLS, tool_choice="required", stream=True,
                messages=[{"role": "user", "content": "Weather?"}]):
            for choice in chunk.choices:
                for tc in choice.delta.tool_calls or []:
                    entry = parts.setdefault(tc.index, {"name": "", "args": ""})
                    if tc.function and tc.function.name:
                        entry["name"] += tc.function.name
                    if tc.function and tc.function.arguments:
                        entry["args"] += tc.function.arguments
        return parts

    with trio.fail_after(10):
        parts = await trio.to_thread.run_sync(run)
    assert parts[0]["name"] == "get_weather"
    assert set(json.loads(parts[0]["args"])) >= {"city", "days"}


async def test_structured_output_json_schema(open_gateway):
    _sim, gw = open_gateway
    schema = {"type": "object", "properties": {"answer": {"type": "string"}, "score": {"type": "number"}},
              "required": ["answer", "score"], "additionalProperties": False}
    with trio.fail_after(10):
        resp = await sdk(client(gw).chat.completions.create, model="sim-chat",
                         response_format={"type": "json_schema",
                                          "json_schema": {"name": "result", "schema": schema, "strict": True}},
                         messages=[{"role": "user", "content": "Rate it."}])
    data = json.loads(resp.choices[0].message.content)
    assert isinstance(data["answer"], str) and isinstance(data["score"], (int, float))


async def test_completions_embeddings_and_models(open_gateway):
    _sim, gw = open_gateway
    c = client(gw)
    with trio.fail_after(10):
        comp = await sdk(c.completions.create, model="sim-chat", prompt="Once upon", max_tokens=4)
        emb = await sdk(c.embeddings.create, model="sim-embed", input=["a", "b"])
        models = await sdk(c.models.list)
        one = await sdk(c.models.retrieve, "sim-chat")
    assert comp.object == "text_completion" and comp.usage.completion_tokens == 4
    assert len(emb.data) == 2 and len(emb.data[0].embedding) > 0
    assert {m.id for m in models.data} == {"sim-chat", "sim-embed"}
    assert one.id == "sim-chat"


async def test_sdk_error_classes(nursery, tmp_path, dead_upstream):
    _sim, url = await start_sim(nursery, max_model_len=64)
    keys_file = tmp_path / "keys.toml"
    good = keys.add(keys_file, "alice")
    narrow = keys.add(keys_file, "bob", tiers=["other"])
    config = make_config([], keys_file=str(keys_file), server={"max_body_bytes": 4096}, tiers=[
        TierConfig(name="local", upstreams=[url], models=["sim-chat"]),
        TierConfig(name="other", upstreams=[dead_upstream()], models=["down-model"]),
    ])
    gw = await start_gateway(nursery, config)
    msgs = [{"role": "user", "content": "hi"}]
    with trio.fail_after(20):
        with pytest.raises(openai.AuthenticationError) as e:
            await sdk(client(gw, "sk-si-wrong").chat.completions.create, model="sim-chat", messages=msgs)
        assert e.value.code == "invalid_api_key"
        with pytest.raises(openai.PermissionDeniedError):
            await sdk(client(gw, narrow).chat.completions.create, model="sim-chat", messages=msgs)
        with pytest.raises(openai.NotFoundError) as e:
            await sdk(client(gw, good).chat.completions.create, model="gpt-4o", messages=msgs)
        assert e.value.code == "model_not_found"
        with pytest.raises(openai.BadRequestError) as e:
            await sdk(client(gw, good).chat.completions.create, model="sim-chat", messages=msgs, temperature=7)
        assert e.value.param == "temperature"
        with pytest.raises(openai.BadRequestError):  # vLLM's own 400 (context length) passes through
            await sdk(client(gw, good).chat.completions.create, model="sim-chat", messages=msgs, max_tokens=500)
        with pytest.raises(openai.APIStatusError) as e:
            await sdk(client(gw, good).chat.completions.create, model="sim-chat",
                      messages=[{"role": "user", "content": "x" * 10000}])
        assert e.value.status_code == 413
        with pytest.raises(openai.APIStatusError) as e:
            await sdk(client(gw, good).chat.completions.create, model="down-model", messages=msgs)
        assert e.value.status_code in (502, 503)
        resp = await sdk(client(gw, good).chat.completions.create, model="sim-chat", messages=msgs, max_tokens=3)
        assert resp.usage.completion_tokens == 3
