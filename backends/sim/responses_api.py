"""The OpenAI Responses API of the simulated vLLM: POST /v1/responses, GET /v1/responses/{id},
POST /v1/responses/{id}/cancel, and the per-server response store behind them.

Strategy: a request becomes a `ResponsesPlan` with the surface the server's generation machinery
already drives (`model`, `prompt_tokens`, `stream`, `completion_tokens`, `max_steps`, `finish`,
`body()`, `events()`, `streamed_tokens()`), so pacing, disconnects, faults and the books are those
of chat. The conversation is built as vLLM's `construct_input_messages` builds it (instructions as a
system message, then the stored messages and assistant outputs of `previous_response_id`, then the
input) and counted with the chat prompt rule; the answer text follows the planner's rules. The store
is an LRU per server (`ResponseStore`), which is the point: a retrieval only succeeds on the host
that created the id.

Shapes, from vLLM's `vllm/entrypoints/openai/responses/` (serving.py @4d89a999, protocol.py
@c0bc5965, api_router.py @f6e93254, context.py @914dad9c):
- the body is `ResponsesResponse.model_dump()` in its field order (id "resp_<32 hex>" ... usage, user,
  input_messages, output_messages); usage per `ResponseUsage` with the per-turn lists empty
  (SimpleContext keeps no turn metrics); status "incomplete" + incomplete_details
  {"reason": "max_output_tokens"} when the limit cut the answer;
- output items are dumped as the openai SDK dumps them (ResponseOutputMessage with "phase", the
  function call with "async_"/"caller"/"namespace"); the non-streamed message id is "msg_<32 hex>";
- a stream is `event: TYPE\ndata: JSON\n\n` per event, no `[DONE]`: response.created,
  response.in_progress (both before the first token), then on the first token
  response.output_item.added (item id: a dashed uuid4) and response.content_part.added, one
  response.output_text.delta per token, response.output_text.done, response.content_part.done,
  response.output_item.done (whose item carries vLLM's stray "summary": []) and response.completed
  with the final response (new message id, as vLLM rebuilds it). `content_index` counts the way
  vLLM's `_process_simple_streaming_events` does: 0 for the part, then one more per delta.
- errors: unknown previous_response_id / retrieval -> 404 "Response with id '<id>' not found."
  (type "invalid_request_error", param "response_id"); cancelling a response that is not queued or in
  progress -> 400 "Cannot cancel a synchronous response."; a prompt of max_model_len tokens or more ->
  400 "The engine prompt length N exceeds the max_model_len M. Please reduce prompt." (param "input").
- tools: function tools are counted in the prompt; a call is made for a named or "required"
  tool_choice, or for "auto" when the server has auto tool choice enabled (and the input does not end
  with a function_call_output). As vLLM's simple streaming path has no tool-call events, a stream
  shows the call's raw hermes markup as output_text and response.completed carries the parsed
  function_call item.
- background (non-streaming): answered at once with status "queued"; the generation runs in the
  server's background and replaces the stored response when done; cancel makes it "cancelled".
"""

from __future__ import annotations

import collections
import json
import time
import uuid
from typing import Any

import msgspec

from backends.sim import prompt_tokens
from backends.sim.planning import Planner, chat_prompt_tokens, text_of
from backends.sim.prompt_tokens import Segment
from backends.sim.responses import (
    GENERATION_ERROR_BODY,
    Choice,
    OneChoice,
    SimError,
    SimOptions,
    bad_request,
    error,
    instance,
    invalid_body,
)

RESPONSES_KEPT = 10_000  # the store is an LRU of this many responses

_enc = msgspec.json.Encoder()


class _Request(msgspec.Struct):
    input: str | list[Any]
    model: str | None = None
    instructions: str | None = None
    max_output_tokens: int | None = None
    max_tool_calls: int | None = None
    metadata: dict[str, Any] | None = None
    parallel_tool_calls: bool | None = True
    previous_response_id: str | None = None
    prompt: Any = None
    reasoning: dict[str, Any] | None = None
    service_tier: str = "auto"
    store: bool | None = True
    stream: bool | None = False
    background: bool | None = False
    temperature: float | None = None
    text: dict[str, Any] | None = None
    tool_choice: str | dict[str, Any] = "auto"
    tools: list[dict[str, Any]] = msgspec.field(default_factory=list)
    top_p: float | None = None
    truncation: str | None = "disabled"
    user: str | None = None
    include: list[str] | None = None
    top_logprobs: int | None = 0
    request_id: str | None = None
    previous_input_messages: list[Any] | None = None


_decoder = msgspec.json.Decoder(_Request)


