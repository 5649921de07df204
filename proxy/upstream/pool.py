"""Keep-alive connection pool, one idle stack per upstream address.

Strategy (after httpcore's connection_pool): the pool holds only IDLE connections; an acquired
connection belongs to its request until `release()` (recycle or close) or `discard()`. One
synchronous function, `_take_idle()`, makes every reuse decision:
- most recently used first (LIFO), so a quiet period lets the tail of the stack expire;
- a connection idle longer than `idle_keepalive_s` is closed, not used: uvicorn (vLLM's server)
  closes idle keep-alive connections after 5 s, so our limit stays below theirs to avoid the race
  where both sides act at once;
- a connection that is readable while idle was hung up by the server (`looks_stale`) and is closed
  (checked once it has been idle for STALE_CHECK_AFTER_S).
At most `max_idle_per_host` idle connections are kept per address; extras are closed on release.
No timeouts here: the caller wraps `connect()` in the upstream connect timeout.
"""

from __future__ import annotations

import msgspec
import trio

from proxy.upstream.connection import UpstreamConnection

# Peeking costs a syscall; a connection used moments ago is very unlikely to be half-closed, and if
# it is, the request fails before its first byte and is retried on a fresh connection (upstream/open.py).
STALE_CHECK_AFTER_S = 0.5


class PoolStatistics(msgspec.Struct, frozen=True):
    idle: int
    active: int
    connects_total: int
    reuses_total: int
    stale_closed_total: int
    connect_errors_total: int


class Pool:
    def __init__(self, *, max_idle_per_host: int = 256, idle_keepalive_s: float = 4.0) -> None:
        self._idle: dict[tuple[str, int], list[UpstreamConnection]] = {}
        self._max_idle = max_idle_per_host
        self._keepalive_s = idle_keepalive_s
        self.active = 0
        self._connects = 0
        self._reuses = 0
        self._stale = 0
        self._connect_errors = 0

    def _take_idle(self, address: tuple[str, int], now: float) -> UpstreamConnection | None:
        stack = self._idle.get(address)
        while stack:
            conn = stack.pop()
            idle = now - conn.idle_since
            if idle > self._keepalive_s or (idle > STALE_CHECK_AFTER_S and conn.looks_stale()):
                self._stale += 1
                conn.close()
                continue
            return conn
        return None

    def take_idle(self, address: tuple[str, int]) -> UpstreamConnection | None:
        """A pooled connection to `address`, or None. A reused connection may have been closed by
        the server in flight: a failure before the first response byte is then safe to retry."""
        conn = self._take_idle(address, trio.current_time())
        if conn is not None:
            self._reuses += 1
            self.active += 1
        return conn

    async def connect(self, address: tuple[str, int]) -> UpstreamConnection:
        """A new connection to `address` (the caller bounds it with the connect timeout)."""
        try:
            conn = await UpstreamConnection.connect(address)
        except OSError:
            self._connect_errors += 1
            raise
        self._connects += 1
        self.active += 1
        return conn

    def release(self, conn: UpstreamConnection) -> None:
        """Return a connection after its response: kept if reusable and there is room, else closed."""
        self.active -= 1
        if conn.recycle(trio.current_time()):
            stack = self._idle.setdefault(conn.address, [])
            if len(stack) < self._max_idle:
                stack.append(conn)
                return
        conn.close()

    def discard(self, conn: UpstreamConnection) -> None:
        """Close a connection whose exchange failed or was abandoned."""
        self.active -= 1
        conn.close()

    def close_all(self) -> None:
        for stack in self._idle.values():
            for conn in stack:
                conn.close()
        self._idle.clear()

    def statistics(self) -> PoolStatistics:
        return PoolStatistics(
            idle=sum(len(s) for s in self._idle.values()),
            active=self.active,
            connects_total=self._connects,
            reuses_total=self._reuses,
            stale_closed_total=self._stale,
            connect_errors_total=self._connect_errors,
        )
