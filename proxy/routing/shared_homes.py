"""Stored responses' homes shared by the supervisor's workers: homes.py's map in an mmap'd file.

Strategy: a retrieve (`GET /v1/responses/{id}`) may arrive on a different worker's connection than
the create did (SO_REUSEPORT spreads connections, not conversations), so under the supervisor the map
lives where every worker sees it: a file created by the supervisor before any worker starts
(`create_homes_table`), its path in ``SPOTINFERENCE_HOMES_TABLE``, mapped by each worker
(`open_homes`). The same interface as `ResponseHomes` (remember / home); a single process keeps
the in-process map.
* Layout: a 64-byte header (magic, version, slot count) and 128-byte slots in sets of `WAYS`; an id's
  set is its 64-bit BLAKE2b hash modulo the number of sets. A slot holds the hash (0: empty), the
  time it was written (CLOCK_MONOTONIC: one clock for the host's processes), and "tier\\0host:port"
  (at most `MAX_VALUE` bytes; a longer one is not stored: the retrieve is then 404, logged).
  `remember` takes the id's own slot, else an empty one, else the set's oldest: a cache, bounded by
  construction, whose oldest entries go first as with the in-process LRU.
* Each access runs under ``fcntl.flock`` (shared to read, exclusive to write): two syscalls, only on
  the Responses routes. As for the rate-limit table, each worker opens the path itself and the kernel
  drops a dead worker's lock; a half-written slot reads as a value without its separator: not found.
"""

from __future__ import annotations

import fcntl
import hashlib
import mmap
import os
import struct
import tempfile
import time
from collections.abc import Callable

from proxy.observe import logs
from proxy.routing.homes import MAX_AGE_S, ResponseHomes

ENV = "SPOTINFERENCE_HOMES_TABLE"
MAGIC = b"SIHOMES1"
_VERSION = 1
_HEADER = struct.Struct("<8sII")
_HEADER_SIZE = 64
_SLOT = struct.Struct("<QdH")  # hash, stamp, value length; the value follows
_SLOT_SIZE = 128
MAX_VALUE = _SLOT_SIZE - _SLOT.size
WAYS = 4
DEFAULT_SLOTS = 65536  # 8 MiB of file, sparse until written


class HomesTableError(RuntimeError):
    """The file is not a homes table this code can use."""


def _hash(response_id: str) -> int:
    h = int.from_bytes(hashlib.blake2b(response_id.encode(), digest_size=8).digest(), "little")
    return h or 1


def create_homes_table(path: str | None = None, *, slots: int = DEFAULT_SLOTS) -> str:
    """Create an empty table file (mode 0600) and return its path; a temp file when `path` is None."""
    if slots < WAYS or slots % WAYS:
        raise ValueError(f"slots must be a positive multiple of {WAYS}")
    if path is None:
        fd, path = tempfile.mkstemp(prefix="spotinference-homes-", suffix=".table")
    else:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.ftruncate(fd, _HEADER_SIZE + slots * _SLOT_SIZE)
        os.pwrite(fd, _HEADER.pack(MAGIC, _VERSION, slots), 0)
    finally:
        os.close(fd)
    return path


class SharedHomes:
    __slots__ = ("_clock", "_fd", "_map", "_sets", "max_age_s")

    def __init__(self, path: str, *, max_age_s: float = MAX_AGE_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self.max_age_s = max_age_s
        self._fd = os.open(path, os.O_RDWR)
        try:
            size = os.fstat(self._fd).st_size
            if size < _HEADER_SIZE:
                raise HomesTableError(f"{path}: too small for a homes table")
            self._map = mmap.mmap(self._fd, size)
        except BaseException:
            os.close(self._fd)
            raise
        magic, version, slots = _HEADER.unpack_from(self._map, 0)
        if (magic != MAGIC or version != _VERSION or slots < WAYS or slots % WAYS
                or size < _HEADER_SIZE + slots * _SLOT_SIZE):
            self.close()
            raise HomesTableError(f"{path}: not a version-{_VERSION} homes table")
        self._sets = slots // WAYS

    def close(self) -> None:
        self._map.close()
        os.close(self._fd)

    def _base(self, h: int) -> int:
        return _HEADER_SIZE + (h % self._sets) * WAYS * _SLOT_SIZE

    def remember(self, response_id: str, tier: str, upstream: str) -> None:
        value = f"{tier}\0{upstream}".encode()
        if len(value) > MAX_VALUE:
            logs.event("response_home_not_stored", level="warning", tier=tier, reason="name too long")
            return
        h = _hash(response_id)
        base = self._base(h)
        m = self._map
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        try:
            target = oldest = base
            oldest_at = float("inf")
            for i in range(WAYS):
                off = base + i * _SLOT_SIZE
                slot_hash, at, _n = _SLOT.unpack_from(m, off)
                if slot_hash == h or slot_hash == 0:
                    target = off
                    break
                if at < oldest_at:
                    oldest, oldest_at = off, at
            else:
                target = oldest
            _SLOT.pack_into(m, target, h, self._clock(), len(value))
            m[target + _SLOT.size:target + _SLOT.size + len(value)] = value
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    def fetch_command(self, response_id: str) -> tuple | None:
        """None: this map is the only one, nothing to fetch from elsewhere (redis_homes.py has one)."""
        return None

    async def lookup(self, response_id: str) -> tuple[str, str] | None:
        """`home`, awaitable: the request path's one call, whichever map serves (redis_homes.py)."""
        return self.home(response_id)

    def home(self, response_id: str) -> tuple[str, str] | None:
        h = _hash(response_id)
        base = self._base(h)
        m = self._map
        fcntl.flock(self._fd, fcntl.LOCK_SH)
        try:
            for i in range(WAYS):
                off = base + i * _SLOT_SIZE
                slot_hash, at, n = _SLOT.unpack_from(m, off)
                if slot_hash == h:
                    value = bytes(m[off + _SLOT.size:off + _SLOT.size + min(n, MAX_VALUE)])
                    break
            else:
                return None
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        if self._clock() - at > self.max_age_s:
            return None
        tier, sep, upstream = value.decode("utf-8", "replace").partition("\0")
        return (tier, upstream) if sep and upstream else None


def open_homes(workers: int) -> ResponseHomes | SharedHomes:
    """The map for one gateway process: the supervisor's table with several workers, else in-process."""
    if workers > 1:
        path = os.environ.get(ENV)
        if path:
            try:
                return SharedHomes(path)
            except (OSError, HomesTableError) as exc:
                logs.event("homes_table_unusable", level="warning", error=str(exc))
        else:
            logs.event("homes_table_missing", level="warning")
    return ResponseHomes()
