"""The crash barrier (proxy/accept/barrier.py, used by connection.py and admit/routes.py).

A real gateway and a real simulated vLLM on loopback ports; a handler that raises is injected at the
route table (the seam a bug would sit behind). Checked through sockets: the failing request gets a 500
in the envelope (or an in-band error after a 200 stream head), streams running on the same worker at
the same time all complete with `[DONE]`, the exception is logged once with its traceback frames and
without its message (which here carries a fake key and prompt), and it is counted in /metrics.
"""

from __future__ import annotations

import io

import httpx
import msgspec
import trio

from proxy import errors
from proxy.admit import routes
from proxy.observe import logs
from tests.support.gateway import (
    CHAT,
    make_config,
    one_response,
    post,
    split_response,
    start_gateway,
    start_sim,
)

SECRET = "sk-live-SECRET and the user's prompt"


class Boom(RuntimeError):
    pass


async def _boom(gw, ds, ex, request, key, rest):
    raise Boom(SECRET)


async def _boom_after_head(gw, ds, ex, request, key, rest):
    ex.stream = True
    await ds.send_raw(ds.response_head(200, [(b"content-type", b"text/event-stream")], None)
                      + ds.frame(b'data: {"choices":[]}\n\n'))
    raise Boom(SECRET)


async def _group_of_one(gw, ds, ex, request, key, rest):
    async with trio.open_nursery() as n:
        async def fail():
            raise errors.overloaded("busy", 3)
        n.start_soon(fail)


def _capture_logs():
    buf = io.BytesIO()
    logs.configure(level="info", access=False, stream=buf)
    return buf


def _events(buf: io.BytesIO, name: str) -> list[dict]:
    out = []
    for line in buf.getvalue().splitlines():
        rec = msgspec.json.decode(line)
        if rec.get("event") == name:
            out.append(rec)
    return out


async def _stream(api: str, results: list) -> None:
    body = {"model": "sim-chat", "messages": [{"role": "user", "content": "hi"}], "stream": True,
            "max_tokens": 20}
    async with httpx.AsyncClient(timeout=20) as client, client.stream(
            "POST", f"{api}/chat/completions", json=body) as r:
        text = b"".join([c async for c in r.aiter_bytes()])
    results.append((r.status_code, text))


async def test_a_failing_handler_is_a_500_and_the_streams_beside_it_complete(nursery, monkeypatch):
    monkeypatch.setitem(routes.ROUTES, b"/v1/boom", ((b"POST",), _boom, False, "boom"))
    buf = _capture_logs()
    try:
        _, sim = await start_sim(nursery, tokens_per_s=40.0)
        gw = await start_gateway(nursery, make_config([sim]))
        results: list = []
        with trio.fail_after(30):
            async with trio.open_nursery() as streams:
                for _ in range(5):
                    streams.start_soon(_stream, gw.api, results)
                await trio.sleep(0.2)  # the streams are running on this worker now
                for _ in range(6):
                    raw = await one_response(gw.port, post(CHAT, path=b"/v1/boom"))
                    status, headers, body = split_response(raw)
                    assert status == 500
                    assert headers.get("connection") == "close"
                    err = msgspec.json.decode(body)["error"]
                    assert err == {"message": err["message"], "type": "server_error", "param": None,
                                   "code": "internal_error"}
                    assert SECRET not in body.decode()
            assert len(results) == 5
            for status, text in results:
                assert status == 200
                assert text.rstrip().endswith(b"data: [DONE]")
            # The worker still serves.
            status, _, _ = split_response(await one_response(gw.port, post(CHAT)))
            assert status == 200
            async with httpx.AsyncClient() as client:
                metrics = (await client.get(f"{gw.url}/metrics")).text
    finally:
        logs.configure()
    assert 'spotinference_internal_errors_total{where="request"} 6.0' in metrics
    crashes = _events(buf, "internal_error")
    assert len(crashes) == 6  # once each
    rec = crashes[0]
    assert rec["exc_type"] == "Boom" and rec["where"] == "request" and rec["endpoint"] == "boom"
    assert any("test_barrier.py" in f and "_boom" in f for f in rec["traceback"])
    assert SECRET not in buf.getvalue().decode()


async def test_a_failure_after_a_stream_head_ends_it_with_an_inband_error(nursery, monkeypatch):
    monkeypatch.setitem(routes.ROUTES, b"/v1/boom", ((b"POST",), _boom_after_head, False, "boom"))
    _, sim = await start_sim(nursery)
    gw = await start_gateway(nursery, make_config([sim]))
    with trio.fail_after(10):
        raw = await one_response(gw.port, post(CHAT, path=b"/v1/boom"))
    status, headers, _body = split_response(raw)
    assert status == 200 and headers["transfer-encoding"] == "chunked"
    event = errors.inband_error("The gateway failed while handling this request; it has been logged.",
                                "internal_error")
    assert raw.endswith(b"%x\r\n%s\r\n" % (len(event), event))  # and no terminating 0-chunk after it


async def test_an_exception_group_of_one_api_error_is_answered_as_that_error(nursery, monkeypatch):
    monkeypatch.setitem(routes.ROUTES, b"/v1/boom", ((b"POST",), _group_of_one, False, "boom"))
    _, sim = await start_sim(nursery)
    gw = await start_gateway(nursery, make_config([sim]))
    with trio.fail_after(10):
        status, headers, body = split_response(await one_response(gw.port, post(CHAT, path=b"/v1/boom")))
    assert status == 503 and headers["retry-after"] == "3"
    assert msgspec.json.decode(body)["error"]["code"] == "overloaded"


async def test_a_failure_recording_a_request_closes_that_connection_only(nursery, monkeypatch):
    _, sim = await start_sim(nursery)
    gw = await start_gateway(nursery, make_config([sim]))
    real = gw.gw.request_finished
    calls = {"n": 0}

    def flaky(ex):
        calls["n"] += 1
        if calls["n"] == 1:
            raise Boom(SECRET)
        real(ex)

    monkeypatch.setattr(gw.gw, "request_finished", flaky)
    with trio.fail_after(10):
        stream = await trio.open_tcp_stream("127.0.0.1", gw.port)
        async with stream:
            await stream.send_all(post(CHAT) + post(CHAT))  # two pipelined requests
            data = b""
            while True:
                chunk = await stream.receive_some(65536)
                if not chunk:
                    break
                data += chunk
        # The first was answered (its record failed after the response went out); the connection
        # then closed instead of serving the pipelined second one on a state it cannot trust.
        assert data.count(b"HTTP/1.1 200 OK") == 1
        status, _, _ = split_response(await one_response(gw.port, post(CHAT)))
        assert status == 200
        async with httpx.AsyncClient() as client:
            metrics = (await client.get(f"{gw.url}/metrics")).text
    assert 'spotinference_internal_errors_total{where="connection"} 1.0' in metrics
