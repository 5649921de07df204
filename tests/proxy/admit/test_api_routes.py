"""The routes beyond chat: Responses API, Anthropic Messages, audio, the pooling family, /health,
/version, CORS -- everything decided before an upstream is reached, driven through the real
`dispatch` on a socket pair (tests/support/gateway.py `dispatch_one`).

Anthropic's routes answer in Anthropic's envelope with its types per status, so anthropic-sdk raises
the right classes (tests/e2e/test_anthropic_sdk.py checks the classes through the SDK itself).
"""

from __future__ import annotations

import msgspec
import pytest
import trio

from proxy.admit import keys
from proxy.admit.routes import route
from proxy.gateway import build_runtime
from tests.support.gateway import CountingGateway, dispatch_one, error_of, make_config, post, split_response

DEAD = "http://127.0.0.1:9"  # never reached by anything below


def gateway(**kw) -> CountingGateway:
    return CountingGateway(build_runtime(make_config([DEAD], **kw)))


def keyed(tmp_path, **kw) -> tuple[CountingGateway, str]:
    path = tmp_path / "keys.toml"
    secret = keys.add(path, "alice")
    return gateway(keys_file=str(path), **kw), secret


async def answer(gw, raw: bytes) -> tuple[int, dict, bytes]:
    with trio.fail_after(5):
        got, _ds, _ = await dispatch_one(gw, raw)
    return split_response(got)


def anthropic_error(body: bytes) -> dict:
    doc = msgspec.json.decode(body)
    assert doc["type"] == "error" and set(doc) == {"type", "error"}
    return doc["error"]


MESSAGE = b'{"model":"sim-chat","max_tokens":16,"messages":[{"role":"user","content":"hi"}]}'


# -- the route table ----------------------------------------------------------------------------------

@pytest.mark.parametrize("path, label", [
    (b"/v1/responses", "responses"), (b"/v1/messages", "messages"),
    (b"/v1/messages/count_tokens", "count_tokens"), (b"/v1/audio/transcriptions", "transcriptions"),
    (b"/v1/audio/translations", "translations"), (b"/v1/rerank", "rerank"), (b"/rerank", "rerank"),
    (b"/v2/rerank", "rerank"), (b"/v1/score", "score"), (b"/score", "score"), (b"/pooling", "pooling"),
    (b"/classify", "classify"), (b"/tokenize", "tokenize"), (b"/detokenize", "detokenize"),
    (b"/health", "healthz"), (b"/version", "version"),
])
def test_every_vllm_path_is_routed(path, label):
    entry, rest = route(path)
    assert entry is not None and entry[3] == label and rest == b""


@pytest.mark.parametrize("path, label, rest", [
    (b"/v1/responses/resp_abc123", "response", b"resp_abc123"),
    (b"/v1/responses/resp_abc123/cancel", "response_cancel", b"resp_abc123"),
])
def test_stored_response_paths(path, label, rest):
    entry, got = route(path)
    assert entry[3] == label and got == rest


@pytest.mark.parametrize("path", [
    b"/v1/responses/", b"/v1/responses/a/b", b"/v1/responses/resp_1/cancel/x", b"/v1/responses/a%2Fb",
    b"/v1/responses/" + b"x" * 257, b"/v1/responses/resp_1/", b"/v1/messages/", b"/v1/audio",
])
def test_malformed_stored_paths_are_unknown(path):
    assert route(path) == (None, b"")


# -- Anthropic's envelope ------------------------------------------------------------------------------

async def test_messages_without_a_key_is_401_authentication_error(tmp_path):
    gw, _ = keyed(tmp_path)
    status, headers, body = await answer(gw, post(MESSAGE, path=b"/v1/messages"))
    assert status == 401
    assert anthropic_error(body) == {"type": "authentication_error", "message":
                                     "Missing API key. Pass it as 'Authorization: Bearer <key>' "
                                     "(or 'x-api-key: <key>')."}
    assert headers["content-type"] == "application/json"
    [ex] = gw.finished
    assert (ex.status, ex.endpoint) == (401, "messages")


async def test_the_key_in_x_api_key_is_accepted(tmp_path):
    gw, secret = keyed(tmp_path)
    # Unknown model: the request got past authentication, and 404 is Anthropic's not_found_error.
    body = MESSAGE.replace(b"sim-chat", b"nope")
    status, _, got = await answer(gw, post(body, path=b"/v1/messages", extra=b"x-api-key: " + secret.encode()
                                           + b"\r\nanthropic-version: 2023-06-01\r\n"))
    assert status == 404
    err = anthropic_error(got)
    assert err["type"] == "not_found_error" and "nope" in err["message"]


