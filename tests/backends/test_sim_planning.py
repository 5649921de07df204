"""Pure tests of the simulator's planning and rendering: token rules, vLLM shapes, schema instances.

No sockets, no clock: `Planner` and `Plan` are synchronous and deterministic.
"""

from __future__ import annotations

import json

import msgspec
import pytest

from backends.sim.planning import Planner
from backends.sim.responses import SimError, SimOptions, instance

TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer", "minimum": 3},
                                     "unit": {"enum": ["c", "f"]}},
    "required": ["city", "days", "unit"]}}},
    {"type": "function", "function": {"name": "noop"}}]


DEFAULTS = SimOptions()
TOOLING = SimOptions(enable_auto_tool_choice=True, tool_call_parser="hermes")  # `vllm serve` with tool flags


def chat(options: SimOptions = DEFAULTS, **fields):
    body = {"model": "sim-chat", "messages": [{"role": "user", "content": "Say hello."}], **fields}
    return Planner(options).chat(msgspec.json.encode(body))


def fail(call) -> dict:
    with pytest.raises(SimError) as info:
        call()
    return {"status": info.value.status, **json.loads(info.value.body)["error"]}


def test_prompt_tokens_follow_the_documented_rule() -> None:
    # 3 + (4 + ceil(10/4)) for one user message of 10 characters
    assert chat().prompt_tokens == 3 + 4 + 3
    plan = chat(messages=[{"role": "system", "content": "x" * 8},
                          {"role": "user", "content": [{"type": "text", "text": "abcd"}, {"type": "image_url"}]}])
    assert plan.prompt_tokens == 3 + (4 + 2) + (4 + 1)
    completion = Planner(SimOptions()).completion(b'{"model":"sim-chat","prompt":"abcdefghi"}')
    assert completion.prompt_tokens == 3


def test_completion_tokens_default_limit_and_reply() -> None:
    plan = chat()
    assert [c.finish for c in plan.choices] == ["stop"] and plan.completion_tokens == 16
    plan = chat(max_tokens=5)
    assert plan.choices[0].finish == "length" and plan.completion_tokens == 5
    plan = chat(max_completion_tokens=7, max_tokens=3)
    assert plan.completion_tokens == 7
    replying = SimOptions(reply="Hello there, world!")
    plan = chat(replying)
    assert plan.choices[0].pieces == ["Hello", " there,", " world!"] and plan.choices[0].finish == "stop"
    plan = chat(replying, max_tokens=2)
    assert plan.choices[0].text() == "Hello there," and plan.choices[0].finish == "length"
    # deterministic: the same prompt gives the same words
    assert chat().choices[0].text() == chat().choices[0].text()


def test_non_streaming_body_has_every_vllm_field_in_order() -> None:
    body = json.loads(chat(max_tokens=2).body())
    assert list(body) == ["id", "object", "created", "model", "choices", "service_tier",
                          "system_fingerprint", "usage", "prompt_logprobs", "prompt_token_ids",
                          "kv_transfer_params"]
    assert body["id"].startswith("chatcmpl-") and body["object"] == "chat.completion"
    choice = body["choices"][0]
    assert list(choice) == ["index", "message", "logprobs", "finish_reason", "stop_reason", "token_ids"]
    assert list(choice["message"]) == ["role", "content", "refusal", "annotations", "audio",
                                       "function_call", "tool_calls", "reasoning"]
    assert body["usage"] == {"prompt_tokens": 10, "total_tokens": 12, "completion_tokens": 2,
                             "prompt_tokens_details": None}


def test_stream_events_are_exclude_unset_chunks() -> None:
    plan = chat(max_tokens=2, stream=True, stream_options={"include_usage": True})
    events = [e for _, e in plan.events()]
    assert [s for s, _ in plan.events()] == [0, 0, 1, 1, 1]
    chunks = [json.loads(e[6:]) for e in events[:-1]]
    assert events[-1] == b"data: [DONE]\n\n" and all(e.endswith(b"\n\n") for e in events)
    assert chunks[0]["choices"][0] == {"index": 0, "delta": {"role": "assistant", "content": ""},
                                       "logprobs": None, "finish_reason": None}
    assert chunks[0]["prompt_token_ids"] is None and "usage" not in chunks[0]
    assert list(chunks[1]["choices"][0]) == ["index", "delta", "logprobs", "finish_reason", "token_ids"]
    assert chunks[2]["choices"][0]["finish_reason"] == "length"
    assert chunks[2]["choices"][0]["stop_reason"] is None
    assert chunks[3] == {"id": plan.rid, "object": "chat.completion.chunk", "created": plan.created,
                         "model": "sim-chat", "choices": [],
                         "usage": {"prompt_tokens": 10, "total_tokens": 12, "completion_tokens": 2}}


