"""BodyTail on the Responses API's and Anthropic's non-streamed bodies: an object under a ``usage`` key
that is not usage is passed over, ``last=True`` takes the body's last usage object (the real one, after
the client-shaped tools and schemas), and ``response_id`` is read from the first bytes only."""

from __future__ import annotations

import json
import random

import pytest

from proxy.usage.body_usage import BodyTail, first_id, usage_from_body
from proxy.usage.counts import Usage
from tests.support.pieces import split_at

RESP_ID = "resp_6f1c0e9a2b7d4c8e9f0a1b2c3d4e5f60"
USAGE = {"input_tokens": 21, "input_tokens_details": {"cached_tokens": 0}, "output_tokens": 5,
         "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": 26}
WANT = Usage(prompt_tokens=21, completion_tokens=5, total_tokens=26)
SCHEMA_TOOL = {"type": "function", "name": "log_call", "description": "records a call",
               "parameters": {"type": "object", "properties": {"usage": {"type": "object"},
                                                               "id": {"type": "string"}}}, "strict": None}


def dumps(obj) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


def responses_body(text: str, tools: list, usage=USAGE) -> bytes:
    # vLLM's ResponsesResponse as JSONResponse(content=model_dump()) sends it: id first, usage near the end.
    return dumps({"id": RESP_ID, "created_at": 1718000000, "incomplete_details": None, "instructions": None,
                  "metadata": None, "model": "qwen3", "object": "response",
                  "output": [{"id": "msg_1", "content": [{"annotations": [], "text": text, "type": "output_text",
                                                           "logprobs": None}],
                              "role": "assistant", "status": "completed", "type": "message"}],
                  "parallel_tool_calls": True, "temperature": 0.7, "tool_choice": "auto", "tools": tools,
                  "top_p": 1.0, "background": False, "max_output_tokens": 1024, "max_tool_calls": None,
                  "previous_response_id": None, "prompt": None, "reasoning": None, "service_tier": "auto",
                  "status": "completed", "text": None, "top_logprobs": None, "truncation": "disabled",
                  "usage": usage, "user": None, "input_messages": None, "output_messages": None})


def run(pieces: list[bytes], *, last: bool = False) -> BodyTail:
    tap = BodyTail(last=last)
    for p in pieces:
        assert tap.feed(p) is p
    assert tap.finish() == b""
    return tap


SMALL = responses_body("Hello!", [SCHEMA_TOOL])
BIG = responses_body("word {x} " * 3000 + "é", [SCHEMA_TOOL] * 3)


def test_the_fixtures() -> None:
    assert len(SMALL) < 4096 < len(BIG)
    for body in (SMALL, BIG):
        # The tools' schema property "usage" comes first, the real usage at the end.
        assert body.index(b'"usage":{"type":"object"}') < body.index(b'"usage":{"input_tokens":21')
        assert body.rindex(b'"usage":{"input_tokens":21') > len(body) - 300


@pytest.mark.parametrize("last", [False, True])
def test_a_schema_property_named_usage_is_passed_over(last: bool) -> None:
    for k in range(len(SMALL) + 1):
        tap = run(split_at(SMALL, k), last=last)
        assert tap.usage == WANT and tap.response_id == RESP_ID, k
    rng = random.Random(2)
    for _ in range(150):
        cuts = sorted(rng.sample(range(1, len(BIG)), rng.randint(1, 30)))
        tap = run(split_at(BIG, *cuts), last=last)
        assert tap.usage == WANT and tap.response_id == RESP_ID
    assert run([BIG[i:i + 1] for i in range(len(BIG))], last=last).usage == WANT


def test_usage_from_body_looks_past_an_object_that_is_not_usage() -> None:
    body = b'{"usage":{"prompt_tokens":1,"completion_tokens":1,"total_tokens":2},"x":{"usage":{"type":"object"}}}'
    assert usage_from_body(body) == Usage(1, 1, 2)
    body = b'{"usage":{"prompt_tokens":1},"x":{"usage":{"type":"object","properties":{"prompt_tokens":{}}}}}'
    assert usage_from_body(body) == Usage(1, 0, 1)
    # A null usage is still the end of the search (the last usage key has no counts).
    assert usage_from_body(b'{"tools":[{"usage":{"prompt_tokens":1}}],"usage":null}') is None
    assert usage_from_body(b'{"usage":{"type":"object"}}') is None


