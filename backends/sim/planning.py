"""Turning a request body into a `Plan`: validation in vLLM's order, and the simulator's token rules.

Strategy: decode a narrow msgspec view of the body (unknown fields such as top_k, guided_json or
chat_template_kwargs are accepted and ignored, as vLLM accepts them), then validate in the order
vLLM's server does: body validation (FastAPI/pydantic: type "Bad Request") -> model lookup (404
NotFoundError) -> context length (renderer: 400 BadRequestError, param "input_tokens" or the
max-tokens field) -> sampling params (n, max_tokens >= 1). Messages are copied from the current
vLLM sources (`vllm/renderers/params.py`, `engine/serving.py`, `chat_completion/protocol.py`).

Token rules (deterministic, so tests and usage accounting can predict them):
- prompt tokens: chat = 3 + sum over messages of (4 + ceil(chars/4)) where chars counts the text
  content (a string or the text parts) plus tool-call names and arguments, + ceil(len(tools JSON)/4)
  when tools are given; completions/embeddings = max(1, ceil(chars/4)) per text prompt, or the
  number of ids for token-id prompts.
- completion tokens: limit = max_completion_tokens or max_tokens, else max_model_len - prompt
  (vLLM's default). The natural answer is the `reply` text (whitespace-led words, one token each),
  the JSON document for tools / json_schema / json_object (4-character pieces), or synthetic words
  derived from the last user message: endless when the request set a limit, `default_max_tokens`
  long otherwise. Emitted = min(natural, limit); finish_reason "stop" when the natural answer fits,
  "length" when cut. An auto/required tool call spends one more token (streamed: the name delta).
- tools: as vLLM, "auto" (the default when tools are given) is refused with 400 unless the server
  runs with `enable_auto_tool_choice` (`--enable-auto-tool-choice --tool-call-parser NAME`), and
  "required"/named choices unless a tool parser is set. Then a named tool_choice calls that function
  (finish "stop", as vLLM); "required" calls the first tool; "auto" calls the first tool unless the
  last message is a tool result, then it answers in text -- one agent-loop turn, deterministically.
  Arguments are a minimal instance of the function's parameters schema (`instance`); with
  `break_tool_json` they lose their closing brace and gain a stray comma.
- n > 1: n choices; synthetic texts differ per choice index.
Not simulated: logprobs (always null), echo, stop strings, beam search, reasoning output.
"""

from __future__ import annotations

import functools
import json
import math
import re
import zlib
from typing import Any

import msgspec

from backends.sim import prompt_tokens
from backends.sim.responses import (
    Choice,
    Plan,
    SimError,
    SimOptions,
    bad_request,
    error,
    instance,
    invalid_body,
    new_id,
    prompt_options,
)

# -- request views (narrow; unknown fields such as top_k or guided_json are ignored) -------------

class _Function(msgspec.Struct):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None


class _Tool(msgspec.Struct):
    function: _Function
    type: str = "function"


class _NamedFunction(msgspec.Struct):
    name: str


class _NamedChoice(msgspec.Struct):
    function: _NamedFunction
    type: str = "function"


class _SchemaFormat(msgspec.Struct):
    name: str | None = None
    schema: dict[str, Any] | None = None


class _ResponseFormat(msgspec.Struct):
    type: str
    json_schema: _SchemaFormat | None = None


class _StreamOptions(msgspec.Struct):
    include_usage: bool | None = True
    continuous_usage_stats: bool | None = False


class _Sampling(msgspec.Struct):
    model: str | None = None
    max_tokens: int | None = None
    n: int | None = 1
    stream: bool | None = False
    stream_options: _StreamOptions | None = None
    response_format: _ResponseFormat | None = None


class _ChatRequest(_Sampling, kw_only=True):
    messages: list[dict[str, Any]]
    max_completion_tokens: int | None = None
    tools: list[_Tool] | None = None
    tool_choice: str | _NamedChoice | None | msgspec.UnsetType = msgspec.UNSET
    logprobs: bool | None = False
    top_logprobs: int | None = None


