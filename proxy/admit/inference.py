"""Requests for an upstream (every vLLM API the gateway serves): admitted here, then handed to the tier.

Strategy: refuse as much as possible before reading the body (declared size, content type; framing
itself is the parser's), then validate the narrow view (schemas.py, api_views.py; audio's form fields
with multipart.py) so nothing invalid reaches an upstream, then: the model's tier (404 unknown model),
the key's permission for it (403), the key's limits (limits/charge.py: 429), the usage tap
(usage/taps.py: the one body rewrite, asking a chat stream for its token counts). The ORIGINAL body
bytes go upstream; routing/forward.py takes it from there.
Stored Responses (routing/homes.py): `GET /v1/responses/{id}` and `POST /v1/responses/{id}/cancel` go
to the upstream that created `{id}` and nowhere else (unknown id, or its upstream no longer in
rotation: 404, and a sleeping tier is not woken to say so); they are not billed and carry no token
charge. A create whose `previous_response_id` is known goes to that upstream when it is routable, else
wherever the tier sends it (vLLM then answers for the id itself).
"""

from __future__ import annotations

from proxy import errors
from proxy.accept.downstream import Downstream
from proxy.admit import multipart
from proxy.admit.api_views import (
    AudioView,
    NoTokenCharge,
    decode_count_tokens,
    decode_messages,
    decode_pooling,
    decode_responses,
    decode_tokenizer,
)
from proxy.admit.schemas import DECODERS as _CHAT_FAMILY
from proxy.exchange import Exchange, model_label
from proxy.limits.charge import charge
from proxy.parse.request import target_path
from proxy.routing.forward import Pin, forward_to_tier
from proxy.usage.taps import choose_tap

_JSON_TYPES = (b"application/json",)
_FORM_TYPE = b"multipart/form-data"
_AUDIO_FIELDS = frozenset(("model", "stream"))

DECODERS = {
    **_CHAT_FAMILY,  # chat, completions, embeddings
    b"/v1/responses": decode_responses,
    b"/v1/messages": decode_messages,
    b"/v1/messages/count_tokens": decode_count_tokens,
    b"/v1/rerank": decode_pooling,
    b"/rerank": decode_pooling,
    b"/v2/rerank": decode_pooling,
    b"/v1/score": decode_pooling,
    b"/score": decode_pooling,
    b"/pooling": decode_pooling,
    b"/classify": decode_pooling,
    b"/tokenize": decode_tokenizer,
    b"/detokenize": decode_tokenizer,
}


def _content_type(request) -> bytes | None:
    for name, value in request.headers:
        if name == b"content-type":
            return value
    return None


def check_declared(request, limit: int) -> None:
    """Refuse before reading the body: a declared length past the limit, a non-JSON content type.
    (Framing itself -- Content-Length with Transfer-Encoding included -- is the parser's: 400.)"""
    if request.content_length is not None and request.content_length > limit:
        raise errors.body_too_large(limit)
    value = _content_type(request)
    if value is not None:
        mime = value.split(b";", 1)[0].strip().lower()
        if mime not in _JSON_TYPES:
            raise errors.invalid_request(
                f"Unsupported Content-Type {mime.decode('latin-1')!r}: send application/json.",
                code="unsupported_content_type")


async def forward_inference(gw, ds: Downstream, ex: Exchange, request, key, rest: bytes) -> None:
    """A JSON request: chat, completions, embeddings, Responses, Messages, the pooling family."""
    limit = ds.limits.max_body_bytes
    check_declared(request, limit)
    body = await ds.read_body(limit, request)
    view = DECODERS[target_path(request.target)](body)
    pin = fetch = None
    if view.api == "responses" and view.previous_response_id is not None:
        home = gw.homes.home(view.previous_response_id)  # this host's map: no round trip
        if home is not None:
            pin = Pin(home[1], strict=False)
        else:
            fetch = view.previous_response_id  # the cluster's map, if any: with the charge, below
    await _admit_and_forward(gw, ds, ex, request, key, view, body, pin, fetch)


