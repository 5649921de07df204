"""`spotinference demo`, run as a user runs it: one request wakes a sleeping tier; the timeline is printed."""

from __future__ import annotations

import re
import subprocess
import sys


def test_demo_prints_a_wake_timeline() -> None:
    proc = subprocess.run([sys.executable, "-m", "proxy", "demo", "--boot-delay-s", "0.4", "--idle-s", "0.5"],
                          check=False, capture_output=True, text=True, timeout=90)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "HTTP 200" in out and "x-spotinference-wake-ms: " in out
    events = re.findall(r"t\+\s*([\d.]+) s  (request in|StartInstances|running|vLLM listening|healthy|first byte|"
                        r"StopInstances)", out)
    names = [name for _, name in events]
    assert names == ["request in", "StartInstances", "running", "vLLM listening", "healthy", "first byte",
                     "StopInstances"]
    times = [float(t) for t, _ in events]
    assert times == sorted(times) and times[3] - times[2] >= 0.4  # the boot delay
    assert "wakes_total=1" in out and "stops_total=1" in out
    # ... then what it cost: the spot price (moto's) x the GPU time, shared by the two keys' tokens
    cost = out[out.index("spotinference usage --cost"):]
    assert re.search(r"alice\s.*\s2\s", cost) and re.search(r"bob\s.*\s1\s", cost), cost
    assert "cost: tier gpu:" in cost and "GPU host-hours" in cost
    assert "price: $1e-05/h (spot:us-east-1a)" in cost, cost  # the price the GPU time was charged at


def test_demo_rejects_bad_arguments() -> None:
    proc = subprocess.run([sys.executable, "-m", "proxy", "demo", "--budget-s", "10", "--hard-cap-s", "5"],
                          check=False, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "budget <= hard cap" in proc.stderr
