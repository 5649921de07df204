"""The Responses API through the gateway, with the official OpenAI SDK as the client and the simulated
vLLM behind: create (plain and streamed), retrieve, cancel, continuation, usage rows, bytes unchanged,
and affinity -- a response created on one upstream of a tier is retrieved and continued on that one.
"""

from __future__ import annotations

import httpx
import msgspec
import openai
import pytest
import trio

from proxy.admit import keys
from proxy.config import UsageConfig
from tests.support.gateway import flushed_usage_rows, make_config, start_gateway, start_sim


def client(gw, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.api, api_key=key, max_retries=0, timeout=10)


async def sdk(fn, *args, **kwargs):
    return await trio.to_thread.run_sync(lambda: fn(*args, **kwargs))


class Setup:
    def __init__(self, gw, sims, db, secret):
        self.gw, self.sims, self.db, self.secret = gw, sims, db, secret

    async def rows(self) -> list[dict]:
        return await flushed_usage_rows(self.gw, self.db)

    def sim_of(self, path_prefix: str) -> list[int]:
        """Which sims (by index) received a request whose target starts with `path_prefix`."""
        return [i for i, sim in enumerate(self.sims) for r in sim.requests if r.target.startswith(path_prefix)]


async def make_setup(nursery, tmp_path, n_sims: int = 1) -> Setup:
    sims, urls = [], []
    for _ in range(n_sims):
        sim, url = await start_sim(nursery)
        sims.append(sim)
        urls.append(url)
    keys_file = tmp_path / "keys.toml"
    secret = keys.add(keys_file, "alice")
    db = str(tmp_path / "usage.sqlite3")
    config = msgspec.structs.replace(make_config(urls, keys_file=str(keys_file)),
                                     usage=UsageConfig(path=db, flush_s=0.01))
    gw = await start_gateway(nursery, config)
    return Setup(gw, sims, db, secret)


@pytest.fixture
async def one(nursery, tmp_path):
    return await make_setup(nursery, tmp_path)


@pytest.fixture
async def two(nursery, tmp_path):
    return await make_setup(nursery, tmp_path, 2)


async def test_create_is_relayed_unchanged_and_billed_with_vllms_counts(one):
    with trio.fail_after(15):
        resp = await sdk(client(one.gw, one.secret).responses.with_raw_response.create,
                         model="sim-chat", input="Say hello.", max_output_tokens=6)
    body = resp.http_response.content
    assert body == one.sims[0].responses[-1]  # byte for byte
    parsed = resp.parse()
    assert parsed.object == "response" and parsed.status in ("completed", "incomplete")
    assert parsed.output_text
    [row] = await one.rows()
    assert (row["endpoint"], row["key_name"], row["model"], row["status"]) == ("responses", "alice", "sim-chat", 200)
    assert (row["prompt_tokens"], row["completion_tokens"]) == (parsed.usage.input_tokens,
                                                                 parsed.usage.output_tokens)
    assert row["total_tokens"] == parsed.usage.total_tokens and not row["estimated"]


async def test_stream_events_byte_for_byte_and_usage_from_completed(one):
    body = {"model": "sim-chat", "input": "Count to five.", "max_output_tokens": 5, "stream": True}
    with trio.fail_after(15):
        async with httpx.AsyncClient(timeout=10) as http:
            got = await http.post(f"{one.gw.api}/responses", json=body,
                                  headers={"authorization": f"Bearer {one.secret}"})
    assert got.status_code == 200 and got.headers["content-type"].startswith("text/event-stream")
    assert got.content == one.sims[0].responses[-1]
    assert b"event: response.created\n" in got.content and b"event: response.completed\n" in got.content
    completed = [e for e in got.content.split(b"\n\n") if e.startswith(b"event: response.completed")]
    usage = msgspec.json.decode(completed[0].split(b"data: ", 1)[1])["response"]["usage"]
    [row] = await one.rows()
    assert (row["prompt_tokens"], row["completion_tokens"], bool(row["stream"])) == (
        usage["input_tokens"], usage["output_tokens"], True)
    assert not row["estimated"]


