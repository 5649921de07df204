"""The usage log: one SQLite row per request, written in batches off the hot path, never silently lost.

Strategy:
* `UsageLog.record` is called on the event loop for every finished request. It appends to a bounded
  deque (O(1), no await, no lock). When the deque is full -- the disk is slow or the writer is stuck --
  the row is appended as one JSON line to a spill file instead (``<path>.spill.jsonl``; one small write,
  counted in `UsageStatistics.spilled_total`). Rows are never dropped; only a failing spill write (disk
  full) loses a row, and that is counted (``lost_total``) and logged.
* `UsageLog.run` owns the writer: it opens the database in a worker thread (WAL, ``synchronous=NORMAL``,
  ``busy_timeout`` so several gateway workers can share one file), imports the spill file left by an
  earlier run, reports readiness, and then writes batches (up to ``batch_max`` rows, at least every
  ``flush_s`` seconds while rows wait) in one transaction each, through ``trio.to_thread.run_sync``
  with a one-slot CapacityLimiter. sqlite never runs on the event loop.
* Shutdown is cancellation: the writer catches it in a shielded ``finally`` and writes everything still
  queued before returning. After that, `record` writes straight to the spill file. A batch whose write
  fails is spilled, so the rows reach the database at the next start.
* The spill file belongs to one process: with several workers each needs its own ``spill_path``
  (e.g. ``<path>.spill.w<N>.jsonl``); `recover_spills` imports every ``<path>.spill*.jsonl`` and is meant
  for the supervisor before workers start. Each spilled line carries a random ``uid`` that is UNIQUE in
  the table, so importing the same file twice (a crash between commit and unlink) adds nothing.
* Schema is versioned with ``PRAGMA user_version``; `_MIGRATIONS` holds one step per version. A database
  newer than this code is refused rather than written to.

Rows carry the key's name, never its secret, and no prompt or completion text.
"""

from __future__ import annotations

import collections
import glob
import logging
import os
import sqlite3

import msgspec
import trio

log = logging.getLogger(__name__)


class UsageRow(msgspec.Struct, kw_only=True):
    """One request. Times in milliseconds; ``ts`` is the unix time the request arrived."""

    ts: float
    request_id: str
    key_name: str | None = None
    model: str | None = None
    tier: str | None = None
    endpoint: str = ""
    stream: bool = False
    status: int = 0
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    total_tokens: int | None = None
    estimated: bool = False
    ttfb_ms: float | None = None
    latency_ms: float | None = None
    wake_ms: float | None = None
    upstream: str | None = None
    error_type: str | None = None


class UsageStatistics(msgspec.Struct, frozen=True):
    queued: int
    written_total: int
    spilled_total: int
    batches_total: int
    imported_total: int
    write_errors_total: int
    lost_total: int


class _Spill(msgspec.Struct):
    uid: str
    row: UsageRow


_COLUMNS = UsageRow.__struct_fields__
SCHEMA_VERSION = 1
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
}
_INSERT = (
    f"INSERT OR IGNORE INTO usage ({', '.join(_COLUMNS)}, uid) "
    f"VALUES ({', '.join('?' * (len(_COLUMNS) + 1))})"
)
_spill_encoder = msgspec.json.Encoder()
_spill_decoder = msgspec.json.Decoder(_Spill)


class UsageSchemaError(RuntimeError):
    """The database was written by a newer version of the gateway, or is not a usage log."""


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


def insert_rows(conn: sqlite3.Connection, rows: list[UsageRow]) -> None:
    """Insert rows in one transaction on a connection from `connect`. Blocking (tools and tests)."""
    _insert(conn, [_values(r, None) for r in rows])


def import_spill_file(conn: sqlite3.Connection, spill_path: str) -> int:
    """Insert the rows of one spill file, then remove it. Returns the rows read. Blocking.

    Lines that do not decode (a torn last line after a crash) are logged and skipped.
    """
    try:
        with open(spill_path, "rb") as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        return 0
    values = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            s = _spill_decoder.decode(line)
        except msgspec.DecodeError:
            log.warning("usage spill %s: line %d is not a usage row; skipped", spill_path, n)
            continue
        values.append(_values(s.row, s.uid))
    if values:
        _insert(conn, values)
    os.unlink(spill_path)
    return len(values)


def recover_spills(path: str) -> int:
    """Import every ``<path>.spill*.jsonl`` into the database at `path`. Blocking.

    For the supervisor, before any worker runs (a live worker may still be appending to its file).
    """
    files = sorted(glob.glob(glob.escape(path) + ".spill*.jsonl"))
    if not files:
        return 0
    conn = connect(path)
    try:
        return sum(import_spill_file(conn, f) for f in files)
    finally:
        conn.close()