async def forward_audio(gw, ds: Downstream, ex: Exchange, request, key, rest: bytes) -> None:
    """/v1/audio/transcriptions and /translations: multipart/form-data, the model from its form field."""
    limit = ds.limits.max_audio_bytes
    if request.content_length is not None and request.content_length > limit:
        raise errors.body_too_large(limit)
    value = _content_type(request)
    mime = (value or b"").split(b";", 1)[0].strip().lower()
    if mime != _FORM_TYPE:
        shown = mime.decode("latin-1") or "none"
        raise errors.invalid_request(f"Unsupported Content-Type {shown!r}: send multipart/form-data with "
                                     "the audio in a 'file' part.", code="unsupported_content_type")
    boundary = multipart.boundary_of(value)
    body = await ds.read_body(limit, request)
    fields = multipart.form_fields(body, boundary, _AUDIO_FIELDS)
    model = fields.get("model")
    if not model:
        raise errors.invalid_request("Missing required parameter: 'model'.", "model")
    stream = fields.get("stream", "false").strip().lower()
    if stream not in ("true", "false", "1", "0", ""):
        raise errors.invalid_request(f"Invalid value for 'stream': expected a boolean, got "
                                     f"'{stream[:40]}'.", "stream")
    await _admit_and_forward(gw, ds, ex, request, key, AudioView(model, stream in ("true", "1")), body, None)


async def _admit_and_forward(gw, ds, ex, request, key, view, body: bytes, pin, fetch: str | None = None) -> None:
    """`fetch`: a continuation's `previous_response_id` this host does not know; with `[cluster]` its
    home is fetched from Redis in the same round trip as the key's limits (one round trip, not two)."""
    ex.model = model_label(view.model)
    ex.stream = view.stream
    tier = gw.runtime.router.tier_for(view.model)
    if tier is None:
        raise errors.model_not_found(ex.model)
    ex.tier = tier.name
    if key is not None and not key.allows_tier(tier.name):
        raise errors.permission_denied(f"This API key may not use tier '{tier.name}' (model '{ex.model}').")
    cmd = gw.homes.fetch_command(fetch) if fetch is not None else None
    also = () if cmd is None else (cmd,)
    replies: list = []
    limit_headers = await charge(gw, ex, key, view, len(body), also=also, replies=replies)
    if also:
        home = gw.homes.from_reply(fetch, replies[0]) if replies else await gw.homes.lookup(fetch)
        if home is not None:
            pin = Pin(home[1], strict=False)
    body, tap = choose_tap(view, body)
    await forward_to_tier(gw, ds, ex, tier, request, body, limit_headers, tap, pin=pin)


async def forward_stored(gw, ds: Downstream, ex: Exchange, request, key, rest: bytes) -> None:
    """`GET /v1/responses/{id}` and `POST /v1/responses/{id}/cancel` (routes.py checked the shape)."""
    response_id = rest.partition(b"/")[0].decode("latin-1")
    home = await gw.homes.lookup(response_id)
    if home is None:
        raise errors.unknown_response(response_id[:256])
    tier = gw.runtime.router.tiers.get(home[0])
    if tier is None:  # the tier is gone from the configuration since
        raise errors.unknown_response(response_id[:256])
    ex.tier = tier.name
    if key is not None and not key.allows_tier(tier.name):
        raise errors.permission_denied(f"This API key may not use tier '{tier.name}'.")
    if tier.waker is not None and not tier.waker.is_ready():
        raise errors.unknown_response(response_id[:256])  # asleep: its hosts' stores are gone
    body = b""
    if request.method == b"POST":
        limit = ds.limits.max_body_bytes
        check_declared(request, limit)
        body = await ds.read_body(limit, request)
    limit_headers = await charge(gw, ex, key, NoTokenCharge, 0)
    await forward_to_tier(gw, ds, ex, tier, request, body, limit_headers, None,
                          pin=Pin(home[1], strict=True, response_id=response_id))