class Stored:
    """One response in the store: its object, and the conversation a continuation prepends."""

    __slots__ = ("messages", "response", "task")

    def __init__(self, response: dict[str, Any], messages: list[dict[str, Any]]) -> None:
        self.response = response
        self.messages = messages
        self.task: Any = None  # the background generation's cancel scope, while it runs

    def body(self) -> bytes:
        return _enc.encode(self.response)


class ResponseStore:
    """The server's responses (`store: true`), least recently used first out past `size`."""

    def __init__(self, size: int = RESPONSES_KEPT) -> None:
        self.size = size
        self._items: collections.OrderedDict[str, Stored] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def get(self, rid: str) -> Stored | None:
        item = self._items.get(rid)
        if item is not None:
            self._items.move_to_end(rid)
        return item

    def put(self, rid: str, item: Stored) -> None:
        self._items[rid] = item
        self._items.move_to_end(rid)
        while len(self._items) > self.size:
            self._items.popitem(last=False)


def not_found(rid: str) -> SimError:
    return error(404, f"Response with id '{rid}' not found.", "invalid_request_error", "response_id")


def cancel_refused() -> SimError:
    return error(400, "Cannot cancel a synchronous response.", "invalid_request_error", "response_id")


def _hex() -> str:
    return uuid.uuid4().hex


def _tool_dump(tool: dict[str, Any]) -> dict[str, Any]:
    """A function tool as the SDK's FunctionTool dumps its core fields; other tools as given."""
    if tool.get("type") != "function":
        return tool
    return {"name": tool.get("name"), "parameters": tool.get("parameters"), "strict": tool.get("strict"),
            "type": "function", "description": tool.get("description")}


def _input_messages(items: str | list[Any]) -> list[dict[str, Any]]:
    """vLLM's `construct_chat_messages_with_tool_call`, reduced to what the prompt rule counts."""
    if isinstance(items, str):
        return [{"role": "user", "content": items}]
    out: list[dict[str, Any]] = []
    for item in items:
        if not isinstance(item, dict):
            raise invalid_body("Input should be a valid dictionary", ("body", "input"), "dict_type")
        kind = item.get("type")
        if kind == "function_call":
            out.append({"role": "assistant", "tool_calls": [
                {"id": item.get("call_id"), "type": "function",
                 "function": {"name": item.get("name") or "", "arguments": item.get("arguments") or ""}}]})
        elif kind == "function_call_output":
            out.append({"role": "tool", "content": item.get("output") or "", "tool_call_id": item.get("call_id")})
        elif kind == "reasoning":
            out.append({"role": "assistant", "reasoning": ""})
        else:
            if not isinstance(item.get("role"), str):
                raise invalid_body("Field required", ("body", "input", "role"), "missing")
            out.append({"role": item["role"], "content": item.get("content")})
    return out


def _output_texts(response: dict[str, Any]) -> list[dict[str, Any]]:
    """The assistant messages vLLM appends for a previous response: one per output_text part of its
    message items (reasoning and function calls are skipped, as vLLM skips them)."""
    out = []
    for item in response.get("output") or ():
        if item.get("type") == "message":
            for part in item.get("content") or ():
                out.append({"role": "assistant", "content": part.get("text") or ""})
    return out


def _markup(name: str, arguments: str) -> str:
    """What a hermes-style model writes for a tool call (the text a stream shows)."""
    return "<tool_call>\n" + json.dumps({"name": name})[:-1] + f', "arguments": {arguments}}}\n</tool_call>'


