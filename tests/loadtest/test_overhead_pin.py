"""`spotinference bench overhead --pin`: the proxies under test measured alone on a core of their own.

Strategy: three layers, cheapest first. (1) `procs.launch(..., cpus=...)` really pins a child: a short
`python -c` started through it prints its own affinity (reading a running gateway's mask from the
outside would race its start). (2) Pure functions: the pinned subset of a plan and the progress total
`steps` counts for it, the CPU split, and the report (a `_pin` row renders with its " [pinned]" label,
not eaten as rich markup; the `_w2` row still reads its gateway-w2 column; the Markdown header names the
pinning). (3) The real command, `--quick --pin --no-nginx`, through tests/loadtest/test_overhead_smoke.py's
`run_quick`: the JSON has every pinned row with measurements and zero errors, meta["pin"] names disjoint
CPU sets, and no process of either rig outlives the run. (1) and (3) are skipped, with the reason, on a
machine with fewer than 2 usable CPUs. Never a wall-clock threshold.
"""

from __future__ import annotations

import os
import signal
import sys

import pytest
from rich.console import Console

from loadtest import procs
from loadtest.overhead import pin_split
from loadtest.overhead_cells import PIN_ID, PIN_LABEL, Plan, pinned_ids, steps
from loadtest.overhead_report import markdown, pin_text, render, table_rows
from tests.loadtest.test_overhead_smoke import run_quick

needs_two_cpus = pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2,
                                    reason="--pin needs 2 usable CPUs; this process may use fewer")
PRINT_AFFINITY = "import os; print(sorted(os.sched_getaffinity(0)))"


def _affinity_of_child(tmp_path, name: str, cpus: set[int] | None) -> str:
    proc = procs.launch(name, [sys.executable, "-c", PRINT_AFFINITY], tmp_path, cpus=cpus)
    try:
        assert proc.popen.wait(30) == 0, proc.log_tail()
    finally:
        proc.stop()
    return proc.log_tail().strip()


@needs_two_cpus
def test_launch_with_cpus_pins_the_child(tmp_path):
    assert _affinity_of_child(tmp_path, "pinned", {0}) == "[0]"
    # Without `cpus` the child may run wherever this process may.
    assert _affinity_of_child(tmp_path, "free", None) == str(procs.usable_cpus())


@needs_two_cpus
def test_pinned_to_moves_this_process_and_restores_it():
    before = os.sched_getaffinity(0)
    other = {procs.usable_cpus()[-1]}
    with procs.pinned_to(other):
        assert os.sched_getaffinity(0) == other
    assert os.sched_getaffinity(0) == before


def test_pin_split_and_usable_cpus():
    assert procs.usable_cpus() == sorted(os.sched_getaffinity(0))
    assert pin_split([0, 1]) == ({0}, {1})
    assert pin_split([2, 5, 7]) == ({2}, {5, 7})
    assert pin_split([3]) is None


@pytest.mark.parametrize("plan", [Plan.quick(), Plan.full(3.0)], ids=["quick", "full"])
def test_pinned_subset_and_its_step_count(plan):
    top_c, top_rate = max(plan.concurrency), plan.rates[-1]
    assert pinned_ids(plan) == {"chat_c1", f"chat_c{top_c}", "ttfb_c1", f"ttfb_open{top_rate:g}",
                                *(f"sse_{n}" for n in plan.sse_streams), "sat_chat", "sat_sse"}
    # Headers: the chat, TTFB, SSE gap and saturation sections; one line per latency cell.
    latency_cells = len(pinned_ids(plan)) - 2
    assert steps(plan, pinned=True) == 4 + latency_cells
    # The shared-core total is what it always was: 7 headers and every cell.
    other_apis = 2 * len(plan.sse_streams[1:2] or plan.sse_streams[:1])
    assert steps(plan) == 7 + 2 * len(plan.rates) + len(plan.concurrency) + 1 + len(plan.sse_streams) + other_apis


