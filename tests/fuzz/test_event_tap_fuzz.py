"""Fuzz: proxy/usage/event_tap.py on generated Responses API and Anthropic Messages streams.

Streams are built the way vLLM builds them (tests/proxy/usage/test_event_tap.py has the exact
fixtures) with the variations another server or a later vLLM could bring: ``event:`` lines or none,
``type`` first or last in each JSON object, compact or spaced JSON, ``data:`` with or without its
space, CRLF, comments and unknown / error events in between, text deltas holding quotes, braces,
``"usage":{...}`` and ``"type":"response.completed"}`` in their strings, long deltas (lines past the
tap's head window), reasoning and tool deltas, request ``tools`` whose schemas have a ``usage``
property or forge a whole usage object, Anthropic streams with several ``message_delta`` events,
with or without ``input_tokens``, streams cut before their usage.

Asserts:
- on a generated stream cut into random pieces: exactly the usage, delta count and response id the
  stream carries; every ``feed`` returns its argument itself, ``finish`` b"";
- on a hostile stream (the shared single-byte mutations of a generated one, or random bytes built
  from SSE fragments): no exception, and the same (usage, events, response_id) however it is cut
  (one piece, random pieces, byte at a time when short) -- the tap's answer depends on the bytes only.
Example counts: 300 each by default; SPOTINFERENCE_FUZZ_EXAMPLES=N for more.
"""

from __future__ import annotations

import json

from hypothesis import event, given
from hypothesis import strategies as st

from proxy.usage.counts import Usage
from proxy.usage.event_tap import EventUsageTap
from tests.fuzz._common import fuzz_settings, mutated, split

RESP_ID = "resp_0123456789abcdef"
MSG_ID = "chatcmpl-0123456789"
TEXTS = ["Hi", " there", '"', "\\", "{", "}", '"usage":{"input_tokens":1,"output_tokens":2}', "usage",
         '"type":"response.completed"}', '"type":"message_delta"', "\n", "\r\n", "é", "data: x", "event: y", " "]


@st.composite
def texts(draw) -> str:
    if draw(st.integers(0, 9)) == 0:
        return draw(st.sampled_from(TEXTS)) * draw(st.integers(100, 400))  # a long line
    return "".join(draw(st.lists(st.sampled_from(TEXTS), min_size=1, max_size=4)))


class Render:
    """One example's choice of wire details."""

    def __init__(self, draw) -> None:
        self.event_lines = draw(st.booleans())
        self.type_first = draw(st.booleans())
        self.spaced = draw(st.booleans())
        self.space = draw(st.sampled_from([b" ", b" ", b""]))
        self.eol = draw(st.sampled_from([b"\n", b"\n", b"\r\n"]))
        self.noise = draw(st.sampled_from([0, 0, 1]))
        self.draw = draw

    def event(self, kind: str, body: dict) -> bytes:
        obj = ({"type": kind, **body} if self.type_first else {**body, "type": kind})
        seps = (", ", ": ") if self.spaced else (",", ":")
        payload = json.dumps(obj, separators=seps, ensure_ascii=self.draw(st.booleans())).encode()
        eol = self.eol
        out = (b"event: " + kind.encode() + eol if self.event_lines else b"")
        out += b"data:" + self.space + payload + eol + eol
        if self.noise and self.draw(st.integers(0, 3)) == 0:
            out += self.draw(st.sampled_from([
                b": ping" + eol + eol, b"event: ping" + eol + b'data: {"type":"ping"}' + eol + eol,
                b"event: error" + eol + b'data: {"type":"error","code":"x","message":"m","param":null}' + eol + eol,
                b"id: 7" + eol + b"retry: 100" + eol + eol, b"data: [DONE]" + eol + eol]))
        return out


USAGE_DETAILS = {"input_tokens_details": {"cached_tokens": 0}, "output_tokens_details": {"reasoning_tokens": 0}}


@st.composite
def responses_streams(draw):
    r = Render(draw)
    tools = draw(st.sampled_from([
        [], [{"type": "function", "name": "f", "parameters": {"properties": {"usage": {"type": "object"}}}}],
        [{"type": "function", "name": "f", "parameters": {"usage": {"input_tokens": 0, "output_tokens": 0}},
          "description": "d" * draw(st.sampled_from([0, 5000]))}]]))

    def response(status: str, usage) -> dict:
        return {"id": RESP_ID, "created_at": 1, "model": "m", "object": "response", "output": [],
                "tools": tools, "status": status, "truncation": "disabled", "usage": usage, "user": None}

    seq = 0
    out = []
    got_id = None
    if draw(st.booleans()):
        out.append(r.event("response.created", {"response": response("in_progress", None), "sequence_number": seq}))
        got_id = RESP_ID
    deltas = 0
    for _ in range(draw(st.integers(0, 8))):
        seq += 1
        kind = draw(st.sampled_from(["response.output_text.delta", "response.reasoning_text.delta",
                                     "response.function_call_arguments.delta", "response.output_text.done",
                                     "response.output_item.added"]))
        if kind.endswith(".delta"):
            body = {"content_index": 0, "delta": draw(texts()), "item_id": "msg_1", "logprobs": [],
                    "output_index": 0, "sequence_number": seq}
            deltas += 1
        elif kind.endswith(".done"):
            body = {"content_index": 0, "item_id": "msg_1", "logprobs": [], "output_index": 0,
                    "sequence_number": seq, "text": draw(texts())}
        else:
            body = {"item": {"id": "msg_1", "content": [], "role": "assistant", "status": "in_progress",
                             "type": "message"}, "output_index": 0, "sequence_number": seq}
        out.append(r.event(kind, body))
    usage = None
    ending = draw(st.sampled_from(["response.completed", "response.completed", "response.incomplete",
                                   "response.failed", None]))
    if ending is not None:
        p, c = draw(st.integers(0, 10**6)), draw(st.integers(0, 10**6))
        raw = {"input_tokens": p, **USAGE_DETAILS, "output_tokens": c, "total_tokens": p + c}
        out.append(r.event(ending, {"response": response(ending.split(".")[1], raw), "sequence_number": seq + 1}))
        usage = Usage(p, c, p + c)
        got_id = RESP_ID
    return "responses", b"".join(out), (usage, deltas, got_id)


