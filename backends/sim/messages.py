"""The Anthropic Messages API of the simulated vLLM: POST /v1/messages and /v1/messages/count_tokens.

Strategy: do what vLLM's `AnthropicServingMessages` does -- turn the request into a chat completion
request (system text joined into one system message, content blocks into chat content, tool_use and
tool_result blocks into tool calls and tool messages, tools into functions, tool_choice auto/any/tool/
none into auto/required/named/none; streams ask for `include_usage` and `continuous_usage_stats`),
plan it with the chat planner (so validation, the tool-choice gate, token counts and texts are the
chat ones; as max_tokens is mandatory it is a cap: a synthetic answer is `default_max_tokens` words,
"end_turn", unless max_tokens cuts it, "max_tokens"), and convert the result: the full body with `messages_full_converter`'s rules, the stream
by running `message_stream_converter`'s state machine over the chat plan's own SSE events, so every
Anthropic event keeps the step (and thus the time) of the chat chunk it came from.

Shapes, from vLLM's `vllm/entrypoints/anthropic/` (serving.py @0001948b, protocol.py @00589e56,
api_router.py @01540b75):
- the body is `AnthropicMessagesResponse.model_dump(exclude_none=True)`: id (the chat id,
  "chatcmpl-..."), type "message", role "assistant", content blocks, model, stop_reason (end_turn,
  max_tokens, tool_use), usage {input_tokens, output_tokens}; `stop_sequence` is null and so absent;
- stream events are `event: NAME\ndata: JSON\n\n`, each `model_dump_json(exclude_unset=True)` in the
  pydantic field order (type, message, delta, content_block, index, error, usage): message_start (its
  message has no type/role, which were never set, and usage {input_tokens, output_tokens: 0}),
  content_block_start / content_block_delta (text_delta, input_json_delta) / content_block_stop,
  message_delta {stop_reason} + usage, message_stop; no `data: [DONE]`;
- errors are `{"type": "error", "error": {"type": <vLLM's error type>, "message": ...}}` with the
  status of the underlying error (vLLM's `translate_error_response`); request-body validation goes
  through vLLM's global handler, so it keeps the OpenAI envelope;
- count_tokens answers {"input_tokens": N, "context_management": {"original_input_tokens": N}}.
"""

from __future__ import annotations

import json
from typing import Any

import msgspec

from backends.sim.planning import Planner
from backends.sim.prompt_tokens import Segment
from backends.sim.responses import Plan, SimError, invalid_body

_enc = msgspec.json.Encoder()
_STOP = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use"}
# What vLLM's converter reports when the chat stream carries an in-band error: the pydantic error of
# parsing `{"error": ...}` as a ChatCompletionStreamResponse (pydantic 2.14's wording).
_SEEN = "input_value={'error': {'message': 'In...am': None, 'code': 500}}, input_type=dict]"
_INBAND_MESSAGE = ("2 validation errors for ChatCompletionStreamResponse\nmodel\n  Field required [type=missing, "
                   f"{_SEEN}\n    For further information visit https://errors.pydantic.dev/2.14/v/missing\n"
                   f"choices\n  Field required [type=missing, {_SEEN}\n    For further information visit "
                   "https://errors.pydantic.dev/2.14/v/missing")


class _Block(msgspec.Struct):
    type: str
    text: str | None = None
    source: dict[str, Any] | None = None
    id: str | None = None
    tool_use_id: str | None = None
    name: str | None = None
    input: dict[str, Any] | None = None
    content: str | list[Any] | None = None
    thinking: str | None = None


class _Message(msgspec.Struct):
    role: str
    content: str | list[_Block]


class _Tool(msgspec.Struct):
    name: str
    input_schema: dict[str, Any]
    description: str | None = None
    defer_loading: bool | None = None


class _ToolChoice(msgspec.Struct):
    type: str
    name: str | None = None


class _CountRequest(msgspec.Struct):
    model: str
    messages: list[_Message]
    system: str | list[_Block] | None = None
    tool_choice: _ToolChoice | None = None
    tools: list[_Tool] | None = None


