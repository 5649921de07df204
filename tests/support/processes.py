"""The one way a test runs a child process that lives longer than one call: `Proc`.

Strategy: a child is started with `subprocess.Popen` in its own session (one process group, so a
supervisor's workers can be killed with it), stdin from /dev/null and stdout and stderr each to its own
file under the test's directory -- never to a pipe, so however much a chatty child writes it cannot
block, and nothing has to be read while the test runs. Readiness is the child's own word: `sim` and
`serve` print one `... listening on http://HOST:PORT` line on stdout (flushed; port 0 prints the real
port), which `wait_listening` polls the stdout file for with a bounded wait, failing at once if the
child exits first. Stopping is always bounded: the signal (SIGTERM unless told), a bounded wait, then
SIGKILL to the whole group; `close()` does that whatever happened, and the context managers here call
it on the way out, a failing test included. Every failure message carries the tail of the child's
stdout and stderr (`logs()`).

- `start(argv, log_dir)`: a context manager around a `Proc` (waits for the listening line unless
  `listening=False`).
- `started(argv, log_dir)`: the same for trio tests -- the waits run in a worker thread, so the test's
  event loop (which may serve the child: a moto tap, a fleet of simulated hosts) keeps running; the
  stop is shielded from the test's cancellation.
- `run_to_end(argv, log_dir, timeout=...)`: a command that runs to completion (a benchmark, locust):
  its exit status and both outputs, the group killed if it overstays. (`subprocess.run` with
  `capture_output=True` remains fine for short commands.)
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Self

import trio

SPOT = [sys.executable, "-m", "proxy"]
"""`spotinference` as this interpreter runs it: prefix for `python -m proxy ARGS`."""

LISTENING = re.compile(r"listening on (http://\S+)")


def spotinference(*args: str) -> list[str]:
    """The argv of `spotinference ARGS` (`python -m proxy ARGS` from this interpreter)."""
    return [*SPOT, *args]


def _fresh(log_dir: Path, name: str) -> Path:
    """`log_dir/name`, or `name-2`, `name-3`, ... if a process of that name already ran in this test."""
    base, n = name, 1
    while (log_dir / f"{name}.stdout").exists() or (log_dir / f"{name}.stderr").exists():
        n += 1
        name = f"{base}-{n}"
    return log_dir / name


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


class Proc:
    """A started child process and its process group; stdout and stderr in files next to each other.

    `url` and `port` are filled by `wait_listening`. Nothing here blocks without a bound.
    """

    def __init__(self, argv: list[str], log_dir: Path, name: str | None = None, *, env: dict | None = None,
                 cwd: Path | str | None = None) -> None:
        self.argv = list(argv)
        self.name = name or Path(argv[0]).name
        stem = _fresh(Path(log_dir), self.name)
        self.stdout_path = stem.with_name(stem.name + ".stdout")
        self.stderr_path = stem.with_name(stem.name + ".stderr")
        child_env = {**(os.environ if env is None else env), "PYTHONUNBUFFERED": "1"}
        with open(self.stdout_path, "wb") as out, open(self.stderr_path, "wb") as err:
            self.popen = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                          start_new_session=True, env=child_env, cwd=cwd)
        self.url = ""
        self.port = 0

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def returncode(self) -> int | None:
        return self.popen.poll()

    # -- output -----------------------------------------------------------------------------------

    def stdout(self) -> str:
        return _read(self.stdout_path)

    def stderr(self) -> str:
        return _read(self.stderr_path)

    def logs(self, n_chars: int = 3000) -> str:
        """The tails of stdout and stderr, labelled: for assertion messages."""
        state = "running" if self.returncode is None else f"exit status {self.returncode}"
        return (f"--- {self.name} ({state}), stdout {self.stdout_path}:\n{self.stdout()[-n_chars:]}\n"
                f"--- stderr {self.stderr_path}:\n{self.stderr()[-n_chars:]}")

    def events(self, name: str) -> list[dict]:
        """The JSON log lines on stderr whose "event" is `name`."""
        out = []
        for line in self.stderr().splitlines():
            if line.startswith("{") and f'"{name}"' in line:
                with contextlib.suppress(ValueError):
                    rec = json.loads(line)
                    if rec.get("event") == name:
                        out.append(rec)
        return out

    # -- life -------------------------------------------------------------------------------------

    def wait_listening(self, timeout: float = 30.0) -> str:
        """Poll stdout for the `listening on http://HOST:PORT` line (bounded); fill `url` and `port`."""
        deadline = time.monotonic() + timeout
        while True:
            match = LISTENING.search(self.stdout())
            if match:
                self.url = match.group(1).rstrip("/")
                self.port = int(self.url.rsplit(":", 1)[1])
                return self.url
            if self.returncode is not None:
                raise AssertionError(f"{self.name} exited before it listened\n{self.logs()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.name} printed no listening line within {timeout:g} s\n{self.logs()}")
            time.sleep(0.02)

    def send(self, sig: int) -> None:
        self.popen.send_signal(sig)

    def wait(self, timeout: float = 40.0) -> int:
        """The exit status, waiting at most `timeout` seconds (then AssertionError, with the logs)."""
        try:
            return self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{self.name} still running after {timeout:g} s\n{self.logs()}") from None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 40.0) -> int:
        """Signal, wait (bounded), return the exit status; SIGKILL to the group past the bound."""
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.popen.send_signal(sig)
            try:
                self.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.kill_group()
                self.popen.wait(timeout=10)
        return self.popen.returncode

    def kill_group(self) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.popen.pid, signal.SIGKILL)

    def close(self, timeout: float = 20.0) -> None:
        """Whatever happened: SIGTERM and a bounded wait if still running, then nothing of the group
        survives (SIGKILL to it: workers that outlived their parent included)."""
        try:
            if self.popen.poll() is None:
                self.stop(signal.SIGTERM, timeout=timeout)
        finally:
            self.kill_group()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(timeout=10)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@contextlib.contextmanager
def start(argv: list[str], log_dir: Path, name: str | None = None, *, env: dict | None = None,
          cwd: Path | str | None = None, listening: bool = True, startup_s: float = 30.0) -> Iterator[Proc]:
    """Run `argv` for the duration of the block; with `listening`, first wait for its URL."""
    proc = Proc(argv, log_dir, name, env=env, cwd=cwd)
    try:
        if listening:
            proc.wait_listening(startup_s)
        yield proc
    finally:
        proc.close()


@contextlib.asynccontextmanager
async def started(argv: list[str], log_dir: Path, name: str | None = None, *, env: dict | None = None,
                  cwd: Path | str | None = None, listening: bool = True,
                  startup_s: float = 30.0) -> AsyncIterator[Proc]:
    """`start` for a trio test: every wait runs in a thread, so the test's loop keeps serving."""
    proc = Proc(argv, log_dir, name, env=env, cwd=cwd)
    try:
        if listening:
            await trio.to_thread.run_sync(proc.wait_listening, startup_s)
        yield proc
    finally:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(proc.close)


def run_to_end(argv: list[str], log_dir: Path, name: str | None = None, *, timeout: float,
               env: dict | None = None, cwd: Path | str | None = None) -> Proc:
    """Run a command to completion (at most `timeout` seconds, then AssertionError with its logs);
    its group is killed either way. Read `returncode`, `stdout()` and `stderr()` afterwards."""
    proc = Proc(argv, log_dir, name, env=env, cwd=cwd)
    try:
        proc.wait(timeout)
    finally:
        proc.close(timeout=5.0)
    return proc


def run_harness(argv: list[str], log_dir: Path, workdir: Path, *, timeout: float) -> Proc:
    """A load-test harness (`bench ...`, `python -m loadtest.floor`) run to completion with `run_to_end`;
    then every process it started under `workdir` (loadtest/procs.py marks them) is killed for sure,
    so a failing run leaves nothing behind. The caller asserts none was left: that is the check."""
    from loadtest import procs

    try:
        return run_to_end(argv, log_dir, "bench", timeout=timeout)
    finally:
        for pid in procs.marked_pids(workdir):  # children die with the harness; make sure of it
            os.kill(pid, signal.SIGKILL)
