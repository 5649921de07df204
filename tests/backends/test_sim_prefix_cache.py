"""The simulated vLLM's prefix-cache and scheduler model through real sockets: a cached prefix skips its
prefill (TTFT), a conversation's next turn hits its history, another conversation only the shared system
prompt, LRU eviction, `max_num_seqs` queueing (vllm:num_requests_waiting, TTFT including the wait), the
/metrics counters in tokens, the model off by default, and the `spotinference sim` flags.

Every test binds 127.0.0.1 port 0 and runs under `trio.fail_after`. Timing assertions compare orders and
keep wide margins (a cold 2,000-token prompt at 20,000 tokens/s takes >= 100 ms, a cached one ~0); the
exact facts (hit tokens) are read from /metrics and `statistics()`.
"""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
import trio

from backends.sim import SimOptions
from backends.sim.cli import _parser, main, options_from
from tests.support.sim_client import running

COLD = {"prefill_tokens_per_s": 20_000, "kv_cache_tokens": 100_000}
LONG = "x" * 8000  # 2,000 tokens: 3 + (4 + 2,000) = 2,007 prompt tokens, 125 full blocks
SYSTEM = "You are a careful agent. " * 32  # 800 characters: 200 tokens


def chat(*messages: dict[str, Any], **fields: Any) -> dict[str, Any]:
    return {"model": "sim-chat", "messages": list(messages), "max_tokens": 4, **fields}


def user(text: str) -> dict[str, Any]:
    return {"role": "user", "content": text}


def metric(text: str, name: str, model: str = "sim-chat") -> float:
    prefix = f'{name}{{engine="0",model_name="{model}"}} '
    return float(next(line[len(prefix):] for line in text.splitlines() if line.startswith(prefix)))


async def metrics(client: httpx.AsyncClient) -> str:
    return (await client.get("/metrics")).text


async def ttft(client: httpx.AsyncClient, body: dict[str, Any],
               marks: dict[str, float] | None = None) -> float:
    """Seconds from sending a streamed chat request to its first SSE event (read to the end)."""
    t0 = trio.current_time()
    first = None
    async with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if first is None and line.startswith("data: "):
                first = trio.current_time() - t0
    if marks is not None:
        marks.update(sent=t0, end=trio.current_time())
    assert first is not None
    return first


async def answer(client: httpx.AsyncClient, body: dict[str, Any]) -> dict[str, Any]:
    r = await client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    return r.json()


async def hits_of(client: httpx.AsyncClient, server: Any, body: dict[str, Any]) -> int:
    """The prefix-cache hit tokens of one request."""
    before = server.statistics().prefix_cache_hits_total
    await answer(client, body)
    return server.statistics().prefix_cache_hits_total - before


async def wait_for(predicate: Any) -> None:
    while not predicate():
        await trio.sleep(0.005)


async def test_a_repeated_prompt_skips_its_prefill() -> None:
    with trio.fail_after(15):
        async with running(**COLD) as (server, _, client):
            body = chat(user(LONG))
            cold = await ttft(client, body)
            warm = await ttft(client, body)
            assert cold >= 0.1 - 0.005  # 2,007 uncached tokens at 20,000/s
            assert warm < cold / 2  # 7 uncached tokens: 0.35 ms
            text = await metrics(client)
            # usage is what it always was; the cache counts tokens: 2 x 2,007 queried, 125 blocks hit
            assert (await answer(client, body))["usage"]["prompt_tokens"] == 2007
            assert metric(text, "vllm:prefix_cache_queries_total") == 2 * 2007
            assert metric(text, "vllm:prefix_cache_hits_total") == 2000
            assert metric(text, "vllm:prefix_cache_hits_total", "sim-embed") == 0
            # vLLM's meaning: blocks held by running requests; idle, the cached blocks count as free
            assert metric(text, "vllm:kv_cache_usage_perc") == 0
            assert "# TYPE vllm:prefix_cache_queries_total counter" in text
            assert "# TYPE vllm:prefix_cache_hits_total counter" in text
            stats = server.statistics()  # the third request hit too
            assert (stats.prefix_cache_queries_total, stats.prefix_cache_hits_total) == (3 * 2007, 2 * 2000)


async def test_a_prompt_that_is_a_block_multiple_recomputes_its_last_block() -> None:
    with trio.fail_after(15):
        async with running(**COLD) as (server, _, client):
            body = chat(user("y" * (4 * (16 * 8 - 7))))  # 3 + 4 + 121 = 128 tokens: 8 full blocks
            await answer(client, body)
            assert await hits_of(client, server, body) == 7 * 16  # vLLM computes the last token anyway


