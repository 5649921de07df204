"""The usage log in a real PostgreSQL: schema, batches, spill import, outages, lost acknowledgements, the CLI.

Every test talks to a real server (tests/support/servers.py): `pg_url` is a database of the test's own
on the session's server; the outage tests start their own (`fresh_postgres`) and stop and start it under
traffic. "Nothing lost, nothing doubled" is checked the strict way: every recorded row has a distinct
request id, and the table must hold each exactly once (count == recorded == count(distinct uid)).
Every wait is bounded by `trio.fail_after`.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import msgspec
import psycopg
import pytest
import trio
import trio.lowlevel
from psycopg.rows import dict_row

from proxy.config import UsageConfig, load
from proxy.observe.redact import redact_url, scrub
from proxy.usage import pg_store
from proxy.usage.log import (
    START_WAIT_S,
    UsageLog,
    UsageRow,
    UsageSchemaError,
    connect,
    importing_path,
    insert_rows,
    open_usage_log,
    recover_usage_spills,
    worker_spill_path,
)
from proxy.usage.pg_store import PgStore
from proxy.usage.sqlite_store import _MIGRATIONS as SQLITE_MIGRATIONS
from proxy.usage.store import encode_spill
from tests.support.gateway import (
    CHAT,
    make_config,
    post,
    raw_request,
    split_response,
    start_gateway,
    start_sim,
)
from tests.support.servers import free_port

ROOT = Path(__file__).resolve().parents[3]


def row(i: int, **kw) -> UsageRow:
    base = {
        "ts": 1_700_000_000.0 + i, "request_id": f"req-{i}", "key_name": f"key{i % 3}",
        "model": "qwen3-coder", "tier": "h100x2", "endpoint": "/v1/chat/completions",
        "stream": bool(i % 2), "status": 200, "prompt_tokens": 10 + i, "completion_tokens": i,
        "total_tokens": 10 + 2 * i, "estimated": False, "ttfb_ms": 1.5, "latency_ms": 20.0 + i,
        "wake_ms": None, "upstream": "10.0.1.5:8000", "error_type": None,
    }
    base.update(kw)
    return UsageRow(**base)


def items(rows: range) -> list[tuple[str, UsageRow]]:
    return [(os.urandom(12).hex(), row(i)) for i in rows]


def sql(url: str, statement: str, params=()) -> list[tuple]:
    with psycopg.connect(url, autocommit=True, connect_timeout=10) as c:
        cur = c.execute(statement, params)
        return cur.fetchall() if cur.description else []


def counts(url: str) -> tuple[int, int, int]:
    """(rows, distinct uids, distinct request ids)."""
    return sql(url, "SELECT count(*), count(DISTINCT uid), count(DISTINCT request_id) FROM usage")[0]


async def acount(url: str) -> int:
    return (await trio.to_thread.run_sync(counts, url))[0]


def pg_log(url: str, tmp_path, **kw) -> UsageLog:
    kw.setdefault("spill_path", str(tmp_path / "usage.spill.jsonl"))
    return UsageLog(PgStore(url), **kw)


async def _equals(awaitable, value) -> bool:
    return await awaitable == value


async def until(predicate, what: str, timeout: float = 60.0) -> None:
    """Poll an async or sync predicate until it holds (bounded)."""
    with trio.fail_after(timeout):
        while True:
            got = predicate()
            if hasattr(got, "__await__"):
                got = await got
            if got:
                return
            await trio.sleep(0.02)


# -- schema ---------------------------------------------------------------------------------------------

async def test_first_start_creates_the_schema_and_its_version_row(pg_url, tmp_path) -> None:
    log = pg_log(pg_url, tmp_path)
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(log.run)
            assert log.statistics().store_up
            nursery.cancel_scope.cancel()
    assert sql(pg_url, "SELECT component, version FROM spotinference_schema") == [
        ("usage", pg_store.SCHEMA_VERSION)]
    columns = [c for (c,) in sql(pg_url, "SELECT column_name FROM information_schema.columns "
                                         "WHERE table_name = 'usage' ORDER BY ordinal_position")]
    lite = sqlite3.connect(":memory:")
    lite.executescript(";".join(SQLITE_MIGRATIONS[1]))
    assert columns == [r[1] for r in lite.execute("PRAGMA table_info(usage)")]  # the same columns
    indexes = " ".join(d for (d,) in sql(pg_url, "SELECT indexdef FROM pg_indexes WHERE tablename = 'usage'"))
    assert "UNIQUE" in indexes and "(uid)" in indexes and "(ts)" in indexes
    assert sql(pg_url, "SELECT is_nullable FROM information_schema.columns "
                       "WHERE table_name = 'usage' AND column_name = 'uid'") == [("NO",)]


def test_concurrent_first_starts_all_succeed(pg_url) -> None:
    n = 8
    barrier = threading.Barrier(n)
    errors: list[BaseException] = []

    def start() -> None:
        try:
            barrier.wait(10)
            pg_store.connect(pg_url).close()
        except BaseException as exc:  # noqa: BLE001  (reported below)
            errors.append(exc)

    threads = [threading.Thread(target=start) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == [] and not any(t.is_alive() for t in threads)
    assert sql(pg_url, "SELECT component, version FROM spotinference_schema") == [
        ("usage", pg_store.SCHEMA_VERSION)]


async def test_two_logs_starting_together_share_the_table(pg_url, tmp_path) -> None:
    logs = [pg_log(pg_url, tmp_path, batch_max=50, flush_s=0.01, spill_path=str(tmp_path / f"s{k}.jsonl"))
            for k in range(2)]
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            async with trio.open_nursery() as starting:  # both first starts at once
                for lg in logs:
                    starting.start_soon(nursery.start, lg.run)
            for i in range(600):
                logs[i % 2].record(row(i))
                if i % 50 == 0:
                    await trio.lowlevel.checkpoint()
            for lg in logs:
                await lg.wait_flushed()
            nursery.cancel_scope.cancel()
    assert counts(pg_url) == (600, 600, 600)


async def test_a_newer_schema_is_refused_and_queued_rows_spill(pg_url, tmp_path) -> None:
    sql(pg_url, "CREATE TABLE spotinference_schema (component text PRIMARY KEY, version integer NOT NULL)")
    sql(pg_url, "INSERT INTO spotinference_schema VALUES ('usage', %s)", (pg_store.SCHEMA_VERSION + 1,))
    log = pg_log(pg_url, tmp_path)
    log.record(row(1))
    with trio.fail_after(30), pytest.raises(UsageSchemaError, match="newer"):
        await log.run()
    assert log.statistics().spilled_total == 1
    with pytest.raises(UsageSchemaError):
        recover_usage_spills(UsageConfig(database_url=pg_url, spill_dir=str(tmp_path)))
    assert os.path.exists(tmp_path / "usage.spill.jsonl")  # kept for a gateway that knows the newer version


async def test_a_schema_upgraded_under_a_running_log_stops_writes_not_serving(pg_url, tmp_path) -> None:
    log = pg_log(pg_url, tmp_path, batch_max=10, flush_s=0.01, retry_s=0.05)
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            await nursery.start(log.run)
            # Another host, newer, migrated; our connection is dropped: the reconnect finds a newer version.
            sql(pg_url, "UPDATE spotinference_schema SET version = %s", (pg_store.SCHEMA_VERSION + 1,))
            sql(pg_url, "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                        "WHERE application_name = 'spotinference-usage'")
            for i in range(20):
                log.record(row(i))
            await until(lambda: log.statistics().write_errors_total >= 1, "the write to fail")
            await trio.sleep(0.3)  # several refused reconnects
            assert not log.statistics().store_up
            # (rolled back, say)
            sql(pg_url, "UPDATE spotinference_schema SET version = %s", (pg_store.SCHEMA_VERSION,))
            await until(lambda: log.statistics().store_up, "the reconnect")
            await log.wait_flushed()
            await until(lambda: log.statistics().imported_total + log.statistics().written_total == 20,
                        "the spilled batch's import")
            nursery.cancel_scope.cancel()
    assert counts(pg_url) == (20, 20, 20)


# -- rows -----------------------------------------------------------------------------------------------

async def test_rows_are_written_in_batches_with_every_column(pg_url, tmp_path) -> None:
    log = pg_log(pg_url, tmp_path, batch_max=200, flush_s=0.02)
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            await nursery.start(log.run)
            for i in range(3000):
                log.record(row(i, wake_ms=5.0 if i == 8 else None))
                if i % 97 == 0:
                    await trio.lowlevel.checkpoint()
            log.record(row(3000, model="a\x00b"))  # a client's model name may hold NUL; text cannot
            await log.wait_flushed()
            st = log.statistics()
            assert (st.written_total, st.queued, st.spilled_total, st.write_errors_total) == (3001, 0, 0, 0)
            assert st.batches_total >= 16 and st.store_up and st.reconnects_total == 0
            nursery.cancel_scope.cancel()
    assert counts(pg_url) == (3001, 3001, 3001)
    with psycopg.connect(pg_url, row_factory=dict_row) as c:
        got = c.execute("SELECT * FROM usage WHERE request_id = 'req-7'").fetchone()
        assert len(got.pop("uid")) == 24 and got.pop("id") > 0
        assert got == {
            "ts": 1_700_000_007.0, "request_id": "req-7", "key_name": "key1", "model": "qwen3-coder",
            "tier": "h100x2", "endpoint": "/v1/chat/completions", "stream": True, "status": 200,
            "prompt_tokens": 17, "completion_tokens": 7, "total_tokens": 24, "estimated": False,
            "ttfb_ms": 1.5,
            "latency_ms": 27.0, "wake_ms": None, "upstream": "10.0.1.5:8000", "error_type": None,
        }
        one = "SELECT {} FROM usage WHERE request_id = %s"
        assert c.execute(one.format("wake_ms"), ("req-8",)).fetchone() == {"wake_ms": 5.0}
        assert c.execute(one.format("model"), ("req-3000",)).fetchone() == {"model": "a\ufffdb"}
    assert not os.path.exists(tmp_path / "usage.spill.jsonl")


async def test_spill_files_are_imported_at_start_own_files_only(pg_url, tmp_path) -> None:
    spill = str(tmp_path / "usage.spill.w0.jsonl")
    first = pg_log(pg_url, tmp_path, queue_max=0, spill_path=spill)  # never started: everything spills
    for i in range(30):
        first.record(row(i))
    first._close_spill_fd()
    Path(importing_path(spill)).write_bytes(encode_spill(items(range(30, 40))))  # an import cut short
    other = tmp_path / "usage.spill.w1.jsonl"  # a live worker's file: not ours to import
    other.write_bytes(encode_spill(items(range(40, 45))))
    log = pg_log(pg_url, tmp_path, spill_path=spill)
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(log.run)
            await until(lambda: log.statistics().imported_total == 40, "the import")
            nursery.cancel_scope.cancel()
    assert counts(pg_url) == (40, 40, 40)
    assert sorted(os.listdir(tmp_path)) == ["usage.spill.w1.jsonl"]
    # The supervisor, before workers start, imports every spill file of the folder.
    assert recover_usage_spills(UsageConfig(database_url=pg_url, spill_dir=str(tmp_path))) == 5
    assert counts(pg_url) == (45, 45, 45) and os.listdir(tmp_path) == []


async def test_a_lost_acknowledgement_adds_nothing(pg_url, tmp_path) -> None:
    # Directly: the batch is in the table, the same (uid, row) pairs come back through the spill file.
    batch = items(range(100))
    conn = pg_store.connect(pg_url)
    pg_store.insert(conn, batch)
    conn.close()
    (tmp_path / "usage.spill.jsonl").write_bytes(encode_spill(batch))
    log = pg_log(pg_url, tmp_path)
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(log.run)
            await until(lambda: log.statistics().imported_total == 100, "the import")
            nursery.cancel_scope.cancel()
    assert counts(pg_url) == (100, 100, 100)


class AckLostStore(PgStore):
    """The second batch commits, then its acknowledgement is lost (the connection drops)."""

    calls = 0

    def insert(self, items) -> None:
        super().insert(items)
        self.calls += 1
        if self.calls == 2:
            raise psycopg.OperationalError("server closed the connection unexpectedly")


async def test_a_batch_committed_but_unacknowledged_is_resent_not_doubled(pg_url, tmp_path) -> None:
    log = UsageLog(AckLostStore(pg_url), batch_max=25, flush_s=0.01, retry_s=0.05,
                   spill_path=str(tmp_path / "usage.spill.jsonl"))
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            await nursery.start(log.run)
            for i in range(200):
                log.record(row(i))
                if i % 25 == 24:
                    await trio.sleep(0.02)
            await until(lambda: log.statistics().reconnects_total == 1, "the reconnect")
            await log.wait_flushed()
            await until(lambda: log.statistics().imported_total == 25, "the re-send")
            st = log.statistics()
            assert st.write_errors_total == 1 and st.spilled_total == 25 and st.written_total == 175
            nursery.cancel_scope.cancel()
    assert counts(pg_url) == (200, 200, 200)


# -- outages --------------------------------------------------------------------------------------------

async def test_postgres_stopped_under_traffic_loses_nothing_doubles_nothing(fresh_postgres, tmp_path) -> None:
    url = fresh_postgres.url()
    log = pg_log(url, tmp_path, queue_max=300, batch_max=50, flush_s=0.02, retry_s=0.1)
    recorded = 0
    stop_recording = trio.Event()

    async def traffic() -> None:
        nonlocal recorded
        while not stop_recording.is_set():
            log.record(row(recorded))
            recorded += 1
            await trio.sleep(0.001)

    with trio.fail_after(120):
        async with trio.open_nursery() as nursery:
            await nursery.start(log.run)
            nursery.start_soon(traffic)
            await until(lambda: log.statistics().written_total > 200, "rows before the outage")
            await trio.to_thread.run_sync(fresh_postgres.stop)
            await until(lambda: not log.statistics().store_up, "the writer to see the outage")
            await until(lambda: log.statistics().spilled_total > 100, "the queue to fill and spill")
            assert log.statistics().queued <= 300
            await trio.to_thread.run_sync(fresh_postgres.start)
            await until(lambda: log.statistics().store_up, "the reconnect")
            await trio.sleep(0.3)  # traffic goes on after the recovery
            stop_recording.set()
            await log.wait_flushed()
            await until(lambda: os.listdir(tmp_path) == [], "the spill file's import")
            await until(lambda: _equals(acount(url), recorded), "every row in the table")
            nursery.cancel_scope.cancel()
    st = log.statistics()
    assert st.reconnects_total >= 1 and st.lost_total == 0
    assert counts(url) == (recorded, recorded, recorded)
    assert st.spilled_total > 100 and st.imported_total == st.spilled_total


def metrics_text(gw) -> str:
    body = gw.metrics.render()[1]
    return body.decode() if isinstance(body, bytes) else body


async def test_start_with_postgres_down_serves_then_writes(fresh_postgres, tmp_path, caplog) -> None:
    caplog.set_level(logging.WARNING)
    url = fresh_postgres.url().replace("postgres@", "postgres:s3cr3t-pw@")  # trust auth ignores it
    fresh_postgres.stop()
    async with trio.open_nursery() as nursery:
        _sim, upstream = await start_sim(nursery)
        config = msgspec.structs.replace(make_config([upstream]), usage=UsageConfig(
            database_url=url, spill_dir=str(tmp_path), retry_s=0.1, flush_s=0.02))
        with trio.fail_after(15):  # a refused connection does not hold the start back
            handle = await start_gateway(nursery, config)
        with trio.fail_after(15):
            raw = await raw_request(handle.port, post(CHAT, extra=b"X-Request-Id: pg-down-1\r\n"
                                                                  b"Connection: close\r\n"))
        assert split_response(raw)[0] == 200
        st = handle.gw.usage.statistics()
        assert not st.store_up and st.queued == 1
        assert "spotinference_usage_store_up 0.0" in metrics_text(handle.gw)
        await trio.to_thread.run_sync(fresh_postgres.start)
        await until(lambda: handle.gw.usage.statistics().written_total == 1, "the write")
        assert handle.gw.usage.statistics().reconnects_total == 1
        text = metrics_text(handle.gw)
        assert "spotinference_usage_store_up 1.0" in text
        assert "spotinference_usage_reconnects_total 1.0" in text
        nursery.cancel_scope.cancel()
    assert sql(url, "SELECT request_id, endpoint, model, status FROM usage") == [("pg-down-1", "chat",
                                                                                   "sim-chat", 200)]
    assert "s3cr3t-pw" not in caplog.text and "postgres:***@" in caplog.text


async def test_a_server_that_does_not_answer_does_not_hold_the_start_back(tmp_path) -> None:
    with socket.socket() as silent:  # the kernel completes the handshake; nobody ever answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        url = f"postgresql://app@127.0.0.1:{silent.getsockname()[1]}/usage"
        log = UsageLog(PgStore(url, connect_timeout_s=2), retry_s=30, spill_path=str(tmp_path / "s.jsonl"))
        with trio.fail_after(START_WAIT_S + 10):
            async with trio.open_nursery() as nursery:
                t0 = trio.current_time()
                await nursery.start(log.run)
                assert trio.current_time() - t0 < START_WAIT_S + 1
                assert not log.statistics().store_up
                log.record(row(1))
                nursery.cancel_scope.cancel()
    # The shutdown waited for the abandoned attempt (its connect timeout), then spilled the queued row.
    assert log.statistics().spilled_total == 1 and log.statistics().lost_total == 0


def test_supervisor_recovery_with_postgres_down_leaves_the_files(fresh_postgres, tmp_path, caplog) -> None:
    caplog.set_level(logging.WARNING)
    fresh_postgres.stop()
    (tmp_path / "usage.spill.w0.jsonl").write_bytes(encode_spill(items(range(3))))
    url = fresh_postgres.url().replace("postgres@", "postgres:s3cr3t-pw@")
    assert recover_usage_spills(UsageConfig(database_url=url, spill_dir=str(tmp_path))) == 0
    assert os.listdir(tmp_path) == ["usage.spill.w0.jsonl"]
    assert "cannot import spill files" in caplog.text and "s3cr3t-pw" not in caplog.text


def test_a_supervisor_and_two_workers_write_to_postgres(pg_url, tmp_path) -> None:
    from tests.support.production import ASK, client, gateway, rid, sim

    state = tmp_path / "state"  # [usage] spill_dir, relative to the config's folder (made if missing)
    leftover = items(range(5))
    with sim(tmp_path) as up:
        cfg = tmp_path / "gw.toml"
        cfg.write_text(f'[server]\nlisten = "127.0.0.1:0"\n[usage]\ndatabase_url = "{pg_url}"\n'
                       'spill_dir = "state"\nflush_s = 0.05\n[[tiers]]\nname = "local"\n'
                       f'upstreams = ["{up.url}"]\nmodels = ["sim-chat"]\n')
        state.mkdir()
        (state / "usage.spill.w7.jsonl").write_bytes(encode_spill(leftover))  # an earlier run's, 7 workers
        with gateway(cfg, "--workers", "2") as gw:
            for i in range(20):
                client(gw).chat.completions.create(model="sim-chat", messages=ASK, max_tokens=4,
                                                   extra_headers=rid(f"w{i}"))
            assert gw.stop() == 0  # SIGTERM: the workers drain and flush
            assert "Traceback" not in gw.stderr()
    got = sorted(r for (r,) in sql(pg_url, "SELECT request_id FROM usage"))
    assert got == sorted([f"w{i}" for i in range(20)] + [f"req-{i}" for i in range(5)])
    assert counts(pg_url) == (25, 25, 25) and list(state.iterdir()) == []


# -- config, factory, redaction -------------------------------------------------------------------------

def test_open_usage_log_picks_the_store_and_the_spill_file(tmp_path) -> None:
    assert open_usage_log(UsageConfig()) is None
    pg = open_usage_log(UsageConfig(database_url="postgresql://u:pw@db/usage", spill_dir=str(tmp_path / "s")))
    assert isinstance(pg.store, PgStore) and pg.spill_path == str(tmp_path / "s" / "usage.spill.jsonl")
    assert (tmp_path / "s").is_dir() and "pw" not in pg.where
    lite = open_usage_log(UsageConfig(path=str(tmp_path / "u.sqlite3")))
    assert lite.spill_path == str(tmp_path / "u.sqlite3.spill.jsonl")
    assert open_usage_log(UsageConfig(path="x"), spill_path="/w.jsonl").spill_path == "/w.jsonl"
    u = UsageConfig(database_url="postgresql://db/usage", spill_dir="/var/lib/spot")
    assert worker_spill_path(u, 3) == "/var/lib/spot/usage.spill.w3.jsonl"
    assert worker_spill_path(UsageConfig(path="/d/u.db"), 1) == "/d/u.db.spill.w1.jsonl"
    assert worker_spill_path(UsageConfig(), 1) is None


def test_the_spill_folder_defaults_to_the_config_folder(tmp_path) -> None:
    p = tmp_path / "gw.toml"
    tier = '[[tiers]]\nname = "local"\nupstreams = ["http://127.0.0.1:9"]\nmodels = ["m"]\n'
    p.write_text(f'[usage]\ndatabase_url = "postgresql://db/usage"\n{tier}')
    assert load(p).usage.spill_dir == str(tmp_path)
    p.write_text(f'[usage]\npath = "u.sqlite3"\n{tier}')
    assert load(p).usage.spill_dir is None


def test_redact_url() -> None:
    assert redact_url("postgresql://app:hunter2@db:5432/usage") == "postgresql://app:***@db:5432/usage"
    assert redact_url("postgresql://app@db/usage") == "postgresql://app@db/usage"
    assert "hunter2" not in redact_url("postgresql://db/usage?user=app&password=hunter2&sslmode=require")
    assert "sslmode=require" in redact_url("postgresql://db/usage?password=hunter2&sslmode=require")
    assert "hunter2" not in redact_url("postgresql://app:hunter2@[::1/usage")
    # libpq quotes a bad percent-escape, which may sit in the password; and decoded forms too
    assert scrub('invalid percent-encoded token: "hun%zz"\n', "postgresql://app:hun%zz@db/u") == \
        'invalid percent-encoded token: "***"'
    assert "p@ss" not in scrub("auth failed for p@ss", "postgresql://app:p%40ss@db/u")
    assert scrub("nothing to hide", "postgresql://db/u") == "nothing to hide"


# -- the report -----------------------------------------------------------------------------------------

def cli(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "proxy", "usage", *argv], cwd=ROOT, capture_output=True,
                          text=True, timeout=60, check=False)


def test_usage_report_from_postgres_matches_sqlite(pg_url, tmp_path) -> None:
    import time

    now = time.time()
    rows = [row(i, ts=now - 3600 - i, status=429 if i == 3 else 200, estimated=i == 5,
                latency_ms=None if i == 4 else 10.0 * i, key_name=None if i == 9 else f"key{i % 3}")
            for i in range(40)]
    rows += [row(100 + i, ts=now - 10 * 86400, model="old") for i in range(5)]
    conn = pg_store.connect(pg_url)
    pg_store.insert(conn, [(os.urandom(12).hex(), r) for r in rows])
    conn.close()
    db = str(tmp_path / "usage.sqlite3")
    lite = connect(db)
    insert_rows(lite, rows)
    lite.close()
    for args in (["--format", "json"], ["--by", "model", "--format", "csv"],
                 ["--since", "7d", "--by", "tier"], ["--since", "30m", "--format", "json"]):
        pg = cli("--database-url", pg_url, *args)
        assert pg.returncode == 0, pg.stderr
        assert pg.stdout == cli("--db", db, *args).stdout, args
    doc = json.loads(cli("--database-url", pg_url, "--format", "json").stdout)
    assert sum(g["requests"] for g in doc["groups"]) == 45 and None in {g["key"] for g in doc["groups"]}
    config = tmp_path / "gw.toml"
    config.write_text(f'[usage]\ndatabase_url = "{pg_url}"\n'
                      '[[tiers]]\nname = "local"\nupstreams = ["http://127.0.0.1:9"]\nmodels = ["m"]\n')
    via_config = cli("--config", str(config), "--format", "json")
    assert via_config.returncode == 0 and json.loads(via_config.stdout) == doc


def test_usage_report_unreachable_or_empty_postgres_exits_2(pg_url) -> None:
    down = f"postgresql://app:s3cr3t-pw@127.0.0.1:{free_port()}/x"  # nothing listens there
    r = cli("--database-url", down)
    assert r.returncode == 2 and "cannot connect to postgresql://app:***@" in r.stderr
    assert "s3cr3t-pw" not in r.stderr and "Traceback" not in r.stderr
    r = cli("--database-url", pg_url)  # no usage table yet: a report creates nothing
    assert r.returncode == 2 and "no readable usage table" in r.stderr and "Traceback" not in r.stderr
    assert sql(pg_url, "SELECT count(*) FROM pg_tables WHERE tablename = 'usage'") == [(0,)]
