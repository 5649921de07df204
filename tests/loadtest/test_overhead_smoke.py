"""Smoke test of `spotinference bench overhead --quick`: it runs end to end, with zero errors.

Strategy: run the harness exactly as CI and users do -- a subprocess of the real command -- with a
work directory under tmp_path, then check the JSON's shape and that the table was printed. Never a
wall-clock threshold: the numbers are only checked to exist. nginx is used when installed and its
absence is reported, not failed; the gateway (`spotinference serve`) and the sim must be present.
Afterwards no process started by the run may survive (they carry a marker in their environment).
"""

from __future__ import annotations

import json
import sys

from loadtest import procs
from tests.support.processes import Proc, run_harness

RUN_TIMEOUT_S = 300


def run_quick(tmp_path, *extra: str) -> tuple[Proc, dict | None]:
    """The harness run (`--quick`, then `extra` arguments) to completion under tests/support/processes.py
    (stdout and stderr to files, never an unread pipe; its process group killed if it overstays), then
    every marked child of the run killed for sure."""
    out = tmp_path / "bench.json"
    workdir = tmp_path / "work"
    argv = [sys.executable, "-m", "proxy", "bench", "overhead", "--quick", *extra, "--json", str(out),
            "--workdir", str(workdir)]
    done = run_harness(argv, tmp_path, workdir, timeout=RUN_TIMEOUT_S)
    return done, (json.loads(out.read_text()) if out.exists() else None)


def test_quick_mode_runs_clean_and_reports(tmp_path):
    done, report = run_quick(tmp_path)
    assert done.returncode == 0, done.logs()
    assert procs.marked_pids(tmp_path / "work") == [], "a process of the run outlived it"

    # The one table and its verdict line.
    stdout = done.stdout()
    assert "spotinference bench overhead" in stdout
    assert "+gateway" in stdout
    assert "errors: 0" in stdout

    assert report is not None
    assert report["errors"] == 0
    meta = report["meta"]
    for key in ("date", "mode", "machine", "versions", "plan"):
        assert key in meta
    assert meta["mode"] == "quick"
    with_nginx = report["nginx"]
    assert with_nginx == (procs.nginx_binary() is not None)

    rows = {row["id"]: row for row in report["rows"]}
    expected = {"chat_c1", "chat_c16", "chat_open100", "ttfb_c1", "ttfb_open100", "sse_20", "sat_chat",
                "sat_sse", "streams_1000", "idle_10k", "sse_responses_20", "sse_messages_20",
                "sat_sse_responses", "sat_sse_messages"}
    assert expected <= set(rows)
    for row in rows.values():
        assert row["errors"] == 0, row["id"]
        targets = row["targets"]
        if row["kind"] == "throughput":
            assert row["metric"] in ("rate_per_s", "events_per_s")
            for name, summary in targets.items():
                assert summary[row["metric"]] > 0, (row["id"], name)
            continue
        assert set(targets) >= {"direct", "gateway"} | ({"nginx"} if with_nginx else set())
        proxies = {"gateway", "nginx"} if with_nginx else {"gateway"}
        assert set(row["added"]) == proxies
        for name, summary in targets.items():
            assert summary["n"] > 0 and summary["errors"] == 0, (row["id"], name)
            dist = summary[row["metric"]]
            assert dist["p50"] <= dist["p95"] <= dist["p99"]
        for name in proxies:
            assert set(row["added"][name]) == {"p50", "p95", "p99"}
    # CPU accounting of the gateway came back for requests and for relayed events.
    assert rows["chat_c1"]["targets"]["gateway"]["cpu_us_per_req"] is not None
    assert rows["sse_20"]["targets"]["gateway"]["cpu_us_per_event"] is not None
    for api in ("responses", "messages"):  # the other streaming APIs, side by side with chat's
        assert rows[f"sat_sse_{api}"]["targets"]["gateway"]["cpu_us_per_event"] is not None
    idle = rows["idle_10k"]["idle"]
    assert idle["opened"] == idle["requested"] == idle["open_at_end"]
    assert idle["rss_bytes_per_conn"] is not None
