"""What the simulated vLLM answers, as bytes: options, the plan of an answer and its rendering.

Strategy: pure (no I/O, no clock other than the `created` stamp) so the wire shapes are unit-tested
byte for byte and the server stays a byte pump. `planning` turns a request into a `Plan` (the token
pieces of every choice and their finish reasons); a plan renders either one JSON body or a sequence
of `(step, sse_event_bytes)` pairs, and the server decides *when* step k goes out. Also here: the
error envelope, minimal JSON-schema instances, and the /v1/models and /v1/embeddings bodies.

Shapes follow vLLM's OpenAI server (v0.17-era main, `vllm/entrypoints/openai/`):
- non-streaming bodies are `model_dump()` of the pydantic models: every field, nulls included
  (`chat.completion` message carries refusal/annotations/audio/function_call/tool_calls/reasoning),
  in vLLM's field order (chat: ..., usage, prompt_logprobs, prompt_token_ids, kv_transfer_params);
  a plan's `return_token_ids` / `prompt_logprobs` (read from a request by `prompt_options`) fill
  prompt_token_ids, the choices' token_ids and prompt_logprobs with deterministic ids (streams keep
  them null);
- chat chunks are `model_dump_json(exclude_unset=True)`: first chunk per choice is
  `{"role":"assistant","content":""}` plus `"prompt_token_ids":null`, token chunks carry
  `"token_ids":null`, the finishing chunk adds `"stop_reason":null`; the usage chunk (when
  `stream_options.include_usage`) has `"choices":[]` and no null fields; `continuous_usage_stats`
  adds usage to every chunk; completion chunks are dumped with every field;
- errors are `{"error": {"message", "type", "param", "code": <int>}}`: serving-level errors have type
  "BadRequestError"/"NotFoundError"; request-model validation errors (FastAPI's handler) have type
  "Bad Request"; `--api-key` rejections are `{"error": "Unauthorized"}`.

Token counts and texts are decided by `backends.sim.planning` (its docstring has the rules).
"""

from __future__ import annotations

import base64
import math
import random
import struct
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Protocol

import msgspec

from backends.sim.prompt_tokens import Segment

VLLM_VERSION = "0.17.0"  # the vLLM release whose wire shapes this simulator copies

_enc = msgspec.json.Encoder()
_DONE = b"data: [DONE]\n\n"
# vLLM's GenerationError ("finish_reason error", engine/serving.py): the non-streaming body
# (JSONResponse of ErrorResponse.model_dump()) and the in-band stream event
# (`create_streaming_error_response` is json.dumps with default separators, then "data: [DONE]").
GENERATION_ERROR = {"message": "Internal server error", "type": "InternalServerError", "param": None, "code": 500}
GENERATION_ERROR_BODY = _enc.encode({"error": GENERATION_ERROR})
INBAND_ERROR = (b'data: {"error": {"message": "Internal server error", "type": "InternalServerError", '
                b'"param": null, "code": 500}}\n\n' + _DONE)


