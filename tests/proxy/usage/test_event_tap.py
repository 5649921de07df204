"""EventUsageTap against the named-event streams vLLM emits for /v1/responses and /v1/messages.

The Responses fixtures are built as vLLM builds them: openai-python's event models dumped with
``model_dump_json(indent=None)`` (responses/api_router.py), each as ``event: <type>\\ndata: <json>\\n\\n``;
the response object inside created / completed is vLLM's ``ResponsesResponse`` (its own field order:
``id`` first, ``usage`` after ``output`` and the echoed ``tools``). Every event is checked against
openai-python's types. The Messages fixtures are vLLM's ``AnthropicStreamEvent`` dumps
(``exclude_unset``: ``type`` first, the message's defaulted ``type``/``role`` left out), and a stream
shaped as Anthropic's own API sends it, checked against anthropic-sdk's types.
"""

from __future__ import annotations

import itertools
import json
import random
import tracemalloc

import pytest
from openai.types.responses import (
    ResponseCompletedEvent,
    ResponseContentPartAddedEvent,
    ResponseContentPartDoneEvent,
    ResponseCreatedEvent,
    ResponseInProgressEvent,
    ResponseOutputItemAddedEvent,
    ResponseOutputItemDoneEvent,
    ResponseOutputMessage,
    ResponseOutputText,
    ResponseStreamEvent,
    ResponseTextDeltaEvent,
    ResponseTextDoneEvent,
)
from pydantic import TypeAdapter

from proxy.usage.counts import Usage
from proxy.usage.event_tap import EventUsageTap
from tests.support.pieces import split_at

RESP_ID = "resp_6f1c0e9a2b7d4c8e9f0a1b2c3d4e5f60"
ITEM_ID = "msg_3a9b8c7d6e5f4a3b2c1d0e9f8a7b6c5d"


def dumps(obj) -> bytes:
    # pydantic's model_dump_json: compact, UTF-8 as is.
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


def sse(kind: str, payload: bytes, *, event_line: bool = True) -> bytes:
    return (f"event: {kind}\n".encode() if event_line else b"") + b"data: " + payload + b"\n\n"


TOOLS = [{"name": "get_weather", "parameters": {"type": "object", "properties": {
    "city": {"type": "string"}, "usage": {"type": "object"}}, "required": ["city"]},
    "strict": None, "type": "function", "description": "Weather, with a property named usage."}]

USAGE = {"input_tokens": 21, "input_tokens_details": {"cached_tokens": 0, "input_tokens_per_turn": [],
                                                      "cached_tokens_per_turn": []},
         "output_tokens": 5, "output_tokens_details": {"reasoning_tokens": 0, "tool_output_tokens": 0,
                                                       "output_tokens_per_turn": [],
                                                       "tool_output_tokens_per_turn": []},
         "total_tokens": 26}
WANT = Usage(prompt_tokens=21, completion_tokens=5, total_tokens=26)


def response_obj(status: str, output: list, usage, tools=TOOLS) -> dict:
    # vLLM's ResponsesResponse, in its declaration order.
    return {"id": RESP_ID, "created_at": 1718000000, "incomplete_details": None, "instructions": None,
            "metadata": None, "model": "qwen3", "object": "response", "output": output,
            "parallel_tool_calls": True, "temperature": 0.7, "tool_choice": "auto", "tools": tools,
            "top_p": 1.0, "background": False, "max_output_tokens": 1024, "max_tool_calls": None,
            "previous_response_id": None, "prompt": None, "reasoning": None, "service_tier": "auto",
            "status": status, "text": None, "top_logprobs": None, "truncation": "disabled", "usage": usage,
            "user": None, "input_messages": None, "output_messages": None}


def wrapped(kind: str, response: dict, seq: int) -> bytes:
    # ResponseCreatedEvent / ResponseCompletedEvent with vLLM's response: fields response, sequence_number, type.
    return b'{"response":' + dumps(response) + b',"sequence_number":%d,"type":"%s"}' % (seq, kind.encode())


