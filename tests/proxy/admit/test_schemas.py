"""proxy/schemas: the narrow request views, their OpenAI-style 400s and the `param` mapping.

Pure unit tests, no event loop. The OpenAI SDK's own request bodies are captured with an httpx
MockTransport (no network) and must all be accepted.
"""

from __future__ import annotations

import json

import httpx
import msgspec
import openai
import pydantic
import pytest

from proxy.admit.schema_errors import param_from_path
from proxy.admit.schemas import (
    DECODERS,
    AssistantMessage,
    ChatView,
    CompletionView,
    EmbeddingView,
    NamedToolChoice,
    ToolMessage,
    UserMessage,
    decode_chat,
    decode_completion,
    decode_embedding,
)
from proxy.errors import ApiError

NOT_JSON = "We could not parse the JSON body of your request."
USER = {"role": "user", "content": "hi"}


def chat(**fields) -> bytes:
    return json.dumps({"model": "m", "messages": [USER], **fields}).encode()


def completion(**fields) -> bytes:
    return json.dumps({"model": "m", "prompt": "Once upon", **fields}).encode()


def embedding(**fields) -> bytes:
    return json.dumps({"model": "m", "input": "hello", **fields}).encode()


def rejected(decode, body: bytes) -> ApiError:
    with pytest.raises(ApiError) as info:
        decode(body)
    err = info.value
    assert (err.status, err.type, err.code) == (400, "invalid_request_error", None)
    return err


# -- param_from_path ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "param"),
    [
        ("$.tools[0].function.name", "tools[0].function.name"),
        ("$.temperature", "temperature"),
        ("$.messages[3]", "messages[3]"),
        ("$.messages[0].content[2].type", "messages[0].content[2].type"),
        ("$[2]", "[2]"),
        ("$", None),
    ],
)
def test_param_from_path(path, param):
    assert param_from_path(path) == param


# -- chat: accepted ------------------------------------------------------------------------------------

TOOL = {"type": "function", "function": {"name": "get_weather", "description": "Weather by city",
                                         "parameters": {"type": "object", "properties": {}}, "strict": True}}
TOOL_CALL = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}

