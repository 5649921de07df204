"""The usage log in PostgreSQL (``[usage] database_url``): one table for every gateway host.

Strategy: psycopg 3, synchronous, one connection per writer, always called from a worker thread
(log.py). Every row carries the uid it got when it was recorded and ``uid`` is UNIQUE, so each batch is
written with ``ON CONFLICT (uid) DO NOTHING``: a batch whose commit reached the server but whose
acknowledgement was lost is spilled, re-sent later, and adds nothing. Batches go in by COPY (binary)
into a per-connection temporary table (``ON COMMIT DELETE ROWS``), then one ``INSERT ... SELECT ...
ON CONFLICT DO NOTHING``, in one transaction: the fastest of four, measured on the real server
(PostgreSQL 15 on loopback, fsync and synchronous_commit off as in the tests, so client- and CPU-bound;
2 shared cores, psycopg 3.3 binary, libpq 18; 200 batches of 500 rows, each one transaction, best of 3,
three runs; ``.venv/bin/python -m tests.proxy.usage.bench_pg_batches``):

    COPY binary -> temp table, INSERT ... SELECT ... ON CONFLICT   89,000-92,000 rows/s  (kept)
    COPY text   -> temp table, INSERT ... SELECT ... ON CONFLICT   71,000-75,000 rows/s
    executemany (pipeline mode) INSERT ... ON CONFLICT             41,000-49,000 rows/s
    one INSERT with 500 VALUES rows ... ON CONFLICT                14,000-15,500 rows/s

Schema is created on first start and versioned in ``spotinference_schema(component, version)``
(row ``('usage', 2)``; version 2 added the ``gpu_time`` table, ``CREATE ... IF NOT EXISTS``); a migration
runs in one transaction under ``pg_advisory_xact_lock(LOCK_KEY)``,
so several hosts starting at once for the first time wait for each other instead of failing, and a
database whose usage version is newer than this code is refused (`UsageSchemaError`). Connections
have a connect timeout and TCP keepalives / user timeout, so a vanished server fails a call within
seconds instead of hanging the writer. PostgreSQL text cannot hold NUL, which a client's model name
may: NUL becomes U+FFFD, so no client can make a batch (and its spill file) unwritable. Log lines
name the server by `redact_url` (no password). GPU-time items of a batch (a few per minute, store.py
`split`) go in the same transaction by one ``executemany`` ``INSERT ... ON CONFLICT (uid) DO NOTHING``:
their uid is deterministic, so the minute several workers or hosts record is inserted once.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import msgspec
import psycopg

from proxy.observe.redact import redact_url, scrub
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

log = logging.getLogger(__name__)

SCHEMA_VERSION = 2
COMPONENT = "usage"
# pg_advisory_xact_lock key of every spotinference schema migration ("spot_sch"): one key for all
# components sharing `spotinference_schema`, so their first starts serialize too.
LOCK_KEY = 0x73706F745F736368
CONNECT_TIMEOUT_S = 5
_CONNECT_OPTIONS = {
    "connect_timeout": CONNECT_TIMEOUT_S,
    "keepalives": 1,
    "keepalives_idle": 10,
    "keepalives_interval": 3,
    "keepalives_count": 3,
    "tcp_user_timeout": 15000,  # ms: unacknowledged data this long means the server is gone
    "application_name": "spotinference-usage",
}

_SCHEMA_TABLE = ("CREATE TABLE IF NOT EXISTS spotinference_schema "
                 "(component text PRIMARY KEY, version integer NOT NULL)")
_MIGRATIONS = {
    1: [
        """CREATE TABLE IF NOT EXISTS usage (
            id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            ts double precision NOT NULL,
            request_id text NOT NULL,
            key_name text,
            model text,
            tier text,
            endpoint text NOT NULL,
            stream boolean NOT NULL,
            status integer NOT NULL,
            prompt_tokens bigint,
            completion_tokens bigint,
            total_tokens bigint,
            estimated boolean NOT NULL,
            ttfb_ms double precision,
            latency_ms double precision,
            wake_ms double precision,
            upstream text,
            error_type text,
            uid text NOT NULL UNIQUE
        )""",
        "CREATE INDEX IF NOT EXISTS usage_ts ON usage (ts)",
    ],
    2: [
        """CREATE TABLE IF NOT EXISTS gpu_time (
            id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            ts double precision NOT NULL,
            tier text NOT NULL,
            host text NOT NULL,
            seconds double precision NOT NULL,
            usd double precision NOT NULL,
            price_source text NOT NULL,
            uid text NOT NULL UNIQUE
        )""",
        "CREATE INDEX IF NOT EXISTS gpu_time_ts ON gpu_time (ts)",
    ],
}
_COLS = f"{', '.join(COLUMNS)}, uid"
_TYPES = ["float8", "text", "text", "text", "text", "text", "bool", "int4", "int8", "int8", "int8", "bool",
          "float8", "float8", "float8", "text", "text", "text"]
assert len(_TYPES) == len(COLUMNS) + 1
# In every transaction, not once per connection: behind a transaction-pooling PgBouncer the next
# transaction may run on another server session. Where it exists already it is a no-op.
_STAGE = (f"CREATE TEMP TABLE IF NOT EXISTS usage_in ON COMMIT DELETE ROWS AS SELECT {_COLS} FROM usage "
          "WITH NO DATA")
_COPY = f"COPY usage_in ({_COLS}) FROM STDIN (FORMAT BINARY)"
_MERGE = f"INSERT INTO usage ({_COLS}) SELECT {_COLS} FROM usage_in ON CONFLICT (uid) DO NOTHING"
_INSERT_GPU = (f"INSERT INTO gpu_time ({', '.join(GPU_COLUMNS)}, uid) "
               f"VALUES ({', '.join(['%s'] * (len(GPU_COLUMNS) + 1))}) ON CONFLICT (uid) DO NOTHING")


def _text(v):
    return v.replace("\x00", "\ufffd") if type(v) is str and "\x00" in v else v


def _values(uid: str, row: UsageRow) -> tuple:
    return (*map(_text, msgspec.structs.astuple(row)), uid)


def _migrate(conn: psycopg.Connection, where: str) -> None:
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (LOCK_KEY,))
        conn.execute(_SCHEMA_TABLE)
        got = conn.execute("SELECT version FROM spotinference_schema WHERE component = %s",
                           (COMPONENT,)).fetchone()
        version = got[0] if got else 0
        if version > SCHEMA_VERSION:
            raise UsageSchemaError(
                f"{where}: usage schema version {version} is newer than this gateway's ({SCHEMA_VERSION})")
        for v in range(version + 1, SCHEMA_VERSION + 1):
            for stmt in _MIGRATIONS[v]:
                conn.execute(stmt)
        if version < SCHEMA_VERSION:
            conn.execute("INSERT INTO spotinference_schema (component, version) VALUES (%s, %s) "
                         "ON CONFLICT (component) DO UPDATE SET version = EXCLUDED.version",
                         (COMPONENT, SCHEMA_VERSION))


def connect(url: str, *, connect_timeout_s: int = CONNECT_TIMEOUT_S) -> psycopg.Connection:
    """Connect and bring the schema up to date. Blocking."""
    conn = psycopg.connect(url, autocommit=True, **{**_CONNECT_OPTIONS, "connect_timeout": connect_timeout_s})
    try:
        try:
            _migrate(conn, redact_url(url))
        except psycopg.errors.UniqueViolation:
            # Another component's first start made `spotinference_schema` beside us without our lock.
            _migrate(conn, redact_url(url))
    except BaseException:
        conn.close()
        raise
    return conn


def insert(conn: psycopg.Connection, items: Sequence[Item]) -> None:
    """Write ``(uid, row)`` pairs in one transaction; uids already there are skipped. Blocking."""
    usage, gpu = split(items)
    with conn.transaction(), conn.cursor() as cur:
        if usage:
            cur.execute(_STAGE)
            with cur.copy(_COPY) as copy:
                copy.set_types(_TYPES)
                for uid, row in usage:
                    copy.write_row(_values(uid, row))
            cur.execute(_MERGE)
        if gpu:
            cur.executemany(_INSERT_GPU,
                            [(*map(_text, msgspec.structs.astuple(row)), uid) for uid, row in gpu])


def import_spill_file(conn: psycopg.Connection, path: str) -> int:
    """Insert the rows of one spill file (chunk by chunk, each idempotent), then remove it. Blocking."""
    return import_spill(path, lambda items: insert(conn, items))


def recover_spills_pg(url: str, pattern: str) -> int:
    """Import every spill file matching the glob `pattern` (``<spill_dir>/usage.spill*.jsonl``). Blocking.

    For the supervisor, before any worker runs (a live worker may still be appending to its file).
    """
    return recover_files(pattern, lambda: connect(url), import_spill_file)


class PgStore:
    """`UsageStore` over one PostgreSQL database. Blocking; one thread at a time."""

    errors: tuple[type[BaseException], ...] = (psycopg.Error, OSError)
    fail_fast = False

    def __init__(self, url: str, *, connect_timeout_s: int = CONNECT_TIMEOUT_S) -> None:
        self.url = url
        self.connect_timeout_s = connect_timeout_s
        self._conn: psycopg.Connection | None = None

    def describe(self) -> str:
        return redact_url(self.url)

    def explain(self, exc: BaseException) -> str:
        return f"{type(exc).__name__}: {scrub(str(exc), self.url)}"

    def open(self) -> None:
        self.close()
        self._conn = connect(self.url, connect_timeout_s=self.connect_timeout_s)

    def insert(self, items: Sequence[Item]) -> None:
        assert self._conn is not None, "insert before open"
        insert(self._conn, items)

    def import_spill(self, path: str) -> int:
        assert self._conn is not None, "import before open"
        return import_spill_file(self._conn, path)

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.close()
            except psycopg.Error:
                pass