def responses_stream(words: list[str], *, event_lines: bool = True, usage=USAGE, tools=TOOLS,
                     completed: bool = True) -> tuple[bytes, list[bytes]]:
    """(the stream, each event's data payload)."""
    text = "".join(words)
    payloads: list[tuple[str, bytes]] = []
    seq = itertools.count()
    payloads.append(("response.created", wrapped("response.created", response_obj("in_progress", [], None, tools),
                                                 next(seq))))
    payloads.append(("response.in_progress", wrapped("response.in_progress",
                                                     response_obj("in_progress", [], None, tools), next(seq))))
    msg = ResponseOutputMessage(id=ITEM_ID, type="message", role="assistant", content=[], status="in_progress")
    for ev in (ResponseOutputItemAddedEvent(type="response.output_item.added", sequence_number=next(seq),
                                            output_index=0, item=msg),
               ResponseContentPartAddedEvent(type="response.content_part.added", sequence_number=next(seq),
                                             output_index=0, item_id=ITEM_ID, content_index=0,
                                             part=ResponseOutputText(type="output_text", text="", annotations=[],
                                                                     logprobs=[]))):
        payloads.append((ev.type, ev.model_dump_json(indent=None).encode()))
    for w in words:
        ev = ResponseTextDeltaEvent(type="response.output_text.delta", sequence_number=next(seq), content_index=0,
                                    output_index=0, item_id=ITEM_ID, delta=w, logprobs=[])
        payloads.append((ev.type, ev.model_dump_json(indent=None).encode()))
    done_text = ResponseOutputText(text=text, type="output_text", annotations=[])
    done_msg = ResponseOutputMessage(type="message", role="assistant", content=[done_text], status="completed",
                                     id=ITEM_ID)
    for ev in (ResponseTextDoneEvent(type="response.output_text.done", item_id=ITEM_ID, sequence_number=next(seq),
                                     output_index=0, content_index=0, text=text, logprobs=[]),
               ResponseContentPartDoneEvent(type="response.content_part.done", sequence_number=next(seq),
                                            item_id=ITEM_ID, output_index=0, content_index=0, part=done_text),
               ResponseOutputItemDoneEvent(type="response.output_item.done", sequence_number=next(seq),
                                           output_index=0, item=done_msg)):
        payloads.append((ev.type, ev.model_dump_json(indent=None).encode()))
    if completed:
        final = response_obj("completed", [done_msg.model_dump(mode="json")], usage, tools)
        payloads.append(("response.completed", wrapped("response.completed", final, next(seq))))
    stream = b"".join(sse(k, p, event_line=event_lines) for k, p in payloads)
    return stream, [p for _, p in payloads]


WORDS = ["Hel", "lo", ", \"usage\":{\"input_tokens\":1}", " wor", "ld", " é", "\n", "}"]
STREAM, PAYLOADS = responses_stream(WORDS)

_stream_event = TypeAdapter(ResponseStreamEvent)


def newer_sdk(payload: bytes) -> bytes:
    # openai-python 2.x+ requires input_tokens_details.cache_write_tokens, which vLLM's
    # InputTokensDetails does not have (yet): added for validation only, the tap sees vLLM's bytes.
    return payload.replace(b'"cached_tokens":0,', b'"cached_tokens":0,"cache_write_tokens":0,')


def test_the_responses_fixture_is_what_openai_python_parses() -> None:
    kinds = []
    for payload in PAYLOADS:
        ev = _stream_event.validate_json(newer_sdk(payload))
        kinds.append(ev.type)
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
    done = ResponseCompletedEvent.model_validate_json(newer_sdk(PAYLOADS[-1]))
    assert done.response.usage.input_tokens == 21 and done.response.id == RESP_ID
    assert ResponseCreatedEvent.model_validate_json(PAYLOADS[0]).response.usage is None
    ResponseInProgressEvent.model_validate_json(PAYLOADS[1])
    # vLLM's shapes the tap relies on: type LAST in every event, id first in the response.
    assert all(p.endswith(b'"type":"%s"}' % k.encode()) for p, k in zip(PAYLOADS, kinds, strict=True))
    assert PAYLOADS[0].startswith(b'{"response":{"id":"resp_')


def run(api: str, pieces: list[bytes], prompt_estimate: int = 9) -> EventUsageTap:
    tap = EventUsageTap(api, prompt_estimate=prompt_estimate)
    for p in pieces:
        assert tap.feed(p) is p
    assert tap.finish() == b""
    return tap


def test_interface() -> None:
    tap = EventUsageTap("responses")
    assert tap.rewrites is False and tap.usage is None and tap.events == 0 and tap.prompt_estimate is None
    assert tap.response_id is None
    assert EventUsageTap("messages", prompt_estimate=4).prompt_estimate == 4
    with pytest.raises(ValueError):
        EventUsageTap("chat")
    assert tap.feed(b"") == b"" and tap.finish() == b""


def test_responses_every_two_way_split() -> None:
    for k in range(len(STREAM) + 1):
        tap = run("responses", split_at(STREAM, k))
        assert tap.usage == WANT, k
        assert tap.events == len(WORDS), k
        assert tap.response_id == RESP_ID, k