CHAT_ACCEPTED = {
    "minimal": chat(),
    "every role": chat(messages=[
        {"role": "system", "content": "be brief"},
        {"role": "developer", "content": [{"type": "text", "text": "be brief"}]},
        {"role": "user", "content": [{"type": "text", "text": "what is this?"},
                                     {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]},
        {"role": "assistant", "content": None, "tool_calls": [TOOL_CALL]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
        {"role": "assistant", "function_call": {"name": "f", "arguments": "{}"}},
        {"role": "function", "name": "f", "content": None},
        {"role": "assistant", "content": "It is sunny.", "refusal": None},
    ]),
    "vLLM extras and unknown fields": chat(top_k=40, repetition_penalty=1.1, min_p=0.05,
                                          guided_json={"type": "object"}, chat_template_kwargs={"enable_thinking": False},
                                          messages=[{"role": "user", "content": "x", "vendor": {"a": [1, 2]}}],
                                          stream=True, stream_options={"include_usage": True, "continuous_usage_stats": True}),
    "nulls for optional fields": chat(stream=None, stream_options=None, n=None, temperature=None, top_p=None,
                                      max_tokens=None, max_completion_tokens=None, stop=None, seed=None, tools=None,
                                      tool_choice=None, response_format=None, logprobs=None, top_logprobs=None,
                                      presence_penalty=None, frequency_penalty=None),
    "lower bounds": chat(temperature=0, top_p=0, n=1, max_tokens=1, max_completion_tokens=1, presence_penalty=-2,
                         frequency_penalty=-2, top_logprobs=0, seed=-(2**63)),
    "upper bounds": chat(temperature=2, top_p=1, n=128, presence_penalty=2, frequency_penalty=2, logprobs=True,
                         top_logprobs=20, seed=2**63 - 1, stop=["a", "b", "c", "d"]),
    "integer for a number": chat(temperature=1, top_p=1),
    "stop string": chat(stop="\n"),
    "tools with tool_choice auto": chat(tools=[TOOL], tool_choice="auto"),
    "tool_choice required": chat(tools=[TOOL], tool_choice="required"),
    "tool_choice none without tools": chat(tool_choice="none"),
    "named tool_choice": chat(tools=[TOOL], tool_choice={"type": "function", "function": {"name": "get_weather"}}),
    "tool without type (vLLM default)": chat(tools=[{"function": {"name": "a-b_9"}}]),
    "empty tools (vLLM)": chat(tools=[], tool_choice="required"),
    "response_format text": chat(response_format={"type": "text"}),
    "response_format json_object": chat(response_format={"type": "json_object"}),
    "response_format json_schema": chat(response_format={"type": "json_schema", "json_schema": {
        "name": "answer", "schema": {"type": "object"}, "strict": True, "description": "d"}}),
    "json_schema without schema": chat(response_format={"type": "json_schema", "json_schema": {"name": "answer"}}),
    "response_format structural_tag (vLLM)": chat(response_format={"type": "structural_tag", "structures": [],
                                                                   "triggers": []}),
}


@pytest.mark.parametrize("body", CHAT_ACCEPTED.values(), ids=CHAT_ACCEPTED.keys())
def test_chat_accepted(body):
    view = decode_chat(body)
    assert isinstance(view, ChatView)
    assert view.model == "m"
    assert isinstance(view.stream, bool)


def test_chat_view_fields():
    view = decode_chat(chat(stream=True, stream_options={"include_usage": True}, max_tokens=10, n=2,
                            temperature=0.5, tools=[TOOL],
                            tool_choice={"type": "function", "function": {"name": "get_weather"}},
                            messages=[USER, {"role": "assistant", "tool_calls": [TOOL_CALL]},
                                      {"role": "tool", "tool_call_id": "call_1", "content": "x"}]))
    assert (view.stream, view.include_usage, view.n, view.temperature) == (True, True, 2, 0.5)
    assert view.output_limit() == 10
    assert [type(m) for m in view.messages] == [UserMessage, AssistantMessage, ToolMessage]
    assert type(view.tool_choice) is NamedToolChoice and view.tools[0].function.name == "get_weather"
    assert view.estimate_prompt_tokens(4000) == 1000


@pytest.mark.parametrize(
    ("fields", "expected"),
    [({}, False), ({"stream": True}, False), ({"stream": True, "stream_options": {}}, False),
     ({"stream": True, "stream_options": {"include_usage": False}}, False),
     ({"stream": True, "stream_options": {"include_usage": None}}, False),
     ({"stream": True, "stream_options": {"include_usage": True}}, True),
     ({"stream": True, "stream_options": {"continuous_usage_stats": True}}, True),
     ({"stream": True, "stream_options": {"include_usage": False, "continuous_usage_stats": True}}, False)],
)
def test_include_usage(fields, expected):
    assert decode_chat(chat(**fields)).include_usage is expected
    assert decode_completion(completion(**fields)).include_usage is expected


@pytest.mark.parametrize(
    ("fields", "expected"),
    [({}, None), ({"max_tokens": 5}, 5), ({"max_completion_tokens": 7}, 7),
     ({"max_tokens": 5, "max_completion_tokens": 7}, 7)],
)
def test_chat_max_output_tokens(fields, expected):
    assert decode_chat(chat(**fields)).output_limit() == expected


def test_stream_null_is_false():
    assert decode_chat(chat(stream=None)).stream is False
    assert decode_completion(completion(stream=None)).stream is False


def test_duplicate_keys_last_wins_like_python_json():
    # vLLM parses with Python's json (last key wins); the gateway must route the same model.
    body = b'{"model":"a","messages":[{"role":"user","content":"x"}],"model":"b"}'
    assert decode_chat(body).model == json.loads(body)["model"] == "b"


# -- chat: rejected ------------------------------------------------------------------------------------

CHAT_REJECTED = [
    # (body, param, message fragment)
    (b'{"messages":[{"role":"user","content":"x"}]}', "model", "Missing required parameter: 'model'."),
    (chat(model=""), "model", "Invalid 'model': empty string."),
    (chat(model=None), "model", "Invalid type for 'model': expected a string, but got null instead."),
    (chat(model=7), "model", "Invalid type for 'model': expected a string, but got an integer instead."),
    (b'{"model":"m"}', "messages", "Missing required parameter: 'messages'."),
    (chat(messages=[]), "messages", "Invalid 'messages': empty array."),
    (chat(messages="hi"), "messages", "Invalid type for 'messages': expected an array, but got a string instead."),
    (chat(messages=["hi"]), "messages[0]", "expected an object, but got a string"),
    (chat(messages=[{"content": "x"}]), "messages[0].role", "Missing required parameter: 'messages[0].role'."),
    (chat(messages=[{"role": "robot", "content": "x"}]), "messages[0].role",
     ("Invalid value for 'messages[0].role': 'robot'. Supported values are: 'system', 'developer', 'user', "
     "'assistant', 'tool', 'function'.")),
    (chat(messages=[{"role": "User", "content": "x"}]), "messages[0].role", "'User'"),
    (chat(messages=[USER, {"role": "user"}]), "messages[1].content", "Missing required parameter"),
    (chat(messages=[{"role": "user", "content": None}]), "messages[0].content", "got null"),
    (chat(messages=[{"role": "system", "content": None}]), "messages[0].content", "got null"),
    (chat(messages=[{"role": "user", "content": 5}]), "messages[0].content",
     "expected a string or an array, but got an integer instead."),
    (chat(messages=[{"role": "user", "content": {"type": "text"}}]), "messages[0].content", "got an object"),
    (chat(messages=[{"role": "user", "content": ["x"]}]), "messages[0].content[0]", "expected an object"),
    (chat(messages=[{"role": "user", "content": [{"text": "x"}]}]), "messages[0].content[0].type",
     "Missing required parameter"),
    (chat(messages=[USER, {"role": "assistant", "content": None}]), "messages[1].content",
     "only an assistant message with tool_calls or function_call may omit content"),
    (chat(messages=[USER, {"role": "assistant"}]), "messages[1].content", "got null"),
    (chat(messages=[USER, {"role": "assistant", "tool_calls": []}]), "messages[1].content", "got null"),
    (chat(messages=[USER, {"role": "tool", "content": "x"}]), "messages[1].tool_call_id",
     "Missing required parameter: 'messages[1].tool_call_id'."),
    (chat(messages=[USER, {"role": "tool", "tool_call_id": 1, "content": "x"}]), "messages[1].tool_call_id",
     "Invalid type"),
    (chat(messages=[{"role": "function", "content": "x"}]), "messages[0].name", "Missing required parameter"),
    (chat(temperature="hot"), "temperature",
     "Invalid type for 'temperature': expected a number, but got a string instead."),
    (chat(temperature=True), "temperature", "expected a number, but got a boolean instead"),
    (chat(temperature=2.5), "temperature", "Invalid 'temperature': expected a value <= 2."),
    (chat(temperature=-0.1), "temperature", "expected a value >= 0."),
    (chat(top_p=1.01), "top_p", "expected a value <= 1."),
    (chat(top_p=-1), "top_p", "expected a value >= 0."),
    (chat(n=0), "n", "Invalid 'n': expected a value >= 1."),
    (chat(n=129), "n", "expected a value <= 128."),
    (chat(n=1.5), "n", "expected an integer, but got a number instead"),
    (chat(n=True), "n", "expected an integer, but got a boolean instead"),
    (chat(max_tokens=0), "max_tokens", "expected a value >= 1."),
    (chat(max_tokens=False), "max_tokens", "got a boolean"),
    (chat(max_tokens="10"), "max_tokens", "got a string"),
    (chat(max_completion_tokens=0), "max_completion_tokens", "expected a value >= 1."),
    (chat(presence_penalty=2.1), "presence_penalty", "expected a value <= 2."),
    (chat(frequency_penalty=-3), "frequency_penalty", "expected a value >= -2."),
    (chat(stop=["a", "b", "c", "d", "e"]), "stop", "Invalid 'stop': expected an array of length <= 4."),
    (chat(stop=1), "stop", "expected a string or an array, but got an integer"),
    (chat(stop=["a", 1]), "stop[1]", "expected a string, but got an integer"),
    (chat(logprobs=1), "logprobs", "expected a boolean, but got an integer"),
    (chat(logprobs=True, top_logprobs=21), "top_logprobs", "expected a value <= 20."),
    (chat(logprobs=True, top_logprobs=-1), "top_logprobs", "expected a value >= 0."),
    (chat(top_logprobs=3), "top_logprobs", "'logprobs' must be set to true"),
    (chat(seed=1.5), "seed", "expected an integer"),
    (chat(seed=2**63), "seed", "expected a value <= 9223372036854775807."),
    (chat(stream="yes"), "stream", "expected a boolean, but got a string"),
    (chat(stream_options={"include_usage": True}), "stream_options",
     "The 'stream_options' parameter is only allowed when 'stream' is enabled."),
    (chat(stream=False, stream_options={}), "stream_options", "only allowed when 'stream' is enabled"),
    (chat(stream=True, stream_options=True), "stream_options", "expected an object, but got a boolean"),
    (chat(stream=True, stream_options={"include_usage": "yes"}), "stream_options.include_usage", "boolean"),
    (chat(tools={}), "tools", "expected an array, but got an object"),
    (chat(tools=["get_weather"]), "tools[0]", "expected an object"),
    (chat(tools=[{"type": "function"}]), "tools[0].function", "Missing required parameter: 'tools[0].function'."),
    (chat(tools=[{"type": "custom", "custom": {"name": "x"}}]), "tools[0].type",
     "Invalid value for 'tools[0].type': 'custom'. Supported values are: 'function'."),
    (chat(tools=[{"type": "function", "function": {}}]), "tools[0].function.name", "Missing required parameter"),
    (chat(tools=[TOOL, {"type": "function", "function": {"name": "get weather"}}]), "tools[1].function.name",
     ("Invalid 'tools[1].function.name': string does not match pattern. Expected a string that matches the "
     "pattern '^[a-zA-Z0-9_-]{1,64}$'.")),
    (chat(tools=[{"type": "function", "function": {"name": "x" * 65}}]), "tools[0].function.name", "pattern"),
    (chat(tools=[{"type": "function", "function": {"name": "ok\n"}}]), "tools[0].function.name", "pattern"),
    (chat(tools=[{"type": "function", "function": {"name": ""}}]), "tools[0].function.name", "pattern"),
    (chat(tools=[{"type": "function", "function": {"name": "f", "parameters": "{}"}}]),
     "tools[0].function.parameters", "expected an object, but got a string"),
    (chat(tools=[{"type": "function", "function": {"name": "f", "strict": "yes"}}]), "tools[0].function.strict",
     "boolean"),
    (chat(tool_choice="always", tools=[TOOL]), "tool_choice",
     "Invalid value for 'tool_choice': 'always'. Supported values are: 'none', 'auto', 'required'."),
    (chat(tool_choice="auto"), "tool_choice", "'tool_choice' is only allowed when 'tools' are specified."),
    (chat(tool_choice="required"), "tool_choice", "only allowed when 'tools' are specified"),
    (chat(tool_choice={"type": "function", "function": {"name": "get_weather"}}), "tool_choice",
     "only allowed when 'tools' are specified"),
    (chat(tools=[TOOL], tool_choice={"type": "function", "function": {"name": "other"}}),
     "tool_choice.function.name", "no function named 'other' is given in 'tools'."),
    (chat(tools=[TOOL], tool_choice={"type": "function"}), "tool_choice.function", "Missing required parameter"),
    (chat(tools=[TOOL], tool_choice={"type": "function", "function": {}}), "tool_choice.function.name",
     "Missing required parameter"),
    (chat(tools=[TOOL], tool_choice={"type": "allowed_tools", "allowed_tools": {}}), "tool_choice.type",
     "Supported values are: 'function'."),
    (chat(tools=[TOOL], tool_choice=1), "tool_choice", "expected a string or an object, but got an integer"),
    (chat(response_format="json"), "response_format", "expected an object, but got a string"),
    (chat(response_format={}), "response_format.type", "Missing required parameter: 'response_format.type'."),
    (chat(response_format={"type": "xml"}), "response_format.type",
     ("Invalid value for 'response_format.type': 'xml'. Supported values are: 'text', 'json_object', "
     "'json_schema', 'structural_tag'.")),
    (chat(response_format={"type": "json_schema"}), "response_format.json_schema",
     "Missing required parameter: 'response_format.json_schema'."),
    (chat(response_format={"type": "json_schema", "json_schema": {"schema": {}}}), "response_format.json_schema.name",
     "Missing required parameter"),
    (chat(response_format={"type": "json_schema", "json_schema": {"name": "my schema"}}),
     "response_format.json_schema.name", "string does not match pattern"),
    (chat(response_format={"type": "json_schema", "json_schema": {"name": "s", "schema": []}}),
     "response_format.json_schema.schema", "expected an object, but got an array"),
]


@pytest.mark.parametrize(("body", "param", "message"), CHAT_REJECTED,
                         ids=[f"{i}-{p}" for i, (_, p, _) in enumerate(CHAT_REJECTED)])
def test_chat_rejected(body, param, message):
    err = rejected(decode_chat, body)
    assert err.param == param
    assert message in err.message


def test_long_values_are_not_echoed_in_full():
    err = rejected(decode_chat, chat(messages=[{"role": "x" * 10_000, "content": "x"}]))
    assert err.param == "messages[0].role" and len(err.message) < 300


# -- bodies that are not a JSON object -------------------------------------------------------------------

NOT_AN_OBJECT = {
    "empty": b"",
    "garbage": b"model=m&messages=hi",
    "truncated": b'{"model": "m", "messages": [',
    "array": b'[{"model": "m"}]',
    "string": b'"hello"',
    "null": b"null",
    "number": b"42",
    "NaN": b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "temperature": NaN}',
    "trailing garbage": b'{"model": "m", "messages": [{"role": "user", "content": "x"}]} x',
    "too deep": b'{"model": "m", "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
}


@pytest.mark.parametrize("body", NOT_AN_OBJECT.values(), ids=NOT_AN_OBJECT.keys())
@pytest.mark.parametrize("decode", [decode_chat, decode_completion, decode_embedding])
def test_not_a_json_object(decode, body):
    err = rejected(decode, body)
    assert err.message.startswith(NOT_JSON) and "help.openai.com" in err.message
    assert err.param is None


# -- completions ------------------------------------------------------------------------------------------

COMPLETION_ACCEPTED = {
    "string": completion(),
    "empty string": completion(prompt=""),
    "strings": completion(prompt=["a", "b"]),
    "tokens": completion(prompt=[1, 2, 3]),
    "token lists": completion(prompt=[[1, 2], [3]]),
    "whitespace in arrays": b'{"model": "m", "prompt": [ \n [ 1 ] , [2]]}',
    "prompt_embeds instead of prompt (vLLM)": b'{"model": "m", "prompt_embeds": "AAAA"}',
    "let-through fields": completion(echo=True, best_of=3, suffix="end", logprobs=5, max_tokens=0, user="u",
                                     top_k=5, logit_bias={"50256": -100}),
    "ranges": completion(temperature=2, top_p=1, n=128, stop=["a", "b"], seed=1, presence_penalty=-2),
    "stream": completion(stream=True, stream_options={"include_usage": True}),
}


@pytest.mark.parametrize("body", COMPLETION_ACCEPTED.values(), ids=COMPLETION_ACCEPTED.keys())
def test_completion_accepted(body):
    view = decode_completion(body)
    assert isinstance(view, CompletionView) and view.model == "m"


def test_completion_view_fields():
    view = decode_completion(completion(max_tokens=32, stream=True))
    assert (view.stream, view.include_usage, view.output_limit()) == (True, False, 32)
    assert bytes(view.prompt) == b'"Once upon"'
    assert decode_completion(completion()).output_limit() is None


COMPLETION_REJECTED = [
    (b'{"model": "m"}', "prompt", "Missing required parameter: 'prompt'."),
    (completion(prompt=None), "prompt", "Missing required parameter: 'prompt'."),
    (b'{"prompt": "x"}', "model", "Missing required parameter: 'model'."),
    (completion(prompt=[]), "prompt", "Invalid 'prompt': empty array."),
    (completion(prompt=[[]]), "prompt[0]", "empty array"),
    (completion(prompt=[[1], []]), "prompt[1]", "empty array"),
    (completion(prompt=["a", 1]), "prompt[1]", "expected a string, but got an integer"),
    (completion(prompt=[1, "a"]), "prompt[1]", "expected an integer, but got a string"),
    (completion(prompt=[[1], 2]), "prompt[1]", "expected an array, but got an integer"),
    (completion(prompt=[[1, "a"]]), "prompt[0][1]", "expected an integer"),
    (completion(prompt=[-1]), "prompt[0]", "expected a value >= 0."),
    (completion(prompt=[True]), "prompt[0]", "got a boolean"),
    (completion(prompt=[1.5]), "prompt[0]", "got a number"),
    (completion(prompt=7), "prompt", ("expected a string, an array of strings, an array of integers or an array "
                                     "of arrays of integers.")),
    (completion(prompt={"text": "x"}), "prompt", "Invalid type for 'prompt'"),
    (completion(max_tokens=-1), "max_tokens", "expected a value >= 0."),
    (completion(logprobs=True), "logprobs", "expected an integer, but got a boolean"),
    (completion(logprobs=-1), "logprobs", "expected a value >= 0."),
    (completion(temperature="0"), "temperature", "got a string"),
    (completion(n=0), "n", "expected a value >= 1."),
    (completion(stop=["1", "2", "3", "4", "5"]), "stop", "length <= 4"),
    (completion(stream_options={"include_usage": True}), "stream_options",
     "The 'stream_options' parameter is only allowed when 'stream' is enabled."),
]


@pytest.mark.parametrize(("body", "param", "message"), COMPLETION_REJECTED,
                         ids=[f"{i}-{p}" for i, (_, p, _) in enumerate(COMPLETION_REJECTED)])
def test_completion_rejected(body, param, message):
    err = rejected(decode_completion, body)
    assert err.param == param
    assert message in err.message


# -- embeddings --------------------------------------------------------------------------------------------

EMBEDDING_ACCEPTED = {
    "string": embedding(),
    "strings": embedding(input=["a", "b"]),
    "tokens": embedding(input=[1, 2]),
    "token lists": embedding(input=[[1], [2, 3]]),
    "options": embedding(encoding_format="base64", dimensions=256, user="u"),
    "float format": embedding(encoding_format="float", dimensions=None),
    "vLLM chat embeddings": json.dumps({"model": "m", "messages": [USER]}).encode(),
    "extras": embedding(truncate_prompt_tokens=512, normalize=True),
}


@pytest.mark.parametrize("body", EMBEDDING_ACCEPTED.values(), ids=EMBEDDING_ACCEPTED.keys())
def test_embedding_accepted(body):
    view = decode_embedding(body)
    assert isinstance(view, EmbeddingView) and view.model == "m"
    assert (view.stream, view.include_usage, view.output_limit()) == (False, False, None)
    assert view.estimate_prompt_tokens(len(body)) == len(body) // 4


EMBEDDING_REJECTED = [
    (b'{"model": "m"}', "input", "Missing required parameter: 'input'."),
    (embedding(input=None), "input", "Missing required parameter: 'input'."),
    (embedding(model=""), "model", "empty string"),
    (embedding(input=""), "input", "Invalid 'input': empty string."),
    (embedding(input=["a", ""]), "input[1]", "Invalid 'input[1]': empty string."),
    (embedding(input=[]), "input", "empty array"),
    (embedding(input=[[]]), "input[0]", "empty array"),
    (embedding(input=["a", 1]), "input[1]", "expected a string, but got an integer"),
    (embedding(input=[-5]), "input[0]", "expected a value >= 0."),
    (embedding(input=3), "input", "Invalid type for 'input'"),
    (embedding(input=True), "input", "Invalid type for 'input'"),
    (embedding(encoding_format="hex"), "encoding_format",
     "Invalid value for 'encoding_format': 'hex'. Supported values are: 'float', 'base64'."),
    (embedding(dimensions=0), "dimensions", "expected a value >= 1."),
    (embedding(dimensions="256"), "dimensions", "got a string"),
    (json.dumps({"model": "m", "messages": []}).encode(), "messages", "empty array"),
]


@pytest.mark.parametrize(("body", "param", "message"), EMBEDDING_REJECTED,
                         ids=[f"{i}-{p}" for i, (_, p, _) in enumerate(EMBEDDING_REJECTED)])
def test_embedding_rejected(body, param, message):
    err = rejected(decode_embedding, body)
    assert err.param == param
    assert message in err.message


# -- routing table -------------------------------------------------------------------------------------------


def test_decoders_by_path():
    assert DECODERS == {b"/v1/chat/completions": decode_chat, b"/v1/completions": decode_completion,
                        b"/v1/embeddings": decode_embedding}


def test_validation_error_of_a_sub_document_is_prefixed():
    # The prompt/input sub-decoders report paths from "$"; the param must still start at the field.
    err = rejected(decode_completion, completion(prompt=[[1], [2, "x"]]))
    assert err.param == "prompt[1][1]" and "'prompt[1][1]'" in err.message


def test_msgspec_error_paths_map_through_param_from_path():
    with pytest.raises(msgspec.ValidationError) as info:
        msgspec.json.decode(b'{"model": "m", "messages": [{"role": "user", "content": "x"}], '
                            b'"tools": [{"function": {"name": "a b"}}]}',
                            type=ChatView)
    assert str(info.value).endswith("`$.tools[0].function.name`")
    assert param_from_path("$.tools[0].function.name") == "tools[0].function.name"


# -- the OpenAI SDK's own request bodies -------------------------------------------------------------------------


class Weather(pydantic.BaseModel):
    city: str
    unit: str = "celsius"


def sdk_bodies() -> dict[str, bytes]:
    """Call the real SDK against a MockTransport and keep the exact bytes it sends."""
    sent: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        sent.append(request)
        if request.url.path.endswith("/embeddings"):
            data = [{"object": "embedding", "index": 0, "embedding": "AAAAAA=="}]  # one float32 0.0, base64
            return httpx.Response(200, json={"object": "list", "data": data, "model": "m",
                                             "usage": {"prompt_tokens": 1, "total_tokens": 1}})
        message = {"role": "assistant", "content": '{"city": "Paris", "unit": "celsius"}'}
        return httpx.Response(200, json={
            "id": "x", "object": "chat.completion", "created": 0, "model": "m",
            "choices": [{"index": 0, "message": message, "finish_reason": "stop", "text": "", "logprobs": None}]})

    client = openai.OpenAI(api_key="sk-test", base_url="http://gateway.test/v1", max_retries=0,
                           http_client=httpx.Client(transport=httpx.MockTransport(handler)))
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "Weather in Paris?"}]
    calls = {
        "chat minimal": lambda: client.chat.completions.create(model="m", messages=messages),
        "chat sampling": lambda: client.chat.completions.create(
            model="m", messages=messages, temperature=0.2, top_p=0.9, n=2, max_completion_tokens=64, stop=["\n"],
            presence_penalty=0.5, frequency_penalty=-0.5, seed=7, logprobs=True, top_logprobs=3, user="u",
            extra_body={"top_k": 20, "repetition_penalty": 1.1, "chat_template_kwargs": {"enable_thinking": False}}),
        "chat tools": lambda: client.chat.completions.create(
            model="m", messages=messages, tools=[openai.pydantic_function_tool(Weather)], tool_choice="required",
            parallel_tool_calls=False),
        "chat named tool": lambda: client.chat.completions.create(
            model="m", messages=messages, tools=[openai.pydantic_function_tool(Weather, name="get_weather")],
            tool_choice={"type": "function", "function": {"name": "get_weather"}}),
        "chat json_object": lambda: client.chat.completions.create(
            model="m", messages=messages, response_format={"type": "json_object"}, max_tokens=16),
        "chat parse (json_schema)": lambda: client.chat.completions.parse(
            model="m", messages=messages, response_format=Weather),
        "chat tool round trip": lambda: client.chat.completions.create(model="m", messages=[
            *messages,
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
            {"role": "user", "content": [{"type": "text", "text": "and this?"},
                                         {"type": "image_url", "image_url": {"url": "https://x.test/a.png"}}]},
        ]),
        "completion": lambda: client.completions.create(model="m", prompt="Once upon", max_tokens=8, echo=True,
                                                        logprobs=2, best_of=2, suffix="."),
        "completion tokens": lambda: client.completions.create(model="m", prompt=[[1, 2], [3]]),
        "embedding": lambda: client.embeddings.create(model="m", input=["a", "b"], dimensions=8),
        "embedding tokens": lambda: client.embeddings.create(model="m", input=[1, 2, 3]),
    }
    bodies = {}
    for name, call in calls.items():
        call()
        bodies[name] = (sent[-1].url.path.encode(), sent[-1].content)
    return bodies


