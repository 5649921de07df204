"""Prefix homes shared by two gateways through a real redis-server (proxy/routing/redis_prefixes.py):
a conversation whose turns alternate between two gateway hosts stays on one vLLM host."""

from __future__ import annotations

import httpx
import msgspec
import trio

from proxy.config import ClusterConfig
from tests.e2e.test_routing import TOOLING, post, served_by, turn_body
from tests.support.gateway import make_config, start_gateway, start_sim


async def test_turns_alternating_between_two_gateways_stay_on_one_host(nursery, redis_url) -> None:
    with trio.fail_after(60):
        sims = [await start_sim(nursery, **TOOLING) for _ in range(3)]
        servers = [s for s, _ in sims]
        config = msgspec.structs.replace(make_config([u for _, u in sims], routing="prefix"),
                                         cluster=ClusterConfig(redis_url=redis_url))
        gateways = [await start_gateway(nursery, config), await start_gateway(nursery, config)]
        hosts: dict[int, set[int]] = {}
        async with httpx.AsyncClient(timeout=30) as http:
            for turn in range(4):
                for conv in range(8):
                    gw = gateways[(turn + conv) % 2]  # every turn on the other gateway
                    before = served_by(servers)
                    own = f"Agent {conv}: you are one of many agents with prompts of their own. " * 10
                    assert await post(http, gw.url, turn_body(conv, turn, system=own)) == 200
                    after = served_by(servers)
                    hosts.setdefault(conv, set()).add(next(i for i in range(3) if after[i] > before[i]))
                await trio.sleep(0.15)  # the homes are sent every 50 ms, off the request path
        assert all(len(h) == 1 for h in hosts.values()), hosts