class SimOptions(msgspec.Struct, frozen=True, kw_only=True):
    """Behaviour of one simulated vLLM server (see the module docstring for the token rules)."""

    models: tuple[str, ...] = ("sim-chat",)
    embedding_models: tuple[str, ...] = ("sim-embed",)
    tokens_per_s: float = 0.0
    ttft_ms: float = 0.0
    latency_ms: float = 0.0
    max_model_len: int = 4096
    default_max_tokens: int = 16
    api_key: str | None = None
    reply: str | None = None
    break_tool_json: bool = False
    embedding_dim: int = 8
    # vLLM's tool flags (`--enable-auto-tool-choice`, `--tool-call-parser NAME`), off by default as in
    # vLLM: without them chat/anthropic requests with tool_choice "auto" (the default when tools are
    # given) are refused, and "required"/named choices need a parser. `enable_auto_tool_choice` alone
    # implies a parser ("hermes") here; the CLI insists on both, as `vllm serve` does.
    enable_auto_tool_choice: bool = False
    tool_call_parser: str | None = None
    reasoning_parser: str | None = None  # accepted (`--reasoning-parser`); no reasoning is simulated
    # VLLM_ENABLE_RESPONSES_API_STORE=1: on here, since routing retrievals to the creating host is what
    # the simulator must let a gateway prove; off -> `store` is silently ignored, as vLLM's default.
    enable_responses_store: bool = True
    # The prefix-cache and scheduler model (`scheduler`, `prefix_cache`), off by default (0 = today's timing):
    # TTFT = wait for a slot + ttft_ms + uncached prompt tokens / prefill_tokens_per_s (prefills one after
    # another); kv_cache_tokens > 0 caches prompt blocks of block_tokens (LRU); max_num_seqs > 0 caps the
    # generations running at once, the others wait in FIFO order.
    prefill_tokens_per_s: float = 0.0
    kv_cache_tokens: int = 0
    max_num_seqs: int = 0
    block_tokens: int = 16

    def __post_init__(self) -> None:
        if not (self.prefill_tokens_per_s >= 0 and self.kv_cache_tokens >= 0 and self.max_num_seqs >= 0):
            raise ValueError("prefill_tokens_per_s, kv_cache_tokens and max_num_seqs must be >= 0")
        if self.block_tokens < 1:
            raise ValueError("block_tokens must be >= 1")

    @property
    def tool_parser(self) -> str | None:
        """The tool-call parser in effect (None: tool parsing unavailable)."""
        return self.tool_call_parser or ("hermes" if self.enable_auto_tool_choice else None)


class SimError(Exception):
    """An error answer: HTTP status and the exact JSON body."""

    def __init__(self, status: int, body: bytes) -> None:
        super().__init__(status)
        self.status = status
        self.body = body


def error(status: int, message: str, type_: str, param: str | None = None) -> SimError:
    """vLLM's ErrorResponse envelope (`code` is the integer status)."""
    info = {"message": message, "type": type_, "param": param, "code": status}
    return SimError(status, _enc.encode({"error": info}))


def bad_request(message: str, param: str | None = None) -> SimError:
    return error(400, message, "BadRequestError", param)


def invalid_body(msg: str, loc: tuple[Any, ...] = ("body",), etype: str = "value_error",
                 param: str | None = None) -> SimError:
    """FastAPI RequestValidationError as vLLM's handler renders it (type is the status phrase)."""
    detail = {"type": etype, "loc": loc, "msg": msg}
    return error(400, f"1 validation error:\n  {detail!r}", "Bad Request", param)


class Generation(Protocol):
    """What the server drives for any generating API (chat/completions `Plan`, and the Responses,
    Messages and audio plans): who is booked, how much, and the bytes of the answer."""

    model: str
    prompt_tokens: int
    stream: bool

    @property
    def completion_tokens(self) -> int: ...
    @property
    def max_steps(self) -> int: ...
    @property
    def finish(self) -> str: ...
    @property
    def overhead(self) -> int: ...
    def streamed_tokens(self, events: int) -> int: ...
    def inband_error(self) -> bytes | None: ...
    def error_body(self) -> tuple[int, bytes]: ...
    def body(self) -> bytes: ...
    def events(self) -> Iterable[tuple[int, bytes]]: ...
    def prompt_sequences(self) -> list[list[Segment]]: ...  # the engine prompts as tokens (`prompt_tokens`)


class OneChoice:
    """The part of `Generation` a plan with a single `choice` answers from it (Responses, audio)."""

    choice: Choice

    @property
    def completion_tokens(self) -> int:
        return self.choice.tokens

    @property
    def max_steps(self) -> int:
        return self.choice.tokens

    @property
    def finish(self) -> str:
        return self.choice.finish

    def prompt_sequences(self) -> list[list[Segment]]:
        """No prompt material the prefix cache can see (audio); Responses overrides it."""
        return []


class Choice:
    """One choice of a plan: its text pieces (one per token), finish reason and tool call."""

    __slots__ = ("finish", "index", "pieces", "prompt_tokens", "tool_id", "tool_mode", "tool_name")

    def __init__(self, index: int, pieces: list[str], prompt_tokens: int) -> None:
        self.index = index
        self.pieces = pieces
        self.finish = "stop"
        self.prompt_tokens = prompt_tokens  # of this choice's prompt (completions may batch prompts)
        self.tool_name: str | None = None
        self.tool_mode = ""  # "auto" | "required" | "named"
        self.tool_id = ""

    @property
    def tokens(self) -> int:
        # auto/required stream the function name as its own token-carrying delta
        return len(self.pieces) + (1 if self.tool_mode in ("auto", "required") else 0)

    def text(self) -> str:
        return "".join(self.pieces)