class _Request(_CountRequest, kw_only=True):
    max_tokens: int
    stream: bool | None = False
    stop_sequences: list[str] | None = None
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None


_request = msgspec.json.Decoder(_Request)
_count = msgspec.json.Decoder(_CountRequest)
_ROLES = {"ctx": "user", "msg": "user"}  # vLLM's normalize_role


def anthropic_error(exc: SimError) -> SimError:
    """vLLM's `translate_error_response`: the serving error's type and message, Anthropic's envelope.
    Request validation errors (FastAPI's handler, type "Bad Request") keep the OpenAI envelope."""
    info = json.loads(exc.body)["error"]
    if not isinstance(info, dict) or info.get("type") == "Bad Request":
        return exc
    return SimError(exc.status, _enc.encode({"type": "error", "error": {"type": info["type"],
                                                                        "message": info["message"]}}))


def _decode(decoder: msgspec.json.Decoder, body: bytes) -> Any:
    try:
        req = decoder.decode(body)
    except msgspec.ValidationError as exc:
        text = str(exc)
        if "missing required field" in text:
            field = text.split("`")[1] if "`" in text else "body"
            raise invalid_body("Field required", ("body", field), "missing") from None
        raise invalid_body(text, ("body",), "value_error") from None
    except msgspec.DecodeError:
        raise invalid_body("JSON decode error", ("body", 0), "json_invalid") from None
    if not req.model:
        raise invalid_body("Value error, Model is required", ("body", "model"))
    if isinstance(req, _Request) and req.max_tokens <= 0:
        raise invalid_body("Value error, max_tokens must be positive", ("body", "max_tokens"))
    for m in req.messages:
        m.role = _ROLES.get(m.role, m.role)
        if m.role not in ("user", "assistant", "system"):
            raise invalid_body("Input should be 'user', 'assistant' or 'system'", ("body", "messages", "role"),
                               "literal_error")
    choice = req.tool_choice
    if choice is not None:
        if choice.type not in ("auto", "any", "tool", "none"):
            raise invalid_body("Input should be 'auto', 'any', 'tool' or 'none'", ("body", "tool_choice", "type"),
                               "literal_error")
        if choice.type == "tool" and not choice.name:
            raise invalid_body("Value error, tool_choice.name is required when type is 'tool'",
                               ("body", "tool_choice"))
    return req


def _system_text(blocks: str | list[_Block]) -> list[str]:
    if isinstance(blocks, str):
        return [blocks]
    return [b.text for b in blocks if b.type == "text" and b.text and not b.text.startswith("x-anthropic-billing-header")]


def chat_body(req: _CountRequest) -> dict[str, Any]:
    """`_convert_anthropic_to_openai_request`: the chat completion request vLLM plans."""
    out: list[dict[str, Any]] = []
    system = _system_text(req.system) if req.system else []
    for m in req.messages:
        if m.role == "system":
            system += _system_text(m.content)
    if system:
        out.append({"role": "system", "content": "".join(system)})
    for m in req.messages:
        if m.role == "system":
            continue
        msg: dict[str, Any] = {"role": m.role}
        if isinstance(m.content, str):
            msg["content"] = m.content
        else:
            parts: list[dict[str, Any]] = []
            calls: list[dict[str, Any]] = []
            reasoning: list[str] = []
            for b in m.content:
                if b.type == "text" and b.text:
                    parts.append({"type": "text", "text": b.text})
                elif b.type == "thinking" and b.thinking is not None:
                    reasoning.append(b.thinking)
                elif b.type == "tool_use":
                    calls.append({"id": b.id or "call_0", "type": "function",
                                  "function": {"name": b.name or "", "arguments": json.dumps(b.input or {})}})
                elif b.type == "tool_result":
                    if m.role == "user":
                        text = b.content if isinstance(b.content, str) else "\n".join(
                            i.get("text", "") for i in b.content or () if isinstance(i, dict) and i.get("type") == "text")
                        out.append({"role": "tool", "tool_call_id": b.tool_use_id or "", "content": text or ""})
                    else:
                        parts.append({"type": "text", "text": f"Tool result: {b.content or ''}"})
            if reasoning:
                msg["reasoning"] = "".join(reasoning)
            if calls:
                msg["tool_calls"] = calls
            if parts:
                msg["content"] = parts[0]["text"] if len(parts) == 1 else parts
        if not (m.role == "user" and "content" not in msg):
            out.append(msg)
    body: dict[str, Any] = {"model": req.model, "messages": out}
    if isinstance(req, _Request):
        body["max_tokens"] = body["max_completion_tokens"] = req.max_tokens
        if req.stream:
            body["stream"] = True
            body["stream_options"] = {"include_usage": True, "continuous_usage_stats": True}
    choice = req.tool_choice
    if choice is not None:
        body["tool_choice"] = {"auto": "auto", "any": "required", "none": "none"}.get(choice.type) or {
            "type": "function", "function": {"name": choice.name}}
    if req.tools is not None:
        body["tools"] = [{"type": "function", "function": {
            "name": t.name, "description": t.description, "parameters": {"type": "object", **t.input_schema},
            "defer_loading": t.defer_loading}} for t in req.tools]
        body.setdefault("tool_choice", "auto")
    return body


