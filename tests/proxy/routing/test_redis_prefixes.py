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


async def test_a_continuation_made_on_another_host_costs_one_redis_round_trip(nursery, redis_url, tmp_path) -> None:
    """A limited key's Responses follow-up whose previous response another gateway created: its home
    comes from Redis in the same round trip as the key's limits, and the follow-up reaches that host."""
    from proxy.admit import keys

    keys_file = tmp_path / "keys.toml"
    secret = keys.add(keys_file, "limited", rpm=1000)
    with trio.fail_after(60):
        sims = [await start_sim(nursery) for _ in range(2)]
        servers = [s for s, _ in sims]
        config = msgspec.structs.replace(make_config([u for _, u in sims], keys_file=str(keys_file)),
                                         cluster=ClusterConfig(redis_url=redis_url))
        a, b = await start_gateway(nursery, config), await start_gateway(nursery, config)
        auth = {"authorization": f"Bearer {secret}"}
        async with httpx.AsyncClient(timeout=30, headers=auth) as http:
            made = await http.post(a.url + "/v1/responses", json={"model": "sim-chat", "input": "hi",
                                                                   "max_output_tokens": 4, "store": True})
            assert made.status_code == 200
            first = served_by(servers)
            home = next(i for i in range(2) if first[i])
            await trio.sleep(0.1)  # a's SET of the home goes out off the request path
            client = b.gw.cluster.client
            calls = []
            for name in ("execute", "eval", "pipeline"):
                real = getattr(client, name)

                async def counted(*args, _real=real, _name=name, **kw):
                    calls.append((_name, args))
                    return await _real(*args, **kw)

                setattr(client, name, counted)
            follow = await http.post(b.url + "/v1/responses", json={
                "model": "sim-chat", "input": "and then?", "previous_response_id": made.json()["id"],
                "max_output_tokens": 4})
            assert follow.status_code == 200, follow.text
        assert served_by(servers)[home] == first[home] + 1  # it went where its history is
        # Before the answer: ONE round trip carried both the key's limits (EVALSHA) and the home (GET);
        # what follows it is off the request path (the settle, the new response's home).
        name, (commands,) = calls[0]
        assert name == "pipeline" and [c[0] for c in commands] == ["EVALSHA", "GET"], calls[0]
        assert not any(n != "pipeline" for n, _ in calls), calls