class Plan:
    """A validated request and what it will generate."""

    __slots__ = (
        "choices",
        "continuous",
        "created",
        "include_usage",
        "kind",
        "material",
        "model",
        "prompt_logprobs",
        "prompt_tokens",
        "return_token_ids",
        "rid",
        "stream",
    )

    def __init__(self, kind: str, rid: str, model: str, prompt_tokens: int, *, stream: bool = False,
                 include_usage: bool = False, continuous: bool = False) -> None:
        self.kind = kind  # "chat" | "completion"
        self.rid = rid
        self.created = int(time.time())
        self.model = model
        self.prompt_tokens = prompt_tokens
        self.choices: list[Choice] = []
        self.stream = stream
        self.include_usage = include_usage
        self.continuous = include_usage and continuous
        # vLLM extras of a non-streaming body (`prompt_options` reads them from a request):
        self.return_token_ids = False  # prompt_token_ids (top level for chat) and each choice's token_ids
        self.prompt_logprobs: int | None = None  # prompt_logprobs: per prompt token, the top-k (>= 1 entry)
        self.material: Callable[[], list[list[Segment]]] | None = None  # the planner's prompt renderer

    def prompt_sequences(self) -> list[list[Segment]]:
        """The engine prompts as the simulated tokenizer's tokens (rendered on demand: only the prefix
        cache needs them)."""
        return self.material() if self.material is not None else []

    @property
    def completion_tokens(self) -> int:
        return sum(c.tokens for c in self.choices)

    # -- what the server needs of any generation (chat, completions, responses, messages, audio) ------

    @property
    def finish(self) -> str:
        """The outcome booked for the request: "stop", "length" or "tool_calls"."""
        return self.choices[0].finish

    @property
    def overhead(self) -> int:
        """SSE events before the first token event (the role chunks of a chat stream)."""
        return len(self.choices) if self.kind == "chat" else 0

    def streamed_tokens(self, events: int) -> int:
        """Tokens that reached the wire when `events` SSE events had been written."""
        if not self.stream:
            return 0
        return max(0, min(self.completion_tokens, events - self.overhead))

    def inband_error(self) -> bytes | None:
        """What a stream sends when generation fails mid-way (None: the connection is cut)."""
        return INBAND_ERROR

    def error_body(self) -> tuple[int, bytes]:
        """A failed non-streaming generation: status and body."""
        return 500, GENERATION_ERROR_BODY

    @property
    def max_steps(self) -> int:
        return max((c.tokens for c in self.choices), default=0)

    def _usage(self, done: int, details: bool) -> dict[str, Any]:
        usage = {"prompt_tokens": self.prompt_tokens, "total_tokens": self.prompt_tokens + done,
                 "completion_tokens": done}
        if details:
            usage["prompt_tokens_details"] = None
        return usage


    def body(self) -> bytes:
        """The non-streaming response body (pydantic `model_dump()` shape: all fields, in vLLM's order:
        for chat ``usage`` comes before ``prompt_logprobs``, ``prompt_token_ids`` and
        ``kv_transfer_params``, so with `return_token_ids` / `prompt_logprobs` on a long prompt most of
        the body follows it)."""
        usage = self._usage(self.completion_tokens, True)
        ids = self.return_token_ids
        k = self.prompt_logprobs
        if self.kind == "completion":
            choices = [{"index": c.index, "text": c.text(), "logprobs": None, "finish_reason": c.finish,
                        "stop_reason": None, "token_ids": _output_ids(c) if ids else None,
                        "prompt_logprobs": None if k is None else _prompt_logprobs(c.prompt_tokens, k),
                        "prompt_token_ids": _prompt_ids(c.prompt_tokens) if ids else None}
                       for c in self.choices]
            return _enc.encode({"id": self.rid, "object": "text_completion", "created": self.created,
                                "model": self.model, "choices": choices, "service_tier": None,
                                "system_fingerprint": None, "usage": usage, "kv_transfer_params": None})
        choices = []
        for c in self.choices:
            content: str | None = c.text()
            calls: list[dict[str, Any]] = []
            if c.tool_name is not None:
                calls.append({"id": c.tool_id, "type": "function",
                              "function": {"name": c.tool_name, "arguments": content}})
                content = None if c.tool_mode == "auto" else ""  # hermes-style parser vs forced call
            message = {"role": "assistant", "content": content, "refusal": None, "annotations": None,
                       "audio": None, "function_call": None, "tool_calls": calls, "reasoning": None}
            choices.append({"index": c.index, "message": message, "logprobs": None,
                            "finish_reason": c.finish, "stop_reason": None,
                            "token_ids": _output_ids(c) if ids else None})
        prompt = self.prompt_tokens
        return _enc.encode({"id": self.rid, "object": "chat.completion", "created": self.created,
                            "model": self.model, "choices": choices, "service_tier": None,
                            "system_fingerprint": None, "usage": usage,
                            "prompt_logprobs": None if k is None else _prompt_logprobs(prompt, k),
                            "prompt_token_ids": _prompt_ids(prompt) if ids else None,
                            "kv_transfer_params": None})

    def events(self) -> Iterator[tuple[int, bytes]]:
        """SSE events as `(step, bytes)`: step k is due at ttft + k / tokens_per_s."""
        obj = b"chat.completion.chunk" if self.kind == "chat" else b"text_completion"
        head = b'data: {"id":%s,"object":"%s","created":%d,"model":%s,"choices":[' % (
            _enc.encode(self.rid), obj, self.created, _enc.encode(self.model))
        prompt = self.prompt_tokens
        if self.kind == "chat":
            usage0 = (b'"usage":{"prompt_tokens":%d,"total_tokens":%d,"completion_tokens":0},'
                      % (prompt, prompt)) if self.continuous else b""
            for c in self.choices:
                yield 0, (head + b'{"index":%d,"delta":{"role":"assistant","content":""},"logprobs":null,'
                          b'"finish_reason":null}],%s"prompt_token_ids":null}\n\n' % (c.index, usage0))
        step = 0
        if len(self.choices) == 1 and not self.continuous and self.choices[0].tool_name is None:
            # the hot path of benchmarks: plain text, one choice -- two constant slices per token
            c = self.choices[0]
            if self.kind == "chat":
                pre = head + b'{"index":%d,"delta":{"content":' % c.index
                mid = b'},"logprobs":null,"finish_reason":null,"token_ids":null}]}\n\n'
            else:
                pre = head + b'{"index":%d,"text":' % c.index
                mid = (b',"logprobs":null,"finish_reason":null,"stop_reason":null,"prompt_token_ids":null,'
                       b'"token_ids":null}],"usage":null}\n\n')
            encode = _enc.encode
            for step, piece in enumerate(c.pieces[:-1]):
                yield step, pre + encode(piece) + mid
            step = len(c.pieces) - 1
            yield step, head + self._chunk(c, step)
        else:
            for step in range(self.max_steps):
                for c in self.choices:
                    if step < c.tokens:
                        yield step, head + self._chunk(c, step)
        if self.include_usage:
            tail = {"id": self.rid, "object": obj.decode(), "created": self.created, "model": self.model,
                    "choices": [], "usage": self._usage(self.completion_tokens, False)}
            yield step, b"data: " + _enc.encode(tail) + b"\n\n"
        yield step, _DONE

    def _chunk(self, c: Choice, step: int) -> bytes:
        last = step == c.tokens - 1
        finish = b'"%s"' % c.finish.encode() if last else b"null"
        if self.kind == "completion":
            usage = b"null"
            if self.continuous:
                p = c.prompt_tokens
                usage = (b'{"prompt_tokens":%d,"total_tokens":%d,"completion_tokens":%d,'
                         b'"prompt_tokens_details":null}' % (p, p + step + 1, step + 1))
            return (b'{"index":%d,"text":%s,"logprobs":null,"finish_reason":%s,"stop_reason":null,'
                    b'"prompt_token_ids":null,"token_ids":null}],"usage":%s}\n\n'
                    % (c.index, _enc.encode(c.pieces[step]), finish, usage))
        tail = b',"stop_reason":null,"token_ids":null}]' if last else b',"token_ids":null}]'
        if self.continuous:
            p = self.prompt_tokens
            tail += b',"usage":{"prompt_tokens":%d,"total_tokens":%d,"completion_tokens":%d}' % (
                p, p + step + 1, step + 1)
        return (b'{"index":%d,"delta":%s,"logprobs":null,"finish_reason":%s%s}\n\n'
                % (c.index, _delta(c, step), finish, tail))


