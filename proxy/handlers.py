"""Routes: method + path -> handler, authentication, and the endpoints the gateway answers itself.

Strategy: a dict from path to (allowed methods, handler), built once; no framework. Order of checks
for every request, so that each abuse case is refused as early and as cheaply as possible:
  route (404/405) -> API key (401) -> declared body size (413, before reading a byte of it)
  -> handler. Inference endpoints continue in forward.py (body, validation, routing, upstream).
`/healthz` and `/metrics` need no key; `/v1/models` is answered from configuration (a down upstream
must not make it fail) and lists only the models of tiers the key may use (OpenAI's list shape).
"""

from __future__ import annotations

import msgspec

from proxy import errors
from proxy.connection import BODY, Downstream
from proxy.exchange import Exchange
from proxy.forward import forward_inference

_JSON = (b"content-type", b"application/json")
_encode = msgspec.json.encode
_BEARER = b"bearer "


def authenticate(gw, headers) -> tuple[object | None, errors.ApiError | None]:
    """(key record or None when running open, error)."""
    keys = gw.runtime.keys
    if keys.open:
        return None, None
    token = None
    for name, value in headers:
        if name == b"authorization":
            if value[:7].lower() == _BEARER:
                token = value[7:].strip()
            break
    if not token:
        return None, errors.invalid_api_key("Missing API key. Pass it as 'Authorization: Bearer <key>'.")
    record = keys.lookup(token)
    if record is None:
        return None, errors.invalid_api_key("Incorrect API key provided.")
    return record, None


def _model_object(model: str, created: int) -> dict:
    return {"id": model, "object": "model", "created": created, "owned_by": "spotinference"}


async def handle_models(gw, ds: Downstream, ex: Exchange, request, key, rest: bytes) -> None:
    router = gw.runtime.router
    allowed = [
        m for m, tier in router.by_model.items() if key is None or key.allows_tier(tier.name)
    ]
    if rest:
        model = rest.decode("utf-8", "replace")
        if model not in allowed:
            raise errors.model_not_found(model)
        body = _encode(_model_object(model, router.model_created))
    else:
        body = _encode({"object": "list", "data": [_model_object(m, router.model_created) for m in allowed]})
    ex.status = 200
    await ds.send_response(200, [_JSON, (b"x-request-id", ex.request_id)], body)


async def handle_healthz(gw, ds: Downstream, ex: Exchange, request, key, rest: bytes) -> None:
    ex.status = 200
    await ds.send_response(200, [_JSON], b'{"status":"ok"}')


async def handle_metrics(gw, ds: Downstream, ex: Exchange, request, key, rest: bytes) -> None:
    content_type, body = await gw.metrics.scrape()
    ex.status = 200
    await ds.send_response(200, [(b"content-type", content_type)], body)


# path -> (methods, handler, needs key, endpoint label)
ROUTES = {
    b"/v1/chat/completions": ((b"POST",), forward_inference, True, "chat"),
    b"/v1/completions": ((b"POST",), forward_inference, True, "completions"),
    b"/v1/embeddings": ((b"POST",), forward_inference, True, "embeddings"),
    b"/v1/models": ((b"GET",), handle_models, True, "models"),
    b"/healthz": ((b"GET", b"HEAD"), handle_healthz, False, "healthz"),
    b"/metrics": ((b"GET",), handle_metrics, False, "metrics"),
}
_MODELS_PREFIX = b"/v1/models/"


def _route(path: bytes):
    entry = ROUTES.get(path)
    if entry is not None:
        return entry, b""
    if path.startswith(_MODELS_PREFIX) and len(path) > len(_MODELS_PREFIX):
        from urllib.parse import unquote_to_bytes

        return ROUTES[b"/v1/models"], unquote_to_bytes(path[len(_MODELS_PREFIX):])
    return None, b""


async def dispatch(gw, ds: Downstream, request) -> None:
    """Handle one request: send exactly one response (or end the connection)."""
    target = request.target
    q = target.find(b"?")
    path = target if q < 0 else target[:q]
    ex = Exchange(gw, request, ds.client)
    try:
        entry, rest = _route(path)
        if entry is None:
            ex.endpoint = "unknown"
            raise errors.not_found(path.decode("latin-1"))
        methods, handler, needs_key, ex.endpoint = entry
        if request.method not in methods:
            raise errors.method_not_allowed(request.method.decode("latin-1"), path.decode("latin-1"))
        key = None
        if needs_key:
            key, err = authenticate(gw, request.headers)
            if err is not None:
                raise err
            ex.key = key
        await handler(gw, ds, ex, request, key, rest)
    except errors.ApiError as err:
        ex.fail(err)
        await ds.send_error(err, ex.request_id)
    finally:
        if ds.phase is BODY and ex.status == 0:  # the body timeout fired (connection.py sends the 408)
            ex.status, ex.error_type = 408, "request_timeout"
        ex.finish(ds.client_gone)
