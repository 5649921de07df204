"""The usage log: one database row per request, written in batches off the hot path, never lost or doubled.

Strategy:
* `UsageLog.record` is called on the event loop for every finished request. It gives the row its uid
  (12 random bytes, hex) and appends ``(uid, row)`` to a bounded deque (O(1), no await, no lock). When
  the deque is full -- the database is slow or down -- the pair is appended as one JSON line to this
  process's spill file instead (one small write, counted in `UsageStatistics.spilled_total`). Rows are
  never dropped; only a failing spill write (disk full) loses a row, and that is counted
  (``lost_total``) and logged.
* The database is a store (store.py): SQLite (sqlite_store.py, ``[usage] path``) or PostgreSQL
  (pg_store.py, ``[usage] database_url``); `open_usage_log` picks it from the config. Store calls run
  in a worker thread (``trio.to_thread.run_sync``, a one-slot CapacityLimiter), never on the loop.
* `UsageLog.run` owns the writer: it opens the store, reports readiness, and then writes batches (up to
  ``batch_max`` rows, at least every ``flush_s`` seconds while rows wait), one transaction each. Every
  insert skips uids already in the table, so a batch re-sent after a lost acknowledgement adds nothing.
* Broken store: a failed write spills its batch (with its uids) and marks the store down; so does a
  failed first open of a store that is not `fail_fast` (PostgreSQL: serving starts anyway, after at most
  ``START_WAIT_S`` for a server that does not answer; SQLite's first open still raises, a bad path
  being a config error; a schema newer than the code raises for both). While down, new rows wait in
  the queue up to ``queue_max`` and then spill; every ``retry_s`` the writer reconnects
  (``reconnects_total``, ``store_up``; a schema found newer on a reconnect keeps it down, logged, and
  serving goes on). Once up, it imports this process's own spill file and then writes the queue.
* Importing a spill file safely: on the loop, with no checkpoint in between, the spill fd is closed and
  the file renamed to ``<spill>.importing.jsonl``; `record` then appends to a fresh spill file, never to
  the one being imported, and the import (in chunks, each idempotent) removes the renamed file when done.
  An import that fails leaves it for the next attempt, which takes it first. Rows spilled while the
  store is up (a burst over ``queue_max``) are imported the same way once the writer is idle.
* Shutdown is cancellation: the writer catches it in a shielded ``finally`` and writes everything still
  queued (or spills it, if the store is down) before returning. After that, `record` spills directly.
* GPU time (gpu_time.py) shares all of this: `record_gpu_time` queues a `GpuTimeRow` under its
  deterministic uid (`gpu_time_uid`) in the same deque, batch and spill file; `record`, the hot path,
  is untouched. Each store writes both kinds of a batch in one transaction, skipping known uids, so a
  minute recorded by several workers is one row.
* The spill file belongs to one process: with several workers each needs its own ``spill_path``
  (`worker_spill_path`); `recover_usage_spills` imports every spill file of the store and is meant for
  the supervisor before workers start. A worker imports only its own file.

Rows carry the key's name, never its secret, and no prompt or completion text.
"""

from __future__ import annotations

import collections
import glob
import logging
import os
import time
from typing import TYPE_CHECKING

import msgspec
import trio

from proxy.usage.sqlite_store import (  # noqa: F401  (re-exported: tools and tests)
    SCHEMA_VERSION,
    SqliteStore,
    _insert,
    _values,
    connect,
    import_spill_file,
    insert_rows,
    recover_spills,
)
from proxy.usage.store import (
    GpuTimeRow,
    Item,
    UsageRow,
    UsageSchemaError,
    UsageStore,
    encode_spill,
    gpu_time_uid,
)

if TYPE_CHECKING:
    from proxy.config import UsageConfig

log = logging.getLogger(__name__)

__all__ = ["GpuTimeRow", "UsageLog", "UsageRow", "UsageSchemaError", "UsageStatistics", "open_usage_log",
           "recover_usage_spills", "worker_spill_path"]

PG_SPILL_NAME = "usage.spill"  # PostgreSQL: <spill_dir>/usage.spill[.w<N>].jsonl
_DOWN_LOG_EVERY_S = 60.0  # while the store stays down, one log line per minute
START_WAIT_S = 2.0  # a store that is not fail_fast: how long run() waits for it before serving anyway


class UsageStatistics(msgspec.Struct, frozen=True):
    queued: int
    written_total: int
    spilled_total: int
    batches_total: int
    imported_total: int
    write_errors_total: int
    lost_total: int
    store_up: bool
    reconnects_total: int


