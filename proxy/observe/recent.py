"""Recent traffic for the operator's status page: requests, tokens and errors per minute, errors by status,
the keys that used the most tokens today.

Strategy: two sources, one shape (`Traffic`). `RecentTraffic.record` is called by
`Gateway.request_finished` for every finished request and keeps this process's figures: a ring of 60
one-minute buckets indexed by the minute of arrival (a bucket found holding an older minute is reset
first), each with its requests, prompt and completion tokens, errors (status >= 400, 499 included)
and errors per status, and a per-key total for the current UTC day (cleared when the day changes,
at most `MAX_KEYS` names; more are summed under `OTHER`). O(1) per request, memory bounded by the
ring, the statuses seen and the keys. Only billed requests count (usage/record.py `BILLED`, the rows
of the usage log), so both sources count the same things and the status page's own polls are not
traffic; tokens per key are the billed total (usage/taps.py `settlement`, the usage row's
`total_tokens`).
When a usage store is configured it sees every worker and every host, so `StoreTraffic` prefers it:
three GROUP BY queries over the `usage` table (the last 15 minutes by minute, the last hour's errors
by status, today's top keys), one SQL text for SQLite and PostgreSQL but for the placeholder. The
minute of a row is ``(CAST(ts AS BIGINT) - start) / 60``: integer division in both engines;
PostgreSQL rounds the cast where SQLite truncates, so a row within half a second of a minute's end
may land in the next minute there. The read runs in a thread (one at a time, read-only connection,
statement and connect timeouts of a few seconds), bounded by `READ_TIMEOUT_S`, and is cached for
`CACHE_S` (a failure too, so a broken store is not asked on every poll). A store that cannot answer
leaves this process's figures, with `store_error` saying why (never a password). The minutes are
unix-time minutes (start = a multiple of 60), newest last, the current one included.
"""

from __future__ import annotations

import math
import sqlite3
import time
from pathlib import Path

import msgspec
import trio

from proxy.usage.record import BILLED
from proxy.usage.taps import settlement

RING = 60  # minutes kept: errors by status cover the last hour
WINDOW = 15  # minutes shown
TOP_KEYS = 10
MAX_KEYS = 10000  # key names counted today before the rest are summed under OTHER
OTHER = "(other keys)"
CACHE_S = 5.0
READ_TIMEOUT_S = 4.0
_DB_TIMEOUT_S = 3


class Minute(msgspec.Struct, frozen=True):
    start: int  # unix time of the minute's start
    requests: int
    prompt_tokens: int
    completion_tokens: int
    errors: int


class StatusCount(msgspec.Struct, frozen=True):
    status: int
    count: int


class KeyTotal(msgspec.Struct, frozen=True):
    name: str | None  # None: no key (an open gateway)
    requests: int
    tokens: int


class Traffic(msgspec.Struct, frozen=True):
    source: str  # "usage_store" | "this_process"
    minutes: list[Minute]
    errors_by_status: list[StatusCount]
    top_keys_today: list[KeyTotal]
    store_error: str | None = None


class _Bucket:
    __slots__ = ("completion", "errors", "minute", "prompt", "requests", "statuses")

    def __init__(self) -> None:
        self.minute = -1
        self.requests = self.prompt = self.completion = self.errors = 0
        self.statuses: dict[int, int] = {}

    def reset(self, minute: int) -> None:
        self.minute = minute
        self.requests = self.prompt = self.completion = self.errors = 0
        self.statuses = {}