def test_full_plan_pins_the_high_loads():
    ids = pinned_ids(Plan.full(3.0))
    assert {"chat_c64", "ttfb_open1000", "sse_100", "sse_200"} <= ids


def _throughput(row_id: str, label: str, targets: dict) -> dict:
    return {"id": row_id, "label": label, "kind": "throughput", "metric": "rate_per_s", "targets": targets,
            "ratio": None, "budget": None, "errors": 0, "note": ""}


def test_report_shows_pinned_rows_and_names_the_cpus():
    meta = {"date": "today", "mode": "quick", "pin": {"proxies": [0], "sims_and_load": [1]},
            "machine": {"cpus": 2, "cpu_model": "x", "kernel": "k", "loadavg_start": [0.0]},
            "versions": {k: "v" for k in ("spotinference", "commit", "python", "trio", "h11", "nginx")}}
    rows = [
        _throughput("sat_chat_w2", "max chat req/s, 2 workers", {"gateway-w2": {"rate_per_s": 222.0}}),
        _throughput("sat_chat" + PIN_ID, "max chat req/s, 64 conns" + PIN_LABEL,
                    {"direct": {"rate_per_s": 900.0}, "gateway": {"rate_per_s": 333.0}}),
    ]
    cells = table_rows(rows)
    assert cells[0][3] == "222" and cells[1][1:4] == ["900", "-", "333"]
    console = Console(record=True, width=200)
    render(rows, meta, [], console)
    text = console.export_text()
    assert "max chat req/s, 64 conns [pinned]" in text
    assert pin_text(meta) in text.replace("\n", " ")
    md = markdown(rows, meta, [], "spotinference bench overhead --pin")
    assert pin_text(meta) in md and "| max chat req/s, 64 conns [pinned] |" in md
    assert pin_text({**meta, "pin": None}) is None


@needs_two_cpus
def test_quick_pin_runs_clean_and_reports_pinned_rows(tmp_path):
    pinned_dir = tmp_path / "work" / "pinned"  # the pinned rig's logs and the marker of its processes
    try:
        done, report = run_quick(tmp_path, "--pin", "--no-nginx")
        assert done.returncode == 0, done.logs()
        assert procs.marked_pids(tmp_path / "work") == [], "a process of the shared rig outlived the run"
        assert procs.marked_pids(pinned_dir) == [], "a process of the pinned rig outlived the run"
    finally:
        for pid in procs.marked_pids(pinned_dir):
            os.kill(pid, signal.SIGKILL)
    assert "[pinned]" in done.stdout() and "errors: 0" in done.stdout()

    assert report is not None and report["errors"] == 0
    pin = report["meta"]["pin"]
    assert pin["proxies"] and pin["sims_and_load"]
    assert not set(pin["proxies"]) & set(pin["sims_and_load"])
    rows = {row["id"]: row for row in report["rows"]}
    plan = Plan.quick()
    assert {f"{i}{PIN_ID}" for i in pinned_ids(plan)} == {i for i in rows if i.endswith(PIN_ID)}
    assert pinned_ids(plan) <= set(rows), "the shared-core rows are still there"
    for row_id in pinned_ids(plan):
        row = rows[row_id + PIN_ID]
        assert row["label"] == rows[row_id]["label"] + PIN_LABEL
        assert row["errors"] == 0, row_id
        assert set(row["targets"]) == {"direct", "gateway"}, row_id  # no nginx, no 2-worker gateway
        for name, summary in row["targets"].items():
            if row["kind"] == "throughput":
                assert summary[row["metric"]] > 0, (row_id, name)
            else:
                assert summary["n"] > 0 and summary["errors"] == 0, (row_id, name)
    assert "2 cores here are shared" not in rows["sat_chat" + PIN_ID]["note"]
    assert "own" in rows["sat_chat" + PIN_ID]["note"]
