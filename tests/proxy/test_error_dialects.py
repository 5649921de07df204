"""errors.py's three dialects: the OpenAI envelope, Anthropic's envelope with its types per status, and
each API's in-band stream error -- byte for byte, since SDKs parse exactly these shapes."""

from __future__ import annotations

import msgspec
import pytest

from proxy import errors
from proxy.errors import ANTHROPIC, OPENAI, RESPONSES, inband_error


@pytest.mark.parametrize("err, status, kind", [
    (errors.invalid_request("bad", "max_tokens"), 400, "invalid_request_error"),
    (errors.invalid_api_key(), 401, "authentication_error"),
    (errors.permission_denied("no"), 403, "permission_error"),
    (errors.model_not_found("m"), 404, "not_found_error"),
    (errors.method_not_allowed("GET", "/v1/messages", (b"POST",)), 405, "invalid_request_error"),
    (errors.body_too_large(10), 413, "request_too_large"),
    (errors.rate_limited("slow down", 5), 429, "rate_limit_error"),
    (errors.ApiError(500, "boom", "server_error"), 500, "api_error"),
    (errors.bad_gateway("t", "x"), 502, "api_error"),
    (errors.upstream_unreachable("t"), 529, "overloaded_error"),
    (errors.overloaded("busy", 1), 529, "overloaded_error"),
    (errors.upstream_timeout("t", "x"), 504, "api_error"),
    (errors.wake_timeout("t", 600), 504, "api_error"),
])
def test_anthropic_envelope_and_status(err, status, kind):
    assert err.status_for(ANTHROPIC) == status
    assert msgspec.json.decode(err.body(ANTHROPIC)) == {"type": "error", "error": {"type": kind,
                                                                                   "message": err.message}}
    # The OpenAI routes keep the gateway's own status and envelope.
    assert err.status_for(OPENAI) == err.status_for(RESPONSES) == err.status
    assert err.body(RESPONSES) == err.body(OPENAI) == err.body()


def test_the_wake_cap_tells_anthropic_clients_not_to_retry():
    err = errors.wake_timeout("big", 600)
    assert (b"x-should-retry", b"false") in err.headers and err.status_for(ANTHROPIC) == 504


def test_inband_shapes_byte_for_byte():
    assert inband_error("gone", "upstream_closed", RESPONSES) == (
        b'event: error\ndata: {"type":"error","code":"upstream_closed","message":"gone","param":null}\n\n')
    assert inband_error("gone", "upstream_closed", ANTHROPIC) == (
        b'event: error\ndata: {"type":"error","error":{"type":"api_error","message":"gone"}}\n\n')
    assert inband_error("gone", "upstream_closed", OPENAI) == inband_error("gone", "upstream_closed") == (
        b'data: {"error":{"message":"gone","type":"server_error","param":null,"code":"upstream_closed"}}\n\n')
