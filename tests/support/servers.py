"""Real Redis and PostgreSQL servers for the tests: Debian's `redis-server` and a throwaway PostgreSQL
cluster (`initdb` + `pg_ctl` into a temp folder), on free loopback ports, stopped after.

Strategy: one server of each per test session (fixtures `redis_server`, `postgres_server`; starting a
PostgreSQL cluster costs a second or two), and isolation per test instead: `redis_db` hands each test
a flushed logical database URL, `pg_url` a database of its own (CREATE DATABASE, dropped after). A test
that stops a server (an outage under traffic) asks for its own with `fresh_redis` / `fresh_postgres`:
`stop()` and `start()` bring it down and back on the same port and data, so clients see a real outage
and a real recovery. Nothing here is faked: the gateway's RESP client and psycopg talk to the real
servers over TCP on 127.0.0.1.

PostgreSQL refuses to run as root, so when the tests run as root the cluster belongs to Debian's
`postgres` user (the package creates it) and every server command runs through `runuser`; the data
folder is a fresh 0700 folder in /tmp handed to that user (pytest's own tmp folders are 0700 root
and not traversable by it). A machine without the packages skips these tests with the command that
installs them; `.ci/run` installs them, so CI never skips.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

INSTALL = "apt-get install -y redis-server postgresql"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_port(port: int, proc: subprocess.Popen | None, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"{what} exited with status {proc.returncode} before listening")
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not listening on 127.0.0.1:{port} after {timeout:g} s")
        time.sleep(0.02)


# -- Redis ----------------------------------------------------------------------------------------

class RedisServer:
    """`redis-server` on 127.0.0.1:`port`, no persistence; `stop()` / `start()` keep the port."""

    def __init__(self, workdir: Path) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            pytest.skip(f"redis-server is not installed ({INSTALL})")
        self.exe = exe
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    def url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def start(self) -> None:
        with open(self.workdir / "redis.log", "ab") as log:
            self.proc = subprocess.Popen(
                [self.exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                 "--dir", str(self.workdir), "--databases", "64", "--protected-mode", "no"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        _wait_port(self.port, self.proc, "redis-server")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.proc = None

    def flush(self, db: int) -> None:
        """FLUSHDB on logical database `db`, with redis-cli-free plain RESP."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as s:
            s.sendall(f"*2\r\n$6\r\nSELECT\r\n${len(str(db))}\r\n{db}\r\n*1\r\n$7\r\nFLUSHDB\r\n".encode())
            got = b""
            while got.count(b"\r\n") < 2:
                chunk = s.recv(100)
                if not chunk:
                    break
                got += chunk
            assert got == b"+OK\r\n+OK\r\n", got


@contextlib.contextmanager
def redis_running(workdir: Path) -> Iterator[RedisServer]:
    server = RedisServer(workdir)
    server.start()
    try:
        yield server
    finally:
        server.stop()


# -- PostgreSQL -----------------------------------------------------------------------------------

def _pg_bindir() -> str | None:
    for cand in sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(p.split("/")[4]), reverse=True):
        if os.path.exists(os.path.join(cand, "initdb")):
            return cand
    exe = shutil.which("initdb")
    return os.path.dirname(exe) if exe else None


class PostgresServer:
    """A throwaway cluster in a temp folder on 127.0.0.1:`port`, trust auth for user `postgres`."""

    def __init__(self) -> None:
        bindir = _pg_bindir()
        if bindir is None:
            pytest.skip(f"PostgreSQL is not installed ({INSTALL})")
        self.bindir = bindir
        self.as_root = os.geteuid() == 0
        self.datadir = Path(tempfile.mkdtemp(prefix="spotinference-pg-"))
        if self.as_root:
            shutil.chown(self.datadir, "postgres", "postgres")
        self.port = free_port()
        self._run(["initdb", "-D", str(self.datadir / "data"), "-A", "trust", "-U", "postgres",
                   "--no-sync", "-E", "UTF8", "--locale", "C"])

    def _run(self, argv: list[str], timeout: float = 120) -> None:
        cmd = [os.path.join(self.bindir, argv[0]), *argv[1:]]
        if self.as_root:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        r = subprocess.run(cmd, check=False, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                           timeout=timeout, cwd=str(self.datadir))
        if r.returncode != 0:
            raise AssertionError(f"{' '.join(argv[:2])} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")

    def url(self, db: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{db}"

    def start(self) -> None:
        opts = (f"-p {self.port} -k {self.datadir} -c listen_addresses=127.0.0.1 -c fsync=off "
                "-c synchronous_commit=off -c full_page_writes=off -c max_connections=200")
        self._run(["pg_ctl", "-D", str(self.datadir / "data"), "-l", str(self.datadir / "server.log"),
                   "-o", opts, "-w", "-t", "60", "start"])
        _wait_port(self.port, None, "postgres")

    def stop(self, mode: str = "fast") -> None:
        with contextlib.suppress(AssertionError, subprocess.TimeoutExpired):
            self._run(["pg_ctl", "-D", str(self.datadir / "data"), "-m", mode, "-w", "-t", "60", "stop"])

    def sql(self, statement: str, db: str = "postgres") -> None:
        """Run one statement as the superuser, autocommit (CREATE/DROP DATABASE)."""
        import psycopg

        with psycopg.connect(self.url(db), autocommit=True, connect_timeout=10) as conn:
            conn.execute(statement)

    def create_database(self) -> str:
        name = "t_" + uuid.uuid4().hex[:12]
        self.sql(f"CREATE DATABASE {name}")
        return name

    def drop_database(self, name: str) -> None:
        with contextlib.suppress(Exception):
            self.sql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")

    def remove(self) -> None:
        self.stop("immediate")
        shutil.rmtree(self.datadir, ignore_errors=True)


@contextlib.contextmanager
def postgres_running() -> Iterator[PostgresServer]:
    server = PostgresServer()
    try:
        server.start()
        yield server
    finally:
        server.remove()


# -- fixtures -------------------------------------------------------------------------------------

_redis_dbs = iter(range(1, 64))


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory) -> Iterator[RedisServer]:
    with redis_running(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """A flushed logical database of the session's Redis, of this test's own."""
    db = next(_redis_dbs, None)
    if db is None:  # more than 63 tests: reuse, flushed
        db = 1
    redis_server.flush(db)
    return redis_server.url(db)


@pytest.fixture
def fresh_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A Redis of this test's own (it may stop and restart it)."""
    with redis_running(tmp_path / "redis") as server:
        yield server


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    with postgres_running() as server:
        yield server


@pytest.fixture
def pg_url(postgres_server: PostgresServer) -> Iterator[str]:
    """A database of this test's own on the session's PostgreSQL, dropped after."""
    name = postgres_server.create_database()
    try:
        yield postgres_server.url(name)
    finally:
        postgres_server.drop_database(name)


@pytest.fixture
def fresh_postgres() -> Iterator[PostgresServer]:
    """A PostgreSQL cluster of this test's own (it may stop and restart it)."""
    with postgres_running() as server:
        yield server
