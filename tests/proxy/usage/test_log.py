"""UsageLog against real SQLite files: batching, shutdown flush, spill and re-import, failures."""

from __future__ import annotations

import os
import shutil
import sqlite3

import pytest
import trio
import trio.lowlevel

from proxy.usage.log import (
    SCHEMA_VERSION,
    UsageLog,
    UsageRow,
    UsageSchemaError,
    _insert,
    _values,
    connect,
    recover_spills,
)


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


def count(path: str) -> int:
    with sqlite3.connect(path) as c:
        return c.execute("SELECT count(*) FROM usage").fetchone()[0]


def read_lines(path: str) -> list[bytes]:
    with open(path, "rb") as f:
        return f.read().splitlines()


def append(path: str, data: bytes) -> None:
    with open(path, "ab") as f:
        f.write(data)


def ids(path: str) -> list[str]:
    with sqlite3.connect(path) as c:
        return [r[0] for r in c.execute("SELECT request_id FROM usage ORDER BY id")]


async def test_thousands_of_rows_round_trip(tmp_path) -> None:
    db = str(tmp_path / "usage.sqlite3")
    log = UsageLog(db, batch_max=200, flush_s=0.05)
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(log.run)
            for i in range(5000):
                log.record(row(i))
                if i % 97 == 0:
                    await trio.lowlevel.checkpoint()
            await log.wait_flushed()
            st = log.statistics()
            assert st.written_total == 5000 and st.queued == 0 and st.spilled_total == 0
            assert st.batches_total >= 25  # batch_max respected
            nursery.cancel_scope.cancel()
    assert count(db) == 5000
    with sqlite3.connect(db) as c:
        c.row_factory = sqlite3.Row
        r = c.execute("SELECT * FROM usage WHERE request_id = 'req-7'").fetchone()
        assert dict(r) | {"id": 0, "uid": None} == {
            "id": 0, "ts": 1_700_000_007.0, "request_id": "req-7", "key_name": "key1", "model": "qwen3-coder",
            "tier": "h100x2", "endpoint": "/v1/chat/completions", "stream": 1, "status": 200,
            "prompt_tokens": 17, "completion_tokens": 7, "total_tokens": 24, "estimated": 0, "ttfb_ms": 1.5,
            "latency_ms": 27.0, "wake_ms": None, "upstream": "10.0.1.5:8000", "error_type": None, "uid": None,
        }
        assert c.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert c.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert not os.path.exists(db + ".spill.jsonl")


async def test_shutdown_flushes_everything_queued(tmp_path) -> None:
    db = str(tmp_path / "usage.sqlite3")
    log = UsageLog(db, batch_max=100, flush_s=3600)  # nothing would be written before shutdown
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(log.run)
            for i in range(2500):
                log.record(row(i))
            # The writer starts a batch: cancellation arrives with one in flight.
            await trio.lowlevel.checkpoint()
            nursery.cancel_scope.cancel()
    assert count(db) == 2500
    assert ids(db) == [f"req-{i}" for i in range(2500)]  # in order, once each
    assert log.statistics().written_total == 2500
    # After shutdown, a late row goes to the spill file and the next start imports it.
    log.record(row(9999))
    assert log.statistics().spilled_total == 1
    log2 = UsageLog(db)
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(log2.run)
            nursery.cancel_scope.cancel()
    assert count(db) == 2501 and log2.statistics().imported_total == 1


async def test_full_queue_spills_and_counts_then_start_imports(tmp_path) -> None:
    db = str(tmp_path / "usage.sqlite3")
    log = UsageLog(db, queue_max=10)
    for i in range(25):  # no writer yet: the queue fills, the rest spills
        log.record(row(i))
    st = log.statistics()
    assert (st.queued, st.spilled_total) == (10, 15)
    lines = read_lines(db + ".spill.jsonl")
    assert len(lines) == 15 and b"req-10" in lines[0] and b"secret" not in lines[0]
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(log.run)
            await log.wait_flushed()
            nursery.cancel_scope.cancel()
    assert count(db) == 25
    assert sorted(ids(db)) == sorted(f"req-{i}" for i in range(25))
    assert log.statistics().imported_total == 15
    assert not os.path.exists(db + ".spill.jsonl")


