"""The bodies that used to kill a worker, over a real socket to a real gateway and simulated vLLM.

Each was reproduced as a crash (an exception escaping the request); each must now be a 400 in the
OpenAI envelope naming what is wrong, reach no upstream, and leave the gateway serving. The field-level
wording is test_schemas.py's; this file is about the wire and the worker.
"""

from __future__ import annotations

import msgspec
import pytest
import trio

from tests.support.gateway import (
    CHAT,
    make_config,
    one_response,
    post,
    split_response,
    start_gateway,
    start_sim,
)

BIG = b"9" * 400

CASES = [
    # (path, body, param, words in the message)
    (b"/v1/completions", b'{"model":"sim-chat","prompt":"\xff"}', None, "not valid UTF-8"),
    (b"/v1/embeddings", b'{"model":"sim-embed","input":["\xc3\x28"]}', None, "not valid UTF-8"),
    (b"/v1/chat/completions", b'{"model":"sim-chat","messages":[{"role":"user","content":"hi"}],"x":"\xed\xa0\x80"}',
     None, "not valid UTF-8"),  # a surrogate, in a field the view never decodes
    (b"/v1/chat/completions", b'{"model":"sim-chat","messages":[{"role":"user","content":"hi"}],"max_tokens":'
     + BIG + b"}", "max_tokens", None),
    (b"/v1/chat/completions", b'{"model":"sim-chat","messages":[{"role":"user","content":"hi"}],'
     b'"max_completion_tokens":' + BIG + b"}", "max_completion_tokens", None),
    (b"/v1/completions", b'{"model":"sim-chat","prompt":"a","max_tokens":' + BIG + b"}", "max_tokens", None),
    (b"/v1/completions", b'{"model":"sim-chat","prompt":"a","logprobs":' + BIG + b"}", "logprobs", None),
    (b"/v1/completions", b'{"model":"sim-chat","prompt":[1,' + BIG + b"]}", "prompt[1]", None),
    (b"/v1/chat/completions", b'{"model":"sim-chat","messages":[{"role":"user","content":"hi"}],"n":' + BIG
     + b"}", "n", None),
    (b"/v1/embeddings", b'{"model":"sim-embed","input":"a","dimensions":' + BIG + b"}", "dimensions", None),
    (b"/v1/chat/completions", (b'{"model":"sim-chat","messages":[{"role":"user","content":"hi"}],'
     b'"temperature":1e400}'), "temperature", None),
]


@pytest.mark.parametrize(("path", "body", "param", "code"), CASES)
async def test_a_hostile_body_is_a_400_naming_the_field_and_the_worker_serves_on(nursery, path, body, param, code):
    sim, sim_url = await start_sim(nursery)
    gw = await start_gateway(nursery, make_config([sim_url]))
    with trio.fail_after(10):
        status, headers, raw = split_response(await one_response(gw.port, post(body, path=path)))
        assert status == 400 and headers["content-type"] == "application/json"
        err = msgspec.json.decode(raw)["error"]
        assert err["type"] == "invalid_request_error"
        assert err["param"] == param
        if code is not None:
            assert code in err["message"]
        if param is not None:
            assert f"'{param}'" in err["message"]
        assert sim.statistics().requests_total == 0  # nothing reached vLLM
        status, _, _ = split_response(await one_response(gw.port, post(CHAT)))
        assert status == 200
    assert gw.gw.metrics.internal_errors.labels("request")._value.get() == 0


async def test_a_huge_unrouted_model_name_is_cut_in_the_answer_the_access_log_and_the_usage_row(
        nursery, tmp_path):
    import io
    import sqlite3

    from proxy.config import UsageConfig
    from proxy.exchange import MODEL_MAX
    from proxy.observe import logs

    name = "m" * 200_000
    db = tmp_path / "usage.sqlite3"
    _, sim_url = await start_sim(nursery)
    config = msgspec.structs.replace(make_config([sim_url]), usage=UsageConfig(path=str(db), flush_s=0.05))
    buf = io.BytesIO()
    logs.configure(stream=buf)
    try:
        gw = await start_gateway(nursery, config)
        body = msgspec.json.encode({"model": name, "messages": [{"role": "user", "content": "hi"}]})
        with trio.fail_after(10):
            status, _, raw = split_response(await one_response(gw.port, post(body)))
            assert status == 404
            assert len(raw) < 1000 and "[200000 chars]" in msgspec.json.decode(raw)["error"]["message"]
            rows: list = []
            while not rows:
                await trio.sleep(0.05)
                logs.flush()
                if db.exists():
                    with sqlite3.connect(db) as c:
                        rows = c.execute("SELECT model, status FROM usage").fetchall()
    finally:
        logs.configure()
    [(model, status)] = rows
    assert status == 404 and model == "m" * MODEL_MAX + "...[200000 chars]"
    access = [rec for line in buf.getvalue().splitlines() if (rec := msgspec.json.decode(line))["event"] == "access"]
    assert [a["model"] for a in access] == [model]
    assert len(buf.getvalue()) < 5000


async def test_a_trickled_body_is_a_408_long_before_request_body_s(nursery):
    # Real time, real socket: a grace of 0.5 s (the default is 10 s, tested on a fake clock in
    # test_downstream.py), a byte every 0.1 s against a 500 B/s minimum.
    _, sim_url = await start_sim(nursery)
    gw = await start_gateway(nursery, make_config([sim_url], server={"body_grace_s": 0.5, "request_body_s": 60.0}))
    stream = await trio.open_tcp_stream("127.0.0.1", gw.port)
    t0 = trio.current_time()
    with trio.fail_after(10):
        async with stream:
            await stream.send_all(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
                                  b"\r\nContent-Length: 1000\r\n\r\n")
            raw = b""

            async def trickle():
                with trio.move_on_after(8):
                    while True:
                        await trio.sleep(0.1)
                        await stream.send_all(b" ")

            async with trio.open_nursery() as n:
                n.start_soon(trickle)
                while chunk := await stream.receive_some(65536):
                    raw += chunk
                n.cancel_scope.cancel()
    assert raw.startswith(b"HTTP/1.1 408 Request Timeout\r\n")
    assert trio.current_time() - t0 < 5.0  # not request_body_s (60 s)
    _status, _, body = split_response(raw)
    assert msgspec.json.decode(body)["error"]["code"] == "request_timeout"
