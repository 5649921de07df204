"""Audio, the pooling family and the in-band error shapes through the gateway, against the simulated
vLLM: the official OpenAI SDK uploads a generated WAV (multipart, the bytes forwarded unchanged),
JSON passthrough for rerank/score/pooling/classify/tokenize/detokenize with usage rows where vLLM
reports counts, and a stream that fails in each API's own error shape -- vLLM's own in-band error
relayed as is, the gateway's when the upstream dies mid-stream.
"""

from __future__ import annotations

import anthropic
import httpx
import msgspec
import openai
import pytest
import trio

from proxy.admit import keys
from proxy.config import UsageConfig
from tests.support.gateway import flushed_usage_rows, make_config, start_gateway, start_sim
from tests.support.sim_client import wav
from tests.support.upstream_kit import FakeUpstream, answer_then_close


class Setup:
    def __init__(self, gw, sim, db, secret):
        self.gw, self.sim, self.db, self.secret = gw, sim, db, secret
        self.auth = {"authorization": f"Bearer {secret}"}

    async def rows(self) -> list[dict]:
        return await flushed_usage_rows(self.gw, self.db)


@pytest.fixture
async def setup(nursery, tmp_path):
    sim, url = await start_sim(nursery)
    keys_file = tmp_path / "keys.toml"
    secret = keys.add(keys_file, "alice")
    db = str(tmp_path / "usage.sqlite3")
    config = msgspec.structs.replace(make_config([url], keys_file=str(keys_file)),
                                     usage=UsageConfig(path=db, flush_s=0.01))
    gw = await start_gateway(nursery, config)
    return Setup(gw, sim, db, secret)


async def test_transcription_through_the_sdk_forwards_the_upload_unchanged(setup):
    audio = wav(2.0)
    c = openai.OpenAI(base_url=setup.gw.api, api_key=setup.secret, max_retries=0, timeout=10)
    with trio.fail_after(15):
        raw = await trio.to_thread.run_sync(lambda: c.audio.transcriptions.with_raw_response.create(
            model="sim-chat", file=("a.wav", audio, "audio/wav")))
    sent = raw.http_response.request.headers  # the SDK streams the body: compare its framing and parts
    received = setup.sim.requests[-1]
    assert received.target == "/v1/audio/transcriptions"
    assert dict(received.headers)[b"content-type"] == sent["content-type"].encode()
    boundary = sent["content-type"].split("boundary=", 1)[1].encode()
    assert received.body.endswith(b"--" + boundary + b"--\r\n")
    assert audio in received.body and b'name="model"\r\n\r\nsim-chat\r\n' in received.body
    assert raw.http_response.content == setup.sim.responses[-1]
    assert raw.parse().text
    [row] = await setup.rows()
    assert (row["endpoint"], row["model"], row["status"]) == ("transcriptions", "sim-chat", 200)


async def test_translation_stream_is_relayed(setup):
    with trio.fail_after(15):
        async with httpx.AsyncClient(timeout=10) as http:
            request = http.build_request("POST", f"{setup.gw.api}/audio/translations", headers=setup.auth,
                                         data={"model": "sim-chat", "stream": "true"},
                                         files={"file": ("a.wav", wav(1.0), "audio/wav")})
            upload = request.read()
            got = await http.send(request)
    assert setup.sim.requests[-1].body == upload  # the original bytes, byte for byte
    assert got.status_code == 200 and got.headers["content-type"].startswith("text/event-stream")
    assert got.content == setup.sim.responses[-1] and got.content.endswith(b"data: [DONE]\n\n")
    [row] = await setup.rows()
    assert bool(row["stream"]) and row["endpoint"] == "translations"


