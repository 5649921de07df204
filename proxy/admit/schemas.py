"""Narrow, validated views of the bodies of /v1/chat/completions, /v1/completions and /v1/embeddings.

Strategy: decode a *view* -- only the fields the gateway routes, meters or must reject on -- and
forward the original body bytes to vLLM unchanged.
* Unknown fields are allowed everywhere, so vLLM extras (``top_k``, ``repetition_penalty``,
  ``guided_json``, ``chat_template_kwargs``...) pass. Decoders are built once, at import.
* Whatever msgspec can express is a type or a ``Meta`` constraint (ranges, lengths, name patterns,
  role tags), so the common case is one C call. Objects the gateway never reads (tool ``parameters``,
  JSON schemas, tool calls, content parts) decode to empty Structs: "is an object", contents skipped.
  The rest is a little Python after decoding (``_check_*``), or a ``__post_init__`` where msgspec's
  error path is needed. No loop over messages or inputs runs in Python.
* Rules follow OpenAI's API reference (openai-python ``types/chat/completion_create_params.py``);
  every optional field accepts null, as the SDK's ``Optional[...]`` does. Where vLLM
  (``vllm/entrypoints/openai/protocol.py``) harmlessly accepts more, follow vLLM so requests that
  work against vLLM keep working: a tool's ``type`` may be omitted, ``response_format.type`` may be
  "structural_tag", a completion may have ``max_tokens`` 0 (echo-only scoring) or ``prompt_embeds``
  instead of ``prompt``, an embedding may have chat ``messages`` instead of ``input``.
* Every failure is an `ApiError` 400 ``invalid_request_error``, worded by schema_errors.py (the one
  translation of msgspec's ``ValidationError`` into OpenAI's wording and ``param``). A body that is
  not a JSON object gets OpenAI's "could not parse" message, param null.
Keep in sync: Structs with the OpenAI/vLLM fields they mirror; schema_errors.SUPPORTED with the
Literals and tags; tests/proxy/admit/test_schemas.py with every rule here.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Annotated, Literal

import msgspec
from msgspec import Meta, Raw, Struct

from proxy.admit.schema_errors import NOT_JSON, from_validation_error, quote
from proxy.errors import invalid_request
from proxy.usage.include_usage import client_asked

# -- constrained scalars (OpenAI's ranges) ---------------------------------------------------------

# \Z, not $: msgspec uses re.search, and $ also matches before a trailing newline.
_Name = Annotated[str, Meta(pattern=r"^[a-zA-Z0-9_-]{1,64}\Z")]
_Model = Annotated[str, Meta(min_length=1)]
_Temperature = Annotated[float, Meta(ge=0, le=2)]
_TopP = Annotated[float, Meta(ge=0, le=1)]
_Penalty = Annotated[float, Meta(ge=-2, le=2)]
# Every integer the gateway reads is bounded (msgspec decodes a 400-digit number to a Python int):
# counts to vLLM's int32 range, so no arithmetic on them can overflow or run long.
_INT32 = 2**31 - 1
_N = Annotated[int, Meta(ge=1, le=128)]
_PositiveInt = Annotated[int, Meta(ge=1, le=_INT32)]
_Count = Annotated[int, Meta(ge=0, le=_INT32)]
_TopLogprobs = Annotated[int, Meta(ge=0, le=20)]
_Seed = Annotated[int, Meta(ge=-(2**63), le=2**63 - 1)]  # vLLM's bound (a torch long)
_Stop = str | Annotated[list[str], Meta(max_length=4)]


class AnyObject(Struct, gc=False):
    """Any JSON object; its members are skipped, not decoded."""


class StreamOptions(Struct, gc=False):
    include_usage: bool | None = None
    continuous_usage_stats: bool | None = None  # vLLM's: usage in every chunk (asks for usage too)


# -- chat messages: a union tagged by `role` --------------------------------------------------------


class ContentPart(Struct, gc=False):
    type: str


_Content = str | list[ContentPart]


class _Message(Struct, tag_field="role", gc=False):
    pass


class SystemMessage(_Message, tag="system"):
    content: _Content


class DeveloperMessage(_Message, tag="developer"):
    content: _Content


class UserMessage(_Message, tag="user"):
    content: _Content


class AssistantMessage(_Message, tag="assistant"):
    content: _Content | None = None
    tool_calls: list[AnyObject] | None = None
    function_call: AnyObject | None = None

    def __post_init__(self) -> None:
        # OpenAI: content is "required unless tool_calls or function_call is specified".
        if self.content is None and not self.tool_calls and self.function_call is None:
            raise ValueError("@content Invalid value for '{param}': expected a string or an array of content "
                             "parts, but got null instead (only an assistant message with tool_calls or "
                             "function_call may omit content).")


class ToolMessage(_Message, tag="tool"):
    content: _Content
    tool_call_id: str


class FunctionMessage(_Message, tag="function"):
    name: str
    content: str | None


Message = SystemMessage | DeveloperMessage | UserMessage | AssistantMessage | ToolMessage | FunctionMessage


# -- tools, tool_choice, response_format ------------------------------------------------------------


class FunctionDefinition(Struct, gc=False):
    name: _Name
    description: str | None = None
    parameters: AnyObject | None = None
    strict: bool | None = None


class Tool(Struct, gc=False):
    function: FunctionDefinition
    type: Literal["function"] = "function"  # required by OpenAI; vLLM defaults it


class NamedFunction(Struct, gc=False):
    name: str


class NamedToolChoice(Struct, gc=False):
    function: NamedFunction
    type: Literal["function"] = "function"


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


class JsonSchema(Struct, gc=False):
    name: _Name
    description: str | None = None
    schema: AnyObject | None = None
    strict: bool | None = None


class ResponseFormat(Struct, gc=False):
    type: Literal["text", "json_object", "json_schema", "structural_tag"]  # structural_tag: vLLM's
    json_schema: JsonSchema | None = None

    def __post_init__(self) -> None:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("@json_schema Missing required parameter: '{param}'.")


# -- the views ---------------------------------------------------------------------------------------

_BYTES_PER_TOKEN = 4
_ABSENT = Raw(b"")
_NULL = Raw(b"null")


class _View(Struct, kw_only=True, gc=False):
    model: _Model
    api = "chat"  # the usage tap's kind (usage/taps.py)

    def estimate_prompt_tokens(self, body_len: int) -> int:
        """A cheap upper-side guess for rate limiting: the body length / 4 bytes per token.

        JSON syntax and non-prompt fields count too, so it over-estimates; usage rows use vLLM's own
        token counts, never this.
        """
        return body_len // _BYTES_PER_TOKEN


class _Generation(_View, kw_only=True):
    stream: bool | None = False  # None is normalized to False after decoding
    stream_options: StreamOptions | None = None
    n: _N | None = None
    temperature: _Temperature | None = None
    top_p: _TopP | None = None
    presence_penalty: _Penalty | None = None
    frequency_penalty: _Penalty | None = None
    stop: _Stop | None = None
    seed: _Seed | None = None

    @property
    def include_usage(self) -> bool:
        """True when the client asked for the final usage chunk (usage/include_usage.py's one rule:
        ``include_usage: true``, or ``continuous_usage_stats: true`` without ``include_usage``)."""
        return client_asked(self.stream_options)


class ChatView(_Generation, kw_only=True):
    messages: Annotated[list[Message], Meta(min_length=1)]
    max_tokens: _PositiveInt | None = None
    max_completion_tokens: _PositiveInt | None = None
    logprobs: bool | None = None
    top_logprobs: _TopLogprobs | None = None
    tools: list[Tool] | None = None
    tool_choice: ToolChoice | None = None
    response_format: ResponseFormat | None = None

    def output_limit(self) -> int | None:
        """``max_completion_tokens``, else the deprecated ``max_tokens``; None: the upstream's default."""
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class CompletionView(_Generation, kw_only=True):
    prompt: Raw = _ABSENT  # str | list[str] | list[int] | list[list[int]], checked by `_check_tokens_or_text`
    prompt_embeds: Raw = _ABSENT  # vLLM extension: replaces `prompt`
    max_tokens: _Count | None = None  # 0 with echo: score the prompt only (vLLM)
    logprobs: _Count | None = None  # an int here, unlike chat

    def output_limit(self) -> int | None:
        """``max_tokens``; None: the upstream's default (16 on OpenAI and vLLM)."""
        return self.max_tokens


