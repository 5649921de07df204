"""admit/local.py: `/v1/models`, `/v1/models/{id}`, `/healthz`, `/metrics`, answered by the gateway itself.

Driven through `dispatch` on a real `Gateway` with a real `Downstream` over a `socket.socketpair()`;
the upstreams in the configuration are dead addresses, which shows that none of these endpoints
touches an upstream. Keys come from a keys file in tmp_path; the router's `created` time is fixed
with `build_runtime(..., created=...)` so the model objects can be compared whole.
"""

from __future__ import annotations

import msgspec
import pytest
from prometheus_client import CONTENT_TYPE_LATEST

from proxy.admit import keys
from proxy.config import TierConfig
from proxy.gateway import Gateway, build_runtime
from tests.support.gateway import dispatch_one, error_of, make_config, split_response

CREATED = 1718000000
TIERS = [
    TierConfig(name="local", upstreams=["http://127.0.0.1:9"], models=["sim-chat", "sim-embed"]),
    TierConfig(name="big", upstreams=["http://127.0.0.1:10"], models=["big-chat"]),
]


def model(name: str) -> dict:
    return {"id": name, "object": "model", "created": CREATED, "owned_by": "spotinference"}


def gateway(keys_file: str | None = None) -> Gateway:
    return Gateway(build_runtime(make_config([], tiers=TIERS, keys_file=keys_file), created=CREATED))


async def get(gw, path: bytes, secret: str | None = None, *, method: bytes = b"GET") -> bytes:
    auth = b"" if secret is None else b"Authorization: Bearer " + secret.encode() + b"\r\n"
    raw = method + b" " + path + b" HTTP/1.1\r\nHost: x\r\nX-Request-Id: rid-1\r\n" + auth + b"\r\n"
    return (await dispatch_one(gw, raw))[0]


@pytest.fixture
def keyring(tmp_path):
    path = tmp_path / "keys.toml"
    secrets = {
        "all": keys.add(path, "all"),
        "big": keys.add(path, "big-only", tiers=["big"]),
        "local": keys.add(path, "local-only", tiers=["local"]),
        "other": keys.add(path, "other", tiers=["nowhere"]),
    }
    return str(path), secrets


async def test_models_open_gateway_lists_every_model():
    raw = await get(gateway(), b"/v1/models")
    status, headers, body = split_response(raw)
    assert status == 200
    assert headers["content-type"] == "application/json"
    assert headers["x-request-id"] == "rid-1"
    assert msgspec.json.decode(body) == {
        "object": "list", "data": [model("sim-chat"), model("sim-embed"), model("big-chat")]}


@pytest.mark.parametrize("who, listed", [
    ("all", ["sim-chat", "sim-embed", "big-chat"]),
    ("big", ["big-chat"]),
    ("local", ["sim-chat", "sim-embed"]),
    ("other", []),
])
async def test_models_filtered_by_the_keys_tiers(keyring, who, listed):
    path, secrets = keyring
    raw = await get(gateway(path), b"/v1/models", secrets[who])
    status, _, body = split_response(raw)
    assert status == 200
    assert msgspec.json.decode(body) == {"object": "list", "data": [model(m) for m in listed]}


async def test_models_needs_a_key_when_keys_are_configured(keyring):
    path, _ = keyring
    status, _, body = split_response(await get(gateway(path), b"/v1/models"))
    assert status == 401 and error_of(body)["code"] == "invalid_api_key"


async def test_one_model(keyring):
    path, secrets = keyring
    raw = await get(gateway(path), b"/v1/models/big-chat", secrets["big"])
    status, headers, body = split_response(raw)
    assert status == 200
    assert headers["x-request-id"] == "rid-1"
    assert msgspec.json.decode(body) == model("big-chat")


async def test_one_model_percent_encoded_id():
    status, _, body = split_response(await get(gateway(), b"/v1/models/big%2Dchat"))
    assert status == 200
    assert msgspec.json.decode(body) == model("big-chat")


@pytest.mark.parametrize("who, name", [("big", "sim-chat"), ("local", "big-chat"), ("other", "sim-embed")])
async def test_one_model_the_key_may_not_use_is_404(keyring, who, name):
    path, secrets = keyring
    raw = await get(gateway(path), b"/v1/models/" + name.encode(), secrets[who])
    assert raw.startswith(b"HTTP/1.1 404 Not Found\r\n")
    assert error_of(split_response(raw)[2]) == {
        "message": f"The model '{name}' does not exist or you do not have access to it.",
        "type": "invalid_request_error", "param": "model", "code": "model_not_found"}


async def test_unknown_model_is_404():
    status, _, body = split_response(await get(gateway(), b"/v1/models/gpt-4o"))
    assert status == 404
    err = error_of(body)
    assert (err["code"], err["param"]) == ("model_not_found", "model")
    assert err["message"] == "The model 'gpt-4o' does not exist or you do not have access to it."


async def test_created_comes_from_the_router():
    gw = Gateway(build_runtime(make_config([], tiers=TIERS), created=1234567890))
    assert gw.runtime.router.model_created == 1234567890
    _, _, body = split_response(await get(gw, b"/v1/models"))
    assert {m["created"] for m in msgspec.json.decode(body)["data"]} == {1234567890}
    _, _, body = split_response(await get(gw, b"/v1/models/sim-embed"))
    assert msgspec.json.decode(body)["created"] == 1234567890


async def test_healthz(keyring):
    path, _ = keyring
    raw = await get(gateway(path), b"/healthz")
    assert raw == (b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 15\r\n\r\n"
                   b'{"status":"ok"}')


async def test_metrics_content_type_and_body(keyring, monkeypatch):
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    path, _ = keyring
    gw = gateway(path)
    await get(gw, b"/healthz")  # one finished request, so the request counter has a sample
    raw = await get(gw, b"/metrics")  # no key needed
    assert raw.startswith(b"HTTP/1.1 200 OK\r\n")
    _status, headers, body = split_response(raw)
    assert headers["content-type"] == CONTENT_TYPE_LATEST
    assert headers["content-length"] == str(len(body))
    assert b"spotinference_requests_total{" in body
    assert b'endpoint="healthz"' in body
