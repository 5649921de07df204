"""How to write a 500-row usage batch to PostgreSQL fastest, idempotently (pg_store.py keeps the winner).

Strategy: a throwaway PostgreSQL (tests/support/servers.py), the real schema (pg_store.connect), the
gateway's own rows with fresh uids, `BATCHES` batches of `ROWS` per method, each batch one transaction
ending in ``ON CONFLICT (uid) DO NOTHING``; rows/s over the whole run, best of `ROUNDS` (the table is
emptied between methods). Not a test (no ``test_`` prefix): run it by hand,
``.venv/bin/python -m tests.proxy.usage.bench_pg_batches``.
"""

from __future__ import annotations

import os
import time

import psycopg

from proxy.usage import pg_store
from proxy.usage.store import COLUMNS, UsageRow
from tests.support.servers import postgres_running

ROWS = 500
BATCHES = 200
ROUNDS = 3
_COLS = f"{', '.join(COLUMNS)}, uid"
_ONE = f"({', '.join(['%s'] * (len(COLUMNS) + 1))})"
_INSERT = f"INSERT INTO usage ({_COLS}) VALUES {_ONE} ON CONFLICT (uid) DO NOTHING"


def row(i: int) -> UsageRow:
    return UsageRow(ts=1_700_000_000.0 + i, request_id=f"req-{i:08d}", key_name=f"key{i % 7}",
                    model="qwen3-coder", tier="h100x2", endpoint="chat", stream=bool(i % 2), status=200,
                    prompt_tokens=100 + i % 50, completion_tokens=i % 300, total_tokens=100 + i % 350,
                    ttfb_ms=12.5, latency_ms=250.0 + i % 100, upstream="10.0.1.5:8000")


def executemany_pipeline(conn: psycopg.Connection, items) -> None:
    with conn.transaction(), conn.cursor() as cur:
        cur.executemany(_INSERT, [pg_store._values(u, r) for u, r in items])  # pipeline mode (libpq 14+)


def multi_values(conn: psycopg.Connection, items) -> None:
    sql = (f"INSERT INTO usage ({_COLS}) VALUES {', '.join([_ONE] * len(items))} "
           "ON CONFLICT (uid) DO NOTHING")
    params = [v for u, r in items for v in pg_store._values(u, r)]
    with conn.transaction():
        conn.execute(sql, params)


def copy_text(conn: psycopg.Connection, items) -> None:
    with conn.transaction(), conn.cursor() as cur:
        cur.execute(pg_store._STAGE)
        with cur.copy(f"COPY usage_in ({_COLS}) FROM STDIN") as copy:
            for u, r in items:
                copy.write_row(pg_store._values(u, r))
        cur.execute(pg_store._MERGE)


METHODS = {
    "executemany (pipeline) INSERT ... ON CONFLICT": executemany_pipeline,
    "one INSERT, 500 VALUES ... ON CONFLICT": multi_values,
    "COPY text -> temp, INSERT ... SELECT ON CONFLICT": copy_text,
    "COPY binary -> temp, INSERT ... SELECT ON CONFLICT (pg_store.insert)": pg_store.insert,
}


def main() -> None:
    with postgres_running() as server:
        conn = pg_store.connect(server.url())
        print(f"PostgreSQL {conn.info.server_version}, libpq {psycopg.pq.version()}, "
              f"psycopg {psycopg.__version__} ({psycopg.pq.__impl__}); {BATCHES} batches of {ROWS} rows")
        for name, fn in METHODS.items():
            best = 0.0
            for _ in range(ROUNDS):
                conn.execute("TRUNCATE usage")
                batches = [[(os.urandom(12).hex(), row(b * ROWS + i)) for i in range(ROWS)]
                           for b in range(BATCHES)]
                t0 = time.perf_counter()
                for items in batches:
                    fn(conn, items)
                best = max(best, ROWS * BATCHES / (time.perf_counter() - t0))
            assert conn.execute("SELECT count(*) FROM usage").fetchone()[0] == ROWS * BATCHES
            fn(conn, batches[-1])  # the same batch again (a lost acknowledgement): nothing added
            assert conn.execute("SELECT count(*) FROM usage").fetchone()[0] == ROWS * BATCHES
            print(f"{best:>10,.0f} rows/s  {name}")
        conn.close()


if __name__ == "__main__":
    main()