def test_continuous_usage_and_n_choices() -> None:
    plan = chat(max_tokens=2, n=2, stream=True,
                stream_options={"include_usage": True, "continuous_usage_stats": True})
    chunks = [json.loads(e[6:]) for _, e in list(plan.events())[:-1]]
    assert [c["choices"][0]["index"] for c in chunks[:-1]] == [0, 1, 0, 1, 0, 1]
    assert [c["usage"]["completion_tokens"] for c in chunks[:-1]] == [0, 0, 1, 1, 2, 2]
    assert chunks[-1]["usage"]["completion_tokens"] == 4
    assert plan.choices[0].text() != plan.choices[1].text()


def test_tool_calls_by_choice_mode() -> None:
    auto = chat(TOOLING, tools=TOOLS)
    body = json.loads(auto.body())
    message, finish = body["choices"][0]["message"], body["choices"][0]["finish_reason"]
    assert finish == "tool_calls" and message["content"] is None
    call = message["tool_calls"][0]
    assert call["id"].startswith("chatcmpl-tool-") and call["type"] == "function"
    assert call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"]) == {"city": "sim", "days": 3, "unit": "c"}
    named = json.loads(chat(TOOLING, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "noop"}}).body())
    assert named["choices"][0]["finish_reason"] == "stop"
    assert named["choices"][0]["message"]["content"] == ""
    assert named["choices"][0]["message"]["tool_calls"][0]["function"] == {"name": "noop", "arguments": "{}"}
    # after a tool result the model answers in text
    turn = chat(TOOLING, tools=TOOLS, messages=[{"role": "user", "content": "weather?"},
                                       {"role": "assistant", "tool_calls": [{"id": "1", "type": "function",
                                        "function": {"name": "get_weather", "arguments": "{}"}}]},
                                       {"role": "tool", "tool_call_id": "1", "content": "sunny"}])
    assert turn.choices[0].tool_name is None and turn.choices[0].finish == "stop"
    assert chat(tools=TOOLS, tool_choice="none").choices[0].tool_name is None  # no flags needed


def test_streamed_tool_call_deltas() -> None:
    plan = chat(TOOLING, tools=TOOLS, stream=True)
    deltas = [json.loads(e[6:])["choices"][0] for _, e in list(plan.events())[1:-1]]
    first = deltas[0]["delta"]["tool_calls"][0]
    assert list(first) == ["id", "type", "index", "function"] and first["function"] == {"name": "get_weather"}
    assert all(list(d["delta"]["tool_calls"][0]) == ["index", "function"] for d in deltas[1:])
    arguments = "".join(d["delta"]["tool_calls"][0]["function"]["arguments"] for d in deltas[1:])
    assert json.loads(arguments)["days"] == 3
    assert deltas[-1]["finish_reason"] == "tool_calls" and plan.completion_tokens == len(deltas)


def test_break_tool_json_emits_invalid_arguments() -> None:
    plan = chat(SimOptions(break_tool_json=True, enable_auto_tool_choice=True), tools=TOOLS)
    arguments = json.loads(plan.body())["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"]
    with pytest.raises(json.JSONDecodeError):
        json.loads(arguments)


def test_schema_instances_are_minimal_and_valid() -> None:
    schema = {"type": "object", "required": ["a", "b", "c", "d", "e"], "$defs": {"E": {"type": "boolean"}},
              "properties": {"a": {"type": "array", "minItems": 2, "items": {"type": "number",
                                                                             "exclusiveMinimum": 2}},
                             "b": {"anyOf": [{"type": "null"}, {"type": "string"}]},
                             "c": {"type": "string", "format": "date", "maxLength": 20},
                             "d": {"type": "integer", "minimum": 7, "multipleOf": 5},
                             "e": {"$ref": "#/$defs/E"}, "skipped": {"type": "string"}}}
    assert instance(schema) == {"a": [2.5, 2.5], "b": None, "c": "2024-01-01", "d": 10, "e": True}
    assert instance({}) == {} and instance({"type": "string", "minLength": 5}) == "simxx"
    jsonschema = pytest.importorskip("jsonschema")
    jsonschema.validate(instance(schema), schema)
    plan = chat(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema}})
    jsonschema.validate(json.loads(plan.choices[0].text()), schema)
    assert json.loads(chat(response_format={"type": "json_object"}).choices[0].text()) == {"response": "sim"}