def test_responses_byte_at_a_time_random_splits_and_crlf() -> None:
    tap = run("responses", [STREAM[i:i + 1] for i in range(len(STREAM))])
    assert (tap.usage, tap.events, tap.response_id) == (WANT, len(WORDS), RESP_ID)
    rng = random.Random(3)
    crlf = STREAM.replace(b"\n\n", b"\r\n\r\n").replace(b"\ndata:", b"\r\ndata:")
    assert b"\r\n" in crlf
    for src in (STREAM, crlf, b": keep-alive\n\n" + STREAM):
        for _ in range(200):
            cuts = sorted(rng.sample(range(1, len(src)), rng.randint(1, 40)))
            tap = run("responses", split_at(src, *cuts))
            assert (tap.usage, tap.events, tap.response_id) == (WANT, len(WORDS), RESP_ID)


def test_responses_without_event_lines_the_json_type_decides() -> None:
    stream, _ = responses_stream(WORDS, event_lines=False)
    for k in range(0, len(stream) + 1, 7):
        tap = run("responses", split_at(stream, k))
        assert (tap.usage, tap.events, tap.response_id) == (WANT, len(WORDS), RESP_ID), k
    # The JSON's type wins over a contradicting event: line.
    liar = sse("response.output_text.delta", PAYLOADS[-4])  # really response.output_text.done
    assert run("responses", [liar]).events == 0
    assert run("responses", [sse("response.output_text.done", PAYLOADS[5])]).events == 1


def test_responses_missing_usage() -> None:
    stream, _ = responses_stream(WORDS, completed=False)
    tap = run("responses", [stream[:100], stream[100:]])
    assert tap.usage is None and tap.events == len(WORDS) and tap.response_id == RESP_ID
    # A completed event whose usage is null: nothing found (the tools' "usage" property is not usage).
    stream, _ = responses_stream(WORDS, usage=None)
    for k in range(0, len(stream), 11):
        assert run("responses", split_at(stream, k)).usage is None


def test_responses_a_usage_object_forged_in_the_tools_is_not_taken() -> None:
    forged = [{"type": "function", "name": "f", "strict": None, "description": None,
               "parameters": {"usage": {"input_tokens": 0, "output_tokens": 0, "total_tokens": 0},
                              "pad": "x" * 9000}}]
    stream, _ = responses_stream(WORDS, tools=forged)
    rng = random.Random(8)
    for _ in range(100):
        cuts = sorted(rng.sample(range(1, len(stream)), rng.randint(1, 20)))
        assert run("responses", split_at(stream, *cuts)).usage == WANT
    assert run("responses", [stream]).usage == WANT


def test_responses_incomplete_and_failed_events_carry_usage() -> None:
    for kind in ("response.incomplete", "response.failed"):
        payload = wrapped(kind, response_obj(kind.split(".")[1], [], USAGE), 9)
        for event_line in (True, False):
            ev = sse(kind, payload, event_line=event_line)
            for k in range(0, len(ev) + 1, 5):
                tap = run("responses", split_at(ev, k))
                assert tap.usage == WANT and tap.response_id == RESP_ID, (kind, k)


def test_responses_the_last_terminal_event_wins_and_an_unterminated_one_counts() -> None:
    other = dict(USAGE, input_tokens=1, output_tokens=1, total_tokens=2)
    first = sse("response.completed", wrapped("response.completed", response_obj("completed", [], other), 1))
    tap = run("responses", [first, STREAM])
    assert tap.usage == WANT
    cut = STREAM.rstrip(b"\n")  # the stream ends right after the completed event's JSON
    tap = run("responses", split_at(cut, len(cut) - 30))
    assert tap.usage == WANT
    cut_delta = STREAM[: STREAM.index(b'"response.output_text.delta"}') + 29]  # a delta without its newline
    assert run("responses", [cut_delta]).events == 0


def test_responses_error_event_and_garbage() -> None:
    error = sse("error", b'{"code":"server_error","message":"boom","param":null,"sequence_number":3,"type":"error"}')
    vllm_error = b'data: {"error": {"message": "Internal server error", "type": "InternalServerError"}}\n\n'
    junk = [b"data: {not json\n\n", b"data: [DONE]\n\n", b"event: response.completed\ndata: {\n\n",
            b"event: response.completed\ndata: \xff\xfe\x00\n\n", b"data:\n\n", b"event:\n\n", b"\n\n\n",
            b'event: response.completed\ndata: {"response":{"usage":{"input_tokens":"x"}}}\n\n',
            b": comment\nid: 4\nretry: 10\n\n", b"event: " + b"x" * 10_000 + b"\n\n"]
    head = STREAM[: STREAM.index(b"event: response.output_text.delta")]
    stream = head + error + vllm_error + b"".join(junk)
    for k in itertools.chain(range(0, len(stream) + 1, 3), range(len(stream) - 10_100, len(stream) + 1)):
        tap = run("responses", split_at(stream, k))
        assert tap.usage is None and tap.events == 0 and tap.response_id == RESP_ID, k
    tap = run("responses", [stream + STREAM])
    assert tap.usage == WANT and tap.events == len(WORDS)


