"""admit/routes.py: `route` (path -> entry) and `dispatch` (one response, one record per request).

`route` is checked as a pure function. `dispatch` is driven directly, without a listener: a real
`Gateway`, a real `Downstream` on one end of a `socket.socketpair()`, the request bytes written to the
other end, the exact response bytes read back. A `Gateway` subclass counts `request_finished` calls,
so "the record is closed exactly once" is checked on every path, cancellation included.
"""

from __future__ import annotations

import socket

import pytest
import trio

from proxy.accept.downstream import BODY, ClientGone, Downstream
from proxy.admit import keys
from proxy.admit.inference import forward_inference
from proxy.admit.local import handle_healthz, handle_metrics, handle_models
from proxy.admit.routes import ROUTES, dispatch, route
from proxy.gateway import build_runtime
from proxy.parse.request import RequestError
from tests.support.gateway import CountingGateway, dispatch_one, error_of, make_config, split_response

DEAD = "http://127.0.0.1:9"  # never reached by anything below


def gateway(**kw) -> CountingGateway:
    return CountingGateway(build_runtime(make_config([DEAD], **kw)))


async def serve_one(gw, raw: bytes, *, hang_up: bool = False) -> tuple[bytes, Downstream, trio.CancelScope]:
    return await dispatch_one(gw, raw, hang_up=hang_up)


# -- route() ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path, handler, needs_key, label", [
    (b"/v1/chat/completions", forward_inference, True, "chat"),
    (b"/v1/completions", forward_inference, True, "completions"),
    (b"/v1/embeddings", forward_inference, True, "embeddings"),
    (b"/v1/models", handle_models, True, "models"),
    (b"/healthz", handle_healthz, False, "healthz"),
    (b"/metrics", handle_metrics, False, "metrics"),
])
def test_route_exact_paths(path, handler, needs_key, label):
    entry, rest = route(path)
    assert entry is ROUTES[path]
    assert entry[1:] == (handler, needs_key, label)
    assert rest == b""


def test_route_methods():
    assert route(b"/v1/chat/completions")[0][0] == (b"POST",)
    assert route(b"/v1/models")[0][0] == (b"GET",)
    assert route(b"/healthz")[0][0] == (b"GET", b"HEAD")


@pytest.mark.parametrize("path, rest", [
    (b"/v1/models/sim-chat", b"sim-chat"),
    (b"/v1/models/sim%2Dchat", b"sim-chat"),
    (b"/v1/models/org%2Fmodel", b"org/model"),
    (b"/v1/models/org/model", b"org/model"),
    (b"/v1/models/caf%C3%A9", "café".encode()),
    (b"/v1/models/100%", b"100%"),  # not an escape: kept as is
])
def test_route_model_id_is_percent_decoded(path, rest):
    entry, got = route(path)
    assert entry is ROUTES[b"/v1/models"]
    assert got == rest


@pytest.mark.parametrize("path", [
    b"/", b"", b"/v1", b"/v1/models/", b"/v1/chat/completions/", b"/V1/models", b"/healthz/",
    b"/v1/chat", b"/v1/modelsx", b"/metrics.txt",
])
def test_route_unknown_is_none(path):
    assert route(path) == (None, b"")


# -- dispatch(): 404, 405, 401 ------------------------------------------------------------------------


async def test_unknown_path_is_404_in_the_openai_envelope():
    gw = gateway()
    raw, _ds, _ = await serve_one(gw, b"GET /v1/nope?x=1 HTTP/1.1\r\nHost: x\r\nX-Request-Id: rid-404\r\n\r\n")
    assert raw.startswith(b"HTTP/1.1 404 Not Found\r\n")
    _status, headers, body = split_response(raw)
    assert headers["content-type"] == "application/json"
    assert headers["x-request-id"] == "rid-404"
    assert headers["content-length"] == str(len(body))
    assert error_of(body) == {"message": "Unknown request URL: /v1/nope.", "type": "invalid_request_error",
                              "param": None, "code": "unknown_url"}
    [ex] = gw.finished
    assert (ex.status, ex.error_type, ex.endpoint) == (404, "unknown_url", "unknown")


@pytest.mark.parametrize("head, method, path, endpoint, allow", [
    (b"POST /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n", "POST", "/healthz", "healthz",
     "GET, HEAD"),
    (b"GET /v1/chat/completions HTTP/1.1\r\nHost: x\r\n\r\n", "GET", "/v1/chat/completions", "chat", "POST"),
    (b"DELETE /v1/models/sim-chat HTTP/1.1\r\nHost: x\r\n\r\n", "DELETE", "/v1/models/sim-chat", "models",
     "GET"),
])
async def test_wrong_method_is_405_with_allow(head, method, path, endpoint, allow):
    gw = gateway()
    raw, _, _ = await serve_one(gw, head)
    assert raw.startswith(b"HTTP/1.1 405 Method Not Allowed\r\n")
    _status, headers, body = split_response(raw)
    assert headers["allow"] == allow  # RFC 9110 15.5.6
    assert error_of(body) == {"message": f"Method {method} is not allowed on {path}.",
                              "type": "invalid_request_error", "param": None, "code": "method_not_allowed"}
    [ex] = gw.finished
    assert (ex.status, ex.error_type, ex.endpoint) == (405, "method_not_allowed", endpoint)


