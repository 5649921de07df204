"""Narrow views of the other APIs vLLM serves: the Responses API, Anthropic Messages, audio, and the
pooling family (rerank, score, pooling, classify, tokenize, detokenize).

Strategy: as schemas.py (same decoding, same error wording via schema_errors.py, unknown fields
allowed, the original bytes forwarded): decode only what the gateway routes, meters or must refuse.
Every view answers the questions inference.py asks of any view: `model`, `stream`, the prompt estimate
and the output maximum for the up-front charge (limits/charge.py), and `api`, which picks the usage
tap (usage/taps.py): "chat" (schemas.py's views), "responses" / "messages" (named-event streams,
usage in the final events), "plain" (a JSON body, or an SSE stream read like chat's without asking
for usage).
* Responses (openai-python ``types/responses/response_create_params.py``, vLLM ``ResponsesRequest``):
  ``model`` and ``input`` (a string or an array of items) required here -- vLLM's own default model
  would bypass routing -- ``max_output_tokens`` (the tpm estimate), ``previous_response_id`` (routes
  the continuation to the upstream that stored it: inference.py).
* Anthropic Messages (``anthropic`` ``types/message_create_params.py``): ``model``, ``max_tokens``
  (required by that API: 400 naming it), ``messages`` (roles user/assistant), ``system`` as a string
  or blocks, Anthropic's ranges (temperature 0..1). ``count_tokens`` has no ``max_tokens`` and costs
  no generation: its estimate is 0 tokens (it counts against rpm only).
* Pooling family: a JSON object with a ``model``; vLLM validates the rest (its field names move
  between releases). tokenize / detokenize cost no GPU time: estimate 0.
* Audio: built from the multipart form's fields (inference.py reads them with multipart.py).
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec
from msgspec import Meta, Raw, Struct

from proxy.admit.schemas import _INT32, AnyObject, _decode, _Model, _present, _Temperature, _TopP
from proxy.errors import invalid_request

_BYTES_PER_TOKEN = 4
_ABSENT = Raw(b"")
_PositiveInt = Annotated[int, Meta(ge=1, le=_INT32)]
_UnitFloat = Annotated[float, Meta(ge=0, le=1)]


class _Base(Struct, kw_only=True, gc=False):
    model: _Model
    api = "plain"
    stream = False

    def estimate_prompt_tokens(self, body_len: int) -> int:
        return body_len // _BYTES_PER_TOKEN

    def output_limit(self) -> int | None:
        return None


class _Free(_Base, kw_only=True):
    """No generation, no GPU time worth a token charge (count_tokens, tokenize, detokenize)."""

    def estimate_prompt_tokens(self, body_len: int) -> int:
        return 0


# -- the Responses API ---------------------------------------------------------------------------------

class ResponsesView(_Base, kw_only=True):
    input: Raw = _ABSENT  # str | list of items: checked below
    stream: bool | None = False
    max_output_tokens: _PositiveInt | None = None
    previous_response_id: Annotated[str, Meta(min_length=1, max_length=256)] | None = None
    instructions: str | None = None
    store: bool | None = None
    background: bool | None = None
    temperature: _Temperature | None = None
    top_p: _TopP | None = None
    tools: list[AnyObject] | None = None
    api = "responses"

    def output_limit(self) -> int | None:
        return self.max_output_tokens


# -- Anthropic Messages ----------------------------------------------------------------------------------

class _Block(Struct, gc=False):
    type: str


_AnthropicContent = str | list[_Block]


class AnthropicMessage(Struct, gc=False):
    role: Literal["user", "assistant"]
    content: _AnthropicContent


class MessagesView(_Base, kw_only=True):
    max_tokens: _PositiveInt
    messages: Annotated[list[AnthropicMessage], Meta(min_length=1)]
    system: _AnthropicContent | None = None
    stream: bool | None = False
    temperature: _UnitFloat | None = None
    top_p: _UnitFloat | None = None
    top_k: Annotated[int, Meta(ge=0, le=_INT32)] | None = None
    stop_sequences: list[str] | None = None
    tools: list[AnyObject] | None = None
    tool_choice: AnyObject | None = None
    metadata: AnyObject | None = None
    api = "messages"

    def output_limit(self) -> int | None:
        return self.max_tokens


class CountTokensView(_Free, kw_only=True):
    messages: Annotated[list[AnthropicMessage], Meta(min_length=1)]
    system: _AnthropicContent | None = None
    tools: list[AnyObject] | None = None


# -- pooling family, tokenizer ---------------------------------------------------------------------------

class PoolingView(_Base, kw_only=True):
    pass


class TokenizerView(_Free, kw_only=True):
    pass


# -- audio ---------------------------------------------------------------------------------------------------

class NoTokenCharge:
    """A request charged one request and no tokens up front (limits/charge.py): audio, whose bytes are
    not tokens and whose output maximum is unknown (settled with what it reports), and a stored
    response's retrieve or cancel."""

    __slots__ = ()

    @staticmethod
    def estimate_prompt_tokens(body_len: int) -> int:
        return 0

    @staticmethod
    def output_limit() -> None:
        return None


class AudioView(NoTokenCharge):
    """Not decoded from JSON: the multipart form's `model` and `stream` fields."""

    __slots__ = ("model", "stream")
    api = "plain"

    def __init__(self, model: str, stream: bool) -> None:
        self.model = model
        self.stream = stream


# -- decoders --------------------------------------------------------------------------------------------------

_RESPONSES = msgspec.json.Decoder(ResponsesView)
_MESSAGES = msgspec.json.Decoder(MessagesView)
_COUNT = msgspec.json.Decoder(CountTokensView)
_POOLING = msgspec.json.Decoder(PoolingView)
_TOKENIZER = msgspec.json.Decoder(TokenizerView)


def _no_null_stream(view) -> None:
    if view.stream is None:
        view.stream = False


def decode_responses(body: bytes) -> ResponsesView:
    """Validate a /v1/responses body; raise `ApiError` 400 naming the bad field."""
    view: ResponsesView = _decode(_RESPONSES, body)  # type: ignore[assignment]
    _no_null_stream(view)
    raw = view.input
    if not _present(raw):
        raise invalid_request("Missing required parameter: 'input'.", "input")
    if memoryview(raw)[0] not in (0x22, 0x5B):  # a string or an array (Raw starts at the value)
        raise invalid_request("Invalid type for 'input': expected a string or an array of input items.", "input")
    return view


def decode_messages(body: bytes) -> MessagesView:
    """Validate a /v1/messages body (Anthropic's); raise `ApiError` 400 naming the bad field."""
    view: MessagesView = _decode(_MESSAGES, body)  # type: ignore[assignment]
    _no_null_stream(view)
    return view


def decode_count_tokens(body: bytes) -> CountTokensView:
    return _decode(_COUNT, body)  # type: ignore[return-value]


def decode_pooling(body: bytes) -> PoolingView:
    return _decode(_POOLING, body)  # type: ignore[return-value]


def decode_tokenizer(body: bytes) -> TokenizerView:
    return _decode(_TOKENIZER, body)  # type: ignore[return-value]