def test_responses_giant_completed_event_bounded_memory() -> None:
    words = ["x" * 100] * 100_000  # 10 MB of output text
    big, _ = responses_stream(["tok"] * 3, usage=USAGE)
    final = response_obj("completed", [ResponseOutputMessage(
        type="message", role="assistant", content=[ResponseOutputText(text="".join(words), type="output_text",
                                                                      annotations=[])],
        status="completed", id=ITEM_ID).model_dump(mode="json")], USAGE)
    completed = sse("response.completed", wrapped("response.completed", final, 99))
    assert len(completed) > 10_000_000
    stream = big[: big.index(b"event: response.completed")] + completed
    size = 65536
    pieces = [stream[i:i + size] for i in range(0, len(stream), size)]
    tracemalloc.start()
    try:
        tap = EventUsageTap("responses")
        for p in pieces:
            tap.feed(p)
            assert len(tap._head) <= 512 and len(tap._tail) <= 129 and tap._held is None
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    tap.finish()
    assert tap.usage == WANT and tap.events == 3 and tap.response_id == RESP_ID
    assert peak < 1_000_000, peak
    # All of it in one piece: searched where it is, sliced 1 MiB at a time at most.
    tracemalloc.start()
    try:
        tap = EventUsageTap("responses")
        tap.feed(stream)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert tap.usage == WANT and peak < 3_000_000, peak


# -- Anthropic Messages --------------------------------------------------------------------------------

MSG_ID = "chatcmpl-9d2f0c4b1a8e4f7b"


def vllm_messages_stream(texts: list[str], *, start_in: int = 12, delta_usage: dict | None = None,
                         end: bool = True) -> bytes:
    """What vLLM's AnthropicServingMessages.message_stream_converter sends (exclude_unset dumps)."""
    out = [sse("message_start", dumps({"type": "message_start", "message": {
        "id": MSG_ID, "content": [], "model": "qwen3", "stop_reason": None, "stop_sequence": None,
        "usage": {"input_tokens": start_in, "output_tokens": 0}}}))]
    out.append(sse("content_block_start", dumps({"type": "content_block_start",
                                                 "content_block": {"type": "text", "text": ""}, "index": 0})))
    for t in texts:
        out.append(sse("content_block_delta", dumps({"type": "content_block_delta",
                                                     "delta": {"type": "text_delta", "text": t}, "index": 0})))
    if end:
        out.append(sse("content_block_stop", dumps({"type": "content_block_stop", "index": 0})))
        usage = {"input_tokens": 12, "output_tokens": 7} if delta_usage is None else delta_usage
        out.append(sse("message_delta", dumps({"type": "message_delta", "delta": {"stop_reason": "end_turn"},
                                               "usage": usage})))
        out.append(sse("message_stop", dumps({"type": "message_stop"})))
    return b"".join(out)


TEXTS = ["Hi", " there", ' "usage":{"output_tokens":0}', "é", "}"]
MESSAGES = vllm_messages_stream(TEXTS)
MSG_WANT = Usage(prompt_tokens=12, completion_tokens=7, total_tokens=19)


def test_messages_every_split() -> None:
    for k in range(len(MESSAGES) + 1):
        tap = run("messages", split_at(MESSAGES, k))
        assert (tap.usage, tap.events, tap.response_id) == (MSG_WANT, len(TEXTS), MSG_ID), k
    tap = run("messages", [MESSAGES[i:i + 1] for i in range(len(MESSAGES))])
    assert (tap.usage, tap.events, tap.response_id) == (MSG_WANT, len(TEXTS), MSG_ID)
    rng = random.Random(5)
    crlf = MESSAGES.replace(b"\n", b"\r\n")
    for _ in range(300):
        cuts = sorted(rng.sample(range(1, len(crlf)), rng.randint(1, 30)))
        tap = run("messages", split_at(crlf, *cuts))
        assert (tap.usage, tap.events, tap.response_id) == (MSG_WANT, len(TEXTS), MSG_ID)