@st.composite
def messages_streams(draw):
    r = Render(draw)
    out = []
    start_in = draw(st.integers(0, 10**6))
    p = c = None
    got_id = None
    if draw(st.booleans()):
        out.append(r.event("message_start", {"message": {
            "id": MSG_ID, "content": [], "model": "m", "stop_reason": None,
            "usage": {"input_tokens": start_in, "output_tokens": 0}}}))
        p, c = start_in, 0
        got_id = MSG_ID
    deltas = 0
    for _ in range(draw(st.integers(0, 8))):
        kind = draw(st.sampled_from(["content_block_delta", "content_block_delta", "content_block_start",
                                     "content_block_stop"]))
        if kind == "content_block_delta":
            delta = draw(st.sampled_from([{"type": "text_delta", "text": draw(texts())},
                                          {"type": "thinking_delta", "thinking": draw(texts())},
                                          {"type": "input_json_delta", "partial_json": draw(texts())}]))
            out.append(r.event(kind, {"delta": delta, "index": 0}))
            deltas += 1
        elif kind == "content_block_start":
            out.append(r.event(kind, {"content_block": {"type": "text", "text": ""}, "index": 0}))
        else:
            out.append(r.event(kind, {"index": 0}))
    seen_delta = False
    for _ in range(draw(st.integers(0, 2))):
        u = {}
        if draw(st.booleans()):
            u["input_tokens"] = draw(st.integers(0, 10**6))
        u["output_tokens"] = draw(st.integers(0, 10**6))
        out.append(r.event("message_delta", {"delta": {"stop_reason": "end_turn"}, "usage": u}))
        if "input_tokens" in u:
            p = u["input_tokens"]
        c = u["output_tokens"]
        seen_delta = True
    if seen_delta or draw(st.booleans()):
        out.append(r.event("message_stop", {}))
    # No usage before a message_delta: a stream cut after message_start is an estimate (taps.py).
    usage = None if not seen_delta else Usage(p or 0, c or 0, (p or 0) + (c or 0))
    return "messages", b"".join(out), (usage, deltas, got_id)


def run(api: str, pieces: list[bytes]) -> tuple:
    tap = EventUsageTap(api)
    for piece in pieces:
        assert tap.feed(piece) is piece
    assert tap.finish() == b""
    assert tap.events >= 0 and (tap.usage is None or isinstance(tap.usage.total_tokens, int))
    return tap.usage, tap.events, tap.response_id


@given(st.data())
@fuzz_settings(300)
def test_generated_streams_are_read_exactly(data) -> None:
    api, stream, want = data.draw(st.one_of(responses_streams(), messages_streams()))
    event(api)
    assert run(api, data.draw(split(stream))) == want
    assert run(api, [stream]) == want


SSE_BITS = [b"event: ", b"data: ", b"data:", b"\n", b"\r\n", b"\r", b"{", b"}", b'"type":', b'"response.completed"',
            b'"message_start"', b'"content_block_delta"', b'"usage":{"input_tokens":3,"output_tokens":4}',
            b'{"type":"message_delta","usage":{"output_tokens":2}}', b'"response":{"id":"r1"', b",", b'"', b"\\",
            b"response.output_text.delta", b"message_delta", b"x" * 600, b": c", b"\xff", b" "]


@st.composite
def hostile_streams(draw):
    if draw(st.integers(0, 3)) == 0:
        api = draw(st.sampled_from(["responses", "messages"]))
        return api, b"".join(draw(st.lists(st.sampled_from(SSE_BITS), max_size=60)))
    api, stream, _ = draw(st.one_of(responses_streams(), messages_streams()))
    return api, draw(mutated(stream, 1.0))


@given(st.data())
@fuzz_settings(300)
def test_hostile_streams_answer_the_same_however_cut(data) -> None:
    api, stream = data.draw(hostile_streams())
    whole = run(api, [stream])
    assert run(api, data.draw(split(stream))) == whole
    assert run(api, data.draw(split(stream))) == whole
    if len(stream) <= 3000:
        assert run(api, [stream[i:i + 1] for i in range(len(stream))]) == whole
