"""Anthropic Messages through the gateway, with the official `anthropic` SDK as the client and the
simulated vLLM behind: create, stream, count_tokens, usage rows with vLLM's counts, the bytes
unchanged, the client's key never upstream (the tier's key is), the Anthropic headers passed on, and
every error class the SDK maps from the gateway's statuses.
"""

from __future__ import annotations

import anthropic
import httpx
import msgspec
import pytest
import trio

from proxy.admit import keys
from proxy.config import TierConfig, UsageConfig
from tests.support.gateway import flushed_usage_rows, make_config, start_gateway, start_sim

TIER_KEY = "tier-secret-for-vllm"


def client(gw, key: str, **kw) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=gw.url, api_key=key, max_retries=0, timeout=10, **kw)


async def sdk(fn, *args, **kwargs):
    return await trio.to_thread.run_sync(lambda: fn(*args, **kwargs))


class Setup:
    def __init__(self, gw, sim, db, secrets):
        self.gw, self.sim, self.db, self.secrets = gw, sim, db, secrets

    async def rows(self) -> list[dict]:
        return await flushed_usage_rows(self.gw, self.db)


@pytest.fixture
async def setup(nursery, tmp_path):
    sim, url = await start_sim(nursery, api_key=TIER_KEY)
    keys_file = tmp_path / "keys.toml"
    secrets = {
        "alice": keys.add(keys_file, "alice"),
        "bob": keys.add(keys_file, "bob", rpm=1),
        "carol": keys.add(keys_file, "carol", tiers=["other"]),
    }
    db = str(tmp_path / "usage.sqlite3")
    tiers = [TierConfig(name="local", upstreams=[url], models=["sim-chat"], upstream_api_key=TIER_KEY),
             TierConfig(name="other", upstreams=["http://127.0.0.1:9"], models=["other-model"])]
    config = msgspec.structs.replace(make_config([], keys_file=str(keys_file), tiers=tiers,
                                                 server={"max_body_bytes": 64 * 1024}),
                                     usage=UsageConfig(path=db, flush_s=0.01))
    gw = await start_gateway(nursery, config)
    return Setup(gw, sim, db, secrets)


MESSAGES = [{"role": "user", "content": "Say hello."}]


async def test_create_unchanged_billed_and_keyed_upstream_by_the_tier(setup):
    c = client(setup.gw, setup.secrets["alice"],
               default_headers={"anthropic-beta": "tools-2024-04-04"})
    with trio.fail_after(15):
        raw = await sdk(c.messages.with_raw_response.create, model="sim-chat", max_tokens=6,
                        system="Be brief.", messages=MESSAGES)
    assert raw.http_response.content == setup.sim.responses[-1]
    msg = raw.parse()
    assert msg.type == "message" and msg.role == "assistant" and msg.content[0].text
    [row] = await setup.rows()
    assert (row["endpoint"], row["key_name"], row["status"]) == ("messages", "alice", 200)
    assert (row["prompt_tokens"], row["completion_tokens"]) == (msg.usage.input_tokens, msg.usage.output_tokens)
    assert not row["estimated"]
    seen = dict(setup.sim.requests[-1].headers)
    assert seen[b"authorization"] == f"Bearer {TIER_KEY}".encode()  # the tier's key, not the client's
    assert b"x-api-key" not in seen
    assert seen[b"anthropic-version"] == raw.http_response.request.headers["anthropic-version"].encode()
    assert seen[b"anthropic-beta"] == b"tools-2024-04-04"


async def test_stream_with_the_sdk_helper(setup):
    c = client(setup.gw, setup.secrets["alice"])

    def run():
        with c.messages.stream(model="sim-chat", max_tokens=5, messages=MESSAGES) as stream:
            text = "".join(stream.text_stream)
            return text, stream.get_final_message()

    with trio.fail_after(15):
        text, final = await trio.to_thread.run_sync(run)
    assert text and text == final.content[0].text
    [row] = await setup.rows()
    assert (row["prompt_tokens"], row["completion_tokens"], bool(row["stream"])) == (
        final.usage.input_tokens, final.usage.output_tokens, True)
    assert not row["estimated"]


async def test_stream_bytes_unchanged(setup):
    body = {"model": "sim-chat", "max_tokens": 4, "stream": True, "messages": MESSAGES}
    with trio.fail_after(15):
        async with httpx.AsyncClient(timeout=10) as http:
            got = await http.post(f"{setup.gw.url}/v1/messages", json=body,
                                  headers={"x-api-key": setup.secrets["alice"], "anthropic-version": "2023-06-01"})
    assert got.status_code == 200
    assert got.content == setup.sim.responses[-1]
    assert got.content.startswith(b"event: message_start\n")


async def test_count_tokens_is_not_billed(setup):
    c = client(setup.gw, setup.secrets["alice"])
    with trio.fail_after(10):
        counted = await sdk(c.messages.count_tokens, model="sim-chat", messages=MESSAGES)
    assert counted.input_tokens > 0
    assert await setup.rows() == []


async def test_error_classes(setup):
    s = setup
    cases = [
        (anthropic.AuthenticationError, "sk-si-wrong", {"model": "sim-chat"}),
        (anthropic.PermissionDeniedError, s.secrets["carol"], {"model": "sim-chat"}),
        (anthropic.NotFoundError, s.secrets["alice"], {"model": "no-such-model"}),
        (anthropic.RequestTooLargeError, s.secrets["alice"],
         {"model": "sim-chat", "messages": [{"role": "user", "content": "x" * 70000}]}),
    ]
    for cls, key, kw in cases:
        args = {"max_tokens": 4, "messages": MESSAGES, **kw}
        with trio.fail_after(10), pytest.raises(cls) as info:
            await sdk(client(s.gw, key).messages.create, **args)
        assert info.value.body["type"] == "error", info.value.body
    # A key with tier "other" only, asking for its model: every upstream refuses -> 529 overloaded.
    with trio.fail_after(10), pytest.raises(anthropic.OverloadedError) as info:
        await sdk(client(s.gw, s.secrets["carol"]).messages.create, model="other-model", max_tokens=4,
                  messages=MESSAGES)
    assert info.value.status_code == 529
    assert info.value.body["error"]["type"] == "overloaded_error"


async def test_rate_limit_is_rate_limit_error_with_retry_after(setup):
    c = client(setup.gw, setup.secrets["bob"])
    with trio.fail_after(10):
        await sdk(c.messages.create, model="sim-chat", max_tokens=2, messages=MESSAGES)
        with pytest.raises(anthropic.RateLimitError) as info:
            await sdk(c.messages.create, model="sim-chat", max_tokens=2, messages=MESSAGES)
    assert info.value.response.headers["retry-after"]
    assert info.value.body["error"]["type"] == "rate_limit_error"


async def test_missing_max_tokens_is_400_naming_it(setup):
    with trio.fail_after(10):
        async with httpx.AsyncClient(timeout=10) as http:
            got = await http.post(f"{setup.gw.url}/v1/messages", json={"model": "sim-chat", "messages": MESSAGES},
                                  headers={"x-api-key": setup.secrets["alice"]})
    assert got.status_code == 400
    err = got.json()["error"]
    assert err["type"] == "invalid_request_error" and "max_tokens" in err["message"]
    assert all(r.target != "/v1/messages" for r in setup.sim.requests)  # refused before any upstream
