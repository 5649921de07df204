"""`spotinference usage` over a real SQLite file written through proxy.usage.log."""

from __future__ import annotations

import csv
import io
import json
import sqlite3
import time

import pytest

from proxy.commands import usage as cmd_usage
from proxy.usage.log import UsageRow, connect, insert_rows

HOUR = 3600.0


@pytest.fixture
def db(tmp_path) -> str:
    path = str(tmp_path / "usage.sqlite3")
    now = time.time()
    rows = []
    # alice: 10 recent requests on h100x2 (latencies 10..100 ms), one a 429, one a 499 estimate.
    for i in range(10):
        status = 429 if i == 3 else 499 if i == 7 else 200
        rows.append(UsageRow(
            ts=now - HOUR, request_id=f"a{i}", key_name="alice", model="qwen3-coder", tier="h100x2",
            endpoint="/v1/chat/completions", stream=True, status=status,
            prompt_tokens=None if status == 429 else 100, completion_tokens=None if status == 429 else 10 * i,
            total_tokens=None, estimated=status == 499, latency_ms=10.0 * (i + 1),
        ))
    # bob: 2 recent on a100x2 and 3 old ones (3 days ago) on h100x2.
    for i in range(2):
        rows.append(UsageRow(ts=now - 2 * HOUR, request_id=f"b{i}", key_name="bob", model="llama",
                             tier="a100x2",
                             endpoint="/v1/completions", status=200, prompt_tokens=7, completion_tokens=3,
                             latency_ms=5.0))
    for i in range(3):
        rows.append(UsageRow(ts=now - 72 * HOUR, request_id=f"old{i}", key_name="bob", model="qwen3-coder",
                             tier="h100x2", endpoint="/v1/chat/completions", status=502, latency_ms=None))
    conn = connect(path)
    insert_rows(conn, rows)
    conn.close()
    return path


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = cmd_usage.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_json_by_key_all_time(db, capsys) -> None:
    code, out, err = run(capsys, "--db", db, "--format", "json")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["by"] == "key" and doc["since_s"] is None
    alice, bob = doc["groups"]
    assert alice == {"key": "alice", "requests": 10, "errors": 2, "prompt_tokens": 900,
                     "completion_tokens": 420, "estimated": 1, "p50_ms": 50.0, "p95_ms": 100.0}
    assert bob["requests"] == 5 and bob["errors"] == 3 and bob["p50_ms"] == 5.0 and bob["p95_ms"] == 5.0


def test_since_filters_old_rows(db, capsys) -> None:
    code, out, _ = run(capsys, "--db", db, "--since", "24h", "--format", "json")
    assert code == 0
    groups = {g["key"]: g for g in json.loads(out)["groups"]}
    assert groups["bob"]["requests"] == 2 and groups["bob"]["errors"] == 0
    code, out, _ = run(capsys, "--db", db, "--since", "30m", "--format", "json")
    assert json.loads(out)["groups"] == []
    code, out, _ = run(capsys, "--db", db, "--since=7d", "--format", "json")
    assert sum(g["requests"] for g in json.loads(out)["groups"]) == 15


def test_csv_by_model_and_by_tier(db, capsys) -> None:
    code, out, _ = run(capsys, "--db", db, "--by", "model", "--format", "csv")
    assert code == 0
    rows = list(csv.DictReader(io.StringIO(out)))
    assert [r["model"] for r in rows] == ["qwen3-coder", "llama"]
    assert rows[0]["requests"] == "13" and rows[0]["errors"] == "5"
    assert rows[1] == {"model": "llama", "requests": "2", "errors": "0", "prompt_tokens": "14",
                       "completion_tokens": "6", "estimated": "0", "p50_ms": "5.0", "p95_ms": "5.0"}
    code, out, _ = run(capsys, "--db", db, "--by", "tier", "--format", "csv", "--since", "1d")
    rows = list(csv.DictReader(io.StringIO(out)))
    assert {r["tier"]: r["requests"] for r in rows} == {"h100x2": "10", "a100x2": "2"}


def test_table_default(db, capsys) -> None:
    code, out, _ = run(capsys, "--db", db, "--since", "24h")
    assert code == 0
    assert "usage by key, last 24h" in out
    assert "alice" in out and "bob" in out and "total" in out
    assert "100.0" in out  # alice's p95
    assert "12" in out  # total requests in the window


def test_missing_and_corrupt_databases_exit_2(tmp_path, capsys) -> None:
    code, _, err = run(capsys, "--db", str(tmp_path / "nope.sqlite3"))
    assert code == 2 and "no usage database" in err and "Traceback" not in err
    assert not (tmp_path / "nope.sqlite3").exists()  # a report never creates a database
    bad = tmp_path / "bad.sqlite3"
    bad.write_bytes(b"this is not sqlite" * 100)
    code, _, err = run(capsys, "--db", str(bad))
    assert code == 2 and "not a readable usage database" in err
    other = tmp_path / "other.sqlite3"
    with sqlite3.connect(other) as c:
        c.execute("CREATE TABLE t (x)")
    code, _, err = run(capsys, "--db", str(other))
    assert code == 2 and "not a readable usage database" in err


def test_bad_arguments_exit_2(db, capsys) -> None:
    assert run(capsys, "--db", db, "--since", "yesterday")[0] == 2
    assert run(capsys, "--db", db, "--by", "colour")[0] == 2
    assert run(capsys)[0] == 2
    assert run(capsys, "--help")[0] == 0


def test_parse_since() -> None:
    assert cmd_usage.parse_since("30m") == 1800
    assert cmd_usage.parse_since("24h") == 86400
    assert cmd_usage.parse_since("7d") == 7 * 86400
    assert cmd_usage.parse_since("1d12h") == 36 * 3600
    with pytest.raises(ValueError):
        cmd_usage.parse_since("12")
