"""The endpoints the gateway answers itself: `/v1/models`, `/healthz` (and vLLM's `/health`), `/version`,
`/metrics`.

Strategy: none of these touches an upstream. `/v1/models` is answered from configuration (a down or
sleeping upstream must not make it fail) and lists only the models of tiers the key may use, in
OpenAI's list shape; `/v1/models/{id}` is one such object or 404. `/healthz` says the process serves;
`/version` is the gateway's own version (vLLM's shape: ``{"version": ...}``);
`/metrics` is the Prometheus scrape (all workers' figures under the supervisor).
Every handler has the signature the route table expects: (gw, ds, ex, request, key, rest).
"""

from __future__ import annotations

import msgspec

from proxy import errors
from proxy.accept.downstream import Downstream
from proxy.exchange import Exchange

_JSON = (b"content-type", b"application/json")
_encode = msgspec.json.encode


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


def _version_body() -> bytes:
    from importlib.metadata import PackageNotFoundError, version

    try:
        v = version("spotinference")
    except PackageNotFoundError:  # a source tree that was never installed
        v = "0+unknown"
    return _encode({"version": v, "name": "spotinference"})


_VERSION: list[bytes] = []


async def handle_version(gw, ds: Downstream, ex: Exchange, request, key, rest: bytes) -> None:
    if not _VERSION:
        _VERSION.append(_version_body())
    ex.status = 200
    await ds.send_response(200, [_JSON], _VERSION[0])


async def handle_metrics(gw, ds: Downstream, ex: Exchange, request, key, rest: bytes) -> None:
    content_type, body = await gw.metrics.scrape()
    ex.status = 200
    await ds.send_response(200, [(b"content-type", content_type)], body)