class MessagesPlan:
    """An Anthropic request planned as chat (`inner`), rendered as Anthropic bodies and events."""

    overhead = 1  # message_start

    def __init__(self, inner: Plan) -> None:
        self.inner = inner
        self.model = inner.model
        self.prompt_tokens = inner.prompt_tokens
        self.stream = inner.stream
        self._marks: list[int] = []  # tokens on the wire after each event written

    @property
    def completion_tokens(self) -> int:
        return self.inner.completion_tokens

    @property
    def max_steps(self) -> int:
        return self.inner.max_steps

    @property
    def finish(self) -> str:
        return self.inner.finish

    def prompt_sequences(self) -> list[list[Segment]]:
        return self.inner.prompt_sequences()

    def streamed_tokens(self, events: int) -> int:
        if not self.stream or events <= 0:
            return 0
        return self._marks[min(events, len(self._marks)) - 1]

    def inband_error(self) -> bytes | None:
        return _event("error", {"type": "error", "error": {"type": "internal_error", "message": _INBAND_MESSAGE}})

    def error_body(self) -> tuple[int, bytes]:
        return 500, _enc.encode({"type": "error", "error": {"type": "InternalServerError",
                                                            "message": "Internal server error"}})

    def body(self) -> bytes:
        """`messages_full_converter`, dumped with exclude_none."""
        c = self.inner.choices[0]
        content: list[dict[str, Any]] = []
        if c.tool_name is None:
            if c.text():
                content.append({"type": "text", "text": c.text()})
        else:
            content.append({"type": "tool_use", "id": c.tool_id, "name": c.tool_name, "input": json.loads(c.text())})
        usage = {"input_tokens": self.prompt_tokens, "output_tokens": self.completion_tokens}
        return _enc.encode({"id": self.inner.rid, "type": "message", "role": "assistant", "content": content,
                            "model": self.model, "stop_reason": _STOP[c.finish], "usage": usage})

    def events(self):
        """`message_stream_converter` over the chat plan's SSE events."""
        first = True
        finish: str | None = None
        index = 0  # content_block_index
        active: str | None = None  # the open block's type
        tool_ids: dict[int, str] = {}
        active_tool: str | None = None
        marks = self._marks
        inner = self.inner
        for k, (step, event) in enumerate(inner.events()):
            tokens = inner.streamed_tokens(k + 1)
            out: list[bytes] = []
            data = event[6:].rstrip(b"\n")
            if data == b"[DONE]":
                out.append(_event("message_stop", {"type": "message_stop"}))
            else:
                chunk = json.loads(data)
                usage = chunk.get("usage") or {}
                if first:
                    first = False
                    out.append(_event("message_start", {"type": "message_start", "message": {
                        "id": chunk["id"], "content": [], "model": chunk["model"], "stop_reason": None,
                        "stop_sequence": None, "usage": {"input_tokens": usage.get("prompt_tokens", 0),
                                                         "output_tokens": 0}}}))
                elif not chunk["choices"]:
                    if active is not None:
                        out.append(_event("content_block_stop", {"type": "content_block_stop", "index": index}))
                        active, active_tool, index = None, None, index + 1
                    out.append(_event("message_delta", {
                        "type": "message_delta", "delta": {"stop_reason": _STOP[finish or "stop"]},
                        "usage": {"input_tokens": usage.get("prompt_tokens", 0),
                                  "output_tokens": usage.get("completion_tokens", 0)}}))
                else:
                    choice = chunk["choices"][0]
                    finish = choice.get("finish_reason") or finish
                    delta = choice["delta"]
                    text = delta.get("content")
                    if text:
                        if active != "text":
                            if active is not None:
                                out.append(_event("content_block_stop", {"type": "content_block_stop",
                                                                         "index": index}))
                                active_tool, index = None, index + 1
                            out.append(_event("content_block_start", {
                                "type": "content_block_start", "content_block": {"type": "text", "text": ""},
                                "index": index}))
                            active = "text"
                        out.append(_event("content_block_delta", {
                            "type": "content_block_delta", "delta": {"type": "text_delta", "text": text},
                            "index": index}))
                    for call in delta.get("tool_calls") or ():
                        fn = call.get("function") or {}
                        if call.get("id") is not None:
                            tool_ids[call["index"]] = call["id"]
                            if active_tool != call["id"] and fn.get("name") is not None:
                                if active is not None:
                                    out.append(_event("content_block_stop", {"type": "content_block_stop",
                                                                             "index": index}))
                                    index += 1
                                out.append(_event("content_block_start", {
                                    "type": "content_block_start", "content_block": {
                                        "type": "tool_use", "id": call["id"], "name": fn["name"], "input": {}},
                                    "index": index}))
                                active, active_tool = "tool_use", call["id"]
                            current = call["id"]
                        else:
                            current = tool_ids.get(call["index"])
                        if fn.get("arguments") and current is not None and active_tool == current:
                            out.append(_event("content_block_delta", {
                                "type": "content_block_delta",
                                "delta": {"type": "input_json_delta", "partial_json": fn["arguments"]},
                                "index": index}))
            for e in out:
                marks.append(tokens)
                yield step, e


