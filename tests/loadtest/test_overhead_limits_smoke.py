"""Smoke test of `spotinference bench overhead --quick --limits`: the limited-key cells run, with zero errors.

Strategy: the same subprocess run as tests/loadtest/test_overhead_smoke.py (its `run_quick`, with its
timeout, here with `--limits --no-nginx`), then check the JSON's "limits" rows: each cell present, both
gateways' added latency and CPU per request there, the redis-table differences and redis-server's own
CPU filled in, zero errors, and no process of the run left behind. Skipped, with the reason, when
redis-server is not installed (the bench then only notes it). Never a wall-clock threshold: the numbers
are only checked to exist.
"""

from __future__ import annotations

import pytest

from loadtest import overhead_limits, procs
from tests.loadtest.test_overhead_smoke import run_quick

pytestmark = pytest.mark.skipif(overhead_limits.redis_binary() is None,
                                reason="redis-server is not installed (apt-get install redis-server)")


def test_quick_limits_runs_clean_and_reports_both_gateways(tmp_path):
    done, report = run_quick(tmp_path, "--limits", "--no-nginx")
    assert done.returncode == 0, done.logs()
    assert procs.marked_pids(tmp_path / "work") == [], "a process of the run outlived it"
    stdout = done.stdout()
    assert "--limits" in stdout and "redis-table" in stdout
    assert "errors: 0" in stdout

    assert report is not None and report["errors"] == 0
    info = report["meta"]["limits"]
    assert info["workers"] == 2 and info["key"]["rpm"] == overhead_limits.KEY_RPM
    rows = {row["id"]: row for row in report["rows"] if row["kind"] == "limits"}
    assert set(rows) == {row_id for row_id, _, _ in overhead_limits.CELLS}
    for row_id, row in rows.items():
        assert row["errors"] == 0, row_id
        targets = row["targets"]
        assert set(targets) == {"direct", *overhead_limits.SIDES}
        for name, summary in targets.items():
            assert summary["n"] > 0 and summary["errors"] == 0, (row_id, name)
            dist = summary["latency_ms"]
            assert dist["p50"] <= dist["p95"] <= dist["p99"]
        for side in overhead_limits.SIDES:
            assert set(row["added"][side]) == {"p50", "p95", "p99"}, (row_id, side)
            assert targets[side]["cpu_us_per_req"] is not None, (row_id, side)
        diff = row["redis_minus_table"]
        assert all(diff[k] is not None for k in ("p50", "p95", "cpu_us_per_req")), row_id
        server = row["redis_server"]
        assert server["n"] == targets["gateway-redis"]["n"]
        assert server["cpu_s"] > 0 and server["cpu_us_per_req"] is not None, row_id
    # The main table's rows are still there, and none of them is a limits row.
    assert {"chat_c1", "sat_chat", "idle_10k"} <= {row["id"] for row in report["rows"]}