class EmbeddingView(_View, kw_only=True):
    input: Raw = _ABSENT  # str | list[str] | list[int] | list[list[int]], no empty strings
    messages: Annotated[list[Message], Meta(min_length=1)] | None = None  # vLLM chat embeddings
    encoding_format: Literal["float", "base64"] | None = None
    dimensions: _PositiveInt | None = None

    stream = False
    include_usage = False
    api = "plain"

    def output_limit(self) -> None:
        return None


View = ChatView | CompletionView | EmbeddingView

def check_utf8(body: bytes) -> None:
    """The whole body must be UTF-8 (RFC 8259 8.1), unknown fields included: msgspec skips what the
    view does not decode without looking, and vLLM must not get what we did not check. Pure ASCII --
    most bodies -- is one `isascii` pass (0.3 us for 7 KB); otherwise a decode (4 us for 7 KB)."""
    if body.isascii():
        return
    try:
        body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise invalid_request("We could not parse the JSON body of your request: it is not valid "
                              f"UTF-8 (byte {exc.start}).") from None


def _decode(decoder: msgspec.json.Decoder, body: bytes) -> object:
    check_utf8(body)
    try:
        return decoder.decode(body)
    except msgspec.ValidationError as exc:
        raise from_validation_error(exc) from None
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):
        raise invalid_request(NOT_JSON) from None


# -- checks a type cannot express ---------------------------------------------------------------------