class _PromptOptions(msgspec.Struct):
    return_token_ids: bool | None = None
    prompt_logprobs: int | None = None


_prompt_options = msgspec.json.Decoder(_PromptOptions)


def prompt_options(body: bytes) -> tuple[bool, int | None]:
    """(``return_token_ids``, ``prompt_logprobs``) of a chat or completion request body, for a `Plan`'s
    attributes of the same names (vLLM: ``prompt_logprobs`` -1 means the whole vocabulary; here 20)."""
    try:
        o = _prompt_options.decode(body)
    except msgspec.DecodeError:
        return False, None
    k = o.prompt_logprobs
    return bool(o.return_token_ids), (None if k is None else 20 if k < 0 else min(k, 20))


# Token ids and logprobs of the simulated tokenizer: deterministic, in a 150k vocabulary.
_VOCAB = 150_000


def _token_id(i: int) -> int:
    return (i * 7919 + 101) % _VOCAB


def _prompt_ids(n: int) -> list[int]:
    return [_token_id(i) for i in range(n)]


def _output_ids(c: Choice) -> list[int]:
    return [_token_id(1_000_003 * (c.index + 1) + i) for i in range(c.tokens)]


def _prompt_logprobs(n: int, k: int) -> list[dict[str, dict[str, Any]] | None]:
    """vLLM's ``prompt_logprobs``: None for the first prompt token, then per token a dict keyed by token
    id (JSON: a string) of ``Logprob`` (logprob, rank, decoded_token): the prompt's own token and the
    other top-`k` candidates."""
    out: list[dict[str, dict[str, Any]] | None] = [None]
    for i in range(1, n):
        own = _token_id(i)
        entry = {str(own): {"logprob": -0.25 - (i % 7) / 8, "rank": 1, "decoded_token": f" t{own}"}}
        for r in range(2, k + 1):
            alt = (own + 31 * r) % _VOCAB
            entry[str(alt)] = {"logprob": -1.5 - r / 4, "rank": r, "decoded_token": f" t{alt}"}
        out.append(entry)
    return out