class ResponsesPlan(OneChoice):
    """A validated Responses request and what it generates (see the module docstring)."""

    overhead = 4  # created, in_progress, output_item.added, content_part.added

    def __init__(self, request: _Request, model: str, prompt: int, limit: int, choice: Choice,
                 call: tuple[str, str] | None, messages: list[dict[str, Any]], store: ResponseStore | None,
                 tools_json: bytes = b"") -> None:
        self.request = request
        self.model = model
        self.prompt_tokens = prompt
        self.limit = limit
        self.choice = choice
        self.call = call  # (name, arguments) of a function call the parser would extract
        self.messages = messages
        self.store = store  # None: not stored (store false, or the store is disabled)
        self.tools_json = tools_json  # the counted tools as the prompt rule measured them
        self.stream = bool(request.stream)
        self.rid = request.request_id or f"resp_{_hex()}"
        self.created = int(time.time())

    # -- the generation surface -------------------------------------------------------------------

    def streamed_tokens(self, events: int) -> int:
        if not self.stream:
            return 0
        return max(0, min(self.completion_tokens, events - self.overhead))

    def prompt_sequences(self) -> list[list[Segment]]:
        return prompt_tokens.chat(self.messages, self.tools_json)

    def inband_error(self) -> bytes | None:
        # vLLM validates its error JSON as a stream event, which fails, and the stream breaks off
        return None

    def error_body(self) -> tuple[int, bytes]:
        return 500, GENERATION_ERROR_BODY

    # -- rendering ------------------------------------------------------------------------------------

    def _usage(self, output: int) -> dict[str, Any]:
        return {"input_tokens": self.prompt_tokens,
                "input_tokens_details": {"cached_tokens": 0, "input_tokens_per_turn": [],
                                         "cached_tokens_per_turn": []},
                "output_tokens": output,
                "output_tokens_details": {"reasoning_tokens": 0, "tool_output_tokens": 0,
                                          "output_tokens_per_turn": [], "tool_output_tokens_per_turn": []},
                "total_tokens": self.prompt_tokens + output}

    def response(self, status: str, output: list[dict[str, Any]], usage: dict[str, Any] | None) -> dict[str, Any]:
        """`ResponsesResponse.from_request(...).model_dump()`."""
        r = self.request
        return {
            "id": self.rid, "created_at": self.created,
            "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
            "instructions": r.instructions, "metadata": r.metadata, "model": self.model, "object": "response",
            "output": output, "parallel_tool_calls": r.parallel_tool_calls,
            "temperature": 1.0 if r.temperature is None else float(r.temperature),
            "tool_choice": r.tool_choice, "tools": [_tool_dump(t) for t in r.tools],
            "top_p": 1.0 if r.top_p is None else float(r.top_p), "background": bool(r.background),
            "max_output_tokens": self.limit, "max_tool_calls": r.max_tool_calls,
            "previous_response_id": r.previous_response_id, "prompt": None, "reasoning": r.reasoning,
            "service_tier": r.service_tier, "status": status, "text": r.text,
            "top_logprobs": r.top_logprobs if r.include and "message.output_text.logprobs" in r.include else None,
            "truncation": r.truncation or "disabled", "usage": usage, "user": r.user,
            "input_messages": None, "output_messages": None}

    def _output(self) -> list[dict[str, Any]]:
        """`_make_response_output_items`: a message item for the text, or the parsed function call."""
        if self.call is not None and self.choice.finish != "length":
            name, arguments = self.call
            return [{"arguments": arguments, "call_id": f"chatcmpl-tool-{_hex()}", "name": name,
                     "type": "function_call", "id": f"fc_{_hex()}", "async_": None, "caller": None,
                     "namespace": None, "status": "completed"}]
        text = self.choice.text()
        if not text:
            return []
        return [{"id": f"msg_{_hex()}", "content": [_part(text, None)], "role": "assistant",
                 "status": "completed", "type": "message", "phase": None}]

    def final(self) -> dict[str, Any]:
        """The completed response, stored (when `store`) before anyone can see it."""
        status = "incomplete" if self.choice.finish == "length" else "completed"
        response = self.response(status, self._output(), self._usage(self.completion_tokens))
        if self.store is not None:
            self.store.put(self.rid, Stored(response, self.messages))
        return response

    def queued(self) -> Stored:
        """The background answer: stored at once with status "queued", no output, no usage."""
        item = Stored(self.response("queued", [], None), self.messages)
        if self.store is not None:
            self.store.put(self.rid, item)
        return item

    def body(self) -> bytes:
        return _enc.encode(self.final())

    def events(self):
        seq = 0

        def event(kind: str, data: dict[str, Any]) -> bytes:
            nonlocal seq
            data["sequence_number"] = seq
            data["type"] = kind
            seq += 1
            return b"event: %s\ndata: %s\n\n" % (kind.encode(), _enc.encode(data))

        initial = self.response("in_progress", [], None)
        yield -1, event("response.created", {"response": initial})
        yield -1, event("response.in_progress", {"response": initial})
        pieces = self.choice.pieces
        item = str(uuid.uuid4())
        for k, piece in enumerate(pieces):
            if k == 0:
                yield 0, event("response.output_item.added", {
                    "item": {"id": item, "content": [], "role": "assistant", "status": "in_progress",
                             "type": "message", "phase": None}, "output_index": 0})
                yield 0, event("response.content_part.added", {
                    "content_index": 0, "item_id": item, "output_index": 0, "part": _part("", [])})
            yield k, event("response.output_text.delta", {
                "content_index": k + 1, "delta": piece, "item_id": item, "logprobs": [], "output_index": 0})
        last = max(len(pieces) - 1, 0)
        if pieces:
            text = "".join(pieces)
            n = len(pieces)
            yield last, event("response.output_text.done", {
                "content_index": n + 1, "item_id": item, "logprobs": [], "output_index": 0, "text": text})
            yield last, event("response.content_part.done", {
                "content_index": n + 2, "item_id": item, "output_index": 0, "part": _part(text, None)})
            yield last, event("response.output_item.done", {
                "item": {"id": item, "content": [_part(text, None)], "role": "assistant", "status": "completed",
                         "type": "message", "phase": None, "summary": []}, "output_index": 0})
        yield last, event("response.completed", {"response": self.final()})