class UsageLog:
    """Batched, non-blocking usage writer for one process. See the module docstring."""

    def __init__(
        self,
        path: str,
        *,
        queue_max: int = 10000,
        batch_max: int = 500,
        flush_s: float = 0.5,
        spill_path: str | None = None,
    ) -> None:
        self.path = path
        self.spill_path = spill_path if spill_path is not None else path + ".spill.jsonl"
        self._queue_max = queue_max
        self._batch_max = max(1, batch_max)
        self._flush_s = flush_s
        self._queue: collections.deque[UsageRow] = collections.deque()
        self._limiter = trio.CapacityLimiter(1)
        self._conn: sqlite3.Connection | None = None
        self._opening = False  # the spill file is being imported: record() must not append to it
        self._closed = False  # run() has finished: record() spills directly
        self._kick = trio.Event()
        self._need = 1 << 62  # the writer waits until len(queue) >= _need
        self._flush_now = False  # wait_flushed() asked: write without waiting for flush_s
        self._in_flight = 0
        self._spill_fd: int | None = None
        self._written = 0
        self._spilled = 0
        self._batches = 0
        self._imported = 0
        self._write_errors = 0
        self._lost = 0

    # -- the hot path ------------------------------------------------------------------------------------

    def record(self, row: UsageRow) -> None:
        """Queue one row; never blocks. A full queue (or a stopped log) sends the row to the spill file."""
        q = self._queue
        if self._closed or (len(q) >= self._queue_max and not self._opening):
            self._spill((row,))
            return
        q.append(row)
        if len(q) >= self._need:
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
        )

    # -- the writer ----------------------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Open the database, import spilled rows, write batches until cancelled; flush on the way out."""
        try:
            self._close_spill_fd()
            self._opening = True
            try:
                self._conn, imported = await trio.to_thread.run_sync(self._open, limiter=self._limiter)
            finally:
                self._opening = False
            self._imported += imported
            if imported:
                log.info("usage: imported %d spilled rows into %s", imported, self.path)
            task_status.started()
            while True:
                await self._wait_rows(1)
                if len(self._queue) < self._batch_max:
                    with trio.move_on_after(self._flush_s):
                        await self._wait_rows(self._batch_max)
                while self._queue:
                    await self._write_batch()
                self._flush_now = False
        finally:
            with trio.CancelScope(shield=True):
                await self._shutdown()

    async def wait_flushed(self) -> None:
        """Return once every row recorded so far has been written (or spilled). For tests and drain."""
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

    async def _write_batch(self) -> None:
        q = self._queue
        k = min(len(q), self._batch_max)
        batch = [q.popleft() for _ in range(k)]
        self._in_flight += k
        try:
            # Shielded: the rows have left the queue, so the write must not be cancelled before the
            # thread starts (that would lose them). It is short; a cancellation lands right after it.
            with trio.CancelScope(shield=True):
                ok = await trio.to_thread.run_sync(self._write, batch, limiter=self._limiter)
        finally:
            self._in_flight -= k
        if ok:
            self._written += k
            self._batches += 1
        else:
            self._write_errors += 1
            self._spill(batch)

    async def _shutdown(self) -> None:
        # Shielded: everything queued goes to the database, or to the spill file if there is none.
        while self._queue:
            if self._conn is None:
                rows = tuple(self._queue)
                self._queue.clear()
                self._spill(rows)
                break
            await self._write_batch()
        self._closed = True
        conn, self._conn = self._conn, None
        if conn is not None:
            await trio.to_thread.run_sync(conn.close, limiter=self._limiter)
        self._close_spill_fd()

    # -- blocking work, in a thread ------------------------------------------------------------------------

    def _open(self) -> tuple[sqlite3.Connection, int]:
        conn = connect(self.path)
        try:
            imported = import_spill_file(conn, self.spill_path)
        except (sqlite3.Error, OSError):
            log.exception("usage: could not import %s; it stays for the next start", self.spill_path)
            imported = 0
        return conn, imported

    def _write(self, batch: list[UsageRow]) -> bool:
        assert self._conn is not None
        try:
            _insert(self._conn, [_values(r, None) for r in batch])
        except sqlite3.Error:
            log.exception("usage: writing %d rows to %s failed; spilling them", len(batch), self.path)
            return False
        return True

    # -- the spill file (event loop; one small write per call) ---------------------------------------------

    def _spill(self, rows: tuple[UsageRow, ...] | list[UsageRow]) -> None:
        data = b"".join(
            _spill_encoder.encode(_Spill(uid=os.urandom(12).hex(), row=r)) + b"\n" for r in rows
        )
        try:
            if self._spill_fd is None:
                self._spill_fd = os.open(self.spill_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            view = memoryview(data)
            while view:
                view = view[os.write(self._spill_fd, view):]
        except OSError as exc:
            self._lost += len(rows)
            log.error("usage: %d rows lost: cannot append to %s: %s", len(rows), self.spill_path,
                      exc.strerror)
            return
        self._spilled += len(rows)

    def _close_spill_fd(self) -> None:
        if self._spill_fd is not None:
            fd, self._spill_fd = self._spill_fd, None
            os.close(fd)