async def test_a_wrong_x_api_key_is_401(tmp_path):
    gw, _ = keyed(tmp_path)
    status, _, got = await answer(gw, post(MESSAGE, path=b"/v1/messages", extra=b"x-api-key: sk-wrong\r\n"))
    assert status == 401 and anthropic_error(got)["type"] == "authentication_error"


async def test_x_api_key_works_on_openai_routes_too(tmp_path):
    gw, secret = keyed(tmp_path)
    status, _, got = await answer(gw, post(b'{"model":"nope","messages":[{"role":"user","content":"x"}]}',
                                           extra=b"x-api-key: " + secret.encode() + b"\r\n"))
    assert status == 404 and error_of(got)["code"] == "model_not_found"  # OpenAI's envelope there


async def test_messages_requires_max_tokens_named():
    status, _, got = await answer(gateway(), post(b'{"model":"sim-chat","messages":[{"role":"user","content":"x"}]}',
                                                  path=b"/v1/messages"))
    assert status == 400
    err = anthropic_error(got)
    assert err["type"] == "invalid_request_error" and "max_tokens" in err["message"]


@pytest.mark.parametrize("body, field", [
    (b'{"model":"sim-chat","max_tokens":0,"messages":[{"role":"user","content":"x"}]}', "max_tokens"),
    (b'{"model":"sim-chat","max_tokens":5,"messages":[]}', "messages"),
    (b'{"model":"sim-chat","max_tokens":5,"messages":[{"role":"system","content":"x"}]}', "role"),
    (b'{"model":"sim-chat","max_tokens":5,"temperature":1.5,"messages":[{"role":"user","content":"x"}]}',
     "temperature"),
    (b'{"max_tokens":5,"messages":[{"role":"user","content":"x"}]}', "model"),
    (b'[1,2]', "JSON"),
])
async def test_messages_validation_names_the_field(body, field):
    status, _, got = await answer(gateway(), post(body, path=b"/v1/messages"))
    assert status == 400
    err = anthropic_error(got)
    assert err["type"] == "invalid_request_error" and field in err["message"], err


async def test_messages_body_too_large_is_413_request_too_large():
    gw = gateway(server={"max_body_bytes": 100})
    status, _, got = await answer(gw, post(MESSAGE + b" " * 200, path=b"/v1/messages"))
    assert status == 413 and anthropic_error(got)["type"] == "request_too_large"


async def test_count_tokens_validates_like_messages_without_max_tokens():
    status, _, got = await answer(gateway(), post(b'{"model":"nope","messages":[{"role":"user","content":"x"}]}',
                                                  path=b"/v1/messages/count_tokens"))
    assert status == 404 and anthropic_error(got)["type"] == "not_found_error"


async def test_no_upstream_is_529_overloaded_on_messages():
    # DEAD refuses: every upstream unreachable is the gateway's 503, Anthropic's 529 overloaded_error.
    gw = gateway()
    status, _, got = await answer(gw, post(MESSAGE, path=b"/v1/messages"))
    assert status == 529 and anthropic_error(got)["type"] == "overloaded_error"
    [ex] = gw.finished
    assert ex.status == 529  # recorded as the client saw it


async def test_no_upstream_is_503_on_responses():
    status, _, got = await answer(gateway(), post(b'{"model":"sim-chat","input":"hi"}', path=b"/v1/responses"))
    assert status == 503 and error_of(got)["code"] == "upstream_unavailable"


# -- the Responses API -----------------------------------------------------------------------------------

@pytest.mark.parametrize("body, param", [
    (b'{"input":"hi"}', "model"),
    (b'{"model":"sim-chat"}', "input"),
    (b'{"model":"sim-chat","input":5}', "input"),
    (b'{"model":"sim-chat","input":"x","max_output_tokens":0}', "max_output_tokens"),
    (b'{"model":"sim-chat","input":"x","temperature":3}', "temperature"),
    (b'{"model":"sim-chat","input":"x","stream":"yes"}', "stream"),
])
async def test_responses_validation_names_the_param(body, param):
    status, _, got = await answer(gateway(), post(body, path=b"/v1/responses"))
    assert status == 400 and error_of(got)["param"] == param


@pytest.mark.parametrize("head", [
    b"GET /v1/responses/resp_unknown HTTP/1.1\r\nHost: x\r\n\r\n",
    b"POST /v1/responses/resp_unknown/cancel HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n",
])
async def test_an_unknown_response_id_is_404_in_the_openai_envelope(head):
    gw = gateway()
    status, _, got = await answer(gw, head)
    assert status == 404
    assert error_of(got) == {"message": "Response with id 'resp_unknown' not found.",
                             "type": "invalid_request_error", "param": "response_id",
                             "code": "response_not_found"}
    [ex] = gw.finished
    assert ex.endpoint in ("response", "response_cancel") and ex.t_upstream is None


