"""Node clients for the e2e tests: the packages of tests/node/ installed once, its scripts run bounded.

Strategy:
- `node_packages()` makes tests/node/node_modules match tests/node/package-lock.json, or skips the
  test with the reason. No `node` or `npm` on the PATH (or a Node older than the packages' engines):
  skip. Installed already -- a stamp file inside node_modules holds the sha256 of the lock file it was
  installed from -- nothing to do: one install per checkout, whatever number of pytest processes. Else
  `npm ci --no-audit --no-fund` under an exclusive file lock (tests/node/.npm-ci.lock, outside
  node_modules because `npm ci` deletes that folder), so two pytest processes never install at the
  same time; the one that waited finds the stamp and returns. The install runs in its own session with
  a bound (`INSTALL_TIMEOUT_S`, npm's own fetch timeout and retries cut short) and its whole process
  group is killed if it overstays. An install that fails because the registry cannot be reached, or
  that runs out of time, skips (a sandbox without network is not a product failure); any other npm
  failure fails the test with npm's output.
- `run_script(name, env, timeout=...)` runs `node tests/node/<name>.mjs` (trio: the test's event loop,
  which serves the gateway, keeps running), with the environment the scripts read (BASE_URL, API_KEY,
  MODEL, API, ...), and returns the JSON document the script printed last on stdout. A non-zero exit or
  output that is not JSON is an AssertionError carrying the script's stderr and stdout. The script runs
  in its own session; on the timeout (or any cancellation) its process group is killed and reaped.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import trio

NODE_DIR = Path(__file__).resolve().parents[1] / "node"
LOCK_FILE = NODE_DIR / "package-lock.json"
MODULES = NODE_DIR / "node_modules"
STAMP = MODULES / ".spotinference-installed"
INSTALL_LOCK = NODE_DIR / ".npm-ci.lock"
INSTALL_TIMEOUT_S = 300.0
MIN_NODE = 18  # the pinned packages' engines: node >= 18

# npm's messages for a registry it cannot reach (DNS, refused, reset, timeouts, proxies, offline cache).
_UNREACHABLE = re.compile(
    r"ENOTFOUND|EAI_AGAIN|ECONNREFUSED|ECONNRESET|ETIMEDOUT|ESOCKETTIMEDOUT|ENETUNREACH|EHOSTUNREACH"
    r"|ENOTCACHED|ERR_SOCKET_TIMEOUT|network request|request to \S+ failed|getaddrinfo|proxy|socket hang up"
    r"|self.signed certificate|unable to get local issuer certificate|CERT_",
    re.IGNORECASE)

_installed = False


def _lock_digest() -> str:
    return hashlib.sha256(LOCK_FILE.read_bytes()).hexdigest()


def _stamped(digest: str) -> bool:
    try:
        return STAMP.read_text().strip() == digest
    except OSError:
        return False


def _tail(text: str, n: int = 4000) -> str:
    return text if len(text) <= n else "..." + text[-n:]


def _kill_group(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(Exception):
        proc.wait(timeout=10)


def _node_major(node: str) -> int | None:
    try:
        out = subprocess.run([node, "--version"], capture_output=True, text=True, timeout=30, check=False)
        return int(out.stdout.strip().lstrip("v").split(".")[0])
    except (OSError, ValueError, subprocess.TimeoutExpired):
        return None


def _flock(fd: int, deadline: float) -> None:
    """An exclusive lock on `fd`, polled until `deadline` (then skip: another install holds it)."""
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() > deadline:
                pytest.skip(f"another process held {INSTALL_LOCK} (npm ci) for over {INSTALL_TIMEOUT_S:.0f} s")
            time.sleep(0.2)


def _npm_ci(npm: str, deadline: float) -> None:
    env = {**os.environ, "npm_config_fetch_timeout": "30000", "npm_config_fetch_retries": "1",
           "npm_config_update_notifier": "false", "npm_config_progress": "false"}
    proc = subprocess.Popen([npm, "ci", "--no-audit", "--no-fund", "--prefer-offline"], cwd=NODE_DIR, env=env,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=max(deadline - time.monotonic(), 1.0))
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        pytest.skip(f"npm ci in {NODE_DIR} did not finish in {INSTALL_TIMEOUT_S:.0f} s "
                    "(registry unreachable or slow); the Node client tests need tests/node/node_modules")
    finally:
        if proc.poll() is None:
            _kill_group(proc)
    if proc.returncode != 0:
        if _UNREACHABLE.search(out):
            first = next((line for line in out.splitlines() if _UNREACHABLE.search(line)), "")
            pytest.skip(f"npm ci could not reach the registry ({first.strip()[:200]}); "
                        "the Node client tests need tests/node/node_modules")
        pytest.fail(f"npm ci in {NODE_DIR} failed (exit {proc.returncode}):\n{_tail(out)}", pytrace=False)


def node_packages() -> Path:
    """tests/node with its node_modules installed from the lock file; skips the test when that cannot be."""
    global _installed
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        missing = " and ".join(n for n, p in (("node", node), ("npm", npm)) if p is None)
        pytest.skip(f"{missing} not on PATH: the Vercel AI SDK tests run Node (Debian: apt-get install nodejs npm)")
    if _installed:
        return NODE_DIR
    major = _node_major(node)
    if major is None or major < MIN_NODE:
        pytest.skip(f"{node} is Node {major}; the pinned AI SDK needs Node >= {MIN_NODE}")
    digest = _lock_digest()
    if not _stamped(digest):
        deadline = time.monotonic() + INSTALL_TIMEOUT_S
        fd = os.open(INSTALL_LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            _flock(fd, deadline)
            if not _stamped(digest):  # the process we waited for may have installed it
                _npm_ci(npm, deadline)
                STAMP.write_text(digest + "\n")
        finally:
            os.close(fd)  # releases the lock
    _installed = True
    return NODE_DIR


async def _kill_on_cancel(process: trio.Process) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)


async def run_script(name: str, env: dict[str, str], timeout: float = 60.0) -> dict:
    """Run `node tests/node/<name>.mjs` with `env` added to this environment; its last stdout line as JSON."""
    node_packages()
    script = NODE_DIR / f"{name}.mjs"
    assert script.is_file(), f"no script {script}"
    child_env = {**os.environ, "NO_COLOR": "1", **{k: str(v) for k, v in env.items()}}
    try:
        with trio.fail_after(timeout):
            done = await trio.run_process(
                [shutil.which("node") or "node", str(script)], cwd=NODE_DIR, env=child_env,
                stdin=subprocess.DEVNULL, capture_stdout=True, capture_stderr=True, check=False,
                start_new_session=True, deliver_cancel=_kill_on_cancel)
    except trio.TooSlowError:
        raise AssertionError(f"node {name}.mjs did not finish in {timeout} s (killed)") from None
    stdout = done.stdout.decode(errors="replace")
    stderr = done.stderr.decode(errors="replace")
    shown = {k: ("..." if k == "API_KEY" else v) for k, v in env.items()}
    where = f"node {name}.mjs (env {shown})\n--- stderr ---\n{_tail(stderr)}\n--- stdout ---\n{_tail(stdout)}"
    assert done.returncode == 0, f"exit {done.returncode}: {where}"
    lines = [line for line in stdout.splitlines() if line.strip()]
    try:
        return json.loads(lines[-1])
    except (IndexError, ValueError):
        raise AssertionError(f"no JSON on the last stdout line: {where}") from None
