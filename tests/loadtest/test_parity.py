"""loadtest/parity and golden_io without simulators: golden loading, judging, figures, bad input.

Bad input must end in a clear one-line message and a non-zero exit, never a traceback: a malformed
golden line (named by its line number), a missing file, an unset key variable, an endpoint that
refuses connections, one that answers 401. The 401 peer is a tiny raw-socket server on port 0.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest
import trio

from loadtest import golden_io, parity, parity_report
from loadtest.golden_io import GoldenError, ToolCall

SAMPLE = Path(__file__).resolve().parents[2] / "loadtest" / "golden" / "sample.jsonl"
GOOD = json.dumps({"id": "one", "messages": [{"role": "user", "content": "hi"}], "params": {"temperature": 0}})


def test_sample_golden_set_loads_with_every_kind_and_pins_sampling() -> None:
    cases = golden_io.load_golden(SAMPLE)
    kinds = [c.kind for c in cases]
    assert 25 <= len(cases) <= 50
    assert kinds.count("tools") >= 4 and kinds.count("json_schema") >= 4 and kinds.count("chat") >= 15
    assert all(not c.unpinned() for c in cases)


@pytest.mark.parametrize(
    ("line", "needle"),
    [
        ("{not json", "not valid JSON"),
        ('["a list"]', "expected a JSON object"),
        ('{"id": "x", "messages": [], "params": {}}', "'messages' must be a non-empty list"),
        ('{"id": "x", "mesages": [{"role": "user", "content": "hi"}]}', "unknown key(s) mesages"),
        ('{"id": "x", "messages": [{"role": "wizard"}]}', "messages[0] needs a 'role'"),
        ('{"id": "one", "messages": [{"role": "user", "content": "hi"}]}', "duplicate id 'one' (first on line 1)"),
        (('{"id": "x", "messages": [{"role": "user"}], "tools": [{"type": "function", "function": '
          '{"name": "f", "parameters": {"type": "nonsense"}}}]}'), "tools[0].function.parameters is not a valid"),
        ('{"id": "x", "messages": [{"role": "user"}], "response_format": {"type": "json_schema"}}',
         "needs a 'name' and a 'schema'"),
    ],
)
def test_malformed_golden_line_is_named_by_number(tmp_path: Path, line: str, needle: str) -> None:
    path = tmp_path / "g.jsonl"
    path.write_text(GOOD + "\n\n" + line + "\n")
    with pytest.raises(GoldenError) as info:
        golden_io.load_golden(path)
    assert f"{path}:3:" in str(info.value)
    assert needle in str(info.value)


def test_missing_and_empty_golden_files(tmp_path: Path) -> None:
    with pytest.raises(GoldenError, match="golden file not found"):
        golden_io.load_golden(tmp_path / "nope.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(GoldenError, match="no golden cases"):
        golden_io.load_golden(tmp_path / "empty.jsonl")


def _case(**extra: object) -> golden_io.GoldenCase:
    return golden_io._parse_case({"id": "c", "messages": [{"role": "user", "content": "x"}], **extra}, 1, "t:1")


def test_tool_call_validity_parses_and_validates_arguments() -> None:
    params = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"],
              "additionalProperties": False}
    case = _case(tools=[{"type": "function", "function": {"name": "get_weather", "parameters": params}}])
    assert golden_io.check_tool_calls(case, [ToolCall("get_weather", '{"city": "Oslo"}')]) == (True, [])
    ok, problems = golden_io.check_tool_calls(case, [ToolCall("get_weather", '{"city": "Oslo"')])
    assert not ok and "arguments are not JSON" in problems[0]
    ok, problems = golden_io.check_tool_calls(case, [ToolCall("get_weather", '{"town": "Oslo"}')])
    assert not ok and "city" in problems[0]
    assert golden_io.check_tool_calls(case, [ToolCall("nope", "{}")])[0] is False
    assert golden_io.check_tool_calls(case, []) == (False, ["no tool call in the response"])
    assert golden_io.check_tool_calls(_case(), []) == (None, [])


def test_structured_output_validity_against_the_schema() -> None:
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    case = _case(response_format={"type": "json_schema", "json_schema": {"name": "s", "schema": schema}})
    assert case.kind == "json_schema"
    assert golden_io.check_structured(case, '{"n": 3}') == (True, [])
    assert golden_io.check_structured(case, '{"n": "3"}')[0] is False
    assert golden_io.check_structured(case, "n = 3")[0] is False
    assert golden_io.check_structured(_case(), "anything") == (None, [])


def _rec(side: str, stream: bool, text: str, ms: float, **kw: object) -> dict[str, object]:
    base = {"side": side, "case": "c", "run": 0, "stream": stream, "text": text, "tool_calls": [],
            "prompt_tokens": 10, "completion_tokens": 4, "ttft_ms": ms / 2 if stream else None,
            "latency_ms": ms, "finish_reason": "stop", "tool_valid": None, "schema_valid": None,
            "problems": [], "error": None}
    return {**base, **kw}


def test_figures_fold_attempts_into_case_and_side_numbers() -> None:
    recs = [_rec("a", False, "the cat sat", 10), _rec("a", True, "the cat sat", 20),
            _rec("b", False, "the dog sat", 30, completion_tokens=5), _rec("b", True, "the dog sat", 40),
            _rec("b", False, "", 1, run=1, error="HTTP 500: boom")]
    case = parity_report.case_figures("c", "chat", recs)
    assert case["exact"] is False
    assert case["similarity"] == pytest.approx(parity_report.similarity("the cat sat", "the dog sat"))
    assert (case["a"]["completion_tokens"], case["b"]["completion_tokens"]) == (4, 5)
    assert case["b"]["errors"] == ["HTTP 500: boom"]
    side_b = parity_report.side_figures([r for r in recs if r["side"] == "b"])
    assert (side_b["requests"], side_b["errors"], side_b["completion_tokens"]) == (3, 1, 9)
    assert side_b["ttft_ms"]["p50"] == 20 and side_b["latency_ms"]["p50"] == 30
    assert side_b["stream_consistency"] == 1.0
    assert parity_report.comparison([case])["token_mismatch_cases"] == 1
    assert parity_report.percentile([1, 2, 3, 4], 50) == 2.5 and parity_report.percentile([], 50) is None


def test_word_diff_escapes_and_marks_both_sides() -> None:
    out = parity_report.word_diff("a <b> c", "a <x> c")
    assert out == "a <del>&lt;b&gt;</del><ins>&lt;x&gt;</ins> c"


def test_base_url_adds_v1_only_when_no_path() -> None:
    assert parity._base_url("http://h:1") == "http://h:1/v1"
    assert parity._base_url("http://h:1/v1/") == "http://h:1/v1"
    assert parity._base_url("https://h/openai/v1") == "https://h/openai/v1"


def _run_main(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    rc = parity.main(argv)
    return rc, capsys.readouterr().err


def test_cli_malformed_golden_line_exits_2_naming_the_line(tmp_path: Path, capsys) -> None:
    path = tmp_path / "g.jsonl"
    path.write_text(GOOD + "\n" + '{"id": "two", "messages": [}\n')
    rc, err = _run_main(["--a", "http://127.0.0.1:9", "--b", "http://127.0.0.1:9", "--golden", str(path)], capsys)
    assert rc == 2
    assert f"{path}:2: not valid JSON" in err and "Traceback" not in err


def test_cli_missing_golden_and_unset_key_variable(tmp_path: Path, capsys, monkeypatch) -> None:
    rc, err = _run_main(["--a", "http://x", "--b", "http://y", "--golden", str(tmp_path / "no.jsonl")], capsys)
    assert rc == 2 and "golden file not found" in err
    path = tmp_path / "g.jsonl"
    path.write_text(GOOD + "\n")
    monkeypatch.delenv("PARITY_TEST_KEY", raising=False)
    rc, err = _run_main(["--a", "http://127.0.0.1:9", "--b", "http://127.0.0.1:9", "--golden", str(path),
                         "--a-key-env", "PARITY_TEST_KEY"], capsys)
    assert rc == 2 and "PARITY_TEST_KEY is not set" in err


def test_unreachable_endpoint_is_a_clean_message_from_the_real_command(tmp_path: Path) -> None:
    path = tmp_path / "g.jsonl"
    path.write_text(GOOD + "\n")
    with socket.socket() as closed:  # bound, never listening: connections are refused, no port race
        closed.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{closed.getsockname()[1]}"
        proc = subprocess.run(
            [sys.executable, "-m", "proxy", "parity", "--a", url, "--b", url, "--golden", str(path),
             "--out", str(tmp_path / "out")],
            check=False, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
        )
    assert proc.returncode == 2
    assert f"cannot reach endpoint A at {url}/v1" in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout


async def _answer_401(stream: trio.SocketStream) -> None:
    data = b""
    with trio.move_on_after(5):
        while b"\r\n\r\n" not in data and len(data) < 65536:
            chunk = await stream.receive_some(4096)
            if not chunk:
                break
            data += chunk
    body = b'{"error": {"message": "Incorrect API key provided", "type": "invalid_request_error", ' \
           b'"param": null, "code": "invalid_api_key"}}'
    head = b"HTTP/1.1 401 Unauthorized\r\ncontent-type: application/json\r\nconnection: close\r\n"
    await stream.send_all(head + b"content-length: %d\r\n\r\n" % len(body) + body)
    await stream.aclose()


async def test_bad_key_401_is_a_clean_message(tmp_path: Path, capsys) -> None:
    path = tmp_path / "g.jsonl"
    path.write_text(GOOD + "\n")
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(partial(trio.serve_tcp, _answer_401, 0, host="127.0.0.1"))
            port = listeners[0].socket.getsockname()[1]
            url = f"http://127.0.0.1:{port}"
            rc = await trio.to_thread.run_sync(parity.main, ["--a", url, "--b", url, "--golden", str(path)])
            nursery.cancel_scope.cancel()
    err = capsys.readouterr().err
    assert rc == 2
    assert "endpoint A" in err and "rejected the API key (HTTP 401: Incorrect API key provided)" in err