class _CompletionRequest(_Sampling):
    prompt: str | list[Any] | None = None


class _EmbeddingRequest(msgspec.Struct):
    input: str | list[Any]
    model: str | None = None
    encoding_format: str = "float"
    dimensions: int | None = None


_chat_dec = msgspec.json.Decoder(_ChatRequest)
_completion_dec = msgspec.json.Decoder(_CompletionRequest)
_embedding_dec = msgspec.json.Decoder(_EmbeddingRequest)
_raw_dec = msgspec.json.Decoder(dict[str, msgspec.Raw])


def _decode(decoder: msgspec.json.Decoder, body: bytes, required: str) -> Any:
    try:
        return decoder.decode(body)
    except msgspec.ValidationError as exc:
        text = str(exc)
        if "missing required field" in text:
            raise invalid_body("Field required", ("body", required), "missing") from None
        raise invalid_body(text, ("body",), "value_error") from None
    except msgspec.DecodeError:
        raise invalid_body("JSON decode error", ("body", 0), "json_invalid") from None


# -- token pieces ---------------------------------------------------------------------------------

_WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "while", "seven", "spot", "instances", "wake", "up", "to", "serve", "tokens", "from", "warm", "caches", "and", "every", "gateway", "relays", "bytes", "without", "delay", "so", "users", "see", "answers", "stream", "in", "steady", "order", "across", "tiers", "of", "hosts", "that", "sleep", "until", "traffic", "returns", "at", "dawn", "with", "new", "requests", "for", "short", "replies", "long", "essays", "code", "tools", "and", "data"]
_SPACED = [" " + w for w in _WORDS]
_WORD_RE = re.compile(r"\s*\S+|\s+$")


def _tokens(n: int) -> int:
    return (n + 3) // 4


def text_tokens(text: str) -> int:
    """ceil(chars / 4): the simulated tokenizer's length of a text."""
    return _tokens(len(text))


def chat_prompt_tokens(messages: list[dict[str, Any]], tools_json_chars: int = 0) -> int:
    """The chat prompt rule: 3 + sum over messages of (4 + ceil(chars/4)) + ceil(tools JSON chars/4)."""
    prompt = 3
    for m in messages:
        chars = len(_text_of(m.get("content")))
        for call in m.get("tool_calls") or ():
            fn = call.get("function") or {} if isinstance(call, dict) else {}
            chars += len(_string(fn.get("name"), "name")) + len(_string(fn.get("arguments"), "arguments"))
        prompt += 4 + _tokens(chars)
    return prompt + _tokens(tools_json_chars)


def _string(value: Any, field: str) -> str:
    """A text field the prompt rule counts: a string, or absent; anything else is pydantic's 400."""
    if value is None:
        return ""
    if not isinstance(value, str):
        raise invalid_body("Input should be a valid string", ("body", field), "string_type")
    return value


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(_string(p.get("text"), "text") for p in content if isinstance(p, dict))
    return ""


def text_of(content: Any) -> str:
    """The text the prompt rule counts: a string, or the "text" of each part of a list."""
    return _text_of(content)


def _chop(text: str) -> list[str]:
    return [text[i:i + 4] for i in range(0, len(text), 4)] or [""]


def _words(seed: int, count: int) -> list[str]:
    n = len(_WORDS)
    if count <= 0:
        return []
    return [_WORDS[seed % n]] + [_SPACED[(seed + 7 * k) % n] for k in range(1, count)]


