"""The usage log in one SQLite file (``[usage] path``): one host, one or several workers sharing it.

Strategy: WAL, ``synchronous=NORMAL`` and ``busy_timeout`` so several workers share one file; every
write is one ``BEGIN IMMEDIATE`` transaction of ``INSERT OR IGNORE`` on the UNIQUE ``uid``, so a batch
or a spill file written twice (a crash between commit and unlink) adds nothing. The file (and its -wal
and -shm) is the owner's alone (0600). Schema is versioned with ``PRAGMA user_version``; `_MIGRATIONS`
holds one step per version (2: the ``gpu_time`` table beside ``usage``, the same uid rule); a database
newer than this code is refused rather than written to. A batch may mix usage and GPU-time items
(store.py `split`): both go in its one transaction.
`recover_spills` imports every ``<path>.spill*.jsonl`` and is for the supervisor before workers start.
"""

from __future__ import annotations

import glob
import os
import sqlite3
from collections.abc import Sequence

import msgspec

from proxy.usage.store import (
    COLUMNS,
    GPU_COLUMNS,
    Item,
    UsageRow,
    UsageSchemaError,
    import_spill,
    recover_files,
    split,
)

SCHEMA_VERSION = 2
_MIGRATIONS = {
    1: [
        """CREATE TABLE IF NOT EXISTS usage (
            id INTEGER PRIMARY KEY,
            ts REAL NOT NULL,
            request_id TEXT NOT NULL,
            key_name TEXT,
            model TEXT,
            tier TEXT,
            endpoint TEXT NOT NULL,
            stream INTEGER NOT NULL,
            status INTEGER NOT NULL,
            prompt_tokens INTEGER,
            completion_tokens INTEGER,
            total_tokens INTEGER,
            estimated INTEGER NOT NULL,
            ttfb_ms REAL,
            latency_ms REAL,
            wake_ms REAL,
            upstream TEXT,
            error_type TEXT,
            uid TEXT UNIQUE
        )""",
        "CREATE INDEX IF NOT EXISTS usage_ts ON usage(ts)",
    ],
    2: [
        """CREATE TABLE IF NOT EXISTS gpu_time (
            id INTEGER PRIMARY KEY,
            ts REAL NOT NULL,
            tier TEXT NOT NULL,
            host TEXT NOT NULL,
            seconds REAL NOT NULL,
            usd REAL NOT NULL,
            price_source TEXT NOT NULL,
            uid TEXT NOT NULL UNIQUE
        )""",
        "CREATE INDEX IF NOT EXISTS gpu_time_ts ON gpu_time(ts)",
    ],
}
_INSERT = (
    f"INSERT OR IGNORE INTO usage ({', '.join(COLUMNS)}, uid) "
    f"VALUES ({', '.join('?' * (len(COLUMNS) + 1))})"
)
_INSERT_GPU = (
    f"INSERT OR IGNORE INTO gpu_time ({', '.join(GPU_COLUMNS)}, uid) "
    f"VALUES ({', '.join('?' * (len(GPU_COLUMNS) + 1))})"
)


def _values(row: UsageRow, uid: str | None) -> tuple:
    return (*msgspec.structs.astuple(row), uid)


def _private(path: str) -> None:
    """The usage table names keys and clients: the database is the owner's alone (0600). Created so
    before SQLite opens it -- SQLite gives its -wal and -shm files the database's own mode -- and an
    older, wider database is narrowed."""
    if path == ":memory:" or path.startswith("file:"):
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        if os.fstat(fd).st_mode & 0o077:
            os.fchmod(fd, 0o600)
    finally:
        os.close(fd)
    for suffix in ("-wal", "-shm"):
        try:
            os.chmod(path + suffix, 0o600)
        except FileNotFoundError:
            pass


def connect(path: str) -> sqlite3.Connection:
    """Open (creating if needed, 0600) the usage database and bring its schema up to date. Blocking."""
    _private(path)
    conn = sqlite3.connect(path, timeout=10.0, isolation_level=None, check_same_thread=False)
    try:
        conn.execute("PRAGMA busy_timeout = 10000")
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = NORMAL")
        conn.execute("BEGIN IMMEDIATE")
        try:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise UsageSchemaError(
                    f"{path}: usage schema version {version} is newer than this gateway's ({SCHEMA_VERSION})"
                )
            for v in range(version + 1, SCHEMA_VERSION + 1):
                for stmt in _MIGRATIONS[v]:
                    conn.execute(stmt)
            if version < SCHEMA_VERSION:
                conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
    except BaseException:
        conn.close()
        raise
    return conn


def _insert(conn: sqlite3.Connection, values: list[tuple]) -> None:
    conn.execute("BEGIN IMMEDIATE")
    try:
        conn.executemany(_INSERT, values)
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise


def _insert_items(conn: sqlite3.Connection, items: Sequence[Item]) -> None:
    """Usage and GPU-time items in one transaction; uids already there are skipped."""
    usage, gpu = split(items)
    conn.execute("BEGIN IMMEDIATE")
    try:
        if usage:
            conn.executemany(_INSERT, [_values(row, uid) for uid, row in usage])
        if gpu:
            conn.executemany(_INSERT_GPU, [(*msgspec.structs.astuple(row), uid) for uid, row in gpu])
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise


def insert_rows(conn: sqlite3.Connection, rows: list[UsageRow]) -> None:
    """Insert rows (no uids) in one transaction on a connection from `connect`. Blocking (tools, tests)."""
    _insert(conn, [_values(r, None) for r in rows])


def import_spill_file(conn: sqlite3.Connection, spill_path: str) -> int:
    """Insert the rows of one spill file, then remove it. Returns the rows read. Blocking."""
    return import_spill(spill_path, lambda items: _insert_items(conn, items))


def recover_spills(path: str) -> int:
    """Import every ``<path>.spill*.jsonl`` into the database at `path`. Blocking.

    For the supervisor, before any worker runs (a live worker may still be appending to its file).
    """
    return recover_files(glob.escape(path) + ".spill*.jsonl", lambda: connect(path), import_spill_file)


class SqliteStore:
    """`UsageStore` over one SQLite file. Blocking; one thread at a time."""

    errors: tuple[type[BaseException], ...] = (sqlite3.Error, OSError)
    fail_fast = True

    def __init__(self, path: str) -> None:
        self.path = path
        self._conn: sqlite3.Connection | None = None

    def describe(self) -> str:
        return self.path

    def explain(self, exc: BaseException) -> str:
        return f"{type(exc).__name__}: {' '.join(str(exc).split())}"

    def open(self) -> None:
        self.close()
        self._conn = connect(self.path)

    def insert(self, items: Sequence[Item]) -> None:
        assert self._conn is not None, "insert before open"
        _insert_items(self._conn, items)

    def import_spill(self, path: str) -> int:
        assert self._conn is not None, "import before open"
        return import_spill_file(self._conn, path)

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()
