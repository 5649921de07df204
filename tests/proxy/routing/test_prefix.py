"""A request's prompt blocks (proxy/routing/prefix.py): a conversation's next turn extends its chain,
conversations sharing a system prompt share the first block, and nothing else matches."""

from __future__ import annotations

import json
import time

from proxy.routing.prefix import MAX_PIECES, prefix_blocks

SYSTEM = {"role": "system", "content": "You are a careful agent. " * 50}
TOOLS = [{"type": "function", "function": {"name": "grep", "parameters": {"type": "object"}}}]


def chat(messages, model="m", **kw) -> bytes:
    return json.dumps({"model": model, "messages": messages, "max_tokens": 9, **kw}).encode()


def test_the_next_turn_extends_the_previous_turns_chain():
    turn1 = [SYSTEM, {"role": "user", "content": "find the bug"}]
    turn2 = [*turn1, {"role": "assistant", "content": "looking"}, {"role": "user", "content": "and?"}]
    a, b = prefix_blocks(chat(turn1, tools=TOOLS)), prefix_blocks(chat(turn2, tools=TOOLS, max_tokens=512))
    assert len(a) == 2 and len(b) == 4 and b[:2] == a


def test_a_shared_system_prompt_shares_the_first_block_only():
    one = prefix_blocks(chat([SYSTEM, {"role": "user", "content": "task one"}]))
    two = prefix_blocks(chat([SYSTEM, {"role": "user", "content": "task two"}]))
    assert one[0] == two[0] and one[1] != two[1]


def test_model_and_tools_are_part_of_the_first_block():
    base = prefix_blocks(chat([SYSTEM]))
    assert prefix_blocks(chat([SYSTEM], model="other"))[0] != base[0]
    assert prefix_blocks(chat([SYSTEM], tools=TOOLS))[0] != base[0]


def test_other_apis_prompt_material():
    messages = json.dumps({"model": "m", "system": "be brief", "max_tokens": 5,
                           "messages": [{"role": "user", "content": "hi"}]}).encode()
    assert len(prefix_blocks(messages)) == 1
    items = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    responses = json.dumps({"model": "m", "instructions": "x", "input": items}).encode()
    assert len(prefix_blocks(responses)) == 2
    text = json.dumps({"model": "m", "input": "a plain string input"}).encode()
    assert len(prefix_blocks(text)) == 1
    long_prompt = json.dumps({"model": "m", "prompt": "z" * 5000}).encode()
    assert len(prefix_blocks(long_prompt)) == 3
    assert prefix_blocks(json.dumps({"model": "m", "input": ["a", "b"]}).encode())  # embeddings-like: still hashed
    assert prefix_blocks(b'{"model":"m"}') == () and prefix_blocks(b"not json") == ()


def test_only_the_first_pieces_are_hashed():
    long = [SYSTEM] + [{"role": "user", "content": f"turn {i}"} for i in range(200)]
    assert len(prefix_blocks(chat(long))) == MAX_PIECES


def test_hashing_a_long_history_costs_little(capsys):
    body = chat([SYSTEM] + [{"role": "user", "content": "x" * 2000} for _ in range(50)], tools=TOOLS)
    n = 500
    t0 = time.perf_counter()
    for _ in range(n):
        prefix_blocks(body)
    us = (time.perf_counter() - t0) / n * 1e6
    with capsys.disabled():
        print(f"\n  prefix_blocks({len(body) // 1024} KiB chat body): {us:.1f} us")
    assert us < 20000
