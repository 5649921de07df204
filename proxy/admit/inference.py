"""Inference requests (chat, completions, embeddings): admitted here, then handed to the tier.

Strategy: refuse as much as possible before reading the body (declared size, content type; framing
itself is the parser's), then validate the narrow view (schemas.py) so nothing invalid reaches an
upstream, then: the model's tier (404 unknown model), the key's permission for it (403), the key's
limits (limits/charge.py: 429), the usage tap (usage/taps.py: the one body rewrite, asking a stream
for its token counts). The ORIGINAL body bytes go upstream; routing/forward.py takes it from there.
"""

from __future__ import annotations

from proxy import errors
from proxy.accept.downstream import Downstream
from proxy.admit.schemas import DECODERS
from proxy.exchange import Exchange, model_label
from proxy.limits.charge import charge
from proxy.parse.request import target_path
from proxy.routing.forward import forward_to_tier
from proxy.usage.taps import choose_tap

_JSON_TYPES = (b"application/json",)


def check_declared(request, limit: int) -> None:
    """Refuse before reading the body: a declared length past the limit, a non-JSON content type.
    (Framing itself -- Content-Length with Transfer-Encoding included -- is the parser's: 400.)"""
    if request.content_length is not None and request.content_length > limit:
        raise errors.body_too_large(limit)
    for name, value in request.headers:
        if name == b"content-type":
            mime = value.split(b";", 1)[0].strip().lower()
            if mime not in _JSON_TYPES:
                raise errors.invalid_request(
                    f"Unsupported Content-Type {mime.decode('latin-1')!r}: send application/json.",
                    code="unsupported_content_type")
            return


async def forward_inference(gw, ds: Downstream, ex: Exchange, request, key, rest: bytes) -> None:
    limit = ds.limits.max_body_bytes
    check_declared(request, limit)
    body = await ds.read_body(limit, request)
    view = DECODERS[target_path(request.target)](body)
    ex.model = model_label(view.model)
    ex.stream = view.stream
    tier = gw.runtime.router.tier_for(view.model)
    if tier is None:
        raise errors.model_not_found(ex.model)
    ex.tier = tier.name
    if key is not None and not key.allows_tier(tier.name):
        raise errors.permission_denied(f"This API key may not use tier '{tier.name}' (model '{ex.model}').")
    limit_headers = charge(gw, ex, key, view, len(body))
    body, tap = choose_tap(view, body)
    await forward_to_tier(gw, ds, ex, tier, request, body, limit_headers, tap)