def _event(name: str, data: dict[str, Any]) -> bytes:
    return b"event: %s\ndata: %s\n\n" % (name.encode(), _enc.encode(data))


def plan(planner: Planner, body: bytes, request_id: str | None = None) -> MessagesPlan:
    """POST /v1/messages -> MessagesPlan (raises SimError, in Anthropic's envelope where vLLM uses it)."""
    req = _decode(_request, body)
    try:
        inner = planner.chat(_enc.encode(chat_body(req)), request_id, capped=True)
    except SimError as exc:
        raise anthropic_error(exc) from None
    c = inner.choices[0]
    if not inner.stream and c.tool_name is not None:
        try:
            json.loads(c.text())
        except json.JSONDecodeError as exc:
            if c.tool_mode == "auto" and c.finish == "length":
                # Cut by max_tokens before the call was complete: vLLM's parser finds no tool call
                # and the partial text is the answer.
                c.tool_name, c.tool_mode = None, ""
                return MessagesPlan(inner)
            # A complete but broken call (--break-tool-json): the converter's json.loads fails, the router's 500.
            raise SimError(500, _enc.encode({"type": "error", "error": {"type": "internal_error",
                                                                        "message": str(exc)}})) from None
    return MessagesPlan(inner)


def count_tokens(planner: Planner, body: bytes) -> bytes:
    """POST /v1/messages/count_tokens: the chat prompt vLLM would render, counted."""
    req = _decode(_count, body)
    try:
        n = planner.chat(_enc.encode(chat_body(req))).prompt_tokens
    except SimError as exc:
        raise anthropic_error(exc) from None
    return _enc.encode({"input_tokens": n, "context_management": {"original_input_tokens": n}})


__all__ = ["MessagesPlan", "anthropic_error", "chat_body", "count_tokens", "plan"]
