"""Pure tests of the simulator's prefix-cache model: chained block hashes, the LRU of blocks with
referenced blocks pinned, the scheduler's admission queue and prefill timeline, and the prompt's token
sequence (as long as the documented prompt rule counts, a prefix across turns). No sockets, no clock.
"""

from __future__ import annotations

import msgspec
import pytest

from backends.sim import messages, prompt_tokens, responses_api
from backends.sim.planning import Planner
from backends.sim.prefix_cache import PrefixCache, block_hashes
from backends.sim.responses import SimOptions
from backends.sim.scheduler import Scheduler

TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]


def tokens(n: int, tag: int = 0) -> list[int]:
    """n token ids (one token each); another `tag`, other ids."""
    return [tag * 1_000_000 + i for i in range(n)]


# -- block hashes --------------------------------------------------------------------------------

def test_only_full_blocks_are_hashed_and_each_hash_chains_its_prefix() -> None:
    a = block_hashes(tokens(50), 16)
    assert len(a) == 3  # 50 tokens: 3 full blocks, the partial 4th is never cached
    b = block_hashes([*tokens(20), -1, *tokens(50)[21:]], 16)
    assert b[0] == a[0] and b[1:] != a[1:] and b[2] != a[2]  # one differing token changes every later block
    assert block_hashes(tokens(15), 16) == []
    # the same block after a different prefix is another block
    assert block_hashes([*tokens(16, 1), *tokens(16)], 16)[1] != block_hashes(tokens(16), 16)[0]


def test_text_runs_hash_as_their_tokens() -> None:
    text = "abcd" * 40 + "xy"  # 41 tokens: 2 full blocks
    as_run = block_hashes([("m",), text, ("end",)], 16)
    assert len(as_run) == 2 and prompt_tokens.length([("m",), text, ("end",)]) == 43
    assert block_hashes([("m",), text[:64], ("end",)], 16)[0] == as_run[0]
    # the partial block is not cached
    assert block_hashes([("m",), "abcd" * 40 + "xz", ("end",)], 16) == as_run
    assert block_hashes([("m",), "abce" + text[4:], ("end",)], 16)[0] != as_run[0]


# -- the cache -------------------------------------------------------------------------------------

def test_hits_stop_at_the_first_miss_and_leave_the_last_token_to_compute() -> None:
    cache = PrefixCache(1024, 16)
    seq = tokens(64)
    hashes = block_hashes(seq, 16)
    assert cache.hit_tokens(hashes, len(seq)) == 0
    cache.touch(hashes)
    assert cache.hit_tokens(hashes, 65) == 64
    assert cache.hit_tokens(hashes, 64) == 48  # a block-multiple prompt recomputes its last block
    other = block_hashes([*seq[:16], -1, *seq[17:]], 16)
    assert cache.hit_tokens(other, 65) == 16
    assert cache.cached_tokens == 64 and cache.usage() == 0.0  # cached but held by nobody: free
    held = cache.acquire(hashes)
    assert cache.usage() == 4 / 64  # four blocks held by a running request, of 1,024 / 16
    cache.release(held)
    assert cache.usage() == 0.0


def test_eviction_is_least_recently_used_and_a_prefix_loses_its_tail_first() -> None:
    cache = PrefixCache(6 * 16, 16)  # 6 blocks
    a, b = block_hashes(tokens(64, 1), 16), block_hashes(tokens(64, 2), 16)
    cache.touch(a)
    cache.touch(b)  # 8 blocks asked, 6 kept: a's tail went first
    assert len(cache) == 6 and cache.evicted == 2
    assert [h in cache for h in a] == [True, True, False, False]
    assert cache.hit_tokens(a, 100) == 32
    cache.touch(a[:2])  # a's head is now the most recently used: b's tail goes next
    cache.touch(block_hashes(tokens(32, 3), 16))
    assert [h in cache for h in b] == [True, True, False, False]
    assert all(h in cache for h in a[:2])


def test_blocks_of_running_requests_are_never_evicted() -> None:
    cache = PrefixCache(4 * 16, 16)
    a, b = block_hashes(tokens(48, 1), 16), block_hashes(tokens(48, 2), 16)
    held = cache.acquire(a)
    assert held == a and cache.referenced_blocks == 3
    got = cache.acquire(b)  # one free slot: b's first block only; the rest of its chain is not cached
    assert got == b[:1] and all(h in cache for h in a)
    cache.release(got)
    cache.release(held)
    assert cache.referenced_blocks == 0 and len(cache) == 4
    assert cache.acquire(a) == a and cache.acquire(a) == a  # two requests share blocks: counted twice
    cache.release(a)
    assert cache.referenced_blocks == 3
    with pytest.raises(ValueError):
        PrefixCache(64, 0)


# -- the scheduler ------------------------------------------------------------------------------------