def importing_path(spill_path: str) -> str:
    """Where a spill file is moved while it is imported (still matches ``*.spill*.jsonl``)."""
    stem, dot, ext = spill_path.rpartition(".")
    return f"{stem}.importing.{ext}" if dot and ext == "jsonl" else spill_path + ".importing"


class UsageLog:
    """Batched, non-blocking usage writer for one process. See the module docstring.

    `store`: a `UsageStore`, or the path of a SQLite file (spill file ``<path>.spill.jsonl`` by default).
    """

    def __init__(
        self,
        store: UsageStore | str,
        *,
        queue_max: int = 10000,
        batch_max: int = 500,
        flush_s: float = 0.5,
        retry_s: float = 2.0,
        spill_path: str | None = None,
    ) -> None:
        if isinstance(store, str):
            if spill_path is None:
                spill_path = store + ".spill.jsonl"
            store = SqliteStore(store)
        if spill_path is None:
            raise ValueError("UsageLog: a store other than a SQLite path needs a spill_path")
        self.store = store
        self.where = store.describe()
        self.spill_path = spill_path
        self._importing = importing_path(spill_path)
        self._queue_max = queue_max
        self._batch_max = max(1, batch_max)
        self._flush_s = flush_s
        self._retry_s = retry_s
        self._queue: collections.deque[Item] = collections.deque()
        self._limiter = trio.CapacityLimiter(1)
        self._up = False  # the store is open and its last call succeeded
        self._spill_dirty = True  # a spill file of ours may exist: import it when the store is up
        self._closed = False  # run() has finished: record() spills directly
        self._kick = trio.Event()
        self._need = 1 << 62  # the writer waits until len(queue) >= _need
        self._flush_now = False  # wait_flushed() asked: write without waiting for flush_s
        self._in_flight = 0
        self._spill_fd: int | None = None
        self._down_attempts = 0
        self._down_logged_at = 0.0
        self._written = 0
        self._spilled = 0
        self._batches = 0
        self._imported = 0
        self._write_errors = 0
        self._lost = 0
        self._reconnects = 0

    # -- the hot path ------------------------------------------------------------------------------------

    def record(self, row: UsageRow) -> None:
        """Queue one row; never blocks. A full queue (or a stopped log) sends the row to the spill file."""
        item = (os.urandom(12).hex(), row)
        q = self._queue
        if self._closed or len(q) >= self._queue_max:
            self._spill((item,))
            return
        q.append(item)
        if len(q) >= self._need:
            self._kick.set()

    def record_gpu_time(self, row: GpuTimeRow) -> None:
        """Queue one GPU-time row under its deterministic uid; like `record`, never blocks or drops."""
        item = (gpu_time_uid(row), row)
        if self._closed or len(self._queue) >= self._queue_max:
            self._spill((item,))
            return
        self._queue.append(item)
        if len(self._queue) >= self._need:
            self._kick.set()

    def statistics(self) -> UsageStatistics:
        return UsageStatistics(
            queued=len(self._queue),
            written_total=self._written,
            spilled_total=self._spilled,
            batches_total=self._batches,
            imported_total=self._imported,
            write_errors_total=self._write_errors,
            lost_total=self._lost,
            store_up=self._up,
            reconnects_total=self._reconnects,
        )

    # -- the writer ----------------------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Open the store, import spilled rows, write batches until cancelled; flush on the way out.

        Raises before `task_status.started()` only for a schema newer than this code, or when a
        `fail_fast` store (SQLite) cannot be opened; otherwise a store that is down is retried.
        """
        try:
            await self._start()
            task_status.started()
            while True:
                if not self._up:
                    await trio.sleep(self._retry_s)
                    await self._reconnect()
                    continue
                if self._spill_dirty:  # then the queue, then (if rows spilled meanwhile) the file again
                    await self._import_spills()
                    while self._queue and self._up:
                        await self._write_batch()
                    continue
                await self._wait_rows(1)
                if len(self._queue) < self._batch_max:
                    with trio.move_on_after(self._flush_s):
                        await self._wait_rows(self._batch_max)
                while self._queue and self._up:
                    await self._write_batch()
                self._flush_now = False
        finally:
            with trio.CancelScope(shield=True):
                await self._shutdown()

    async def wait_flushed(self) -> None:
        """Return once every row recorded so far has been written (or spilled). For tests and drain.
        While the store is down this waits for it to come back."""
        while self._queue or self._in_flight:
            self._flush_now = True
            self._kick.set()
            await trio.sleep(0.005)

    async def _wait_rows(self, n: int) -> None:
        while len(self._queue) < n and not self._flush_now:
            self._need = n
            self._kick = trio.Event()
            try:
                await self._kick.wait()
            finally:
                self._need = 1 << 62

    async def _thread(self, fn, *args):
        return await trio.to_thread.run_sync(fn, *args, limiter=self._limiter)

    async def _start(self) -> None:
        if self.store.fail_fast:  # SQLite: a bad path raises; spilled rows are in before serving, as ever
            await self._thread(self.store.open)
            self._up = True
            await self._import_spills()
            return
        # A database that does not answer at once does not hold serving back: after START_WAIT_S the
        # attempt is abandoned (its thread keeps the limiter until it ends, so the store is never used
        # by two threads) and the writer retries like after any outage.
        try:
            with trio.move_on_after(START_WAIT_S) as waited:
                await trio.to_thread.run_sync(self.store.open, limiter=self._limiter, abandon_on_cancel=True)
        except UsageSchemaError:
            raise
        except self.store.errors as exc:  # the database is down: serve anyway
            self._note_down(exc, "connecting")
            return
        except Exception as exc:  # not the database's doing: logged with its traceback, retried all the same
            log.exception("usage: connecting to %s failed", self.where)
            self._note_down(exc, "connecting")
            return
        if waited.cancelled_caught:
            self._note_down(TimeoutError(f"no answer within {START_WAIT_S:g} s"), "connecting")
            return
        self._up = True

    async def _reconnect(self) -> None:
        try:
            await self._thread(self.store.open)
        except UsageSchemaError as exc:  # another host upgraded the schema: not ours to write, say so
            self._note_down(exc, "reconnecting", level=logging.ERROR)
            return
        except self.store.errors as exc:
            self._note_down(exc, "reconnecting")
            return
        except Exception as exc:  # not the database's doing: logged with its traceback, retried all the same
            log.exception("usage: reconnecting to %s failed", self.where)
            self._note_down(exc, "reconnecting")
            return
        self._up = True
        self._reconnects += 1
        self._spill_dirty = True
        log.warning("usage: %s is back after %d attempts; importing %s, then writing %d queued rows",
                    self.where, self._down_attempts, self.spill_path, len(self._queue))
        self._down_attempts = 0

    def _note_down(self, exc: BaseException, doing: str, level: int = logging.WARNING) -> None:
        """The store is down: log the first failure, then one line a minute while it stays down."""
        self._up = False
        self._down_attempts += 1
        now = time.monotonic()
        if self._down_attempts == 1 or now - self._down_logged_at >= _DOWN_LOG_EVERY_S:
            self._down_logged_at = now
            log.log(level, "usage: %s is down (%s: %s; attempt %d); rows wait in the queue (%d of %d), "
                    "then in %s; retrying every %g s", self.where, doing, self.store.explain(exc),
                    self._down_attempts, len(self._queue), self._queue_max, self.spill_path, self._retry_s)

    async def _broken(self, exc: BaseException, doing: str) -> None:
        self._note_down(exc, doing)
        try:
            await self._thread(self.store.close)
        except Exception:
            log.exception("usage: closing %s failed", self.where)

    async def _import_spills(self) -> None:
        """Import our own spill file (and one left by an earlier failed import); the store is up."""
        self._spill_dirty = False
        n = 0
        try:
            if os.path.exists(self._importing):  # left by a failed import or a crash: nobody appends to it
                n += await self._thread(self.store.import_spill, self._importing)
            if self._take_spill_file():
                n += await self._thread(self.store.import_spill, self._importing)
        except Exception as exc:
            if not isinstance(exc, self.store.errors):
                log.exception("usage: importing %s into %s failed", self._importing, self.where)
            self._spill_dirty = True
            await self._broken(exc, f"importing {self._importing}")
            return
        finally:
            self._imported += n
        if n:
            log.info("usage: imported %d spilled rows into %s", n, self.where)

    def _take_spill_file(self) -> bool:
        """Move the spill file aside for import. No checkpoint here: `record` appends to a fresh file
        from now on, never to the one being imported."""
        self._close_spill_fd()
        try:
            os.rename(self.spill_path, self._importing)
        except FileNotFoundError:
            return False
        return True

    async def _write_batch(self) -> None:
        q = self._queue
        k = min(len(q), self._batch_max)
        batch = [q.popleft() for _ in range(k)]
        self._in_flight += k
        try:
            # Shielded: the rows have left the queue, so the write must not be cancelled before the
            # thread starts (that would lose them). It is short; a cancellation lands right after it.
            with trio.CancelScope(shield=True):
                exc = await self._thread(self._write, batch)
                if exc is not None:
                    self._write_errors += 1
                    self._spill(batch)
                    await self._broken(exc, f"writing {k} rows")
        finally:
            self._in_flight -= k
        if exc is None:
            self._written += k
            self._batches += 1

    async def _shutdown(self) -> None:
        # Shielded: everything queued goes to the database, or to the spill file if it is down.
        while self._queue:
            if not self._up:
                items = tuple(self._queue)
                self._queue.clear()
                self._spill(items)
                break
            await self._write_batch()
        self._closed = True
        self._up = False
        try:
            await self._thread(self.store.close)
        except Exception:
            log.exception("usage: closing %s failed", self.where)
        self._close_spill_fd()

    # -- blocking work, in a thread ------------------------------------------------------------------------

    def _write(self, batch: list[Item]) -> BaseException | None:
        try:
            self.store.insert(batch)
        except Exception as exc:  # whatever it is, the writer lives on: the batch is spilled
            if not isinstance(exc, self.store.errors):
                log.exception("usage: writing %d rows to %s failed; spilling them", len(batch), self.where)
            return exc
        return None

    # -- the spill file (event loop; one small write per call) ---------------------------------------------

    def _spill(self, items: tuple[Item, ...] | list[Item]) -> None:
        data = encode_spill(items)
        try:
            if self._spill_fd is None:
                self._spill_fd = os.open(self.spill_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            view = memoryview(data)
            while view:
                view = view[os.write(self._spill_fd, view):]
        except OSError as exc:
            self._lost += len(items)
            log.error("usage: %d rows lost: cannot append to %s: %s", len(items), self.spill_path,
                      exc.strerror)
            return
        self._spilled += len(items)
        self._spill_dirty = True

    def _close_spill_fd(self) -> None:
        if self._spill_fd is not None:
            fd, self._spill_fd = self._spill_fd, None
            os.close(fd)


# -- from the config -----------------------------------------------------------------------------------


def _spill_folder(usage_config: UsageConfig) -> str:
    return usage_config.spill_dir or os.getcwd()


def worker_spill_path(usage_config: UsageConfig, index: int) -> str | None:
    """The spill file of worker `index` under the supervisor (each worker has its own)."""
    if usage_config.database_url:
        return os.path.join(_spill_folder(usage_config), f"{PG_SPILL_NAME}.w{index}.jsonl")
    if usage_config.path:
        return f"{usage_config.path}.spill.w{index}.jsonl"
    return None


def open_usage_log(usage_config: UsageConfig, *, spill_path: str | None = None) -> UsageLog | None:
    """The usage log `[usage]` names (PostgreSQL or SQLite), or None when it names neither.
    Nothing is opened yet: `UsageLog.run` does that."""
    u = usage_config
    if u.database_url:
        from proxy.usage.pg_store import PgStore  # psycopg: the `cluster` extra

        store: UsageStore = PgStore(u.database_url)
        if spill_path is None:
            spill_path = os.path.join(_spill_folder(u), f"{PG_SPILL_NAME}.jsonl")
        os.makedirs(os.path.dirname(spill_path) or ".", mode=0o700, exist_ok=True)  # rows wait there
    elif u.path:
        store = SqliteStore(u.path)
        if spill_path is None:
            spill_path = u.path + ".spill.jsonl"
    else:
        return None
    return UsageLog(store, queue_max=u.queue_max, batch_max=u.batch_max, flush_s=u.flush_s, retry_s=u.retry_s,
                    spill_path=spill_path)


def recover_usage_spills(usage_config: UsageConfig) -> int:
    """Import every spill file of the configured store; for the supervisor before workers start. Blocking.

    PostgreSQL down: logged, the files stay; each worker imports its own once it connects, the rest
    at the next start. A schema newer than this code raises `UsageSchemaError`, as SQLite's does.
    """
    u = usage_config
    if u.database_url:
        from proxy.usage import pg_store

        pattern = os.path.join(glob.escape(_spill_folder(u)), f"{PG_SPILL_NAME}*.jsonl")
        try:
            return pg_store.recover_spills_pg(u.database_url, pattern)
        except pg_store.PgStore.errors as exc:
            store = pg_store.PgStore(u.database_url)
            log.warning("usage: cannot import spill files into %s now (%s); they stay for the workers",
                        store.describe(), store.explain(exc))
            return 0
    if u.path:
        return recover_spills(u.path)
    return 0
