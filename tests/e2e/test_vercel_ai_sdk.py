"""The Vercel AI SDK's default OpenAI provider, from Node, against the gateway: what a TypeScript app sees.

`createOpenAI({ baseURL, apiKey })` as docs/MIGRATION.md says; `openai(MODEL)` speaks the Responses API
(POST /v1/responses, SSE `response.created` ... `response.output_text.delta` ... `response.completed`),
`openai.chat(MODEL)` chat completions. The scripts are tests/node/*.mjs (pinned in its package-lock.json),
installed and run by tests/support/node.py: no node or npm, or no registry for the first install, skips.

The simulated vLLM answers with a fixed reply (one token per word), so the text, the finish reason
and the output token count are known; the SDK's usage must equal the gateway's usage row for the
request (the counts billing rests on). The gateway runs in this test's trio loop, node as a child process.
"""

from __future__ import annotations

import re

import msgspec
import pytest
import trio

from proxy.admit import keys
from proxy.config import UsageConfig
from tests.support.gateway import flushed_usage_rows, make_config, start_gateway, start_sim
from tests.support.node import node_packages, run_script

REPLY = "Hello from the simulated vLLM, one token per word."
WORDS = re.findall(r"\s*\S+", REPLY)
APIS = ["chat", "responses"]


@pytest.fixture(scope="module")
def node_dir():
    """The Node packages, installed once (skips the module's tests when that cannot be)."""
    return node_packages()


class Setup:
    def __init__(self, gw, db: str, secret: str, limited: str) -> None:
        self.gw = gw
        self.db = db
        self.secret = secret
        self.limited = limited  # a key with rpm 1

    def env(self, api: str, key: str | None = None, **extra) -> dict[str, str]:
        return {"BASE_URL": self.gw.api, "API_KEY": key or self.secret, "MODEL": "sim-chat", "API": api,
                **{k: str(v) for k, v in extra.items()}}

    async def rows(self) -> list[dict]:
        return await flushed_usage_rows(self.gw, self.db)


@pytest.fixture
async def setup(node_dir, nursery, tmp_path):
    _sim, url = await start_sim(nursery, reply=REPLY)
    keys_file = tmp_path / "keys.toml"
    secret = keys.add(keys_file, "alice")
    limited = keys.add(keys_file, "bob", rpm=1)
    db = str(tmp_path / "usage.sqlite3")
    config = msgspec.structs.replace(make_config([url], keys_file=str(keys_file)),
                                     usage=UsageConfig(path=db, flush_s=0.01))
    gw = await start_gateway(nursery, config)
    return Setup(gw, db, secret, limited)


async def only_row(s: Setup, *, stream: bool) -> dict:
    rows = await s.rows()
    assert len(rows) == 1, rows
    row = rows[0]
    assert (row["key_name"], row["model"], row["status"], bool(row["stream"])) == ("alice", "sim-chat", 200, stream)
    assert not row["estimated"], row  # vLLM's own count, not the gateway's estimate
    return row


def assert_usage(usage: dict, row: dict) -> None:
    """The SDK's usage is the gateway's usage row: positive integers, the same counts."""
    for field in ("inputTokens", "outputTokens", "totalTokens"):
        assert isinstance(usage[field], int) and usage[field] > 0, usage
    assert (usage["inputTokens"], usage["outputTokens"]) == (row["prompt_tokens"], row["completion_tokens"]), (
        usage, row)
    assert usage["totalTokens"] == row["total_tokens"] == row["prompt_tokens"] + row["completion_tokens"]


# -- generateText / streamText: chat completions and the Responses API ------------------------------------

@pytest.mark.parametrize("api", APIS)
async def test_generate_text(setup, api):
    out = await run_script("generate_text", setup.env(api, PROMPT="Say hello."))
    assert out["text"] == REPLY
    assert out["finishReason"] == "stop"
    assert out["usage"]["outputTokens"] == len(WORDS)
    assert out["responseId"]
    assert_usage(out["usage"], await only_row(setup, stream=False))


@pytest.mark.parametrize("api", APIS)
async def test_generate_text_cut_at_max_output_tokens(setup, api):
    """maxOutputTokens reaches vLLM (chat: max_tokens; Responses: max_output_tokens) and a cut answer
    says so (chat: finish_reason "length"; Responses: status incomplete, reason max_output_tokens)."""
    out = await run_script("generate_text", setup.env(api, MAX_OUTPUT_TOKENS=3))
    assert out["text"] == "".join(WORDS[:3])
    assert out["finishReason"] == "length"
    assert out["usage"]["outputTokens"] == 3
    assert_usage(out["usage"], await only_row(setup, stream=False))


@pytest.mark.parametrize("api", APIS)
async def test_stream_text(setup, api):
    out = await run_script("stream_text", setup.env(api, PROMPT="Count to five."))
    assert out["text"] == REPLY  # the script also checks the text is its deltas joined
    assert out["chunks"] == len(WORDS)  # one delta per token, relayed as they came
    assert out["finishReason"] == "stop"
    assert out["responseId"]
    assert_usage(out["usage"], await only_row(setup, stream=True))


# -- errors: the SDK's APICallError with the gateway's status, retryable as the status says ---------------

@pytest.mark.parametrize("stream", [False, True], ids=["generate", "stream"])
@pytest.mark.parametrize("api", APIS)
async def test_bad_key_is_a_401_not_retryable(setup, api, stream):
    out = await run_script("error", setup.env(api, key="sk-si-wrong", STREAM=int(stream)))
    assert (out["class"], out["statusCode"], out["isRetryable"]) == ("APICallError", 401, False), out
    assert out["url"] == setup.gw.api + ("/chat/completions" if api == "chat" else "/responses")
    assert "invalid_api_key" in out["responseBody"]
    rows = await setup.rows()
    assert [(r["status"], r["key_name"]) for r in rows] == [(401, None)]


@pytest.mark.parametrize("api", APIS)
async def test_rate_limit_is_a_429_retryable(setup, api):
    first = await run_script("generate_text", setup.env(api, key=setup.limited))
    assert first["text"] == REPLY
    out = await run_script("error", setup.env(api, key=setup.limited))
    assert (out["class"], out["statusCode"], out["isRetryable"]) == ("APICallError", 429, True), out
    assert out["retryAfter"] is not None and float(out["retryAfter"]) > 0, out
    rows = await setup.rows()
    assert [(r["status"], r["key_name"]) for r in rows] == [(200, "bob"), (429, "bob")]


async def test_script_timeout_kills_node(node_dir, tmp_path):
    """A script that overstays is killed (its process group) and the caller hears so."""
    with trio.fail_after(30):
        # a server that accepts and never answers: the SDK waits, the helper's timeout ends it
        listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
        port = listener.socket.getsockname()[1]
        with pytest.raises(AssertionError, match="did not finish"):
            await run_script("generate_text", {"BASE_URL": f"http://127.0.0.1:{port}/v1", "API_KEY": "k",
                                               "MODEL": "m", "API": "chat"}, timeout=3)
        await listener.aclose()