class Planner:
    """Validates requests for one simulated server and plans their answers."""

    def __init__(self, options: SimOptions) -> None:
        self.options = options
        self.chat_models = options.models
        self.embedding_models = options.embedding_models
        self._reply = _WORD_RE.findall(options.reply) if options.reply is not None else None

    def chat(self, body: bytes, request_id: str | None = None, *, capped: bool = False) -> Plan:
        """POST /v1/chat/completions -> Plan (raises SimError). `capped`: the limit is a mandatory cap
        (Anthropic's max_tokens), so the synthetic answer keeps its natural length below it."""
        req: _ChatRequest = _decode(_chat_dec, body, "messages")
        if req.stream_options is not None and not req.stream:
            raise invalid_body("Value error, Stream options can only be defined when `stream=True`.",
                               param="stream_options")
        if req.top_logprobs is not None and (req.top_logprobs == -1 or req.top_logprobs > 0) \
                and not req.logprobs:
            raise invalid_body("Value error, when using `top_logprobs`, `logprobs` must be set to true.",
                               param="top_logprobs")
        choice = _tool_choice(req)
        model = self._model(req.model, "Chat Completions")
        self.check_tool_parser(choice)
        for m in req.messages:
            if not isinstance(m.get("role"), str):
                raise invalid_body("Field required", ("body", "messages", "role"), "missing")
        tools_json = bytes(_raw_dec.decode(body)["tools"]) if req.tools else b""
        prompt = chat_prompt_tokens(req.messages, len(tools_json))
        field = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
        limit = self._limit(prompt, req.max_completion_tokens or req.max_tokens, field)
        n = self._n(req.n)
        plan = Plan("chat", "chatcmpl-" + (request_id or new_id("")), model, prompt,
                    stream=bool(req.stream), include_usage=bool(req.stream_options and req.stream_options.include_usage),
                    continuous=bool(req.stream_options and req.stream_options.continuous_usage_stats))
        plan.return_token_ids, plan.prompt_logprobs = prompt_options(body)
        plan.material = functools.partial(prompt_tokens.chat, req.messages, tools_json)
        tool: _Tool | None = None
        if choice != "none" and req.tools:
            if isinstance(choice, _NamedChoice):
                tool = next(t for t in req.tools if t.function.name == choice.function.name)
            elif choice == "required" or (req.messages and req.messages[-1].get("role") != "tool"):
                tool = req.tools[0]
        structured = _structured(req.response_format)
        seed = zlib.crc32(next((_text_of(m.get("content")) for m in reversed(req.messages)
                                if m.get("role") == "user"), "").encode())
        explicit = (req.max_completion_tokens is not None or req.max_tokens is not None) and not capped
        for i in range(n):
            c = Choice(i, [], prompt)
            if tool is not None:
                args = json.dumps(instance(tool.function.parameters or {}), ensure_ascii=False)
                if self.options.break_tool_json:
                    args = args[:-1] + ","
                c.tool_name, c.tool_id = tool.function.name, new_id("chatcmpl-tool-")
                c.tool_mode = "named" if isinstance(choice, _NamedChoice) else choice
                self._fill(c, _chop(args), limit, "stop" if c.tool_mode == "named" else "tool_calls")
            else:
                self._fill(c, self._natural(structured, seed + 7919 * i, explicit, limit), limit, "stop")
            plan.choices.append(c)
        return plan

    def completion(self, body: bytes, request_id: str | None = None) -> Plan:
        """POST /v1/completions -> Plan (raises SimError)."""
        req: _CompletionRequest = _decode(_completion_dec, body, "prompt")
        if req.stream_options is not None and not req.stream:
            raise invalid_body("Value error, Stream options can only be defined when `stream=True`.",
                               param="stream_options")
        prompts = _prompts(req.prompt)
        if not prompts:
            raise invalid_body("Value error, Either prompt or prompt_embeds must be provided and non-empty.")
        model = self._model(req.model, "Completions")
        limits = [self._limit(tokens, req.max_tokens, "max_tokens") for _, tokens in prompts]
        n = self._n(req.n)
        plan = Plan("completion", "cmpl-" + (request_id or new_id("")), model,
                    sum(tokens for _, tokens in prompts), stream=bool(req.stream),
                    include_usage=bool(req.stream_options and req.stream_options.include_usage),
                    continuous=bool(req.stream_options and req.stream_options.continuous_usage_stats))
        plan.return_token_ids, plan.prompt_logprobs = prompt_options(body)
        plan.material = functools.partial(prompt_tokens.completion, req.prompt)
        structured = _structured(req.response_format)
        for p, (seed_text, tokens) in enumerate(prompts):
            for j in range(n):
                c = Choice(p * n + j, [], tokens)
                natural = self._natural(structured, zlib.crc32(seed_text.encode()) + 7919 * j,
                                        req.max_tokens is not None, limits[p])
                self._fill(c, natural, limits[p], "stop")
                plan.choices.append(c)
        return plan

    def embeddings(self, body: bytes) -> tuple[str, list[list[float]], int, bool]:
        """POST /v1/embeddings -> (model, vectors, prompt tokens, base64?) (raises SimError)."""
        req: _EmbeddingRequest = _decode(_embedding_dec, body, "input")
        if req.encoding_format not in ("float", "base64"):
            raise invalid_body("Input should be 'float' or 'base64'", ("body", "encoding_format"),
                               "literal_error")
        model = req.model or (self.embedding_models[0] if self.embedding_models else "")
        if model not in self.embedding_models:
            if model in self.chat_models:
                raise bad_request("The model does not support Embeddings API")
            raise error(404, f"The model `{model}` does not exist.", "NotFoundError", "model")
        prompts = _prompts(req.input)
        if not prompts:
            raise invalid_body("Value error, Input must not be empty.")
        dim = req.dimensions if req.dimensions is not None else self.options.embedding_dim
        if not 1 <= dim <= 65536:
            raise bad_request(f"dimensions must be between 1 and 65536, got {dim}.", "dimensions")
        total = 0
        vectors = []
        for text, tokens in prompts:
            if tokens > self.options.max_model_len:
                raise self._too_long(tokens, 0)
            total += tokens
            vectors.append(_vector(zlib.crc32(text.encode()), dim))
        return model, vectors, total, req.encoding_format == "base64"

    # -- shared rules ----------------------------------------------------------------------------

    def check_tool_parser(self, choice: object) -> None:
        """vLLM's chat `render_chat_request` gate: "auto" needs --enable-auto-tool-choice (and a parser),
        "required" and named choices need --tool-call-parser. `choice` is the validated tool_choice."""
        if choice == "none":
            return
        if choice == "auto":
            if not self.options.enable_auto_tool_choice:
                raise bad_request('"auto" tool choice requires --enable-auto-tool-choice and '
                                  "--tool-call-parser to be set")
            return
        if self.options.tool_parser is None:
            shown = (f'function "{choice.function.name}"' if isinstance(choice, _NamedChoice)
                     else f'"{choice}"')
            raise bad_request(f"tool_choice={shown} requires --tool-call-parser to be set")

    def model(self, name: str | None, api: str) -> str:
        """The served chat model a request names (vLLM's `_check_model`), or SimError."""
        return self._model(name, api)

    def text_choice(self, seed_text: str, prompt: int, limit: int, explicit: bool, index: int = 0) -> Choice:
        """One plain-text choice by the documented rules (synthetic words or `reply`), cut at `limit`."""
        c = Choice(index, [], prompt)
        self._fill(c, self._natural(None, zlib.crc32(seed_text.encode()) + 7919 * index, explicit, limit),
                   limit, "stop")
        return c

    def words(self, seed: int, count: int) -> list[str]:
        """`count` synthetic words from `seed` (one token each), or the fixed `reply` when set."""
        if self._reply is not None:
            return self._reply or [""]
        return _words(seed, count)

    def _model(self, name: str | None, api: str) -> str:
        model = name or (self.chat_models[0] if self.chat_models else "")
        if model in self.chat_models:
            return model
        if model in self.embedding_models:
            raise bad_request(f"The model does not support {api} API")
        raise error(404, f"The model `{model}` does not exist.", "NotFoundError", "model")

    def too_long(self, prompt: int, out: int) -> SimError:
        """The renderer's context-length error for `prompt` input and `out` output tokens."""
        return self._too_long(prompt, out)

    def _too_long(self, prompt: int, out: int) -> SimError:
        total = self.options.max_model_len
        return bad_request(
            f"You passed {prompt} input tokens and requested {out} output tokens. However, the model's "
            f"context length is only {total} tokens, resulting in a maximum input length of "
            f"{total - out} tokens. Please reduce the length of the input prompt.", "input_tokens")

    def _limit(self, prompt: int, requested: int | None, field: str) -> int:
        """vLLM's TokenizeParams checks, then SamplingParams' max_tokens >= 1."""
        total = self.options.max_model_len
        if requested is not None and requested > total:
            raise bad_request(f"{field}={requested}cannot be greater than max_model_len=max_total_tokens="
                              f"{total}. Please request fewer output tokens.", field)
        if prompt > total - (requested or 0):
            raise self._too_long(prompt, requested or 0)
        limit = total - prompt if requested is None else requested
        if limit < 1:
            raise bad_request(f"max_tokens must be at least 1, got {limit}.", "max_tokens")
        return limit

    @staticmethod
    def _n(n: int | None) -> int:
        n = 1 if n is None else n
        if not 1 <= n <= 128:
            raise bad_request(f"n must be at least 1, got {n}." if n < 1 else "n must be at most 128.", "n")
        return n

    def _natural(self, structured: str | None, seed: int, explicit: bool, limit: int) -> list[str]:
        if structured is not None:
            return _chop(structured)
        if self._reply is not None:
            return self._reply or [""]
        # synthetic text never ends before an explicit limit: one word past it marks the cut
        return _words(seed, limit + 1 if explicit else self.options.default_max_tokens)

    @staticmethod
    def _fill(c: Choice, natural: list[str], limit: int, finish: str) -> None:
        extra = 1 if c.tool_mode in ("auto", "required") else 0  # the name delta
        room = max(limit - extra, 0)
        if len(natural) <= room:
            c.pieces, c.finish = natural, finish
        else:
            c.pieces, c.finish = natural[:room], "length"