def test_last_mode_does_not_take_a_usage_object_forged_in_the_tools() -> None:
    forged = dict(SCHEMA_TOOL, parameters={"usage": {"input_tokens": 0, "output_tokens": 0, "total_tokens": 0},
                                              "pad": "x" * 6000})
    body = responses_body("x" * 20_000, [forged])
    rng = random.Random(6)
    for _ in range(100):
        cuts = sorted(rng.sample(range(1, len(body)), rng.randint(0, 20)))
        assert run(split_at(body, *cuts), last=True).usage == WANT
    # Why the Responses API and Messages need last mode: the first object found is the client's.
    assert run([body]).usage == Usage(0, 0, 0)


def test_last_mode_on_an_anthropic_body_with_a_tool_use_input() -> None:
    # vLLM's AnthropicMessagesResponse, model_dump(exclude_none=True): a model-written tool input first.
    body = dumps({"id": "chatcmpl-9d2f", "type": "message", "role": "assistant", "content": [
        {"type": "text", "text": "pad " * 3000},
        {"type": "tool_use", "id": "call_1", "name": "f", "input": {"usage": {"input_tokens": 1, "output_tokens": 1}}}],
        "model": "qwen3", "stop_reason": "tool_use", "usage": {"input_tokens": 40, "output_tokens": 9}})
    for k in range(0, len(body), 97):
        tap = run(split_at(body, k), last=True)
        assert tap.usage == Usage(40, 9, 49) and tap.response_id == "chatcmpl-9d2f", k


def test_last_mode_on_a_chat_body_with_a_long_prompt_tail() -> None:
    tail = b',"prompt_token_ids":[' + b",".join(b"%d" % i for i in range(5000)) + b'],"kv_transfer_params":null}'
    body = (b'{"id":"chatcmpl-1","object":"chat.completion","created":1,"model":"m","choices":[],'
            b'"usage":{"prompt_tokens":12,"total_tokens":40,"completion_tokens":28}' + tail)
    for size in (1, 100, 4096, 10_000, len(body)):
        tap = run([body[i:i + size] for i in range(0, len(body), size)], last=True)
        assert tap.usage == Usage(12, 28, 40), size


# -- response_id ---------------------------------------------------------------------------------------

ANTHROPIC = b'{"id":"chatcmpl-abc","type":"message","role":"assistant","content":[],"usage":{"input_tokens":1,"output_tokens":2}}'


@pytest.mark.parametrize(("body", "want"), [(SMALL, RESP_ID), (ANTHROPIC, "chatcmpl-abc")])
def test_response_id_at_every_split(body: bytes, want: str) -> None:
    for k in range(len(body) + 1):
        assert run(split_at(body, k)).response_id == want, k
    for a in range(60):
        for b in range(a, 70, 3):
            assert run(split_at(body, a, b)).response_id == want, (a, b)
    assert run([body[i:i + 1] for i in range(len(body))]).response_id == want


@pytest.mark.parametrize(("body", "want"), [
    (b' \n{ "id" :\t"resp_1" , "x":1}', "resp_1"),
    (b'{"id":"' + b"a" * 256 + b'"}', "a" * 256),
    (b'{"id":"' + b"a" * 257 + b'"}', None),
    (b'{"object":"response","id":"resp_1"}', None),  # not the first member
    (b'{"id":"a\\"b"}', None),  # an escape: not an id we take
    (b'{"id":"caf\xc3\xa9"}', None),  # not printable ASCII
    (b'{"id":""}', None),
    (b'{"id":1}', None),
    (b'["id"]', None),
    (b'{"ids":"x"}', None),
    (b"", None),
    (b"{" + b" " * 600 + b'"id":"x"}', None),  # past the first 512 bytes
    (b'{"id":"resp_1"', "resp_1"),  # the body cut right after it
    (b'{"id":"resp_1', None),
])
def test_response_id_cases(body: bytes, want: str | None) -> None:
    for k in range(0, len(body) + 1, max(1, len(body) // 40)):
        assert run(split_at(body, k)).response_id == want, k


def test_response_id_never_looks_past_512_bytes() -> None:
    tap = BodyTail()
    tap.feed(b"{" + b" " * 300)
    assert tap._head is not None  # still undecided
    tap.feed(b" " * 300)
    assert tap._head is None and tap.response_id is None  # decided at 512 bytes, nothing more kept
    tap = BodyTail()
    tap.feed(b'{"x"')
    assert tap._head is None  # decided as soon as it cannot match
    assert first_id(b'{"i') == (False, None) and first_id(b'{"id":"r') == (False, None)
    assert first_id(b'{"id":"r"') == (True, "r") and first_id(b'{"ix') == (True, None)