def _delta(c: Choice, step: int) -> bytes:
    """The chat delta for token `step`, as vLLM's tool-call paths shape it."""
    if c.tool_name is None:
        return b'{"content":%s}' % _enc.encode(c.pieces[step])
    mode = c.tool_mode
    if step == 0:
        fn: dict[str, Any] = {"name": c.tool_name}
        if mode != "auto":  # forced calls carry arguments from the first delta on
            fn["arguments"] = c.pieces[0] if mode == "named" else ""
        call = {"id": c.tool_id, "type": "function", "index": c.index if mode == "named" else 0,
                "function": fn}
        return _enc.encode({"tool_calls": [call]})
    piece = c.pieces[step] if mode == "named" else c.pieces[step - 1]
    fn = {"name": None, "arguments": piece} if mode == "required" else {"arguments": piece}
    return _enc.encode({"tool_calls": [{"index": c.index if mode == "named" else 0, "function": fn}]})



# -- minimal JSON-schema instances (for json_schema output and tool-call arguments) -----------

_FORMATS = {"date-time": "2024-01-01T00:00:00Z", "date": "2024-01-01", "time": "00:00:00Z",
            "email": "sim@example.com", "uri": "https://example.com/", "uuid":
            "00000000-0000-4000-8000-000000000000", "ipv4": "127.0.0.1", "hostname": "example.com"}