async def test_sdk_stream_and_retrieve(one):
    def run():
        c = client(one.gw, one.secret)
        events = list(c.responses.create(model="sim-chat", input="Hi", max_output_tokens=4, stream=True))
        rid = events[-1].response.id
        return events, c.responses.retrieve(rid)

    with trio.fail_after(15):
        events, again = await trio.to_thread.run_sync(run)
    types = [e.type for e in events]
    assert types[0] == "response.created" and types[-1] == "response.completed"
    assert "response.output_text.delta" in types
    assert again.id == events[-1].response.id and again.output_text == events[-1].response.output_text
    rows = await one.rows()
    assert [r["endpoint"] for r in rows] == ["responses"]  # a retrieve is not billed again


async def test_unknown_id_is_the_sdks_not_found(one):
    with trio.fail_after(10), pytest.raises(openai.NotFoundError) as info:
        await sdk(client(one.gw, one.secret).responses.retrieve, "resp_never_made")
    assert info.value.body["code"] == "response_not_found"
    assert one.sim_of("/v1/responses/") == []  # never reached an upstream


async def test_affinity_create_retrieve_continue_land_on_the_creator(two):
    c = client(two.gw, two.secret)

    def run():
        made = [c.responses.create(model="sim-chat", input=f"turn {i}", max_output_tokens=3) for i in range(6)]
        # Orders that round robin alone would get wrong: the same parity twice in a row, reversed.
        for r in (made[0], made[2], made[4], *reversed(made)):
            assert c.responses.retrieve(r.id).id == r.id
        follow = [c.responses.create(model="sim-chat", input="and then?", previous_response_id=r.id,
                                     max_output_tokens=3) for r in (made[1], made[3], made[5], made[0],
                                                                    made[2], made[4])]
        return made, follow

    with trio.fail_after(30):
        made, follow = await trio.to_thread.run_sync(run)
    creators = {}
    for i, sim in enumerate(two.sims):
        for body in sim.responses:
            doc = msgspec.json.decode(body) if body.startswith(b"{") else {}
            if doc.get("object") == "response":
                creators.setdefault(doc["id"], i)
    assert set(creators.values()) == {0, 1}  # round robin spread the creates over both
    for r in made:
        home = creators[r.id]
        retrieves = {i for i, sim in enumerate(two.sims) for q in sim.requests
                     if q.method == "GET" and q.target == f"/v1/responses/{r.id}"}
        assert retrieves == {home}
    for r, f in zip((made[1], made[3], made[5], made[0], made[2], made[4]), follow, strict=True):
        continued = [i for i, sim in enumerate(two.sims) for q in sim.requests
                     if q.method == "POST" and r.id.encode() in q.body]
        assert continued == [creators[r.id]], (r.id, continued)
        assert creators[f.id] == creators[r.id]


async def test_cancel_reaches_the_creator(two):
    c = client(two.gw, two.secret)
    with trio.fail_after(15):
        made = await sdk(c.responses.create, model="sim-chat", input="x", max_output_tokens=2)
        async with httpx.AsyncClient(timeout=10) as http:
            got = await http.post(f"{two.gw.api}/responses/{made.id}/cancel",
                                  headers={"authorization": f"Bearer {two.secret}"})
    hits = [i for i, sim in enumerate(two.sims) for q in sim.requests
            if q.target == f"/v1/responses/{made.id}/cancel"]
    assert len(hits) == 1
    # vLLM refuses to cancel a response that is not running in the background: its answer is relayed.
    assert got.status_code == 400
    assert got.content == two.sims[hits[0]].responses[-1]
    assert got.json()["error"]["message"] == "Cannot cancel a synchronous response."


async def test_previous_response_id_unknown_to_the_gateway_is_routed_normally(one):
    with trio.fail_after(10), pytest.raises(openai.NotFoundError):
        # vLLM itself answers for an id nobody stored: its 404 is relayed.
        await sdk(client(one.gw, one.secret).responses.create, model="sim-chat", input="x",
                  previous_response_id="resp_nobody_has_this", max_output_tokens=2)
    assert one.sim_of("/v1/responses") != []
