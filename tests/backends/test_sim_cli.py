"""`spotinference sim` as a user runs it: a real child process (tests/support/processes.py), its one
stdout line, SIGTERM -> 0."""

from __future__ import annotations

import signal
import sys

import pytest
import trio

from backends.sim.cli import _parser, main, options_from
from tests.support.processes import started


def test_flags_map_onto_options() -> None:
    args = _parser().parse_args(["--listen", "0.0.0.0:9000", "--model", "a", "--model", "b",
                                 "--embedding-model", "e", "--tokens-per-s", "50", "--ttft-ms", "20",
                                 "--latency-ms", "20", "--max-model-len", "8192", "--api-key", "k",
                                 "--reply", "hi", "--break-tool-json"])
    options = options_from(args)
    assert args.listen == ("0.0.0.0", 9000)
    assert (options.models, options.embedding_models, options.tokens_per_s) == (("a", "b"), ("e",), 50.0)
    assert (options.ttft_ms, options.latency_ms, options.max_model_len) == (20.0, 20.0, 8192)
    assert (options.api_key, options.reply, options.break_tool_json) == ("k", "hi", True)
    with pytest.raises(SystemExit):
        main(["--listen", "nowhere"])
    assert main(["--listen", "127.0.0.1:0", "--tokens-per-s", "-1"]) == 2


async def test_cli_prints_the_bound_address_and_exits_zero_on_sigterm(tmp_path) -> None:
    with trio.fail_after(30):
        async with started([sys.executable, "-m", "backends.sim.cli", "--listen", "127.0.0.1:0"], tmp_path,
                           "sim") as process:
            line = process.stdout().splitlines()[0]  # the first line it printed
            prefix = "spotinference sim listening on http://127.0.0.1:"
            assert line.startswith(prefix)
            port = int(line[len(prefix):])
            assert port == process.port
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            async with stream:
                await stream.send_all(b"GET /health HTTP/1.1\r\nHost: sim\r\n\r\n")
                assert (await stream.receive_some()).startswith(b"HTTP/1.1 200 OK")
            process.send(signal.SIGTERM)
            assert await trio.to_thread.run_sync(process.wait, 15) == 0, process.logs()