async def test_405_comes_before_401(tmp_path):
    path = tmp_path / "keys.toml"
    keys.add(path, "alice")
    gw = gateway(keys_file=str(path))
    raw, _, _ = await serve_one(gw, b"POST /v1/models HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
    assert raw.startswith(b"HTTP/1.1 405 ")


async def test_401_before_the_handler_runs(tmp_path):
    path = tmp_path / "keys.toml"
    keys.add(path, "alice")
    gw = gateway(keys_file=str(path), server={"max_body_bytes": 1000})
    # Were the handler to run, this would be 413 (declared length) or 400 (content type) instead.
    req = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: text/plain\r\n"
           b"Content-Length: 100000000\r\n\r\n")
    with trio.fail_after(5):
        raw, _ds, _ = await serve_one(gw, req)
    assert raw.startswith(b"HTTP/1.1 401 Unauthorized\r\n")
    _status, headers, body = split_response(raw)
    assert error_of(body) == {"message": "Missing API key. Pass it as 'Authorization: Bearer <key>' (or 'x-api-key: <key>').",
                              "type": "invalid_request_error", "param": None, "code": "invalid_api_key"}
    assert headers["connection"] == "close"  # the body was never read
    [ex] = gw.finished
    assert (ex.status, ex.error_type, ex.endpoint, ex.key, ex.model) == (401, "invalid_api_key", "chat", None, None)


async def test_a_valid_key_is_recorded_on_the_exchange(tmp_path):
    path = tmp_path / "keys.toml"
    secret = keys.add(path, "alice")
    gw = gateway(keys_file=str(path))
    req = b"GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + secret.encode() + b"\r\n\r\n"
    raw, _, _ = await serve_one(gw, req)
    assert raw.startswith(b"HTTP/1.1 200 OK\r\n")
    [ex] = gw.finished
    assert ex.key.name == "alice" and ex.status == 200 and ex.endpoint == "models"


async def test_healthz_needs_no_key(tmp_path):
    path = tmp_path / "keys.toml"
    keys.add(path, "alice")
    gw = gateway(keys_file=str(path))
    raw, _, _ = await serve_one(gw, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    assert raw == (b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 15\r\n\r\n"
                   b'{"status":"ok"}')
    [ex] = gw.finished
    assert (ex.status, ex.error_type, ex.endpoint, ex.key) == (200, None, "healthz", None)


async def test_head_healthz_has_no_body():
    gw = gateway()
    raw, _, _ = await serve_one(gw, b"HEAD /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    assert raw == b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 15\r\n\r\n"
    assert len(gw.finished) == 1


# -- dispatch(): exactly one record -------------------------------------------------------------------


async def test_one_record_per_request_on_one_connection():
    gw = gateway()
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    theirs.settimeout(5)
    try:
        theirs.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n" * 2 + b"GET /nope HTTP/1.1\r\nHost: x\r\n\r\n")
        ds = Downstream(ours, gw, "127.0.0.1")
        with trio.CancelScope() as scope:
            ds.scope = scope
            for n in range(1, 4):
                await dispatch(gw, ds, await ds.read_head())
                assert len(gw.finished) == n
                assert ds.next_cycle()
    finally:
        ours.close()
        theirs.close()
    assert [ex.status for ex in gw.finished] == [200, 200, 404]
    assert len({ex.request_id for ex in gw.finished}) == 3


async def test_client_gone_before_the_response_is_499_once():
    gw = gateway()
    with pytest.raises(ClientGone):
        await serve_one(gw, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n", hang_up=True)
    [ex] = gw.finished
    assert (ex.status, ex.error_type) == (499, "client_closed")


async def test_client_gone_keeps_an_error_status():
    gw = gateway()
    with pytest.raises(ClientGone):
        await serve_one(gw, b"GET /nope HTTP/1.1\r\nHost: x\r\n\r\n", hang_up=True)
    [ex] = gw.finished
    assert (ex.status, ex.error_type) == (404, "unknown_url")


async def test_body_timeout_is_recorded_as_408_once(autojump_clock):
    gw = gateway(server={"request_body_s": 2.0})
    req = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
           b"Content-Length: 100\r\n\r\n{\"model\"")  # 92 bytes never come
    with trio.fail_after(30):
        raw, ds, scope = await serve_one(gw, req)
    assert scope.cancelled_caught and ds.phase is BODY
    assert raw == b""  # the 408 itself is connection.py's to send, after dispatch
    [ex] = gw.finished
    assert (ex.status, ex.error_type, ex.endpoint) == (408, "request_timeout", "chat")
    assert ex.model is None


async def test_a_bad_chunked_body_is_recorded_as_the_400_the_client_gets():
    gw = gateway()
    req = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
           b"Transfer-Encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n")  # "zz" is no chunk size
    with trio.fail_after(10), pytest.raises(RequestError) as info:
        await serve_one(gw, req)
    assert info.value.status == 400  # connection.py sends it and closes
    [ex] = gw.finished
    assert (ex.status, ex.error_type, ex.endpoint) == (400, "bad_http", "chat")


async def test_cancelled_while_busy_is_499_once():
    # A request cut while no body is awaited (e.g. by the drain deadline) is not a 408.
    gw = gateway()
    req = b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    try:
        theirs.sendall(req)
        ds = Downstream(ours, gw, "127.0.0.1")
        with trio.CancelScope() as scope:
            ds.scope = scope
            request = await ds.read_head()
            scope.cancel()  # cancelled before the handler gets to answer
            await dispatch(gw, ds, request)
    finally:
        ours.close()
        theirs.close()
    assert scope.cancelled_caught
    [ex] = gw.finished
    assert (ex.status, ex.error_type, ex.endpoint) == (499, "client_closed", "metrics")