def test_messages_counts_rules() -> None:
    # Only message_start came (the stream was cut): no usage -- the record is an estimate -- but its
    # input count, vLLM's own, becomes the estimate's prompt part; the deltas its completion part.
    tap = run("messages", [vllm_messages_stream(TEXTS, end=False)], prompt_estimate=500)
    assert tap.usage is None and tap.events == len(TEXTS) and tap.prompt_estimate == 12
    # message_delta without input_tokens (Anthropic's own API): the input from message_start.
    tap = run("messages", [vllm_messages_stream(TEXTS, delta_usage={"output_tokens": 30})])
    assert tap.usage == Usage(prompt_tokens=12, completion_tokens=30, total_tokens=42)
    # message_delta's input_tokens is preferred; the LAST message_delta wins.
    two = vllm_messages_stream(TEXTS, start_in=3, delta_usage={"input_tokens": 14, "output_tokens": 1})
    two += sse("message_delta", b'{"type":"message_delta","delta":{},"usage":{"output_tokens":8}}')
    assert run("messages", [two]).usage == Usage(prompt_tokens=14, completion_tokens=8, total_tokens=22)
    # A message_delta whose usage carries no count changes nothing.
    empty = MESSAGES + sse("message_delta", b'{"type":"message_delta","delta":{},"usage":{}}')
    assert run("messages", [empty]).usage == MSG_WANT
    # No event: lines, the type not first: the JSON decides.
    bare = (b'data: {"message":{"id":"m1","usage":{"input_tokens":2,"output_tokens":0}},"type":"message_start"}\n\n'
            b'data: {"index":0,"type":"content_block_delta","delta":{"type":"text_delta","text":"a"}}\n\n'
            b'data: {"delta":{"type":"text_delta","text":"b"},"index":0,"type":"content_block_delta"}\n\n'
            b'data: {"delta":{},"usage":{"output_tokens":2},"type":"message_delta"}\n\n')
    for k in range(len(bare) + 1):
        tap = run("messages", split_at(bare, k))
        assert (tap.usage, tap.events, tap.response_id) == (Usage(2, 2, 4), 2, "m1"), k


def test_messages_oversized_and_invalid_events_are_given_up() -> None:
    huge = sse("message_start", dumps({"type": "message_start", "message": {
        "id": "big", "content": [], "pad": "x" * 70_000, "usage": {"input_tokens": 99, "output_tokens": 0}}}))
    for pieces in ([huge + MESSAGES[MESSAGES.index(b"event: content_block_start"):]],
                   split_at(huge, 1000, 50_000) + [MESSAGES[MESSAGES.index(b"event: content_block_start"):]]):
        tap = run("messages", pieces)
        assert tap.usage == MSG_WANT  # message_delta's input_tokens; the oversized start counted nothing
    garbage = (b'event: message_start\ndata: {"type":"message_start","message":{"usage":{"input_tokens":"x"}}}\n\n'
               b'event: message_delta\ndata: {"type":"message_delta","usage":[1]}\n\n'
               b"event: message_delta\ndata: not json\n\n"
               b'event: error\ndata: {"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}\n\n'
               b'event: ping\ndata: {"type": "ping"}\n\n')
    for k in range(len(garbage) + 1):
        tap = run("messages", split_at(garbage, k))
        assert tap.usage is None and tap.events == 0, k


def test_messages_anthropic_api_shapes_validate_with_the_sdk() -> None:
    anthropic = pytest.importorskip("anthropic")
    events = [
        {"type": "message_start", "message": {"id": "msg_01XFDUDYJgAACzvnptvVoYEL", "type": "message",
                                              "role": "assistant", "content": [], "model": "claude-x",
                                              "stop_reason": None, "stop_sequence": None,
                                              "usage": {"input_tokens": 25, "output_tokens": 1}}},
        {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
        {"type": "ping"},
        {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Hello"}},
        {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "!"}},
        {"type": "content_block_stop", "index": 0},
        {"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None},
         "usage": {"output_tokens": 15}},
        {"type": "message_stop"},
    ]
    adapter = TypeAdapter(anthropic.types.RawMessageStreamEvent)
    stream = b""
    for ev in events:
        if ev["type"] != "ping":
            adapter.validate_python(ev)
        stream += sse(ev["type"], json.dumps(ev).encode())  # Anthropic's spacing: ", " and ": "
    for k in range(len(stream) + 1):
        tap = run("messages", split_at(stream, k))
        assert tap.usage == Usage(prompt_tokens=25, completion_tokens=15, total_tokens=40), k
        assert tap.events == 2 and tap.response_id == "msg_01XFDUDYJgAACzvnptvVoYEL"


def test_streams_of_the_other_api_yield_nothing() -> None:
    assert run("messages", [STREAM]).usage is None
    tap = run("responses", [MESSAGES])
    assert tap.usage is None and tap.events == 0
