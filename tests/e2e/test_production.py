"""Usage accounting end to end, through real gateway and sim processes.

Strategy: everything runs as an operator runs it -- `python -m proxy sim` as the upstream,
`python -m proxy keys add` for keys, `python -m proxy serve --config FILE [--workers N]` as the gateway,
the official OpenAI SDK as the client (its blocking calls in plain threads; there is no event loop in
these tests), `spotinference usage` for the report and the SQLite file read directly for the rows.
Every process binds 127.0.0.1 port 0 and is run by tests/support/processes.py (its own process group,
killed as a group on the way out; stdout and stderr to files, never an unread pipe); every wait is a
bounded poll. Nothing asserts speed: the simulated upstream's pacing (tokens per second) only makes
streams long enough to be "in flight" when a signal arrives.

Requests are matched to usage rows by an `x-request-id` the client sends; responses carry the gateway's
request id, whose first 12 hex digits are a per-process prefix (proxy/exchange.py) -- which worker
answered. The helpers shared with the other test_prod_* files live in tests/support/production.py.
"""

from __future__ import annotations

import json
import subprocess

import openai
import pytest

from tests.support.processes import SPOT
from tests.support.production import (
    ASK,
    TOOLS,
    add_key,
    by_request_id,
    client,
    gateway,
    rid,
    row_tokens,
    sim,
    tokens,
    usage_rows,
    wait_for,
    write_config,
)

# -- 1. usage: one row per request, vLLM's own counts ------------------------------------------------

def test_mixed_traffic_leaves_one_exact_usage_row_per_request(tmp_path):
    keys_file = tmp_path / "keys.toml"
    secret = add_key(keys_file, "alice")
    db = tmp_path / "usage.sqlite3"
    with sim(tmp_path, "--tokens-per-s", "200", "--enable-auto-tool-choice", "--tool-call-parser", "hermes") as up:
        cfg = write_config(tmp_path, up.url, keys_file=keys_file, usage_db=db)
        with gateway(cfg) as gw:
            c = client(gw, secret)
            expect: dict[str, tuple[int, int, int]] = {}  # request id -> usage the upstream reported

            r = c.chat.completions.create(model="sim-chat", messages=ASK, max_tokens=5, extra_headers=rid("u-plain"))
            expect["u-plain"] = tokens(r.usage)

            chunks = list(c.chat.completions.create(
                model="sim-chat", messages=ASK, max_tokens=7, stream=True, stream_options={"include_usage": True},
                extra_headers=rid("u-include")))
            usage_chunks = [ch for ch in chunks if ch.usage is not None]
            assert len(usage_chunks) == 1 and chunks[-1] is usage_chunks[0] and chunks[-1].choices == []
            expect["u-include"] = tokens(chunks[-1].usage)

            # The same request without include_usage: the gateway asks vLLM for usage and hides it.
            chunks = list(c.chat.completions.create(model="sim-chat", messages=ASK, max_tokens=7, stream=True,
                                                    extra_headers=rid("u-hidden")))
            assert all(ch.usage is None and ch.choices for ch in chunks)
            assert chunks[-1].choices[0].finish_reason == "length"
            expect["u-hidden"] = expect["u-include"]  # the simulator's counts are deterministic

            r = c.chat.completions.create(model="sim-chat", messages=ASK, tools=TOOLS, tool_choice="required",
                                          extra_headers=rid("u-tools"))
            assert r.choices[0].message.tool_calls[0].function.name == "get_weather"
            expect["u-tools"] = tokens(r.usage)

            chunks = list(c.chat.completions.create(
                model="sim-chat", messages=ASK, tools=TOOLS, tool_choice="required", stream=True,
                stream_options={"include_usage": True}, extra_headers=rid("u-tools-stream")))
            assert any(ch.choices and ch.choices[0].delta.tool_calls for ch in chunks)
            expect["u-tools-stream"] = tokens(chunks[-1].usage)

            r = c.completions.create(model="sim-chat", prompt="Once upon a time", max_tokens=4,
                                     extra_headers=rid("u-legacy"))
            expect["u-legacy"] = tokens(r.usage)

            errors = {}
            with pytest.raises(openai.NotFoundError):
                c.chat.completions.create(model="no-such-model", messages=ASK, extra_headers=rid("u-404"))
            errors["u-404"] = 404
            with pytest.raises(openai.BadRequestError) as bad:  # refused by the gateway's validation
                c.chat.completions.create(model="sim-chat", messages=ASK, temperature=5, extra_headers=rid("u-400"))
            assert bad.value.body["param"] == "temperature"
            errors["u-400"] = 400
            with pytest.raises(openai.BadRequestError):  # vLLM's context-length 400, passed through
                c.chat.completions.create(model="sim-chat", messages=ASK, max_tokens=100000,
                                          extra_headers=rid("u-400-upstream"))
            errors["u-400-upstream"] = 400

            # A client that goes away mid-stream: 10 s of tokens, it reads three chunks and closes.
            stream = c.chat.completions.create(model="sim-chat", messages=ASK, max_tokens=2000, stream=True,
                                               extra_headers=rid("u-gone"))
            it = iter(stream)
            seen = [next(it) for _ in range(3)]
            assert all(ch.choices for ch in seen)
            stream.close()
            # The row is written when the gateway notices (its next write fails); drain then flushes.
            wait_for(lambda: any(e.get("request_id") == "u-gone" for e in gw.events("access")),
                     "the access line of the abandoned stream")
            assert gw.stop() == 0

    rows = usage_rows(db)
    got = by_request_id(rows)
    assert set(got) == set(expect) | set(errors) | {"u-gone"}  # exactly one row per request, no other
    for request_id, counts in expect.items():
        row = got[request_id]
        assert (row["status"], row["estimated"], row["key_name"]) == (200, 0, "alice"), request_id
        assert row_tokens(row) == counts, request_id
    assert got["u-include"]["stream"] == 1 and got["u-plain"]["stream"] == 0
    assert got["u-legacy"]["endpoint"] == "completions"
    for request_id, status in errors.items():
        row = got[request_id]
        assert row["status"] == status and row["completion_tokens"] is None, request_id
    assert got["u-400-upstream"]["tier"] == "local"  # it reached the upstream, which refused it
    gone = got["u-gone"]
    assert gone["status"] == 499 and gone["estimated"] == 1 and gone["error_type"] == "client_closed"
    assert 3 <= gone["completion_tokens"] < 2000  # tokens relayed so far (one per SSE event)
    secret_free = json.dumps(rows)
    assert secret not in secret_free and "sheep" not in secret_free  # no secret, no prompt text

    report = subprocess.run([*SPOT, "usage", "--db", str(db), "--format", "json"], check=False,
                            capture_output=True, text=True, timeout=30)
    assert report.returncode == 0, report.stderr
    groups = json.loads(report.stdout)["groups"]
    assert len(groups) == 1 and groups[0]["key"] == "alice"
    g = groups[0]
    assert g["requests"] == len(rows) == 10
    assert g["errors"] == 4  # 404, two 400s, the 499
    assert g["estimated"] == 1
    assert g["prompt_tokens"] == sum(p for p, _, _ in expect.values()) + (gone["prompt_tokens"] or 0)
    assert g["completion_tokens"] == sum(c for _, c, _ in expect.values()) + gone["completion_tokens"]
