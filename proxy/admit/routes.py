"""Routes: method + path -> handler; the first step of every request once its head is parsed.

Strategy: a dict from path to (allowed methods, handler, needs a key, endpoint label), built once; no
framework; two prefixes (`/v1/models/{id}`, `/v1/responses/{id}[/cancel]`) after the dict misses. The
label also names the route's error dialect (errors.py: Anthropic's envelope on `/v1/messages*`, the
Responses API's in-band event), set on the connection and the record before anything can fail. The
order of checks, so that each abuse case is refused as early and as cheaply as possible: CORS
preflight (cors.py, only with `cors_origins`) -> route (404/405) -> API key (401, auth.py) -> handler.
Upstream handlers continue in inference.py (declared size and type before a byte of the body is
read, then validation, tier, limits); the gateway's own endpoints are local.py's, the operator's
status page and its JSON status.py's (the JSON needs a key like every keyed route, then an admin one).
`dispatch` sends exactly one response per request (or ends the connection) and closes the request's
record (`Exchange.finish`) whatever happens, cancellation included. Any other exception meets the crash
barrier (accept/barrier.py): 500 (or an in-band error), logged and counted, the connection closed.
"""

from __future__ import annotations

from urllib.parse import unquote_to_bytes

from proxy import errors
from proxy.accept.barrier import contain
from proxy.accept.downstream import BODY, ClientGone, Downstream
from proxy.admit import cors
from proxy.admit.auth import authenticate
from proxy.admit.inference import forward_audio, forward_inference, forward_stored
from proxy.admit.local import handle_healthz, handle_metrics, handle_models, handle_version
from proxy.admit.status import handle_status_json, handle_status_page
from proxy.exchange import Exchange
from proxy.parse.request import RequestError, origin_form, target_path

# path -> (methods, handler, needs key, endpoint label)
_POST = (b"POST",)
ROUTES = {
    b"/v1/chat/completions": (_POST, forward_inference, True, "chat"),
    b"/v1/completions": (_POST, forward_inference, True, "completions"),
    b"/v1/embeddings": (_POST, forward_inference, True, "embeddings"),
    b"/v1/responses": (_POST, forward_inference, True, "responses"),
    b"/v1/messages": (_POST, forward_inference, True, "messages"),
    b"/v1/messages/count_tokens": (_POST, forward_inference, True, "count_tokens"),
    b"/v1/audio/transcriptions": (_POST, forward_audio, True, "transcriptions"),
    b"/v1/audio/translations": (_POST, forward_audio, True, "translations"),
    b"/v1/rerank": (_POST, forward_inference, True, "rerank"),
    b"/rerank": (_POST, forward_inference, True, "rerank"),
    b"/v2/rerank": (_POST, forward_inference, True, "rerank"),
    b"/v1/score": (_POST, forward_inference, True, "score"),
    b"/score": (_POST, forward_inference, True, "score"),
    b"/pooling": (_POST, forward_inference, True, "pooling"),
    b"/classify": (_POST, forward_inference, True, "classify"),
    b"/tokenize": (_POST, forward_inference, True, "tokenize"),
    b"/detokenize": (_POST, forward_inference, True, "detokenize"),
    b"/v1/models": ((b"GET",), handle_models, True, "models"),
    b"/healthz": ((b"GET", b"HEAD"), handle_healthz, False, "healthz"),
    b"/health": ((b"GET", b"HEAD"), handle_healthz, False, "healthz"),
    b"/version": ((b"GET",), handle_version, False, "version"),
    b"/metrics": ((b"GET",), handle_metrics, False, "metrics"),
    b"/status": ((b"GET", b"HEAD"), handle_status_page, False, "status_page"),
    b"/status.json": ((b"GET",), handle_status_json, True, "status"),
}
_MODELS_PREFIX = b"/v1/models/"
_RESPONSES_PREFIX = b"/v1/responses/"
_STORED = ((b"GET",), forward_stored, True, "response")
_CANCEL = (_POST, forward_stored, True, "response_cancel")
_DIALECTS = {"messages": errors.ANTHROPIC, "count_tokens": errors.ANTHROPIC, "responses": errors.RESPONSES,
             "response": errors.RESPONSES, "response_cancel": errors.RESPONSES}
_ID_CHARS = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")


def route(path: bytes):
    """(route entry or None, the rest of the path: the model of `/v1/models/{id}`, the response id
    of `/v1/responses/{id}` (+ `/cancel`))."""
    entry = ROUTES.get(path)
    if entry is not None:
        return entry, b""
    if path.startswith(_MODELS_PREFIX) and len(path) > len(_MODELS_PREFIX):
        return ROUTES[b"/v1/models"], unquote_to_bytes(path[len(_MODELS_PREFIX):])
    if path.startswith(_RESPONSES_PREFIX):
        rid, slash, action = path[len(_RESPONSES_PREFIX):].partition(b"/")
        if 0 < len(rid) <= 256 and all(c in _ID_CHARS for c in rid):
            if not slash:
                return _STORED, rid
            if action == b"cancel":
                return _CANCEL, rid
    return None, b""


async def dispatch(gw, ds: Downstream, request) -> None:
    """Handle one request: send exactly one response (or end the connection)."""
    if request.target[:1] != b"/":
        request.target = origin_form(request.target)
    path = target_path(request.target)
    ex = Exchange(gw, request, ds.client)
    try:
        entry, rest = route(path)
        origins = gw.runtime.config.server.cors_origins
        if origins:
            ds.cors = cors.response_headers(origins, request.headers)
            if request.method == b"OPTIONS" and entry is not None:
                ex.endpoint = "preflight"
                await cors.preflight(ds, ex, request, entry[0])
                return
        if entry is None:
            ex.endpoint = "unknown"
            raise errors.not_found(path.decode("latin-1"))
        methods, handler, needs_key, ex.endpoint = entry
        ds.dialect = ex.dialect = _DIALECTS.get(ex.endpoint, errors.OPENAI)
        if request.method not in methods:
            raise errors.method_not_allowed(request.method.decode("latin-1"), path.decode("latin-1"), methods)
        key = None
        if needs_key:
            key, err = authenticate(gw.runtime.keys, request.headers)
            if err is not None:
                raise err
            ex.key = key
        await handler(gw, ds, ex, request, key, rest)
    except errors.ApiError as err:
        ex.fail(err)
        await ds.send_error(err, ex.request_id)
    except ClientGone:
        raise  # the connection loop's to handle: nobody to answer
    except RequestError as exc:  # a bad body (chunking, EOF mid-body): connection.py answers it
        ex.status, ex.error_type = exc.status, "bad_http"
        raise
    except Exception as exc:  # noqa: BLE001 -- the crash barrier: this request ends with 500, the worker carries on
        err = errors.sole_exception(exc)
        if not isinstance(err, errors.ApiError):
            await contain(gw, ds, exc, "request", ex)
        else:
            ex.fail(err)
            await ds.send_error(err, ex.request_id)
    finally:
        if ds.phase is BODY and ex.status == 0:  # the body timeout fired (connection.py sends the 408)
            ex.status, ex.error_type = 408, "request_timeout"
        ex.finish(ds.client_gone)