async def test_the_next_turn_of_a_conversation_hits_its_history() -> None:
    with trio.fail_after(15):
        async with running(**COLD) as (server, _, client):
            history = [{"role": "system", "content": SYSTEM}, user("Read the file. " * 40)]
            first = await answer(client, chat(*history))
            prompt = first["usage"]["prompt_tokens"]
            reply = {"role": "assistant", "content": first["choices"][0]["message"]["content"]}
            hits = await hits_of(client, server, chat(*history, reply, user("Now fix the bug.")))
            assert hits == prompt // 16 * 16  # every full block of the previous turn's prompt


async def test_another_conversation_hits_only_the_shared_system_prompt() -> None:
    with trio.fail_after(15):
        async with running(**COLD) as (server, _, client):
            system = {"role": "system", "content": SYSTEM}
            await answer(client, chat(system, user("a" * 2000)))
            hits = await hits_of(client, server, chat(system, user("b" * 2000)))
            # shared: 3 header + 4 + 200 (system) + 3 markers of the user message = 210 tokens: 13 blocks
            assert hits == 13 * 16
            assert await hits_of(client, server, chat(user("a" * 2000))) == 0  # no system prompt: no prefix
            # the same system prompt and the same tools are shared; other tools end the shared prefix
            tools = [{"type": "function", "function": {"name": "read_file",
                                                       "parameters": {"type": "object"}}}]
            await answer(client, chat(system, user("c" * 400), tools=tools, tool_choice="none"))
            assert await hits_of(client, server, chat(system, user("d" * 400), tools=tools,
                                                      tool_choice="none")) > 13 * 16
            other = [{"type": "function", "function": {"name": "write_file",
                                                       "parameters": {"type": "object"}}}]
            # (the tools' JSON differs from its 11th 4-byte piece on: 207 + 10 shared tokens, 13 blocks again)
            assert await hits_of(client, server, chat(system, user("d" * 400), tools=other,
                                                      tool_choice="none")) == 13 * 16


async def test_eviction_past_capacity_drops_the_least_recently_used() -> None:
    # each prompt: 3 + 4 + 250 = 257 tokens, 16 full blocks; the cache holds 32 blocks: two prompts
    a, b, c = (chat(user(ch * 1000)) for ch in "abc")
    with trio.fail_after(15):
        async with running(prefill_tokens_per_s=0, kv_cache_tokens=32 * 16) as (server, _, client):
            assert await hits_of(client, server, a) == 0
            assert await hits_of(client, server, b) == 0
            assert await hits_of(client, server, a) == 256  # A is now the most recently used
            assert await hits_of(client, server, c) == 0  # C evicts B, the least recently used
            assert metric(await metrics(client), "vllm:kv_cache_usage_perc") == 0  # full, but idle
            assert await hits_of(client, server, a) == 256
            assert await hits_of(client, server, b) == 0


async def test_max_num_seqs_makes_the_second_request_wait_its_turn() -> None:
    with trio.fail_after(15):
        async with running(max_num_seqs=1, tokens_per_s=50) as (server, _, client):
            body = chat(user("Say hello."), max_tokens=10)  # 10 tokens at 50/s: 180 ms after the first
            first: dict[str, float] = {}
            ttfts: dict[str, float] = {}

            async def one(name: str, marks: dict[str, float] | None = None) -> None:
                ttfts[name] = await ttft(client, body, marks)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(one, "a", first)
                await wait_for(lambda: server.statistics().running == 1)
                started = trio.current_time()
                nursery.start_soon(one, "b")
                await wait_for(lambda: server.statistics().waiting == 1)
                text = await metrics(client)
                assert metric(text, "vllm:num_requests_waiting") == 1
                assert metric(text, "vllm:num_requests_running") == 1
            # b's first token came after a's stream was over: its TTFT is (mostly) the wait
            assert ttfts["a"] < 0.05
            assert ttfts["b"] >= first["end"] - started - 0.03
            assert ttfts["b"] >= 0.1
            assert server.statistics().waiting == 0
            assert metric(await metrics(client), "vllm:num_requests_waiting") == 0


