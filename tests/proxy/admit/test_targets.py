"""Request targets (RFC 9112 3.2): absolute-form is accepted and forwarded as origin-form.

`origin_form` (parse/request.py) in isolation, then over a real socket through the gateway to the
simulated vLLM, whose own router must see `/v1/...` (uvicorn takes the target as the path).
"""

from __future__ import annotations

import msgspec
import pytest
import trio

from proxy.parse.request import origin_form
from tests.support.gateway import CHAT, make_config, one_response, split_response, start_gateway, start_sim


@pytest.mark.parametrize(("target", "origin"), [
    (b"http://gw.example/v1/chat/completions", b"/v1/chat/completions"),
    (b"HTTP://gw.example:8080/v1/models?x=1", b"/v1/models?x=1"),
    (b"https://gw.example/v1/models/sim-chat", b"/v1/models/sim-chat"),
    (b"http://gw.example", b"/"),
    (b"http://gw.example?q=/v1/models", b"/?q=/v1/models"),
    (b"*", b"*"),
    (b"gw.example:443", b"gw.example:443"),
])
def test_origin_form(target, origin):
    assert origin_form(target) == origin


async def test_absolute_form_targets_are_served_like_origin_form(nursery):
    _, sim_url = await start_sim(nursery)
    gw = await start_gateway(nursery, make_config([sim_url]))
    with trio.fail_after(10):
        raw = await one_response(gw.port, b"POST http://gw.example/v1/chat/completions HTTP/1.1\r\n"
                                 b"Host: gw.example\r\nContent-Type: application/json\r\n"
                                 b"Content-Length: %d\r\n\r\n%s" % (len(CHAT), CHAT))
        status, _, body = split_response(raw)
        assert status == 200 and msgspec.json.decode(body)["object"] == "chat.completion"
        status, _, body = split_response(await one_response(
            gw.port, b"GET https://gw.example/v1/models HTTP/1.1\r\nHost: gw.example\r\n\r\n"))
        assert status == 200 and "sim-chat" in {m["id"] for m in msgspec.json.decode(body)["data"]}
        status, _, body = split_response(await one_response(
            gw.port, b"GET http://gw.example/nope HTTP/1.1\r\nHost: gw.example\r\n\r\n"))
        assert status == 404 and msgspec.json.decode(body)["error"]["message"] == "Unknown request URL: /nope."
