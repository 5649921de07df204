"""Through real processes: SIGTERM in the middle of load -- streams finish, nothing is lost, exit 0.

Strategy: 1 and 2 workers behind one port; four SDK streams paced by the simulator (4 s each) and three
SDK clients making back-to-back requests on their keep-alive connections, each request tagged with an
`x-request-id`. Once all are going, a conductor thread opens connection after connection (as a busy
gateway sees them) and sends SIGTERM in the middle of that; the first refused connection is noted with
the number of streams still in flight. Afterwards the usage table is compared with what every client
saw: a request that got an HTTP answer has exactly one row with that status and vLLM's counts; a
request refused at the TCP level never reached the gateway and has none. Helpers: tests/support/production.py.
"""

from __future__ import annotations

import json
import signal
import socket
import threading
import time
from collections.abc import Callable

import openai
import pytest

from tests.support.production import (
    ASK,
    by_request_id,
    client,
    gateway,
    rid,
    row_tokens,
    run_threads,
    sim,
    tokens,
    usage_rows,
    write_config,
)

# -- 2. SIGTERM in the middle of load: streams finish, nothing lost, exit 0 --------------------------

@pytest.mark.parametrize("workers", [1, 2])
def test_sigterm_under_load_drains_streams_and_loses_no_row(tmp_path, workers):
    db = tmp_path / "usage.sqlite3"
    stream_tokens = 100  # 4 s each at 25 tokens/s: in flight when SIGTERM arrives
    with sim(tmp_path, "--tokens-per-s", "25") as up:
        cfg = write_config(tmp_path, up.url, usage_db=db)
        with gateway(cfg, "--workers", str(workers)) as gw:
            started = [threading.Event() for _ in range(4)]
            answered = [threading.Event() for _ in range(3)]
            streams: dict[str, object] = {}
            plain: dict[str, object] = {}  # request id -> ("ok", usage) | ("status", code) | ("conn", exc)

            def streamer(i: int) -> Callable[[], None]:
                def run() -> None:
                    lines = []
                    try:
                        with client(gw).chat.completions.with_streaming_response.create(
                                model="sim-chat", messages=ASK, max_tokens=stream_tokens, stream=True,
                                stream_options={"include_usage": True}, extra_headers=rid(f"s{i}")) as resp:
                            for line in resp.iter_lines():
                                if line:
                                    lines.append(line)
                                    started[i].set()
                        streams[f"s{i}"] = ("ok", lines)
                    except openai.APIError as exc:
                        streams[f"s{i}"] = ("error", exc)
                    finally:
                        started[i].set()
                return run

            def requester(i: int) -> Callable[[], None]:
                def run() -> None:
                    c = client(gw)
                    try:
                        for j in range(400):
                            request_id = f"p{i}-{j}"
                            try:
                                r = c.chat.completions.create(model="sim-chat", messages=ASK, max_tokens=2,
                                                              extra_headers=rid(request_id))
                                plain[request_id] = ("ok", tokens(r.usage))
                            except openai.APIStatusError as exc:
                                plain[request_id] = ("status", exc.status_code)
                            except openai.APIConnectionError as exc:
                                plain[request_id] = ("conn", exc)
                                return  # refused: the gateway is draining or gone
                            answered[i].set()
                    finally:
                        answered[i].set()
                return run

            def conductor() -> None:
                for e in [*started, *answered]:
                    assert e.wait(20)
                # New connections keep arriving (connect, close) while SIGTERM lands, as they do on a
                # busy gateway; after it they must be refused -- while the streams are still going.
                deadline = time.monotonic() + 15
                n = 0
                while time.monotonic() < deadline:
                    try:
                        socket.create_connection(("127.0.0.1", gw.port), timeout=2).close()
                    except ConnectionRefusedError:
                        refused_at["streams_open"] = sum(1 for k in ("s0", "s1", "s2", "s3") if k not in streams)
                        return
                    except OSError:  # reset from a closing accept queue: not yet refused
                        pass
                    n += 1
                    if n == 20:
                        gw.send(signal.SIGTERM)

            refused_at: dict[str, int] = {}
            run_threads([*(streamer(i) for i in range(4)), *(requester(i) for i in range(3)), conductor])
            assert gw.wait(timeout=40) == 0, gw.stderr()[-4000:]
            assert "Traceback" not in gw.stderr()  # no worker crashed on the way out

    assert refused_at.get("streams_open") == 4  # refusal came while all four streams were in flight
    rows = by_request_id(usage_rows(db))
    for name, (outcome, lines) in streams.items():
        assert outcome == "ok", (name, lines)
        assert lines[-1] == "data: [DONE]"
        usage = json.loads(lines[-2][len("data: "):])["usage"]
        assert usage["completion_tokens"] == stream_tokens
        assert rows[name]["status"] == 200 and rows[name]["completion_tokens"] == stream_tokens
    answered_ids = {k for k, v in plain.items() if v[0] != "conn"}
    refused_ids = {k for k, v in plain.items() if v[0] == "conn"}
    assert len(refused_ids) == 3  # every requester ended on a refused (or closed) connection
    for request_id in answered_ids:
        outcome, value = plain[request_id]
        row = rows[request_id]
        if outcome == "ok":
            assert row["status"] == 200 and row_tokens(row) == value
        else:
            assert row["status"] == value
    assert not refused_ids & set(rows)  # never read by the gateway: no row, and the client knows it failed
    assert set(rows) == answered_ids | set(streams)
    assert not list(tmp_path.glob("usage.sqlite3.spill*"))  # flushed into the table, nothing spilled
    if workers > 1:
        assert not list(tmp_path.glob("spotinference-ratelimit-*"))  # the supervisor removed its table