async def test_restart_reimports_spill_exactly_once(tmp_path) -> None:
    db = str(tmp_path / "usage.sqlite3")
    first = UsageLog(db, queue_max=50, flush_s=3600)
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(first.run)
            for i in range(200):  # one burst, no checkpoint: 150 spill
                first.record(row(i))
            nursery.cancel_scope.cancel()
    assert first.statistics().spilled_total == 150
    assert count(db) == 50
    kept = str(tmp_path / "copy.jsonl")
    shutil.copy(db + ".spill.jsonl", kept)
    second = UsageLog(db)
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(second.run)
            assert count(db) == 200  # imported before started() returned
            nursery.cancel_scope.cancel()
    assert second.statistics().imported_total == 150
    # The same spill file again (a crash between commit and unlink): the uids make it a no-op.
    shutil.copy(kept, db + ".spill.jsonl")
    assert recover_spills(db) == 150
    assert count(db) == 200


async def test_failed_batch_is_spilled_not_lost(tmp_path) -> None:
    db = str(tmp_path / "usage.sqlite3")
    log = UsageLog(db, batch_max=10, flush_s=0.01)
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(log.run)
            with sqlite3.connect(db) as c:
                c.execute("CREATE TRIGGER boom BEFORE INSERT ON usage WHEN NEW.request_id = 'req-3' "
                          "BEGIN SELECT RAISE(ABORT, 'refused'); END")
            for i in range(10):
                log.record(row(i))
            await log.wait_flushed()
            st = log.statistics()
            assert st.write_errors_total == 1 and st.spilled_total == 10 and st.written_total == 0
            nursery.cancel_scope.cancel()
    with sqlite3.connect(db) as c:
        c.execute("DROP TRIGGER boom")
    assert recover_spills(db) == 10
    assert count(db) == 10


async def test_newer_schema_is_refused_and_queued_rows_spill(tmp_path) -> None:
    db = str(tmp_path / "usage.sqlite3")
    with sqlite3.connect(db) as c:
        c.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    log = UsageLog(db)
    log.record(row(1))
    with trio.fail_after(30), pytest.raises(UsageSchemaError):
        await log.run()
    assert log.statistics().spilled_total == 1


async def test_torn_spill_line_is_skipped(tmp_path) -> None:
    db = str(tmp_path / "usage.sqlite3")
    log = UsageLog(db, queue_max=0)
    log.record(row(1))
    log.record(row(2))
    log._close_spill_fd()
    append(db + ".spill.jsonl", b'{"uid":"x","row":{"ts":1.0,"req')  # a crash mid-line
    assert recover_spills(db) == 2
    assert sorted(ids(db)) == ["req-1", "req-2"]


async def test_two_workers_share_one_database(tmp_path) -> None:
    db = str(tmp_path / "usage.sqlite3")
    logs = [UsageLog(db, batch_max=50, flush_s=0.01, spill_path=f"{db}.spill.w{k}.jsonl") for k in range(2)]
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            for lg in logs:
                await nursery.start(lg.run)
            for i in range(1000):
                logs[i % 2].record(row(i))
                if i % 50 == 0:
                    await trio.lowlevel.checkpoint()
            for lg in logs:
                await lg.wait_flushed()
            nursery.cancel_scope.cancel()
    assert count(db) == 1000


async def test_recover_spills_imports_every_worker_file(tmp_path) -> None:
    db = str(tmp_path / "usage.sqlite3")
    for k in range(3):
        lg = UsageLog(db, queue_max=0, spill_path=f"{db}.spill.w{k}.jsonl")
        for i in range(4):
            lg.record(row(10 * k + i))
        lg._close_spill_fd()
    assert recover_spills(db) == 12
    assert count(db) == 12
    assert recover_spills(db) == 0


def test_the_database_and_its_wal_and_shm_files_are_the_owners_alone(tmp_path):
    import os
    import stat

    db = str(tmp_path / "usage.sqlite3")
    old = os.umask(0o022)  # a typical umask: files would be 0644
    try:
        conn = connect(db)
        try:
            _insert(conn, [_values(UsageRow(ts=1.0, request_id="r1", endpoint="chat", status=200), None)])
            for name in ("usage.sqlite3", "usage.sqlite3-wal", "usage.sqlite3-shm"):
                mode = stat.S_IMODE(os.stat(tmp_path / name).st_mode)
                assert mode == 0o600, (name, oct(mode))
        finally:
            conn.close()
        # An older database created 0644 is narrowed when opened.
        os.chmod(db, 0o644)
        connect(db).close()
        assert stat.S_IMODE(os.stat(db).st_mode) == 0o600
    finally:
        os.umask(old)