async def test_a_stored_response_needs_a_key(tmp_path):
    gw, _ = keyed(tmp_path)
    status, _, _ = await answer(gw, b"GET /v1/responses/resp_1 HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status == 401


async def test_retrieve_is_get_only():
    status, headers, _ = await answer(gateway(), post(b"{}", path=b"/v1/responses/resp_1"))
    assert status == 405 and headers["allow"] == "GET"


# -- pooling family ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("path", [b"/v1/rerank", b"/rerank", b"/v2/rerank", b"/v1/score", b"/score",
                                  b"/pooling", b"/classify", b"/tokenize", b"/detokenize"])
async def test_pooling_family_needs_a_model(path):
    status, _, got = await answer(gateway(), post(b'{"query":"q","documents":["a"]}', path=path))
    assert status == 400 and error_of(got)["param"] == "model"
    status, _, got = await answer(gateway(), post(b'{"model":"nope","query":"q"}', path=path))
    assert status == 404 and error_of(got)["code"] == "model_not_found"


# -- audio ------------------------------------------------------------------------------------------------------

def multipart(fields: dict, *, boundary: bytes = b"b0undary") -> bytes:
    parts = []
    for name, value in fields.items():
        if name == "file":
            parts.append(b"--" + boundary + b'\r\nContent-Disposition: form-data; name="file"; '
                         b'filename="a.wav"\r\nContent-Type: audio/wav\r\n\r\n' + value + b"\r\n")
        else:
            parts.append(b"--" + boundary + b'\r\nContent-Disposition: form-data; name="' + name.encode()
                         + b'"\r\n\r\n' + value.encode() + b"\r\n")
    return b"".join(parts) + b"--" + boundary + b"--\r\n"


def audio_post(body: bytes, *, ctype: bytes = b"multipart/form-data; boundary=b0undary",
               path: bytes = b"/v1/audio/transcriptions") -> bytes:
    return (b"POST " + path + b" HTTP/1.1\r\nHost: x\r\nContent-Type: " + ctype + b"\r\nContent-Length: "
            + str(len(body)).encode() + b"\r\n\r\n" + body)


async def test_audio_wants_multipart():
    status, _, got = await answer(gateway(), audio_post(b"{}", ctype=b"application/json"))
    assert status == 400 and error_of(got)["code"] == "unsupported_content_type"


async def test_audio_needs_a_model():
    status, _, got = await answer(gateway(), audio_post(multipart({"file": b"RIFF1234"})))
    assert status == 400 and error_of(got)["param"] == "model"


async def test_audio_unknown_model_is_404():
    status, _, got = await answer(gateway(), audio_post(multipart({"model": "nope", "file": b"RIFF"}),
                                                        path=b"/v1/audio/translations"))
    assert status == 404 and error_of(got)["code"] == "model_not_found"


async def test_audio_malformed_body_is_400_not_500():
    body = multipart({"model": "sim-chat", "file": b"RIFF"})[:-12]  # no closing delimiter
    status, _, got = await answer(gateway(), audio_post(body))
    assert status == 400 and error_of(got)["type"] == "invalid_request_error"


async def test_audio_limit_is_its_own_and_checked_before_reading():
    gw = gateway(server={"max_audio_bytes": 1000, "max_body_bytes": 10})
    head = (b"POST /v1/audio/transcriptions HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; "
            b"boundary=b0undary\r\nContent-Length: 100000000\r\n\r\n")
    status, headers, got = await answer(gw, head)  # no body sent at all: refused from the head
    assert status == 413 and "1000 bytes" in error_of(got)["message"]
    assert headers["connection"] == "close"
    # A body of 500 bytes is over max_body_bytes but within the audio limit: it reaches routing (503).
    body = multipart({"model": "sim-chat", "file": b"x" * 400})
    status, _, got = await answer(gw, audio_post(body))
    assert status == 503, got


# -- /health, /version ------------------------------------------------------------------------------------------

async def test_health_is_healthz_and_version_is_json():
    status, _, got = await answer(gateway(), b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    assert (status, got) == (200, b'{"status":"ok"}')
    status, headers, got = await answer(gateway(), b"GET /version HTTP/1.1\r\nHost: x\r\n\r\n")
    doc = msgspec.json.decode(got)
    assert status == 200 and headers["content-type"] == "application/json"
    assert doc["name"] == "spotinference" and doc["version"]


async def test_audio_needs_a_file_part():
    status, _, got = await answer(gateway(), audio_post(multipart({"model": "sim-chat"})))
    assert status == 400 and error_of(got)["param"] == "file"


async def test_audio_stream_must_be_a_boolean():
    status, _, got = await answer(gateway(), audio_post(multipart({"model": "sim-chat", "stream": "maybe",
                                                                   "file": b"RIFF"})))
    assert status == 400 and error_of(got)["param"] == "stream"