def test_errors_use_vllm_messages_types_and_order() -> None:
    err = fail(lambda: chat(model="nope"))
    assert err == {"status": 404, "message": "The model `nope` does not exist.", "type": "NotFoundError",
                   "param": "model", "code": 404}
    small = SimOptions(max_model_len=32)
    err = fail(lambda: chat(small, messages=[{"role": "user", "content": "x" * 200}]))
    assert err["type"] == "BadRequestError" and err["param"] == "input_tokens"
    assert err["message"].startswith("You passed 57 input tokens and requested 0 output tokens. However, "
                                     "the model's context length is only 32 tokens")
    err = fail(lambda: chat(small, max_tokens=30))
    assert err["param"] == "input_tokens" and "maximum input length of 2 tokens" in err["message"]
    err = fail(lambda: chat(small, max_completion_tokens=33))
    assert err["param"] == "max_completion_tokens" and "cannot be greater than" in err["message"]
    err = fail(lambda: Planner(SimOptions()).chat(b"{not json"))
    assert err["type"] == "Bad Request" and err["code"] == 400
    err = fail(lambda: chat(stream_options={"include_usage": True}))
    assert err["param"] == "stream_options" and err["type"] == "Bad Request"
    # body validation comes before the model check, as in FastAPI
    assert fail(lambda: chat(model="nope", tool_choice="auto"))["type"] == "Bad Request"
    assert fail(lambda: chat(n=0))["message"] == "n must be at least 1, got 0."
    assert fail(lambda: Planner(SimOptions()).chat(b'{"model":"sim-chat"}'))["type"] == "Bad Request"
    assert fail(lambda: chat(model="sim-embed"))["message"] == "The model does not support Chat Completions API"


def test_unknown_fields_are_accepted() -> None:
    plan = chat(top_k=5, repetition_penalty=1.1, guided_json={"type": "object"},
                chat_template_kwargs={"enable_thinking": False}, min_p=0.1, seed=3)
    assert plan.completion_tokens == 16


def test_completions_batch_and_embeddings() -> None:
    planner = Planner(SimOptions())
    plan = planner.completion(b'{"model":"sim-chat","prompt":["a","bbbbb"],"max_tokens":2,"n":2}')
    body = json.loads(plan.body())
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    assert list(body["choices"][0]) == ["index", "text", "logprobs", "finish_reason", "stop_reason",
                                        "token_ids", "prompt_logprobs", "prompt_token_ids"]
    assert body["usage"]["prompt_tokens"] == 1 + 2 and body["usage"]["completion_tokens"] == 8
    model, vectors, tokens, b64 = planner.embeddings(b'{"model":"sim-embed","input":["x","y"]}')
    assert model == "sim-embed" and len(vectors) == 2 and len(vectors[0]) == 8 and tokens == 2
    assert abs(sum(v * v for v in vectors[0]) - 1.0) < 1e-9 and not b64
    assert planner.embeddings(b'{"model":"sim-embed","input":"x"}')[1][0] == vectors[0]


@pytest.mark.parametrize("kind", ["chat", "completion"])
def test_fast_event_path_matches_the_general_renderer(kind: str) -> None:
    planner = Planner(SimOptions())
    if kind == "chat":
        plan = planner.chat(b'{"messages":[{"role":"user","content":"q\\u00e9"}],"max_tokens":5,"stream":true}')
    else:
        plan = planner.completion(b'{"model":"sim-chat","prompt":"q","max_tokens":5,"stream":true}')
    events = [e for _, e in plan.events()][(1 if kind == "chat" else 0):][:5]
    head = events[0][:events[0].index(b'{"index"')]
    assert events == [head + plan._chunk(plan.choices[0], step) for step in range(5)]