def _part(text: str, logprobs: list[Any] | None) -> dict[str, Any]:
    return {"annotations": [], "text": text, "type": "output_text", "logprobs": logprobs}


def plan(planner: Planner, store: ResponseStore, body: bytes) -> ResponsesPlan:
    """POST /v1/responses -> ResponsesPlan, in vLLM's validation order (raises SimError)."""
    options: SimOptions = planner.options
    req = _decode(body)
    if req.background and req.store is False:
        raise invalid_body("Value error, background can only be used when `store` is true")
    if req.prompt is not None:
        raise invalid_body("Value error, prompt template is not supported (parameter=prompt)")
    model = planner.model(req.model, "Responses")
    if req.store and not options.enable_responses_store and req.background:
        raise error(400, "This vLLM engine does not support `store=True` and therefore does not support the "
                         "background mode. To enable these features, set the environment variable "
                         "`VLLM_ENABLE_RESPONSES_API_STORE=1` when launching the vLLM server.",
                    "invalid_request_error", "background")
    if req.previous_input_messages and req.previous_response_id:
        raise error(400, "Only one of `previous_input_messages` and `previous_response_id` can be set.",
                    "invalid_request_error", "previous_response_id")
    keep = bool(req.store) and options.enable_responses_store
    previous = None
    if req.previous_response_id is not None:
        previous = store.get(req.previous_response_id) if options.enable_responses_store else None
        if previous is None:
            raise not_found(req.previous_response_id)
    messages: list[dict[str, Any]] = []
    if req.instructions:
        messages.append({"role": "system", "content": req.instructions})
    if previous is not None:
        messages += previous.messages + _output_texts(previous.response)
    messages += _input_messages(req.input)
    functions = [t for t in req.tools if t.get("type") == "function"]
    counted = req.tools if req.tools and req.tool_choice != "none" else []
    tools_json = _enc.encode(counted) if counted else b""
    prompt = chat_prompt_tokens(messages, len(tools_json))
    total = options.max_model_len
    if total <= prompt:
        raise error(400, f"The engine prompt length {prompt} exceeds the max_model_len {total}. Please reduce "
                         "prompt.", "invalid_request_error", "input")
    limit = total - prompt if req.max_output_tokens is None else min(req.max_output_tokens, total - prompt)
    if limit < 1:
        raise bad_request(f"max_tokens must be at least 1, got {limit}.", "max_tokens")
    call = _tool_call(options, req, functions, messages)
    if call is not None:
        pieces = [_markup(*call)[i:i + 4] for i in range(0, len(_markup(*call)), 4)]
        choice = Choice(0, [], prompt)
        choice.pieces, choice.finish = (pieces, "stop") if len(pieces) <= limit else (pieces[:limit], "length")
    else:
        seed = next((text_of(m.get("content")) for m in reversed(messages) if m.get("role") == "user"), "")
        choice = planner.text_choice(seed, prompt, limit, req.max_output_tokens is not None)
    return ResponsesPlan(req, model, prompt, limit, choice, call, messages, store if keep else None,
                         tools_json)


def _tool_call(options: SimOptions, req: _Request, functions: list[dict[str, Any]],
               messages: list[dict[str, Any]]) -> tuple[str, str] | None:
    choice = req.tool_choice
    tool = None
    if not functions or choice == "none":
        return None
    if isinstance(choice, dict) and choice.get("type") == "function":
        tool = next((t for t in functions if t.get("name") == choice.get("name")), None)
    elif choice == "required" or (choice == "auto" and options.enable_auto_tool_choice
                                  and not (messages and messages[-1].get("role") == "tool")):
        tool = functions[0]
    if tool is None:
        return None
    arguments = json.dumps(instance(tool.get("parameters") or {}), ensure_ascii=False)
    if options.break_tool_json:
        arguments = arguments[:-1] + ","
    return str(tool.get("name") or ""), arguments


def _decode(body: bytes) -> _Request:
    try:
        return _decoder.decode(body)
    except msgspec.ValidationError as exc:
        text = str(exc)
        if "missing required field" in text:
            raise invalid_body("Field required", ("body", "input"), "missing") from None
        raise invalid_body(text, ("body",), "value_error") from None
    except msgspec.DecodeError:
        raise invalid_body("JSON decode error", ("body", 0), "json_invalid") from None


__all__ = ["RESPONSES_KEPT", "ResponseStore", "ResponsesPlan", "Stored", "cancel_refused", "not_found", "plan"]