def instance(schema: Any, root: Any = None, depth: int = 0) -> Any:
    """A small JSON value valid against `schema`: required properties only, minimum item counts,
    first enum/const/anyOf choice, numbers clamped into their bounds, `$ref` to local definitions."""
    if not isinstance(schema, dict):
        return {}
    root = schema if root is None else root
    if depth > 16:
        return None
    ref = schema.get("$ref")
    if isinstance(ref, str) and ref.startswith("#"):
        target: Any = root
        for part in ref[1:].split("/")[1:] if ref != "#" else []:
            target = target.get(part.replace("~1", "/").replace("~0", "~"), {}) if isinstance(target, dict) else {}
        return instance(target, root, depth + 1)
    if "const" in schema:
        return schema["const"]
    if schema.get("enum"):
        return schema["enum"][0]
    for key in ("anyOf", "oneOf"):
        if schema.get(key):
            return instance(schema[key][0], root, depth + 1)
    if schema.get("allOf"):
        merged: dict[str, Any] = {k: v for k, v in schema.items() if k != "allOf"}
        for part in schema["allOf"]:
            if isinstance(part, dict):
                merged.setdefault("properties", {}).update(part.get("properties", {}))
                merged["required"] = [*merged.get("required", []), *part.get("required", [])]
                merged.setdefault("type", part.get("type"))
        return instance(merged, root, depth + 1)
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind is None:
        kind = "array" if "items" in schema else "object"
    if kind == "object":
        props = schema.get("properties") or {}
        names = list(dict.fromkeys(schema.get("required") or []))
        for extra in props:
            if len(names) >= schema.get("minProperties", 0):
                break
            if extra not in names:
                names.append(extra)
        return {name: instance(props.get(name, {}), root, depth + 1) for name in names}
    if kind == "array":
        items = [instance(s, root, depth + 1) for s in schema.get("prefixItems") or []]
        while len(items) < schema.get("minItems", 0):
            items.append(instance(schema.get("items") or {}, root, depth + 1))
        return items
    if kind == "string":
        text = _FORMATS.get(schema.get("format", ""), "sim")
        text = text + "x" * max(0, schema.get("minLength", 0) - len(text))
        return text[: schema["maxLength"]] if "maxLength" in schema else text
    if kind in ("integer", "number"):
        return _number(schema, kind == "integer")
    if kind == "boolean":
        return True
    return None


def _number(schema: dict[str, Any], integer: bool) -> int | float:
    step = 1 if integer else 0.5
    lo = schema.get("minimum")
    if "exclusiveMinimum" in schema and isinstance(schema["exclusiveMinimum"], (int, float)):
        lo = schema["exclusiveMinimum"] + step
    hi = schema.get("maximum")
    if "exclusiveMaximum" in schema and isinstance(schema["exclusiveMaximum"], (int, float)):
        hi = schema["exclusiveMaximum"] - step
    value: int | float = 0 if lo is None else lo
    if hi is not None and value > hi:
        value = hi
    multiple = schema.get("multipleOf")
    if multiple:
        value = math.ceil(value / multiple) * multiple
    return math.ceil(value) if integer else value


def new_id(prefix: str) -> str:
    """vLLM-style id: prefix + 16 random hex digits (not secret: ids, not keys)."""
    return f"{prefix}{random.getrandbits(64):016x}"


def models_body(names: tuple[str, ...], max_model_len: int) -> bytes:
    """GET /v1/models: vLLM's ModelList with one ModelCard (and its permission) per served name."""
    now = int(time.time())
    data = [{"id": name, "object": "model", "created": now, "owned_by": "vllm", "root": name,
             "parent": None, "max_model_len": max_model_len,
             "permission": [{"id": new_id("modelperm-"), "object": "model_permission", "created": now,
                             "allow_create_engine": False, "allow_sampling": True,
                             "allow_logprobs": True, "allow_search_indices": False, "allow_view": True,
                             "allow_fine_tuning": False, "organization": "*", "group": None,
                             "is_blocking": False}]}
            for name in names]
    return _enc.encode({"object": "list", "data": data})


def embeddings_body(model: str, vectors: list[list[float]], prompt_tokens: int, b64: bool) -> bytes:
    """POST /v1/embeddings: EmbeddingResponse; base64 is little-endian float32, as the SDK expects."""
    data = [{"index": i, "object": "embedding",
             "embedding": base64.b64encode(struct.pack(f"<{len(v)}f", *v)).decode() if b64 else v}
            for i, v in enumerate(vectors)]
    usage = {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens, "completion_tokens": 0,
             "prompt_tokens_details": None}
    return _enc.encode({"id": new_id("embd-"), "object": "list", "created": int(time.time()),
                        "model": model, "data": data, "usage": usage})
