"""Exact per-key rate limits across the supervisor's workers: token buckets in a shared, mmap'd table.

Strategy: the bucket math is proxy/limits/buckets.py's (`fit`, `decide`, `settle` on `Bucket` objects); this
module only keeps the buckets' state somewhere every worker sees it, so a key's rpm/tpm are its
configured values however its connections spread over workers. (Dividing the limit by the worker count,
the earlier scheme, gave a client on one keep-alive connection -- the OpenAI SDKs -- 1/N of its limit.)

* The table is a small file created by the supervisor (`create_table`, before any worker starts) and
  mapped by every worker (`SharedRateLimiter`); its path reaches the workers in the environment
  variable ``SPOTINFERENCE_RATELIMIT_TABLE`` (`open_limiter`). The supervisor deletes it when it exits:
  limits restart full with the service, as they do for a single process.
* Layout: a 64-byte header (magic, version, slot count) and fixed 64-byte slots, open addressing with
  linear probing (at most `MAX_PROBE` slots), keyed by a 64-bit BLAKE2b hash of the key name (0 means
  empty; two names with one hash would share buckets -- odds about n^2/2^65 for n keys). A slot holds the request bucket and the token bucket (capacity, level, stamp each) and a flag
  per bucket. Slots are never freed: keys with limits are few and come from the keys file; `forget`
  clears a slot's buckets but keeps its hash so probe chains stay intact.
* Every read-modify-write (find or claim the slot, refill, decide, charge, write back) runs under an
  exclusive ``fcntl.flock`` on the whole file: two syscalls per limited request; unlimited keys never
  touch the table. The critical section is a few microseconds of Python, so workers rarely wait, and
  the wait is a short blocking syscall on the event loop. flock locks belong to the open file, so each
  worker opens the path itself (an inherited descriptor would be one shared lock), and the kernel drops
  the lock of a worker that is killed while holding it. A slot such a death left half-written reads as
  non-finite or out-of-range numbers and is reset to a full bucket.
* The clock is read inside the lock, so stamps only move forward across workers; ``time.monotonic`` is
  CLOCK_MONOTONIC, one clock for every process on the host. Tests inject a fake clock.
* More limited keys than fit (a full table or a probe chain past `MAX_PROBE`): those keys fall back to
  in-process buckets with the limit divided by the worker count (the old scheme), logged once.
A single-process `serve` keeps the in-process `RateLimiter`: nothing to share, no syscalls.
"""

from __future__ import annotations

import fcntl
import hashlib
import math
import mmap
import os
import struct
import tempfile
from collections.abc import Callable

from proxy.limits.buckets import UNLIMITED, Admission, Bucket, RateLimiter, decide, fit, settle
from proxy.observe import logs

ENV = "SPOTINFERENCE_RATELIMIT_TABLE"
MAGIC = b"SIRLTAB1"
DEFAULT_SLOTS = 4096  # 256 KiB; keys with limits, not requests, fill it
MAX_PROBE = 64

_HEADER = struct.Struct("<8sII")  # magic, version, slots (padded to 64 bytes)
_HEADER_SIZE = 64
_SLOT = struct.Struct("<Q6dI4x")  # hash; request cap, level, stamp; token cap, level, stamp; flags
_SLOT_SIZE = 64
_VERSION = 1
_HAS_R = 1
_HAS_T = 2
assert _SLOT.size == _SLOT_SIZE


class TableError(RuntimeError):
    """The file is not a rate-limit table this code can use."""


def key_hash(key_name: str) -> int:
    """64-bit slot key of a key name; never 0 (0 marks an empty slot)."""
    h = int.from_bytes(hashlib.blake2b(key_name.encode(), digest_size=8).digest(), "little")
    return h or 1


def create_table(path: str | None = None, *, slots: int = DEFAULT_SLOTS) -> str:
    """Create an empty table file (mode 0600) and return its path; a temp file when `path` is None."""
    if slots < 1:
        raise ValueError("slots must be >= 1")
    if path is None:
        fd, path = tempfile.mkstemp(prefix="spotinference-ratelimit-", suffix=".table")
    else:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.ftruncate(fd, _HEADER_SIZE + slots * _SLOT_SIZE)  # zero-filled: every slot empty
        os.pwrite(fd, _HEADER.pack(MAGIC, _VERSION, slots), 0)
    finally:
        os.close(fd)
    return path


def _sane(cap: float, level: float, stamp: float) -> bool:
    return (math.isfinite(cap) and math.isfinite(level) and math.isfinite(stamp) and cap >= 0
            and level <= cap)