async def test_waiting_requests_are_served_in_arrival_order_and_may_give_up() -> None:
    with trio.fail_after(15):
        async with running(max_num_seqs=1, ttft_ms=150) as (server, port, client):
            done: list[str] = []

            async def one(name: str) -> None:
                await answer(client, chat(user(name)))
                done.append(name)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(one, "first")
                await wait_for(lambda: server.statistics().running == 1)
                # a raw client that queues, then hangs up: it leaves the queue, booked as aborted
                quitter = await trio.open_tcp_stream("127.0.0.1", port)
                data = json.dumps(chat(user("quitter"))).encode()
                head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: sim\r\nContent-Type: application/json"
                head += b"\r\n"
                await quitter.send_all(head + b"Content-Length: %d\r\n\r\n%s" % (len(data), data))
                await wait_for(lambda: server.statistics().waiting == 1)
                nursery.start_soon(one, "second")
                await wait_for(lambda: server.statistics().waiting == 2)
                nursery.start_soon(one, "third")
                await wait_for(lambda: server.statistics().waiting == 3)
                await quitter.aclose()
                await wait_for(lambda: server.statistics().cancelled_total == 1)
                assert server.statistics().waiting == 2
            assert done == ["first", "second", "third"]
            stats = server.statistics()
            assert (stats.running, stats.waiting, stats.finished_total) == (0, 0, 3)


async def test_every_generating_api_goes_through_the_cache() -> None:
    with trio.fail_after(15):
        async with running(**COLD) as (server, _, client):
            # instructions / system of 1,024 characters: 256 tokens (3 + 260 + 5 = 268: 16 blocks hit again)
            requests = [
                ("/v1/completions", {"model": "sim-chat", "prompt": LONG, "max_tokens": 4}, 1984),
                ("/v1/responses", {"model": "sim-chat", "instructions": "Answer briefly. " * 64,
                                   "input": "Hi", "max_output_tokens": 4}, 256),
                ("/v1/messages", {"model": "sim-chat", "system": "Answer at length " * 64, "max_tokens": 4,
                                  "messages": [{"role": "user", "content": "Hi"}]}, 256),
            ]
            for path, body, at_least in requests:
                for turn in range(2):
                    before = server.statistics().prefix_cache_hits_total
                    r = await client.post(path, json=body)
                    assert r.status_code == 200, r.text
                    hits = server.statistics().prefix_cache_hits_total - before
                    assert (hits >= at_least) if turn else (hits == 0), (path, hits)


async def test_the_model_is_off_by_default() -> None:
    assert SimOptions().kv_cache_tokens == SimOptions().max_num_seqs == 0
    assert SimOptions().prefill_tokens_per_s == 0
    with trio.fail_after(15):
        async with running(tokens_per_s=0) as (server, _, client):
            assert server.scheduler.cache is None
            body = chat(user(LONG), max_tokens=200)
            async with trio.open_nursery() as nursery:  # no prefill time, no slot limit, no queue
                for _ in range(8):
                    nursery.start_soon(answer, client, body)
            text = await metrics(client)
            assert metric(text, "vllm:prefix_cache_queries_total") == 0
            assert metric(text, "vllm:prefix_cache_hits_total") == 0
            assert metric(text, "vllm:num_requests_waiting") == 0
            assert metric(text, "vllm:kv_cache_usage_perc") == 0  # running / 256, as before
            stats = server.statistics()
            assert (stats.finished_total, stats.waiting, stats.prefix_cache_queries_total) == (8, 0, 0)


def test_flags_map_onto_options_and_are_validated(capsys: pytest.CaptureFixture[str]) -> None:
    args = _parser().parse_args(["--prefill-tokens-per-s", "20000", "--kv-cache-tokens", "65536",
                                 "--max-num-seqs", "8", "--block-tokens", "32"])
    o = options_from(args)
    assert (o.prefill_tokens_per_s, o.kv_cache_tokens, o.max_num_seqs, o.block_tokens) == \
        (20000.0, 65536, 8, 32)
    d = options_from(_parser().parse_args([]))
    assert (d.prefill_tokens_per_s, d.kv_cache_tokens, d.max_num_seqs, d.block_tokens) == (0.0, 0, 0, 16)
    for flags, message in ((["--prefill-tokens-per-s", "-1"], "--prefill-tokens-per-s must be >= 0"),
                           (["--prefill-tokens-per-s", "nan"], "--prefill-tokens-per-s must be >= 0"),
                           (["--kv-cache-tokens", "-5"], "--kv-cache-tokens must be >= 0"),
                           (["--max-num-seqs", "-1"], "--max-num-seqs must be >= 0"),
                           (["--block-tokens", "0"], "--block-tokens must be >= 1"),
                           (["--kv-cache-tokens", "8"], "--kv-cache-tokens must be 0 (off) or at least")):
        assert main(["--listen", "127.0.0.1:0", *flags]) == 2
        assert message in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--max-num-seqs", "many"])
    with pytest.raises(ValueError, match="block_tokens"):
        SimOptions(block_tokens=0)
    with pytest.raises(ValueError, match="must be >= 0"):
        SimOptions(max_num_seqs=-1)
