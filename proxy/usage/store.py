"""What the usage writer (log.py) needs from a database: the row, the spill-line format, the store contract.

Strategy: `UsageLog` owns queueing, batching, spilling and retrying; a store only talks to one database,
blocking, always from a worker thread (`trio.to_thread.run_sync`, one call at a time). A store:
* `open()` connects (closing any earlier connection) and brings the schema up to date, refusing a newer
  one with `UsageSchemaError`;
* `insert(items)` writes ``(uid, row)`` pairs in one transaction, idempotently: a uid already in the
  table is skipped, so a batch re-sent after a lost acknowledgement adds nothing;
* `import_spill(path)` inserts a spill file's rows (in chunks of `IMPORT_CHUNK`, each idempotent) and
  removes the file;
* `close()`; `errors`, the exception types of a failing database (the writer spills and retries on
  them); `fail_fast`, whether a failure of the first `open()` is fatal (SQLite: a bad path is a config
  error) or just the database being down (PostgreSQL: serving goes on, the writer retries);
  `describe()`, the database for log lines, and `explain(exc)`, a failure on one line (never a
  password).

The spill file is JSON lines ``{"uid": ..., "row": {...}}``; every row gets its uid when it is recorded,
so the uid travels with the row from the queue to the database or the spill file and back. A second
kind of item shares the queue, the batches and the spill file: a `GpuTimeRow` (table ``gpu_time``, one
row per tier, host and recorded interval; proxy/usage/gpu_time.py), spilled as ``{"uid": ..., "gpu":
{...}}``. Its uid is deterministic (`gpu_time_uid`: tier, host, interval), so the same interval
recorded by several workers or hosts is inserted once. A store's `insert` writes both kinds of a batch
in one transaction (`split` separates them).
"""

from __future__ import annotations

import glob
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from typing import BinaryIO, Protocol

import msgspec

log = logging.getLogger(__name__)

IMPORT_CHUNK = 5000  # spill rows per import transaction: memory stays flat however long the outage


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


class GpuTimeRow(msgspec.Struct, kw_only=True):
    """Paid GPU time of one host of a tier in one recorded interval: ``ts`` is the interval's start (unix
    time), ``host`` an instance id (or the upstream URL of a tier without a waker)."""

    ts: float
    tier: str
    host: str
    seconds: float
    usd: float
    price_source: str


COLUMNS: tuple[str, ...] = UsageRow.__struct_fields__
GPU_COLUMNS: tuple[str, ...] = GpuTimeRow.__struct_fields__
Item = tuple[str, UsageRow | GpuTimeRow]  # (uid, row)


def gpu_time_uid(row: GpuTimeRow) -> str:
    """The deterministic uid of a GPU-time row: ``tier|host|interval start (unix seconds)``."""
    return f"{row.tier}|{row.host}|{int(row.ts)}"


def split(items: Sequence[Item]) -> tuple[list[tuple[str, UsageRow]], list[tuple[str, GpuTimeRow]]]:
    """(usage items, GPU-time items) of a batch, each in order."""
    usage: list = []
    gpu: list = []
    for item in items:
        (gpu if type(item[1]) is GpuTimeRow else usage).append(item)
    return usage, gpu


class UsageSchemaError(RuntimeError):
    """The database was written by a newer version of the gateway, or is not a usage log."""


class UsageStore(Protocol):
    errors: tuple[type[BaseException], ...]
    fail_fast: bool

    def describe(self) -> str: ...
    def explain(self, exc: BaseException) -> str: ...
    def open(self) -> None: ...
    def insert(self, items: Sequence[Item]) -> None: ...
    def import_spill(self, path: str) -> int: ...
    def close(self) -> None: ...


class _Spill(msgspec.Struct, omit_defaults=True):
    uid: str
    row: UsageRow | None = None
    gpu: GpuTimeRow | None = None


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(_Spill)


def encode_spill(items: Sequence[Item]) -> bytes:
    """Spill lines for ``(uid, row)`` pairs, newline-terminated."""
    return b"".join(_encoder.encode(_spill_line(uid, row)) + b"\n" for uid, row in items)


def _spill_line(uid: str, row: UsageRow | GpuTimeRow) -> _Spill:
    return _Spill(uid=uid, gpu=row) if type(row) is GpuTimeRow else _Spill(uid=uid, row=row)


def read_spill(path: str, chunk: int = IMPORT_CHUNK) -> Iterator[list[Item]]:
    """The pairs of a spill file, `chunk` at a time (nothing when the file is missing). Blocking.

    Lines that do not decode (a torn last line after a crash) are logged and skipped.
    """
    try:
        with open(path, "rb") as f:
            yield from _chunks(f, path, chunk)
    except FileNotFoundError:
        return


def _chunks(f: BinaryIO, path: str, chunk: int) -> Iterator[list[Item]]:
    items: list[Item] = []
    for n, line in enumerate(f, 1):
        if not line.strip():
            continue
        try:
            s = _decoder.decode(line)
        except msgspec.DecodeError:
            log.warning("usage spill %s: line %d is not a usage row; skipped", path, n)
            continue
        row = s.row if s.row is not None else s.gpu
        if row is None:
            log.warning("usage spill %s: line %d holds no row; skipped", path, n)
            continue
        items.append((s.uid, row))
        if len(items) >= chunk:
            yield items
            items = []
    if items:
        yield items


def recover_files(pattern: str, connect: Callable[[], object], import_one: Callable[[object, str], int]) -> int:
    """Import every spill file matching the glob `pattern` on one connection from `connect`. Blocking.
    For the supervisor, before any worker runs (a live worker may still be appending to its file)."""
    files = sorted(glob.glob(pattern))
    if not files:
        return 0
    conn = connect()
    try:
        return sum(import_one(conn, f) for f in files)
    finally:
        conn.close()


def import_spill(path: str, insert: Callable[[Sequence[Item]], None]) -> int:
    """Insert the rows of the spill file at `path` with `insert`, chunk by chunk (each chunk idempotent:
    rows carry their uids), then remove the file. Returns the rows read. Blocking."""
    n = 0
    for items in read_spill(path):
        insert(items)
        n += len(items)
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    return n
