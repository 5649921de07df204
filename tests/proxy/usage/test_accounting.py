"""Usage accounting through the real interface: a real gateway on 127.0.0.1, the simulated vLLM (or a
fake upstream with exact bytes) behind it, httpx as the client, a key with a token limit, the usage log
in a real SQLite file.

What is checked is what billing rests on: which ``stream_options`` vLLM acts on (the LAST duplicate,
escapes decoded, as Python's json reads it), whether the client sees the usage event it asked for and
only then, the count the key's bucket is settled at (`reconcile`, recorded by a limiter on a clock that
does not move), and the usage row. The estimates: a stream without vLLM's count settles at the prompt
estimate it was charged plus one token per relayed event, anything else at its up-front charge; only a
request that provably cost nothing (never sent, refused with a 4xx) settles at 0.
"""

from __future__ import annotations

import json
import sqlite3

import httpx
import msgspec
import pytest
import trio

from proxy.admit import keys
from proxy.config import UsageConfig
from proxy.gateway import build_runtime
from proxy.limits.buckets import RateLimiter
from proxy.process.services import run_gateway
from tests.support.gateway import CountingGateway, make_config, start_sim
from tests.support.upstream_kit import (
    DONE,
    E1,
    E2,
    E3,
    SSE_UP,
    FakeUpstream,
    answer,
    answer_then_close,
    chunk,
    close,
)

TPM = 2000


class RecordingLimiter(RateLimiter):
    """The real bucket math on a clock that stands still (nothing refills), recording each settlement."""

    def __init__(self) -> None:
        super().__init__(lambda: 1000.0)
        self.reconciles: list[tuple[str, int, int]] = []

    def reconcile(self, key_name, charged, actual):
        self.reconciles.append((key_name, charged, actual))
        super().reconcile(key_name, charged, actual)


class Setup:
    def __init__(self, gw: CountingGateway, url: str, secret: str, db: str) -> None:
        self.gw = gw
        self.db = db
        self.client = httpx.AsyncClient(base_url=url + "/v1", timeout=10,
                                        headers={"Authorization": f"Bearer {secret}",
                                                 "Content-Type": "application/json"})

    async def finished(self, n: int):
        """The n-th finished record (1-based), once the gateway has handed it over."""
        while len(self.gw.finished) < n:
            await trio.sleep(0.001)
        return self.gw.finished[n - 1]

    async def rows(self) -> list[dict]:
        await self.gw.usage.wait_flushed()
        conn = sqlite3.connect(self.db)
        conn.row_factory = sqlite3.Row
        try:
            return [dict(r) for r in conn.execute("SELECT * FROM usage ORDER BY id")]
        finally:
            conn.close()

    @property
    def reconciles(self) -> list[tuple[str, int, int]]:
        return self.gw.limiter.reconciles


async def setup(nursery, tmp_path, upstream: str, tpm: int = TPM) -> Setup:
    keys_path = tmp_path / "keys.toml"
    secret = keys.add(keys_path, "alice", tpm=tpm)
    db = str(tmp_path / "usage.db")
    config = msgspec.structs.replace(make_config([upstream], keys_file=str(keys_path)),
                                     usage=UsageConfig(path=db, flush_s=0.01))
    gw = CountingGateway(build_runtime(config))
    gw.limiter = RecordingLimiter()

    async def run(task_status=trio.TASK_STATUS_IGNORED):
        await run_gateway(config, gateway=gw, task_status=task_status)

    host, port = await nursery.start(run)
    return Setup(gw, f"http://{host}:{port}", secret, db)


def chat_body(extra: bytes = b"", *, content: str = "count the sheep", max_tokens: int = 5,
              stream: bool = True) -> bytes:
    return (b'{"model":"sim-chat","messages":[{"role":"user","content":' + json.dumps(content).encode()
            + b'}],"max_tokens":%d,"stream":%s' % (max_tokens, b"true" if stream else b"false") + extra + b"}")


def events(data: bytes) -> list[bytes]:
    return [e + b"\n\n" for e in data.split(b"\n\n") if e]


def usage_event(data: bytes) -> bytes | None:
    found = [e for e in events(data) if b'"choices":[]' in e and b'"usage":{' in e]
    assert len(found) <= 1
    return found[0] if found else None


def sim_usage(sim) -> dict:
    """The usage vLLM (the sim) reported for its last answer."""
    sent = sim.responses[-1]
    event = usage_event(sent)
    if event is not None:
        return json.loads(event[6:])["usage"]
    return json.loads(sent)["usage"]


# -- item 1 and 4: the request asks vLLM for usage whatever the spelling; the client sees it iff it asked --