SDK_BODIES = sdk_bodies()


@pytest.mark.parametrize("path_body", SDK_BODIES.values(), ids=SDK_BODIES.keys())
def test_openai_sdk_bodies_accepted(path_body):
    path, body = path_body
    view = DECODERS[path](body)
    assert view.model == "m"


def test_sdk_stream_body_sets_stream():
    sent: list[bytes] = []

    def handler(request: httpx.Request) -> httpx.Response:
        sent.append(request.content)
        return httpx.Response(200, text="data: [DONE]\n\n", headers={"content-type": "text/event-stream"})

    client = openai.OpenAI(api_key="sk-test", base_url="http://gateway.test/v1", max_retries=0,
                           http_client=httpx.Client(transport=httpx.MockTransport(handler)))
    for _ in client.chat.completions.create(model="m", messages=[USER], stream=True,
                                            stream_options={"include_usage": True}):
        pass
    view = decode_chat(sent[0])
    assert view.stream is True and view.include_usage is True


@pytest.mark.parametrize("body", [
    b'{"model": "\xff", "messages": [{"role": "user", "content": "x"}]}',
    b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "vendor_extra": "\xc3\x28"}',
    b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "\xed\xa0\x80": 1}',  # a surrogate key
])
@pytest.mark.parametrize("decode", [decode_chat, decode_completion, decode_embedding])
def test_invalid_utf8_anywhere_is_refused_with_its_offset(decode, body):
    err = rejected(decode, body)
    start = body.decode("utf-8", "replace").find("\ufffd")
    assert err.param is None
    assert err.message == f"We could not parse the JSON body of your request: it is not valid UTF-8 (byte {start})."


def test_valid_non_ascii_passes():
    view = decode_chat(chat(messages=[{"role": "user", "content": "héllo wörld ✓ 日本"}]))
    assert view.model == "m"


@pytest.mark.parametrize(("decode", "field", "body_of"), [
    (decode_chat, "max_tokens", chat), (decode_chat, "max_completion_tokens", chat), (decode_chat, "n", chat),
    (decode_chat, "top_logprobs", chat), (decode_completion, "max_tokens", completion),
    (decode_completion, "logprobs", completion), (decode_completion, "n", completion),
    (decode_embedding, "dimensions", embedding),
])
def test_every_integer_read_is_bounded_and_named(decode, field, body_of):
    body = body_of().replace(b'"model"', b'"%s": %s, "model"' % (field.encode(), b"9" * 400))
    err = rejected(decode, body)
    assert err.param == field and f"'{field}'" in err.message
