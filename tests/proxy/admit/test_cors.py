"""admit/cors.py through the real `dispatch`: preflights answered before authentication, CORS headers
on every response (errors included) for configured origins only, nothing without `cors_origins`."""

from __future__ import annotations

import pytest
import trio

from proxy.admit import keys
from proxy.config import ConfigError
from proxy.gateway import build_runtime
from tests.support.gateway import CountingGateway, dispatch_one, make_config, post, split_response

DEAD = "http://127.0.0.1:9"
APP = b"https://app.example.com"


def gateway(tmp_path, origins) -> CountingGateway:
    path = tmp_path / "keys.toml"
    keys.add(path, "alice")
    return CountingGateway(build_runtime(make_config([DEAD], keys_file=str(path),
                                                     server={"cors_origins": origins})))


async def answer(gw, raw: bytes):
    with trio.fail_after(5):
        got, _, _ = await dispatch_one(gw, raw)
    return got, split_response(got)


def preflight(origin: bytes, path: bytes = b"/v1/chat/completions", asked: bytes = b"authorization, content-type"):
    return (b"OPTIONS " + path + b" HTTP/1.1\r\nHost: x\r\nOrigin: " + origin + b"\r\n"
            b"Access-Control-Request-Method: POST\r\nAccess-Control-Request-Headers: " + asked + b"\r\n\r\n")


async def test_preflight_from_an_allowed_origin_is_204_without_a_key(tmp_path):
    gw = gateway(tmp_path, [APP.decode()])
    _raw, (status, headers, body) = await answer(gw, preflight(APP))
    assert status == 204 and body == b""
    assert "content-length" not in headers and "transfer-encoding" not in headers  # RFC 9110 8.6
    assert headers["access-control-allow-origin"] == APP.decode()
    assert headers["access-control-allow-methods"] == "POST, OPTIONS"
    assert headers["access-control-allow-headers"] == "authorization, content-type"
    assert headers["access-control-max-age"] == "600"
    assert headers["vary"] == "origin"
    [ex] = gw.finished
    assert (ex.status, ex.endpoint) == (204, "preflight")


async def test_preflight_with_odd_requested_headers_gets_the_default_list(tmp_path):
    gw = gateway(tmp_path, [APP.decode()])
    _, (status, headers, _) = await answer(gw, preflight(APP, asked=b"x-a, (y)"))
    assert status == 204 and "x-api-key" in headers["access-control-allow-headers"]


async def test_preflight_from_another_origin_is_403_without_cors_headers(tmp_path):
    gw = gateway(tmp_path, [APP.decode()])
    _, (status, headers, _) = await answer(gw, preflight(b"https://evil.example"))
    assert status == 403
    assert not any(h.startswith("access-control-") for h in headers)


async def test_responses_to_an_allowed_origin_carry_the_headers_errors_included(tmp_path):
    gw = gateway(tmp_path, [APP.decode()])
    _, (status, headers, _) = await answer(gw, post(b"{}", extra=b"Origin: " + APP + b"\r\n"))
    assert status == 401  # no key: the error still carries CORS, so the page can read it
    assert headers["access-control-allow-origin"] == APP.decode()
    assert "x-request-id" in headers["access-control-expose-headers"]
    assert "retry-after" in headers["access-control-expose-headers"]
    _, (status, headers, _) = await answer(gw, post(b"{}", extra=b"Origin: https://other.example\r\n"))
    assert status == 401 and "access-control-allow-origin" not in headers


async def test_star_allows_every_origin(tmp_path):
    gw = gateway(tmp_path, ["*"])
    _, (status, headers, _) = await answer(gw, preflight(b"https://any.example", path=b"/v1/messages"))
    assert status == 204 and headers["access-control-allow-origin"] == "*"


async def test_no_cors_by_default(tmp_path):
    gw = gateway(tmp_path, [])
    _, (status, headers, _) = await answer(gw, preflight(APP))
    assert status == 405
    assert not any(h.startswith("access-control-") for h in headers)


@pytest.mark.parametrize("origin", ["app.example.com", "https://app.example.com/", "https://a.example/x",
                                    "ftp://a.example", ""])
def test_a_bad_origin_is_a_config_error(origin):
    with pytest.raises(ConfigError, match=r"server\.cors_origins\[0\]"):
        make_config([DEAD], server={"cors_origins": [origin]})
