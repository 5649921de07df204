"""`python -m loadtest.floor`: the floor proxy and the gateway, measured side by side, end to end.

Strategy: the real command as a subprocess (one 1 s slice each), then its output: both rows with a CPU
figure and zero errors, the gateway's own share named; no process it started survives it. The numbers
themselves are never compared with a threshold.
"""

from __future__ import annotations

import re
import sys

from loadtest import procs
from tests.support.processes import run_harness


def test_floor_and_gateway_are_measured_side_by_side(tmp_path):
    workdir = tmp_path / "work"
    done = run_harness([sys.executable, "-m", "loadtest.floor", "--rounds", "1", "--workdir", str(workdir)],
                       tmp_path, workdir, timeout=120)
    out = done.stdout()
    assert done.returncode == 0, out + done.stderr()
    for name in ("floor", "gateway"):
        assert re.search(rf"^\s+{name}\s+[\d.]+ us CPU per request\s+[\d,]+ req/s\s+errors 0$", out, re.MULTILINE), out
    assert "the gateway's own code:" in out
    assert procs.marked_pids(workdir) == []
