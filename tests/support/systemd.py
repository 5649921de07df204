"""`systemd-analyze verify` for unit files a test wrote (tests/ops/test_systemd.py, tests/backends/test_render.py)."""

from __future__ import annotations

import subprocess
from pathlib import Path


def verify_units(paths: list[Path]) -> list[str]:
    """`systemd-analyze verify` findings, minus 'not executable' (nothing is installed in a test)."""
    proc = subprocess.run(["systemd-analyze", "verify", *map(str, paths)], capture_output=True, text=True,
                          timeout=30, check=False)
    return [line for line in (proc.stdout + proc.stderr).splitlines()
            if line.strip() and "is not executable" not in line]
