"""Keep a gateway's KeyStore in step with the keys database: every host sees a change within seconds.

Strategy: one task per gateway process, one persistent connection used only from worker threads
(psycopg is synchronous; `trio.to_thread.run_sync`, one call at a time). At start it loads the keys
(retrying an unreachable database for `start_timeout_s`, then raising `KeysError`) and hands the
first `KeyStore` to `nursery.start`'s caller. Then every `refresh_s` it reads the change counter
(keys_db.version: one row) and, only when it moved, the whole snapshot (keys_db.load), and calls
`on_change(KeyStore(records))` on the event loop. While the database is unreachable the last store
stays in force: one warning on the way down, one line on the way back, counters throughout
(`statistics()`), a reconnect at every poll. A poll stuck on a dead peer is bounded by keys_db's TCP
timeouts (~5 s), and cancelling the task never waits for it (the thread is abandoned and closes the
connection itself when it returns).

Gateway wiring (the caller owns the swap):

    refresher = KeysRefresher(cfg.auth.database_url, cfg.auth.refresh_s, on_change)
    store = await services_nursery.start(refresher.run)     # KeysError: refuse to start
    runtime = runtime._replace(keys=store)
    gw.metrics.register_stats_source("keys_db", refresher.statistics)

    def on_change(store: KeyStore) -> None:                  # on the event loop; must not raise
        old = gw.runtime
        gw.runtime = old._replace(keys=store)
        for name in old.keys.names() - store.names():
            gw.limiter.forget(name)                          # a revoked key's buckets go with it

(`await nursery.start(run_refresher, url, refresh_s, on_change)` is the same without the counters.)
A SIGHUP reload must keep `gw.runtime.keys` rather than build a KeyStore of its own when
`auth.database_url` is set.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable

import msgspec
import trio

from proxy.admit import keys_db
from proxy.admit.keys import KeysError, KeyStore
from proxy.observe import logs


class RefresherStatistics(msgspec.Struct, frozen=True):
    up: bool
    version: int
    keys: int
    polls_total: int
    poll_failures_total: int
    changes_total: int
    outages_total: int
    reconnects_total: int


class KeysRefresher:
    """Polls the keys database; see the module docstring for the wiring."""

    def __init__(self, url: str, refresh_s: float, on_change: Callable[[KeyStore], None], *,
                 start_timeout_s: float = 10.0) -> None:
        self.url = url
        self.where = keys_db.where(url)
        self.refresh_s = refresh_s
        self.on_change = on_change
        self.start_timeout_s = start_timeout_s
        self.version = -1
        self.keys = 0
        self.up = False
        self.polls = self.poll_failures = self.changes = self.outages = self.reconnects = 0
        self._conn = None
        self._busy = False
        self._stopping = False
        self._down_since: float | None = None

    def statistics(self) -> RefresherStatistics:
        return RefresherStatistics(up=self.up, version=self.version, keys=self.keys,
                                   polls_total=self.polls, poll_failures_total=self.poll_failures,
                                   changes_total=self.changes, outages_total=self.outages,
                                   reconnects_total=self.reconnects)

    # -- in a worker thread --------------------------------------------------------------------

    def _fetch(self, known: int, timeout_s: float) -> tuple[int, list | None]:
        """(version, records if the version is not `known` else None); reconnects if needed."""
        self._busy = True
        try:
            if self._conn is None:
                self._conn = keys_db.connect(self.url, connect_timeout=timeout_s)
            try:
                current = keys_db.version(self._conn)
                return (current, None) if current == known else keys_db.load(self._conn)
            except KeysError:
                self._drop()
                raise
        finally:
            self._busy = False
            if self._stopping:
                self._drop()

    def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(keys_db.psycopg.Error, OSError):  # conn: psycopg is there
                conn.close()

    async def _thread(self, known: int, timeout_s: float = keys_db.CONNECT_TIMEOUT_S):
        return await trio.to_thread.run_sync(self._fetch, known, timeout_s, abandon_on_cancel=True)

    # -- on the event loop ---------------------------------------------------------------------

    async def _first(self) -> KeyStore:
        deadline = trio.current_time() + self.start_timeout_s
        while True:
            try:
                version, records = await self._thread(-1, max(1.0, deadline - trio.current_time()))
                break
            except keys_db.Unreachable as exc:
                left = deadline - trio.current_time()
                if left <= 0:
                    raise KeysError(f"{exc} (still unreachable after {self.start_timeout_s:g} s)") from None
                await trio.sleep(min(0.5, left))
        store = KeyStore(records)
        self.version, self.keys, self.up = version, len(store), True
        logs.event("keys_db_loaded", database=self.where, version=version, keys=len(store))
        return store

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Load, report the first KeyStore through `task_status.started`, then poll until cancelled."""
        try:
            task_status.started(await self._first())
            while True:
                await trio.sleep(self.refresh_s)
                await self._poll()
        finally:
            self._stopping = True
            if not self._busy:
                self._drop()

    async def _poll(self) -> None:
        self.polls += 1
        had_conn = self._conn is not None
        try:
            version, records = await self._thread(self.version)
        except KeysError as exc:  # Unreachable, or e.g. a schema from a newer spotinference
            self.poll_failures += 1
            if self.up:
                self.up, self.outages, self._down_since = False, self.outages + 1, time.monotonic()
                logs.event("keys_db_down", level="warning", database=self.where, error=str(exc),
                           keeping_keys=self.keys)
            return
        if not had_conn:
            self.reconnects += 1
        if not self.up:
            self.up = True
            logs.event("keys_db_up", database=self.where,
                       down_s=round(time.monotonic() - (self._down_since or time.monotonic()), 1))
        if records is not None:
            store = KeyStore(records)
            self.version, self.keys = version, len(store)
            self.changes += 1
            self.on_change(store)
            logs.event("keys_refreshed", database=self.where, version=version, keys=len(store))


async def run_refresher(url: str, refresh_s: float, on_change: Callable[[KeyStore], None], *,
                        task_status=trio.TASK_STATUS_IGNORED, start_timeout_s: float = 10.0) -> None:
    """`KeysRefresher(url, refresh_s, on_change).run()`: `await nursery.start(run_refresher, ...)`
    returns the first KeyStore (or raises KeysError when the database stays unreachable at start)."""
    await KeysRefresher(url, refresh_s, on_change, start_timeout_s=start_timeout_s).run(task_status=task_status)