def _tool_choice(req: _ChatRequest) -> str | _NamedChoice:
    """vLLM's `check_tool_usage` validator (mode="before")."""
    choice = req.tool_choice
    if choice is msgspec.UNSET:
        return "auto" if req.tools else "none"
    if choice is None or choice == "none":
        return "none"
    if req.tools is None:
        raise invalid_body("Value error, When using `tool_choice`, `tools` must be set.")
    if isinstance(choice, str) and choice not in ("auto", "required"):
        raise invalid_body(f"Value error, Invalid value for `tool_choice`: {choice}! Only named tools, "
                           '"none", "auto" or "required" are supported.')
    if choice == "required" and not req.tools:
        return "none"
    if isinstance(choice, _NamedChoice) and all(t.function.name != choice.function.name for t in req.tools):
        raise invalid_body("Value error, The tool specified in `tool_choice` does not match any of the "
                           "specified `tools`")
    return choice


def _structured(fmt: _ResponseFormat | None) -> str | None:
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return '{"response": "sim"}'
    if fmt.type == "json_schema":
        schema = fmt.json_schema.schema if fmt.json_schema is not None else None
        return json.dumps(instance(schema or {}), ensure_ascii=False)
    raise invalid_body("Input should be 'text', 'json_object' or 'json_schema'",
                       ("body", "response_format", "type"), "literal_error")


def _prompts(raw: Any) -> list[tuple[str, int]]:
    """(seed text, prompt tokens) per prompt: text, list of texts, ids, or list of id lists."""
    if raw is None or raw == "" or raw == []:
        return []
    if isinstance(raw, str):
        return [(raw, max(1, _tokens(len(raw))))]
    if isinstance(raw[0], str):
        return [(s, max(1, _tokens(len(s)))) for s in raw]
    if isinstance(raw[0], int):
        return [(str(raw), len(raw))]
    return [(str(ids), len(ids)) for ids in raw if ids]


def vector(seed: int, dim: int) -> list[float]:
    """The unit vector /v1/embeddings returns for a text whose CRC-32 is `seed`."""
    return _vector(seed, dim)


def _vector(seed: int, dim: int) -> list[float]:
    values = []
    state = seed or 1
    for _ in range(dim):
        state = (state * 1103515245 + 12345) & 0x7FFFFFFF
        values.append(state / 0x7FFFFFFF - 0.5)
    norm = math.sqrt(sum(v * v for v in values)) or 1.0
    return [v / norm for v in values]