def test_admission_is_fifo_within_max_num_seqs() -> None:
    s = Scheduler(max_num_seqs=2)
    t = [s.enqueue() for _ in range(4)]
    assert [x.admitted for x in t] == [True, True, False, False] and (s.running, s.waiting) == (2, 2)
    s.finish(t[3], 0.0)  # gave up waiting: leaves the queue
    assert s.waiting == 1
    s.finish(t[0], 0.0)
    assert t[2].admitted and (s.running, s.waiting) == (2, 0)
    s.finish(t[0], 0.0)  # idempotent
    assert s.running == 2
    late = s.enqueue()
    assert not late.admitted  # no slot: queued even though nobody else waits
    unlimited = Scheduler()
    assert all(unlimited.enqueue().admitted for _ in range(100))


def test_prefill_takes_uncached_tokens_over_the_rate_one_prompt_after_another() -> None:
    s = Scheduler(prefill_tokens_per_s=1000, kv_cache_tokens=10_000, block_tokens=16)
    seq = tokens(1001)
    first, second, third = s.enqueue(), s.enqueue(), s.enqueue()
    a = s.start(first, [seq], 1001, 0.0)
    assert (a.prefill_end, a.queried, a.hits) == (pytest.approx(1.001), 1001, 0)
    b = s.start(second, [seq], 1001, 0.0)  # 62 blocks hit, but the engine is busy prefilling `first`
    assert b.hits == 992 and b.prefill_end == pytest.approx(1.001 + 0.009)
    s.finish(second, 0.5)  # cut while prefilling, the last booked: its share is given back
    c = s.start(third, [tokens(500, 3)], 500, 0.5)
    assert c.prefill_end == pytest.approx(1.501)
    none = Scheduler()
    assert none.start(none.enqueue(), [seq], 1001, 3.0) == (3.0, 0, 0)  # model off: no time, no lookups


# -- the prompt as tokens ----------------------------------------------------------------------------

def _chat(options: SimOptions, **body) -> list[list[prompt_tokens.Segment]]:
    """The flat tokens of a chat request's one prompt, checked against usage's prompt_tokens."""
    plan = Planner(options).chat(msgspec.json.encode({"model": "sim-chat", **body}))
    seqs = plan.prompt_sequences()
    assert sum(map(prompt_tokens.length, seqs)) == plan.prompt_tokens
    return [prompt_tokens.flatten(seq) for seq in seqs]


def test_the_token_sequence_is_as_long_as_the_prompt_rule_counts() -> None:
    options = SimOptions(enable_auto_tool_choice=True, tool_call_parser="hermes")
    history = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": [
        {"type": "text", "text": "What is "}, {"type": "text", "text": "the weather?"}]},
        {"role": "assistant", "tool_calls": [{"id": "c1", "type": "function", "function": {
            "name": "get_weather", "arguments": '{"city":"Oslo"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"}]
    _chat(options, messages=history, tools=TOOLS)
    _chat(options, messages=[{"role": "user", "content": ""}])
    planner = Planner(options)
    for prompt in ("hello there", ["a", "", "bb" * 40], [1, 2, 3], [[1, 2], [3, 4, 5]]):
        plan = planner.completion(msgspec.json.encode({"model": "sim-chat", "prompt": prompt}))
        assert sum(map(prompt_tokens.length, plan.prompt_sequences())) == plan.prompt_tokens
    resp = responses_api.plan(planner, responses_api.ResponseStore(), msgspec.json.encode(
        {"model": "sim-chat", "instructions": "Be brief.", "input": "Hi", "tools": [
            {"type": "function", "name": "f", "parameters": {"type": "object"}}], "tool_choice": "none"}))
    assert sum(map(prompt_tokens.length, resp.prompt_sequences())) == resp.prompt_tokens
    msg = messages.plan(planner, msgspec.json.encode({"model": "sim-chat", "system": "Be brief.",
                                                      "max_tokens": 8,
                                                      "messages": [{"role": "user", "content": "Hi"}]}))
    assert sum(map(prompt_tokens.length, msg.prompt_sequences())) == msg.prompt_tokens


def test_a_next_turn_extends_the_previous_prompt_and_tools_follow_the_system_prompt() -> None:
    options = SimOptions()
    turn = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    (one,) = _chat(options, messages=turn)
    (two,) = _chat(options, messages=[*turn, {"role": "assistant", "content": "Hello."},
                                      {"role": "user", "content": "More."}])
    assert two[:len(one)] == one
    (a,) = _chat(options, messages=turn, tools=TOOLS, tool_choice="none")
    (b,) = _chat(options, messages=[turn[0], {"role": "user", "content": "Bye"}], tools=TOOLS,
                 tool_choice="none")
    system = 3 + 4 + 3  # header, then the system message (4 markers + 3 pieces)
    tools_pieces = -(-len(msgspec.json.encode(TOOLS)) // 4)
    shared = next(i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y)
    assert shared == system + tools_pieces + 3  # the user message's markers match, its text does not