@pytest.mark.parametrize("path, body, billed", [
    ("/v1/rerank", {"model": "sim-embed", "query": "q", "documents": ["a b", "c"]}, True),
    ("/rerank", {"model": "sim-embed", "query": "q", "documents": ["a"]}, True),
    ("/v2/rerank", {"model": "sim-embed", "query": "q", "documents": ["a"]}, True),
    ("/v1/score", {"model": "sim-embed", "text_1": "a", "text_2": ["b", "c"]}, True),
    ("/score", {"model": "sim-embed", "text_1": "a", "text_2": "b"}, True),
    ("/pooling", {"model": "sim-embed", "input": "a b c"}, True),
    ("/classify", {"model": "sim-embed", "input": ["a", "b"]}, True),
    # vLLM serves the pooling family with a pooling model; tokenize/detokenize with any.
    ("/tokenize", {"model": "sim-chat", "prompt": "a b c"}, False),
    ("/detokenize", {"model": "sim-chat", "tokens": [1, 2, 3]}, False),
])
async def test_pooling_family_passes_through(setup, path, body, billed):
    with trio.fail_after(10):
        async with httpx.AsyncClient(timeout=10) as http:
            got = await http.post(setup.gw.url + path, json=body, headers=setup.auth)
    assert got.status_code == 200, got.text
    assert got.content == setup.sim.responses[-1]
    assert setup.sim.requests[-1].target == path
    rows = await setup.rows()
    if not billed:
        assert rows == []
        return
    [row] = rows
    usage = got.json().get("usage")
    assert row["total_tokens"] == usage["total_tokens"] and not row["estimated"]


async def test_vllms_own_inband_error_is_relayed_as_is(setup):
    setup.sim.set_fault("inband_error")
    body = {"model": "sim-chat", "stream": True, "max_tokens": 8, "messages": [{"role": "user", "content": "x"}]}
    with trio.fail_after(10):
        async with httpx.AsyncClient(timeout=10) as http:
            got = await http.post(f"{setup.gw.api}/chat/completions", json=body, headers=setup.auth)
    assert got.status_code == 200
    sent = setup.sim.responses[-1]
    assert b'data: {"error":' in sent and sent.endswith(b"data: [DONE]\n\n")
    assert got.content == sent  # the client asked for no usage; vLLM's error event and [DONE] unchanged


async def _gateway_before(nursery, upstream_bytes: bytes):
    """A gateway in front of one upstream that sends `upstream_bytes` and hangs up."""
    url = await FakeUpstream(answer_then_close(upstream_bytes)).start(nursery)
    return await start_gateway(nursery, make_config([url]))


async def _died_mid_stream(nursery, upstream_bytes: bytes, path: bytes, body: dict, headers):
    gw = await _gateway_before(nursery, upstream_bytes)
    data = b""
    async with httpx.AsyncClient(timeout=10) as http, \
            http.stream("POST", gw.url + path.decode(), json=body, headers=headers) as got:
        with pytest.raises(httpx.RemoteProtocolError):  # no last chunk: an incomplete response
            async for piece in got.aiter_bytes():
                data += piece
    return data


async def test_responses_stream_that_dies_ends_with_a_responses_error_event(nursery, tmp_path):
    created = (b'event: response.created\ndata: {"type":"response.created","sequence_number":0,'
               b'"response":{"id":"resp_1","object":"response","status":"in_progress"}}\n\n')
    up = (b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
          + b"%x\r\n%s\r\n" % (len(created), created))
    with trio.fail_after(10):
        data = await _died_mid_stream(nursery, up, b"/v1/responses",
                                      {"model": "sim-chat", "input": "x", "stream": True}, {})
    assert data.startswith(created)
    tail = data[len(created):]
    assert tail.startswith(b"event: error\ndata: ")
    event = msgspec.json.decode(tail.split(b"data: ", 1)[1])
    assert event["type"] == "error" and event["code"] == "upstream_closed" and "mid-stream" in event["message"]


async def test_messages_stream_that_dies_raises_in_the_anthropic_sdk(nursery, tmp_path):
    start = (b'event: message_start\ndata: {"type":"message_start","message":{"id":"msg_1","type":"message",'
             b'"role":"assistant","content":[],"model":"sim-chat","stop_reason":null,"stop_sequence":null,'
             b'"usage":{"input_tokens":3,"output_tokens":1}}}\n\n')
    up = (b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
          + b"%x\r\n%s\r\n" % (len(start), start))
    gw = await _gateway_before(nursery, up)
    c = anthropic.Anthropic(base_url=gw.url, api_key="none", max_retries=0, timeout=10)

    def run():
        with c.messages.stream(model="sim-chat", max_tokens=4, messages=[{"role": "user", "content": "x"}]) as s:
            for _ in s:
                pass

    with trio.fail_after(10), pytest.raises(anthropic.APIStatusError) as info:
        await trio.to_thread.run_sync(run)
    assert "mid-stream" in str(info.value)