SPELLINGS = {
    "absent": (b"", False),
    "plain false": (b',"stream_options":{"include_usage":false}', False),
    "escaped false": (b',"stream\\u005foptions":{"include_usage":false}', False),
    "escaped null": (b',"stream\\u005foptions":null', False),
    "empty object": (b',"stream_options":{}', False),
    "last duplicate false": (b',"stream_options":{"include_usage":true},"stream_options":{"include_usage":false}',
                             False),
    "escaped true": (b',"stream\\u005foptions":{"include\\u005fusage":true}', True),
    "last duplicate true": (b',"stream\\u005foptions":{"include_usage":false},"stream_options":{"include_usage":true}',
                            True),
    "continuous stats": (b',"stream_options":{"continuous_usage_stats":true}', True),
    "continuous stats off": (b',"stream_options":{"include_usage":false,"continuous_usage_stats":true}', False),
}


@pytest.mark.parametrize("name", list(SPELLINGS))
async def test_every_spelling_of_stream_options_is_metered(nursery, tmp_path, name):
    extra, asked = SPELLINGS[name]
    sim, url = await start_sim(nursery)
    s = await setup(nursery, tmp_path, url)
    body = chat_body(extra)
    with trio.fail_after(20):
        async with s.client.stream("POST", "/chat/completions", content=body) as resp:
            assert resp.status_code == 200
            got = b"".join([piece async for piece in resp.aiter_bytes()])
        ex = await s.finished(1)
        rows = await s.rows()
    # vLLM acts on the last stream_options (Python's json, as FastAPI reads the body): it asks for usage.
    assert json.loads(sim.requests[-1].body)["stream_options"]["include_usage"] is True
    sent = sim.responses[-1]
    event = usage_event(sent)
    assert event is not None
    if asked:
        assert got == sent  # untouched, the usage event included
    else:
        assert got == sent.replace(event, b"")  # only the usage event the gateway asked for is gone
        assert b'"usage":{' not in got  # nor running usage in ordinary chunks
    if name == "continuous stats":
        assert sum(b'"usage":{' in e for e in events(got)) > 2  # every chunk carries its running usage
    usage = sim_usage(sim)
    assert (ex.prompt_tokens, ex.completion_tokens, ex.total_tokens, ex.estimated) == (
        usage["prompt_tokens"], usage["completion_tokens"], usage["total_tokens"], False)
    assert s.reconciles == [("alice", len(body) // 4 + 5, usage["total_tokens"])]
    assert [(r["status"], r["total_tokens"], r["estimated"]) for r in rows] == [(200, usage["total_tokens"], 0)]


async def test_an_escaped_stream_options_no_longer_runs_a_key_past_its_limit(nursery, tmp_path):
    """The issue's case: 300-token streams with an escaped ``include_usage: false`` on a 2,000-tpm key.
    Each is settled at vLLM's count, so the key runs dry after six -- not refunded to 0 every time."""
    sim, url = await start_sim(nursery)
    s = await setup(nursery, tmp_path, url)
    body = chat_body(b',"stream\\u005foptions":{"include_usage":false}', max_tokens=300)
    charge = len(body) // 4 + 300
    statuses = []
    with trio.fail_after(30):
        for n in range(1, 9):
            async with s.client.stream("POST", "/chat/completions", content=body) as resp:
                statuses.append(resp.status_code)
                got = b"".join([piece async for piece in resp.aiter_bytes()])
            await s.finished(n)
            if resp.status_code == 429:
                break
            assert usage_event(got) is None
    actual = sim_usage(sim)["total_tokens"]
    assert actual > 300
    ok = statuses.count(200)
    assert statuses == [200] * ok + [429]
    assert ok == 6 and TPM - 6 * actual < charge <= TPM - 5 * actual  # exactly what the bucket allows
    assert s.reconciles == [("alice", charge, actual)] * 6


# -- item 2: no usage from vLLM -> settled at an estimate, never at 0, and the row says so ------------


async def test_a_client_gone_mid_stream_is_settled_at_its_relayed_events(nursery, tmp_path):
    _sim, url = await start_sim(nursery, tokens_per_s=40)
    s = await setup(nursery, tmp_path, url)
    body = chat_body(max_tokens=1000)
    with trio.fail_after(20):
        async with s.client.stream("POST", "/chat/completions", content=body) as resp:
            assert resp.status_code == 200
            seen = b""
            async for piece in resp.aiter_bytes():
                seen += piece
                if seen.count(b"\n\ndata: ") >= 3:
                    break
        ex = await s.finished(1)
        rows = await s.rows()
    assert (ex.status, ex.error_type, ex.estimated) == (499, "client_closed", True)
    prompt = len(body) // 4
    assert ex.prompt_tokens == prompt and 3 <= ex.completion_tokens < 1000
    assert ex.total_tokens == prompt + ex.completion_tokens
    assert s.reconciles == [("alice", prompt + 1000, prompt + ex.completion_tokens)]
    row = rows[0]
    assert (row["status"], row["estimated"], row["prompt_tokens"], row["completion_tokens"], row["total_tokens"]) == (
        499, 1, prompt, ex.completion_tokens, prompt + ex.completion_tokens)


STREAM = chat_body()
PROMPT = len(STREAM) // 4
CHARGE = PROMPT + 5


@pytest.mark.parametrize("reply, status, completion, settled", [
    # The upstream fails mid-stream: two token events relayed.
    (answer_then_close(SSE_UP + chunk(E1) + chunk(E2)), 502, 2, PROMPT + 2),
    # A whole stream, but no usage event (an upstream that ignores include_usage).
    (answer(SSE_UP + chunk(E1 + E2 + E3 + DONE) + b"0\r\n\r\n"), 200, 3, PROMPT + 3),
    # The stream's head, then the upstream fails before any event: nothing counted -> the charge.
    (answer_then_close(SSE_UP + chunk(b": comment\n\n")), 502, None, CHARGE),
])
async def test_a_stream_without_usage_is_settled_at_an_estimate(nursery, tmp_path, reply, status, completion,
                                                                 settled):
    up = FakeUpstream(reply)
    s = await setup(nursery, tmp_path, await up.start(nursery))
    with trio.fail_after(20):
        async with s.client.stream("POST", "/chat/completions", content=STREAM) as resp:
            assert resp.status_code == 200
            with pytest.raises(httpx.HTTPError) if status != 200 else _nothing():
                _ = [piece async for piece in resp.aiter_bytes()]
        ex = await s.finished(1)
        rows = await s.rows()
    assert (ex.status, ex.completion_tokens) == (status, completion)
    assert s.reconciles == [("alice", CHARGE, settled)]
    assert [(r["total_tokens"], r["estimated"]) for r in rows] == [(settled, 1)]


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


NON_STREAM = chat_body(stream=False)
NS_CHARGE = len(NON_STREAM) // 4 + 5
NO_USAGE = b'{"id":"c","object":"chat.completion","choices":[]}'


@pytest.mark.parametrize("reply, status, settled, estimated", [
    # A 200 whose usage never shows: the charge, estimated.
    (answer(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n" % len(NO_USAGE)
            + NO_USAGE), 200, NS_CHARGE, 1),
    # The upstream took the request and hung up before answering (vLLM may have been generating).
    (close, 502, NS_CHARGE, 1),
    # The upstream refused it with a 4xx: vLLM validates before it schedules -> nothing used.
    (answer(b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}"),
     400, None, 0),
])
async def test_a_non_streamed_answer_without_usage(nursery, tmp_path, reply, status, settled, estimated):
    up = FakeUpstream(reply)
    s = await setup(nursery, tmp_path, await up.start(nursery))
    with trio.fail_after(20):
        resp = await s.client.post("/chat/completions", content=NON_STREAM)
        ex = await s.finished(1)
        rows = await s.rows()
    assert resp.status_code == ex.status == status
    assert s.reconciles == [("alice", NS_CHARGE, settled or 0)]
    assert [(r["total_tokens"], r["estimated"]) for r in rows] == [(settled, estimated)]


async def test_a_request_that_never_reached_an_upstream_is_refunded(nursery, tmp_path, dead_upstream):
    s = await setup(nursery, tmp_path, dead_upstream())
    with trio.fail_after(20):
        resp = await s.client.post("/chat/completions", content=NON_STREAM)
        await s.finished(1)
        rows = await s.rows()
    assert resp.status_code == 503
    assert s.reconciles == [("alice", NS_CHARGE, 0)]
    assert [(r["total_tokens"], r["estimated"]) for r in rows] == [(None, 0)]


# -- item 3: usage before megabytes of prompt_logprobs / prompt_token_ids --------------------------------


@pytest.mark.parametrize("extra", [b',"return_token_ids":true', b',"prompt_logprobs":5',
                                   b',"return_token_ids":true,"prompt_logprobs":1'])
async def test_usage_is_found_before_a_long_tail(nursery, tmp_path, extra):
    _, url = await start_sim(nursery, max_model_len=100_000)
    s = await setup(nursery, tmp_path, url, tpm=100_000)
    body = chat_body(extra, content="sheep " * 4000, stream=False)
    with trio.fail_after(20):
        resp = await s.client.post("/chat/completions", content=body)
        ex = await s.finished(1)
        rows = await s.rows()
    assert resp.status_code == 200, resp.text
    answer_ = resp.content
    tail = answer_[answer_.index(b'"usage":{'):]
    assert len(tail) > 16 * 1024  # far more than a tail buffer would keep follows the usage object
    usage = resp.json()["usage"]
    assert (ex.prompt_tokens, ex.completion_tokens, ex.total_tokens, ex.estimated) == (
        usage["prompt_tokens"], usage["completion_tokens"], usage["total_tokens"], False)
    assert s.reconciles == [("alice", len(body) // 4 + 5, usage["total_tokens"])]
    assert [(r["total_tokens"], r["estimated"]) for r in rows] == [(usage["total_tokens"], 0)]