class SharedRateLimiter:
    """`RateLimiter`'s interface over the shared table at `path`. One per worker process."""

    remote = False  # answers synchronously (charge.py awaits only the cluster's limiter)

    def __init__(self, path: str, clock: Callable[[], float], *, workers: int = 1) -> None:
        self._clock = clock
        self._fd = os.open(path, os.O_RDWR)
        try:
            size = os.fstat(self._fd).st_size
            if size < _HEADER_SIZE:
                raise TableError(f"{path}: too small for a rate-limit table")
            self._map = mmap.mmap(self._fd, size)
        except BaseException:
            os.close(self._fd)
            raise
        magic, version, slots = _HEADER.unpack_from(self._map, 0)
        if magic != MAGIC or version != _VERSION or size < _HEADER_SIZE + slots * _SLOT_SIZE or slots < 1:
            self.close()
            raise TableError(f"{path}: not a version-{_VERSION} rate-limit table")
        self.slots = slots
        self._workers = max(1, workers)
        self._overflow = RateLimiter(clock)  # keys that found no slot: their 1/N share in-process
        self._overflowed: set[str] = set()
        self._offsets: dict[str, int] = {}  # key name -> slot offset, once found or claimed

    def close(self) -> None:
        self._map.close()
        os.close(self._fd)

    # -- the RateLimiter interface --------------------------------------------------------------
    def admit(self, key_name: str, rpm: float | None, tpm: float | None, tokens_estimate: int) -> Admission:
        """Charge one request and `tokens_estimate` tokens to the key's shared buckets, or refuse."""
        if rpm is None and tpm is None:
            return UNLIMITED
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        try:
            off = self._slot(key_name)
            if off is None:
                return self._overflow_admit(key_name, rpm, tpm, tokens_estimate)
            now = self._clock()
            h, rc, rl, rs, tc, tl, ts, flags = _SLOT.unpack_from(self._map, off)
            rb = tb = None
            if rpm is not None:
                prev = Bucket(rc, rs, rl) if flags & _HAS_R and _sane(rc, rl, rs) else None
                rb = fit(prev, rpm, now)
            if tpm is not None:
                prev = Bucket(tc, ts, tl) if flags & _HAS_T and _sane(tc, tl, ts) else None
                tb = fit(prev, tpm, now)
            adm = decide(rb, tb, tokens_estimate)
            if rb is not None:
                rc, rl, rs = rb.cap, rb.level, rb.stamp
                flags |= _HAS_R
            if tb is not None:
                tc, tl, ts = tb.cap, tb.level, tb.stamp
                flags |= _HAS_T
            _SLOT.pack_into(self._map, off, h, rc, rl, rs, tc, tl, ts, flags)
            return adm
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    def reconcile(self, key_name: str, charged: int, actual: int) -> None:
        """Refund (or charge) the difference between the up-front charge and the tokens vLLM reported."""
        if charged == actual:
            return
        if key_name in self._overflowed:
            self._overflow.reconcile(key_name, charged, actual)
            return
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        try:
            off = self._slot(key_name, claim=False)
            if off is None:
                return
            h, rc, rl, rs, tc, tl, ts, flags = _SLOT.unpack_from(self._map, off)
            if not flags & _HAS_T or not _sane(tc, tl, ts):
                return
            tb = Bucket(tc, ts, tl)
            settle(tb, charged, actual, self._clock())
            _SLOT.pack_into(self._map, off, h, rc, rl, rs, tb.cap, tb.level, tb.stamp, flags)
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    def forget(self, key_name: str) -> None:
        """Drop a key's buckets (a revoked key); the slot stays claimed so probe chains hold."""
        self._overflow.forget(key_name)
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        try:
            off = self._slot(key_name, claim=False)
            if off is not None:
                _SLOT.pack_into(self._map, off, key_hash(key_name), 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0)
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    # -- the table --------------------------------------------------------------------------------
    def _slot(self, key_name: str, *, claim: bool = True) -> int | None:
        """Byte offset of the key's slot (claiming an empty one if asked), or None. Call under the lock."""
        off = self._offsets.get(key_name)
        if off is not None:
            return off  # a claimed slot never changes owner
        h = key_hash(key_name)
        start = h % self.slots
        for i in range(min(MAX_PROBE, self.slots)):
            o = _HEADER_SIZE + ((start + i) % self.slots) * _SLOT_SIZE
            owner = int.from_bytes(self._map[o:o + 8], "little")
            if owner == h:
                self._offsets[key_name] = o
                return o
            if owner == 0:
                if not claim:
                    return None
                _SLOT.pack_into(self._map, o, h, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0)
                self._offsets[key_name] = o
                return o
        return None

    def _overflow_admit(self, key_name: str, rpm, tpm, tokens_estimate: int) -> Admission:
        if key_name not in self._overflowed:
            self._overflowed.add(key_name)
            logs.event("ratelimit_table_full", level="warning", key=key_name, slots=self.slots,
                       per_worker_share=f"1/{self._workers}")
        w = self._workers
        return self._overflow.admit(key_name, None if rpm is None else rpm / w,
                                    None if tpm is None else tpm / w, tokens_estimate)


def open_limiter(workers: int, clock: Callable[[], float]) -> tuple[RateLimiter | SharedRateLimiter, int]:
    """The limiter for one gateway process and the divisor to apply to a key's limits.

    Under the supervisor (``workers > 1`` and the table's path in ``SPOTINFERENCE_RATELIMIT_TABLE``):
    the shared table, divisor 1 -- exact limits. A single process: in-process buckets, divisor 1. Several
    workers without a usable table: in-process buckets, each worker enforcing ``1/workers`` (logged).
    """
    workers = max(1, workers)
    if workers == 1:
        return RateLimiter(clock), 1
    path = os.environ.get(ENV)
    if path:
        try:
            return SharedRateLimiter(path, clock, workers=workers), 1
        except (OSError, TableError, ValueError) as exc:
            logs.event("ratelimit_table_unusable", level="warning", error=str(exc),
                       per_worker_share=f"1/{workers}")
    else:
        logs.event("ratelimit_table_missing", level="warning", per_worker_share=f"1/{workers}")
    return RateLimiter(clock), workers
