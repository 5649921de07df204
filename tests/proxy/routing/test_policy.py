"""The routing choice (proxy/routing/policy.py) as a pure function: no event loop, a fake clock, seeded
randomness. Affinity, the load bound, hosts that are not candidates, ties, vLLM's own counts, the
rotation, the bounded memory -- and what one choice costs."""

from __future__ import annotations

import random
import time
from collections import Counter

import pytest

from proxy.routing.policy import FRESH_S, Load, RouteState, choose, load_of

URLS = ["http://a:8000", "http://b:8000", "http://c:8000"]
IDLE = [Load(0), Load(0), Load(0)]


def state(policy: str = "prefix", **kw) -> RouteState:
    return RouteState(policy, rng=random.Random(7), **kw)


def test_a_conversation_stays_on_its_host_turn_after_turn():
    s = state()
    turn1 = (11, 12)
    first = choose(s, URLS, IDLE, turn1, 0.0)[0]
    for n in range(2, 10):  # each turn extends the previous turn's chain
        turn = (11, 12, *range(100, 100 + n))
        assert choose(s, URLS, IDLE, turn, 0.0)[0] == first


def test_the_deepest_match_wins_over_a_shared_system_prompt():
    s = state()
    s.remember((1,), URLS[0])  # the shared system prompt lives on a
    s.remember((1, 2, 3), URLS[2])  # this conversation's history on c
    assert choose(s, URLS, IDLE, (1, 2, 3, 4), 0.0)[0] == 2
    # Another conversation with the same system prompt: only the shared block matches, and it was
    # last served (so is surely cached) on c.
    assert choose(s, URLS, IDLE, (1, 9), 0.0)[0] == 2


def test_the_load_bound_sends_a_busy_homes_request_to_the_least_loaded_which_becomes_home():
    s = state(load_bound=4)
    s.remember((1, 2), URLS[0])
    assert choose(s, URLS, [Load(4), Load(0), Load(1)], (1, 2, 3), 0.0)[0] == 0  # 4 over: still within
    order = choose(s, URLS, [Load(5), Load(0), Load(1)], (1, 2, 3), 0.0)
    assert order == [1, 2, 0]  # past the bound: least loaded first, the rest by load
    assert s.homes[1] == s.homes[2] == s.homes[3] == URLS[1]  # the prefix moved with it
    assert choose(s, URLS, IDLE, (1, 2, 3, 4), 0.0)[0] == 1


def test_a_home_that_is_not_a_candidate_is_looked_past():
    s = state()
    s.remember((1, 2), URLS[0])
    s.remember((1,), URLS[1])  # the shared first block was served on b since
    down_a = [URLS[1], URLS[2]]  # a is down (the tier filtered it out)
    order = choose(s, down_a, [Load(0), Load(0)], (1, 2, 3), 0.0)
    assert down_a[order[0]] == URLS[1]  # the shallower match on b
    assert choose(s, [URLS[2]], [Load(3)], (1, 2), 0.0) == [0]  # one candidate: it


def test_no_match_goes_to_the_least_loaded_and_makes_it_home():
    s = state()
    order = choose(s, URLS, [Load(3), Load(1), Load(2)], (5, 6), 0.0)
    assert order == [1, 2, 0] and s.homes[5] == URLS[1]


def test_ties_are_broken_by_two_random_choices_and_spread():
    s = state("least_loaded")
    firsts = Counter(choose(s, URLS, IDLE, (), 0.0)[0] for _ in range(3000))
    assert set(firsts) == {0, 1, 2} and min(firsts.values()) > 800


def test_least_loaded_ignores_prefixes_and_orders_by_load():
    s = state("least_loaded")
    s.remember((1,), URLS[0])
    assert choose(s, URLS, [Load(2), Load(0), Load(1)], (1,), 0.0) == [1, 2, 0]


def test_other_gateways_requests_count_only_while_vllms_reading_is_fresh():
    busy_elsewhere = Load(0, others=6.0, kv_usage=0.5, read_at=100.0)  # other gateways' requests
    assert load_of(busy_elsewhere, 100.0 + FRESH_S) == 6.5
    assert load_of(busy_elsewhere, 100.0 + FRESH_S + 0.1) == 0.0  # stale: our own count only
    assert load_of(Load(3, others=1.0, read_at=0.0), 1.0) == 4.0  # ours now, plus the others then
    s = state("least_loaded")
    loads = [Load(1), Load(0, others=6.0, read_at=10.0), Load(2)]
    assert choose(s, URLS, loads, (), 11.0) == [0, 2, 1]
    assert choose(s, URLS, loads, (), 10.0 + FRESH_S + 1)[0] == 1


def test_the_kv_cache_fill_breaks_an_even_load():
    s = state("least_loaded")
    loads = [Load(1, others=1.0, kv_usage=0.9, read_at=0.0), Load(1, others=1.0, kv_usage=0.2, read_at=0.0)]
    assert choose(s, URLS[:2], loads, (), 1.0)[0] == 1


def test_round_robin_rotates():
    s = state("round_robin")
    assert [choose(s, URLS, [], (), 0.0) for _ in range(3)] == [[1, 2, 0], [2, 0, 1], [0, 1, 2]]


def test_the_prefix_memory_is_bounded_lru():
    s = state(max_blocks=4)
    s.remember((1, 2), URLS[0])
    s.remember((3, 4), URLS[1])
    s.remember((1,), URLS[0])  # touched: younger than 2
    s.remember((5,), URLS[2])
    assert list(s.homes) == [3, 4, 1, 5]  # the oldest untouched block went


@pytest.mark.parametrize("policy", ["prefix", "least_loaded", "round_robin"])
def test_choose_costs_microseconds(policy, capsys):
    """Not a speed assertion (the bench reports speed): prints the cost, checks it is sane."""
    s = state(policy)
    urls = [f"http://h{i}:8000" for i in range(4)]
    loads = [Load(i % 3, others=float(i), kv_usage=0.1, read_at=0.0) for i in range(4)]
    blocks = tuple(range(8))
    n = 20000
    t0 = time.perf_counter()
    for i in range(n):
        choose(s, urls, loads, blocks if i % 2 else (i, i + 1), 1.0)
    us = (time.perf_counter() - t0) / n * 1e6
    with capsys.disabled():
        print(f"\n  choose({policy}, 4 hosts, 8 blocks): {us:.2f} us per request")
    assert us < 1000


def test_a_shared_first_block_alone_wins_only_among_the_least_loaded():
    s = state(load_bound=4)
    s.remember((1,), URLS[0])  # the shared system prompt was last served on a
    assert choose(s, URLS, [Load(1), Load(0), Load(0)], (1, 50), 0.0)[0] in (1, 2)  # a new conversation spreads
    s.remember((1, 2), URLS[0])  # a conversation's own history on a
    assert choose(s, URLS, [Load(3), Load(0), Load(0)], (1, 2, 3), 0.0)[0] == 0  # deep: within the bound
