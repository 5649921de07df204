"""Router and Tier (proxy/routing/tiers.py): model -> tier, round-robin order, the waker's list, the key.

Built from a real validated config (tests/support/gateway.make_config); a waker is a small fake
holding the routable list the test sets (Reporter, from tests/support/upstream_kit.py).
"""

from __future__ import annotations

import trio

from proxy.config import TierConfig
from proxy.routing.tiers import Router
from tests.support.gateway import make_config
from tests.support.upstream_kit import Reporter

A, B, C = "http://10.0.0.1:8000", "http://10.0.0.2:8001", "http://vllm-3.internal"
PA, PB, PC = (A, ("10.0.0.1", 8000)), (B, ("10.0.0.2", 8001)), (C, ("vllm-3.internal", 80))


def router(*tiers: TierConfig, created: int = 1718000000) -> Router:
    return Router(make_config([], tiers=list(tiers)), created)


def one_tier(upstreams, **kw):
    kw.setdefault("routing", "round_robin")  # the rotation is what these tests are about (policies: test_policy.py)
    return router(TierConfig(name="t", upstreams=list(upstreams), models=["m"], **kw)).tiers["t"]


def test_tier_for_maps_every_model_of_every_tier():
    r = router(TierConfig(name="small", upstreams=[A], models=["qwen-7b", "embed"]),
               TierConfig(name="big", upstreams=[B, C], models=["qwen-72b"]))
    assert r.tier_for("qwen-7b") is r.tiers["small"] and r.tier_for("embed") is r.tiers["small"]
    assert r.tier_for("qwen-72b") is r.tiers["big"]
    assert r.tier_for("gpt-4") is None and r.tier_for("") is None and r.tier_for("QWEN-7B") is None
    assert list(r.tiers) == ["small", "big"] and r.model_created == 1718000000
    big = r.tiers["big"]
    assert (big.name, big.models, big.urls, big.pairs, big.waker) == ("big", ["qwen-72b"], [B, C], [PB, PC], None)


def test_candidates_rotate_one_step_per_request():
    tier = one_tier([A, B, C])
    orders = [tier.candidates() for _ in range(6)]
    assert orders == [[PB, PC, PA], [PC, PA, PB], [PA, PB, PC]] * 2
    assert [o[0] for o in orders[:3]] == [PB, PC, PA]  # each upstream first once in every three
    assert tier.pairs == [PA, PB, PC]  # the stored order is never changed


def test_a_single_upstream_is_always_the_candidate():
    tier = one_tier([A])
    assert [tier.candidates() for _ in range(3)] == [[PA]] * 3
    assert tier.route.rr == 0


def test_a_waker_decides_which_upstreams_are_routable():
    tier = one_tier([A, B, C])
    tier.waker = Reporter([C, A])
    assert tier.candidates() == [PA, PC]
    assert tier.candidates() == [PC, PA]
    tier.waker.urls = [B]  # the waker took hosts out of rotation
    assert tier.candidates() == [PB]
    tier.waker.urls = []
    assert tier.candidates() == []
    # A fallback host the waker launched is not in the configuration at all.
    tier.waker.urls = ["http://10.9.9.9:9000", A]
    assert tier.candidates() == [(A, ("10.0.0.1", 8000)), ("http://10.9.9.9:9000", ("10.9.9.9", 9000))]


def test_the_default_policy_is_prefix_for_several_upstreams_and_rotation_for_one():
    many = router(TierConfig(name="t", upstreams=[A, B], models=["m"])).tiers["t"]
    single = router(TierConfig(name="t", upstreams=[A], models=["m"])).tiers["t"]
    assert (many.route.policy, many.prefix_routed) == ("prefix", True)
    assert (single.route.policy, single.prefix_routed) == ("round_robin", False)
    assert one_tier([A, B], routing="least_loaded", load_bound=2).route.load_bound == 2


async def test_least_loaded_goes_by_the_health_records_in_flight_and_vllms_counts():
    from backends.health import HealthBook, Progress

    tier = one_tier([A, B, C], routing="least_loaded")
    book = HealthBook()
    tier.attach_health(book)
    book.record(A).inflight.update({object(), object()})  # two of ours on A
    book.record(B).succeeded(trio.current_time(), Progress(running=5, tokens=10.0, waiting=2))  # vLLM: 7
    order = tier.candidates()
    assert order == [PC, PA, PB]  # C idle, A has 2 of ours, B has 7 of others' by vLLM's count
    book.record(C).inflight.add(object())
    book.record(C).succeeded(trio.current_time(), Progress(running=1, tokens=10.0))  # vLLM sees only ours
    assert tier.candidates() == [PC, PA, PB]  # C: 1 (ours; vLLM's 1 is the same one), A: 2, B: 7


def test_auth_header_comes_from_upstream_api_key():
    assert one_tier([A], upstream_api_key="vllm-secret").auth_header == (b"authorization", b"Bearer vllm-secret")
    assert one_tier([A]).auth_header is None
    assert one_tier([A], upstream_api_key="").auth_header is None


def test_a_new_router_starts_its_own_rotation():
    cfg = make_config([], tiers=[TierConfig(name="local", upstreams=[A, B], models=["m"], routing="round_robin")])
    first, second = Router(cfg, 0).tiers["local"], Router(cfg, 0).tiers["local"]
    first.candidates()
    assert second.candidates() == [PB, PA] and first.candidates() == [PA, PB]