def _day_start(now: float) -> int:
    return int(now // 86400) * 86400


class RecentTraffic:
    """This process's recent traffic (see the module comment); `store` reads the usage store's."""

    def __init__(self) -> None:
        self.started = time.time()
        self.started_mono = time.monotonic()
        self._ring = [_Bucket() for _ in range(RING)]
        self._day = -1
        self._keys: dict[str | None, list[int]] = {}  # name -> [requests, tokens], today
        self.tiers: dict[str, list[float]] = {}  # configured tier -> [tokens since start, last request ts]
        self.store = StoreTraffic()

    def record(self, ex) -> None:
        """One finished request (an `Exchange`): O(1)."""
        if ex.endpoint not in BILLED:
            return
        ts = ex.ts
        minute = int(ts // 60)
        b = self._ring[minute % RING]
        if b.minute != minute:
            if b.minute > minute:  # arrived more than an hour before it finished: older than the ring
                b = None
            else:
                b.reset(minute)
        prompt, completion = ex.prompt_tokens or 0, ex.completion_tokens or 0
        if b is not None:
            b.requests += 1
            b.prompt += prompt
            b.completion += completion
            if ex.status >= 400:
                b.errors += 1
                b.statuses[ex.status] = b.statuses.get(ex.status, 0) + 1
        day = int(ts // 86400)
        if day != self._day:
            if day < self._day:
                return  # arrived yesterday, finished today: yesterday's totals are gone
            self._day = day
            self._keys = {}
        tokens = settlement(ex)[0] or 0
        tier = ex.tier
        if tier is not None:  # only configured tier names are set on the record
            t = self.tiers.get(tier)
            if t is None:
                t = self.tiers[tier] = [0, 0.0]
            t[0] += tokens
            t[1] = max(t[1], ts)
        name = ex.key.name if ex.key is not None else None
        row = self._keys.get(name)
        if row is None:
            if len(self._keys) >= MAX_KEYS:
                name = OTHER
                row = self._keys.get(name)
            if row is None:
                row = self._keys[name] = [0, 0]
        row[0] += 1
        row[1] += tokens

    def snapshot(self, now: float | None = None) -> Traffic:
        now = time.time() if now is None else now
        current = int(now // 60)
        minutes = []
        for m in range(current - WINDOW + 1, current + 1):
            b = self._ring[m % RING]
            if b.minute == m:
                minutes.append(Minute(m * 60, b.requests, b.prompt, b.completion, b.errors))
            else:
                minutes.append(Minute(m * 60, 0, 0, 0, 0))
        statuses: dict[int, int] = {}
        for b in self._ring:
            if current - RING < b.minute <= current:
                for status, n in b.statuses.items():
                    statuses[status] = statuses.get(status, 0) + n
        keys = self._keys if self._day == int(now // 86400) else {}
        top = sorted(keys.items(), key=lambda kv: (-kv[1][1], -kv[1][0], kv[0] or ""))[:TOP_KEYS]
        return Traffic(
            source="this_process", minutes=minutes,
            errors_by_status=[StatusCount(s, n) for s, n in sorted(statuses.items())],
            top_keys_today=[KeyTotal(name, req, tok) for name, (req, tok) in top])


# -- the usage store ------------------------------------------------------------------------------

_MINUTES_SQL = ("SELECT (CAST(ts AS BIGINT) - {p}) / 60, count(*), coalesce(sum(prompt_tokens), 0), "
                "coalesce(sum(completion_tokens), 0), sum(CASE WHEN status >= 400 THEN 1 ELSE 0 END) "
                "FROM usage WHERE ts >= {p} GROUP BY 1")
_STATUS_SQL = "SELECT status, count(*) FROM usage WHERE ts >= {p} AND status >= 400 GROUP BY status"
_KEYS_SQL = ("SELECT key_name, count(*), coalesce(sum(total_tokens), 0) FROM usage WHERE ts >= {p} "
             f"GROUP BY key_name ORDER BY 3 DESC, 2 DESC LIMIT {TOP_KEYS}")


def _query(conn, ph: str, now: float) -> Traffic:
    current = int(now // 60)
    start = (current - WINDOW + 1) * 60
    by_index = {}
    for idx, req, pt, ct, err in conn.execute(_MINUTES_SQL.format(p=ph), (start, start)).fetchall():
        by_index[int(idx)] = Minute(start + 60 * int(idx), int(req), int(pt), int(ct), int(err or 0))
    minutes = [by_index.get(i) or Minute(start + 60 * i, 0, 0, 0, 0) for i in range(WINDOW)]
    statuses = conn.execute(_STATUS_SQL.format(p=ph), ((current - RING + 1) * 60,)).fetchall()
    top = conn.execute(_KEYS_SQL.format(p=ph), (_day_start(now),)).fetchall()
    return Traffic(
        source="usage_store", minutes=minutes,
        errors_by_status=[StatusCount(int(s), int(n)) for s, n in sorted(statuses)],
        top_keys_today=[KeyTotal(name, int(req), int(tok)) for name, req, tok in top])


def read_sqlite(path: str, now: float) -> Traffic:
    """The store's traffic from a SQLite usage file, opened read-only. Blocking."""
    conn = sqlite3.connect(f"{Path(path).resolve().as_uri()}?mode=ro", uri=True, timeout=_DB_TIMEOUT_S)
    try:
        return _query(conn, "?", now)
    finally:
        conn.close()


def read_pg(url: str, now: float) -> Traffic:
    """The store's traffic from the PostgreSQL usage table, in a read-only transaction. Blocking."""
    import psycopg

    with psycopg.connect(url, connect_timeout=_DB_TIMEOUT_S, application_name="spotinference-status") as conn:
        conn.read_only = True
        conn.execute(f"SET LOCAL statement_timeout = {_DB_TIMEOUT_S * 1000}")
        return _query(conn, "%s", now)


def _explain(exc: BaseException, url: str | None) -> str:
    text = " ".join(str(exc).split())[:200] or type(exc).__name__
    if url:
        from proxy.observe.redact import scrub

        text = scrub(text, url)
    return f"{type(exc).__name__}: {text}"


class StoreTraffic:
    """The usage store's traffic, read in a thread at most every `CACHE_S` (see the module comment)."""

    def __init__(self, *, cache_s: float = CACHE_S, timeout_s: float = READ_TIMEOUT_S) -> None:
        self.cache_s = cache_s
        self.timeout_s = timeout_s
        self._lock = trio.Lock()
        self._limiter = trio.CapacityLimiter(1)  # an abandoned read still holds it until it ends
        self._at = -math.inf
        self._where: tuple | None = None
        self._value: Traffic | None = None
        self._error: str | None = None

    def invalidate(self) -> None:
        self._at = -math.inf

    async def read(self, usage_config) -> tuple[Traffic | None, str | None]:
        """(the store's traffic or None, why not); None, None without a store."""
        path, url = usage_config.path, usage_config.database_url
        if not path and not url:
            return None, None
        where = (path, url)
        async with self._lock:  # one read at a time; those waiting take its answer
            if where == self._where and time.monotonic() - self._at < self.cache_s:
                return self._value, self._error
            now = time.time()
            value, error = None, None
            with trio.move_on_after(self.timeout_s) as waited:
                try:
                    if url:
                        value = await trio.to_thread.run_sync(read_pg, url, now, limiter=self._limiter,
                                                              abandon_on_cancel=True)
                    else:
                        value = await trio.to_thread.run_sync(read_sqlite, path, now, limiter=self._limiter,
                                                              abandon_on_cancel=True)
                except Exception as exc:  # noqa: BLE001 -- any failure of the store: this process's figures
                    error = _explain(exc, url)
            if waited.cancelled_caught:
                error = f"no answer within {self.timeout_s:g} s"
            self._where, self._at, self._value, self._error = where, time.monotonic(), value, error
            return value, error