def _check_stream(view: _Generation) -> None:
    if view.stream is None:
        view.stream = False
    if view.stream_options is not None and not view.stream:
        # OpenAI's own message and param.
        raise invalid_request("The 'stream_options' parameter is only allowed when 'stream' is enabled.",
                              "stream_options")


def _check_tools(view: ChatView) -> None:
    choice = view.tool_choice
    if choice is None or choice == "none":
        return
    if view.tools is None:
        raise invalid_request("Invalid value for 'tool_choice': 'tool_choice' is only allowed when 'tools' "
                              "are specified.", "tool_choice")
    if type(choice) is NamedToolChoice:
        name = choice.function.name
        for tool in view.tools:
            if tool.function.name == name:
                return
        raise invalid_request(f"Invalid value for 'tool_choice': no function named '{quote(name)}' is given "
                              "in 'tools'.", "tool_choice.function.name")


# Sub-decoders for the str | list[str] | list[int] | list[list[int]] fields, picked by the first byte,
# so that mixed arrays fail with a precise path and no Python loop runs over the items.
_TokenId = Annotated[int, Meta(ge=0, le=_INT32)]
_Tokens = Annotated[list[_TokenId], Meta(min_length=1)]
_TEXT_DECODERS = {
    False: (msgspec.json.Decoder(str), msgspec.json.Decoder(Annotated[list[str], Meta(min_length=1)])),
    True: (msgspec.json.Decoder(Annotated[str, Meta(min_length=1)]),
           msgspec.json.Decoder(Annotated[list[Annotated[str, Meta(min_length=1)]], Meta(min_length=1)])),
}
_TOKENS = msgspec.json.Decoder(_Tokens)
_TOKEN_LISTS = msgspec.json.Decoder(Annotated[list[_Tokens], Meta(min_length=1)])
_FIRST_ITEM = re.compile(rb"\[[ \t\r\n]*(.)", re.DOTALL)


def _check_tokens_or_text(raw: Raw, field: str, non_empty_strings: bool) -> None:
    data = memoryview(raw)
    first = data[0]  # msgspec's Raw starts at the value, never at whitespace
    text, texts = _TEXT_DECODERS[non_empty_strings]
    if first == 0x22:  # "
        decoder = text
    elif first == 0x5B:  # [
        m = _FIRST_ITEM.match(data)
        item = m.group(1) if m else b"]"
        decoder = _TOKEN_LISTS if item == b"[" else _TOKENS if item in b"-0123456789" else texts
    else:
        raise invalid_request(f"Invalid type for '{field}': expected a string, an array of strings, an array "
                              "of integers or an array of arrays of integers.", field)
    try:
        decoder.decode(data)
    except msgspec.ValidationError as exc:
        raise from_validation_error(exc, field) from None
    except msgspec.DecodeError:  # the view's decode already checked the JSON; kept as a backstop
        raise invalid_request(f"Invalid value for '{field}': not valid JSON text.", field) from None


def _present(raw: Raw) -> bool:
    return len(raw) > 0 and raw != _NULL


# -- public decoders -----------------------------------------------------------------------------------

_CHAT = msgspec.json.Decoder(ChatView)
_COMPLETION = msgspec.json.Decoder(CompletionView)
_EMBEDDING = msgspec.json.Decoder(EmbeddingView)


def decode_chat(body: bytes) -> ChatView:
    """Validate a /v1/chat/completions body; raise `ApiError` 400 naming the bad field."""
    view: ChatView = _decode(_CHAT, body)  # type: ignore[assignment]
    _check_stream(view)
    if view.tool_choice is not None:
        _check_tools(view)
    if view.top_logprobs and not view.logprobs:  # OpenAI and vLLM both refuse this
        raise invalid_request("Invalid value for 'top_logprobs': 'logprobs' must be set to true when "
                              "'top_logprobs' is used.", "top_logprobs")
    return view


def decode_completion(body: bytes) -> CompletionView:
    """Validate a /v1/completions body; raise `ApiError` 400 naming the bad field."""
    view: CompletionView = _decode(_COMPLETION, body)  # type: ignore[assignment]
    _check_stream(view)
    if _present(view.prompt):
        _check_tokens_or_text(view.prompt, "prompt", non_empty_strings=False)
    elif not _present(view.prompt_embeds):
        raise invalid_request("Missing required parameter: 'prompt'.", "prompt")
    return view


def decode_embedding(body: bytes) -> EmbeddingView:
    """Validate a /v1/embeddings body; raise `ApiError` 400 naming the bad field."""
    view: EmbeddingView = _decode(_EMBEDDING, body)  # type: ignore[assignment]
    if _present(view.input):
        _check_tokens_or_text(view.input, "input", non_empty_strings=True)  # OpenAI rejects ""
    elif view.messages is None:
        raise invalid_request("Missing required parameter: 'input'.", "input")
    return view


DECODERS: dict[bytes, Callable[[bytes], View]] = {
    b"/v1/chat/completions": decode_chat,
    b"/v1/completions": decode_completion,
    b"/v1/embeddings": decode_embedding,
}
