"""`spotinference usage`: report the usage log per key, model or tier.

Strategy: read-only SQL over the table `proxy.usage.log` writes: a SQLite file (``--db``, opened with
``mode=ro``, so a report never creates or changes a database, and runs beside a live gateway thanks to
WAL) or the PostgreSQL database of several hosts (``--database-url``, a read-only transaction), or
whichever ``--config``'s ``[usage]`` names. The SQL is the same for both (only the placeholder differs).
Counts and token sums are one GROUP BY; latency percentiles (nearest rank) come from a second query
ordered by group and latency, consumed as a stream (PostgreSQL: a server-side cursor), so memory stays
flat however large the log. Errors are rows with status >= 400 (499 included: the client went away).
A missing, unreadable or foreign file, or an unreachable server, is a one-line message (a URL without
its password) and exit status 2, never a traceback.

``--cost`` adds what the GPU time cost (`cost_report`): a tier's cost in the period is the sum of its
``gpu_time`` rows' ``usd`` (proxy/usage/gpu_time.py), shared among the period's usage rows of that tier
in proportion to their tokens (``total_tokens``, else prompt + completion), so the groups' shares add up
to the tier's total. ``usd_per_mtok`` is a group's cost per million of its tokens on tiers that had a
cost in the period. A tier with cost and no tokens in the period (awake, idle) has no rows to share it:
it is its own line, ``(idle)`` (by key or model; by tier, the tier's line). A database without the
``gpu_time`` table (written before schema version 2) reports no cost, and says so.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import re
import sqlite3
import sys
import time
from pathlib import Path
from typing import Any

_GROUP_COLUMN = {"key": "key_name", "model": "model", "tier": "tier"}
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_PROBE = "SELECT ts, status, latency_ms, key_name, model, tier FROM usage LIMIT 1"
_FIELDS = ("requests", "errors", "prompt_tokens", "completion_tokens", "estimated", "p50_ms", "p95_ms")
_COST_FIELDS = ("usd", "usd_per_mtok")
_TOKENS = "coalesce(total_tokens, coalesce(prompt_tokens, 0) + coalesce(completion_tokens, 0))"
IDLE = "(idle)"


class UsageReportError(Exception):
    """A report that cannot be made; the message is for the operator."""


def parse_since(text: str) -> float:
    """``30m``, ``24h``, ``7d``, ``90s``, ``2w`` (or a combination like ``1d12h``) -> seconds."""
    parts = re.fullmatch(r"(?:\d+(?:\.\d+)?[smhdw])+", text.strip())
    if not parts:
        raise ValueError(f"expected a duration like 30m, 24h or 7d, got {text!r}")
    return sum(float(n) * _UNITS[u] for n, u in re.findall(r"(\d+(?:\.\d+)?)([smhdw])", text))


def _connect(path: str) -> sqlite3.Connection:
    p = Path(path)
    if not p.is_file():
        raise UsageReportError(f"no usage database at {path}")
    try:
        conn = sqlite3.connect(f"{p.resolve().as_uri()}?mode=ro", uri=True, timeout=10.0)
        conn.execute(_PROBE).fetchall()
    except sqlite3.DatabaseError as exc:
        raise UsageReportError(f"{path} is not a readable usage database ({exc})") from None
    return conn


def _connect_pg(url: str):
    try:
        import psycopg
    except ImportError:
        raise UsageReportError("--database-url needs psycopg: pip install 'spotinference[cluster]'") from None
    from proxy.observe.redact import redact_url, scrub

    try:
        conn = psycopg.connect(url, connect_timeout=10, application_name="spotinference-usage-report")
    except psycopg.Error as exc:
        raise UsageReportError(f"cannot connect to {redact_url(url)} "
                               f"({scrub(_first_line(exc), url)})") from None
    try:
        conn.read_only = True  # a report never changes the database
        conn.execute(_PROBE).fetchall()
    except psycopg.Error as exc:
        conn.close()
        raise UsageReportError(f"{redact_url(url)} has no readable usage table "
                               f"({scrub(_first_line(exc), url)})") from None
    return conn


def _first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


class _Source:
    """One database to report on: its connection, placeholder, error types and a streaming cursor."""

    def __init__(self, path: str | None, database_url: str | None) -> None:
        if database_url is not None:
            import psycopg

            from proxy.observe.redact import redact_url

            self.conn = _connect_pg(database_url)
            self.ph, self.errors, self.name = "%s", psycopg.Error, redact_url(database_url)
        else:
            assert path is not None
            self.conn = _connect(path)
            self.ph, self.errors, self.name = "?", sqlite3.DatabaseError, path
        self.pg, self.url = database_url is not None, database_url or ""

    def rows(self, sql: str, params: tuple):
        """All result rows, as a stream (PostgreSQL: a server-side cursor, memory stays flat)."""
        if not self.pg:
            yield from self.conn.execute(sql, params)
            return
        with self.conn.cursor(name="usage_report") as cur:
            cur.itersize = 10000
            cur.execute(sql, params)
            yield from cur

    def explain(self, exc: BaseException) -> str:
        if not self.pg:
            return _first_line(exc)
        from proxy.observe.redact import scrub

        return scrub(_first_line(exc), self.url)

    def close(self) -> None:
        self.conn.close()


def _percentile_rank(n: int, q: float) -> int:
    # Nearest-rank: the smallest value with at least q of the sample at or below it (1-based rank).
    return max(1, math.ceil(q * n))


def report(path: str | None, since_s: float | None, by: str, now: float | None = None, *,
           database_url: str | None = None) -> list[dict[str, Any]]:
    """One dict per group, sorted by requests (most first), then name. The SQLite file at `path`, or
    the PostgreSQL database at `database_url`."""
    return _run(path, database_url, since_s, by, now, cost=False)[0]


def cost_report(path: str | None, since_s: float | None, by: str, now: float | None = None, *,
                database_url: str | None = None) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """`report` with each group's ``usd`` and ``usd_per_mtok`` (and an ``(idle)`` line), and the cost
    summary: ``{"tiers": {tier: {"usd", "gpu_seconds", "tokens", "idle"}}, "usd", "recorded"}``."""
    rows, cost = _run(path, database_url, since_s, by, now, cost=True)
    assert cost is not None
    return rows, cost


def _run(path: str | None, database_url: str | None, since_s: float | None, by: str, now: float | None, *,
         cost: bool) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    col = _GROUP_COLUMN[by]
    src = _Source(path, database_url)
    where, params = "", ()
    if since_s is not None:
        where, params = f" WHERE ts >= {src.ph}", ((time.time() if now is None else now) - since_s,)
    try:
        try:
            groups = _groups(src, col, by, where, params)
            summary = _attribute(src, col, by, where, params, groups) if cost else None
        except src.errors as exc:
            raise UsageReportError(f"{src.name}: cannot read the usage table ({src.explain(exc)})") from None
    finally:
        src.close()
    rows = sorted(groups.values(), key=lambda r: (-r["requests"], str(r[by])))
    for r in rows:
        del r["_n"]
    return rows, summary


def _groups(src: _Source, col: str, by: str, where: str, params: tuple) -> dict[Any, dict[str, Any]]:
    groups: dict[Any, dict[str, Any]] = {}
    for g, req, err, pt, ct, est, nlat in src.rows(
        f"SELECT {col}, count(*), sum(CASE WHEN status >= 400 THEN 1 ELSE 0 END), "
        f"coalesce(sum(prompt_tokens), 0), coalesce(sum(completion_tokens), 0), "
        f"sum(CASE WHEN estimated THEN 1 ELSE 0 END), count(latency_ms) "
        f"FROM usage{where} GROUP BY {col}",
        params,
    ):
        groups[g] = {by: g, "requests": req, "errors": int(err or 0), "prompt_tokens": int(pt),
                     "completion_tokens": int(ct), "estimated": int(est or 0), "p50_ms": None,
                     "p95_ms": None, "_n": nlat}
    current, rank = object(), 0
    for g, lat in src.rows(
        f"SELECT {col}, latency_ms FROM usage{where}{' AND' if where else ' WHERE'} "
        f"latency_ms IS NOT NULL ORDER BY {col}, latency_ms",
        params,
    ):
        if g != current:
            current, rank = g, 0
            row = groups[g]
            r50, r95 = _percentile_rank(row["_n"], 0.50), _percentile_rank(row["_n"], 0.95)
        rank += 1
        if rank == r50:
            row["p50_ms"] = lat
        if rank == r95:
            row["p95_ms"] = lat
    return groups


def _has_gpu_time(src: _Source) -> bool:
    sql = ("SELECT to_regclass('gpu_time') IS NOT NULL" if src.pg else
           "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = 'gpu_time'")
    (found,), = list(src.rows(sql, ()))  # consumed whole: a PostgreSQL named cursor closes before the next
    return bool(found)


def _empty(by: str, name: str) -> dict[str, Any]:
    return {by: name, "requests": 0, "errors": 0, "prompt_tokens": 0, "completion_tokens": 0, "estimated": 0,
            "p50_ms": None, "p95_ms": None, "_n": 0}


def _attribute(src: _Source, col: str, by: str, where: str, params: tuple,
               groups: dict[Any, dict[str, Any]]) -> dict[str, Any]:
    """Share each tier's GPU cost among the groups by their tokens on it; adds usd fields to `groups`."""
    tiers: dict[str, dict[str, Any]] = {}
    recorded = _has_gpu_time(src)
    if recorded:
        for tier, usd, secs in src.rows(
                f"SELECT tier, sum(usd), sum(seconds) FROM gpu_time{where} GROUP BY tier", params):
            tiers[tier] = {"usd": float(usd or 0.0), "gpu_seconds": float(secs or 0.0), "tokens": 0,
                           "idle": False}
    shares: list[tuple[Any, str, int]] = []
    for g, tier, tokens in src.rows(
            f"SELECT {col}, tier, sum({_TOKENS}) FROM usage{where} GROUP BY {col}, tier", params):
        if tier in tiers and tokens:
            tiers[tier]["tokens"] += int(tokens)
            shares.append((g, tier, int(tokens)))
    for row in groups.values():
        row["usd"], row["_priced_tokens"] = 0.0, 0
    for g, tier, tokens in shares:
        t = tiers[tier]
        groups[g]["usd"] += t["usd"] * tokens / t["tokens"]
        groups[g]["_priced_tokens"] += tokens
    for tier, t in sorted(tiers.items()):
        if t["tokens"] or not t["usd"]:
            continue
        t["idle"] = True
        name = tier if by == "tier" else IDLE
        row = groups.get(name)
        if row is None:
            row = groups[name] = {**_empty(by, name), "usd": 0.0, "_priced_tokens": 0}
        row["usd"] += t["usd"]
    for row in groups.values():
        n = row.pop("_priced_tokens")
        row["usd_per_mtok"] = row["usd"] / n * 1e6 if n else None
    return {"tiers": tiers, "usd": sum(t["usd"] for t in tiers.values()), "recorded": recorded}


def _fmt_ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}"


def _totals(rows: list[dict[str, Any]]) -> dict[str, int]:
    return {k: sum(r[k] for r in rows) for k in ("requests", "errors", "prompt_tokens", "completion_tokens")}


def fmt_usd(v: float | None) -> str:
    """Dollars readable at any scale: cents for large sums, significant digits for tiny ones."""
    if v is None:
        return "-"
    if v == 0:
        return "0"
    if abs(v) >= 100:
        return f"{v:,.2f}"
    if abs(v) >= 0.01:
        return f"{v:.4f}"
    return f"{v:.3g}"


def _print_table(rows: list[dict[str, Any]], by: str, since: str | None, out,
                 cost: dict[str, Any] | None = None) -> None:
    from rich.console import Console
    from rich.table import Table

    title = f"usage by {by}" + (f", last {since}" if since else "")
    table = Table(title=title)
    table.add_column(by)
    names = ["requests", "errors", "prompt tokens", "completion tokens", "p50 ms", "p95 ms"]
    for name in names + (["usd", "usd/Mtok"] if cost is not None else []):
        table.add_column(name, justify="right")
    for r in rows:
        extra = [fmt_usd(r["usd"]), fmt_usd(r["usd_per_mtok"])] if cost is not None else []
        table.add_row("-" if r[by] is None else str(r[by]), str(r["requests"]), str(r["errors"]),
                      str(r["prompt_tokens"]), str(r["completion_tokens"]), _fmt_ms(r["p50_ms"]),
                      _fmt_ms(r["p95_ms"]), *extra)
    if rows:
        t = _totals(rows)
        table.add_section()
        extra = [fmt_usd(cost["usd"]), ""] if cost is not None else []
        table.add_row("total", str(t["requests"]), str(t["errors"]), str(t["prompt_tokens"]),
                      str(t["completion_tokens"]), "", "", *extra)
    console = Console(file=out, soft_wrap=True, width=None if getattr(out, "isatty", lambda: False)() else 160)
    console.print(table)
    if cost is not None:
        for line in cost_footer(cost):
            console.print(line, highlight=False, markup=False)


def cost_footer(cost: dict[str, Any]) -> list[str]:
    """The lines under a --cost table: each tier's GPU time and cost, how it was shared, what (idle) is."""
    if not cost["recorded"]:
        return ["cost: no GPU time recorded (no gpu_time table yet: a gateway with [tiers.cost] writes it)"]
    if not cost["tiers"]:
        return ["cost: no GPU time recorded in the period (only tiers with [tiers.cost] are metered)"]
    lines = [f"cost: tier {tier}: {t['gpu_seconds'] / 3600:.3f} GPU host-hours, ${fmt_usd(t['usd'])}, "
             f"{t['tokens']} tokens" + (" -- awake with no tokens (idle)" if t["idle"] else "")
             for tier, t in sorted(cost["tiers"].items())]
    lines.append("cost: GPU time is paid from start to stop, wake time included; a tier's cost is shared "
                 "among its requests in proportion to their tokens.")
    if any(t["idle"] for t in cost["tiers"].values()):
        lines.append(f"cost: {IDLE} is GPU time of a tier awake without a token in the period: cost without "
                     "tokens.")
    return lines


def _where(args) -> tuple[str | None, str | None]:
    """(SQLite path, PostgreSQL URL) from --db, --database-url or the config's [usage] section."""
    if args.config is None:
        return args.db, args.database_url
    from proxy.config import ConfigError, load

    try:
        usage = load(args.config).usage
    except ConfigError as exc:
        raise UsageReportError(f"{args.config}: {exc}") from None
    if usage.database_url is None and usage.path is None:
        raise UsageReportError(f"{args.config}: [usage] names no database (path or database_url)")
    return usage.path, usage.database_url


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="spotinference usage", description="Report the usage log.")
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--db", help="the usage SQLite file ([usage] path)")
    where.add_argument("--database-url", metavar="URL",
                       help="the usage PostgreSQL database ([usage] database_url)")
    where.add_argument("--config", metavar="FILE",
                       help="the gateway's config file: whichever [usage] names (path or database_url)")
    parser.add_argument("--since", default=None, metavar="DURATION",
                        help="only requests newer than this (30m, 24h, 7d); default: all")
    parser.add_argument("--by", choices=sorted(_GROUP_COLUMN), default="key")
    parser.add_argument("--format", choices=("table", "csv", "json"), default="table")
    parser.add_argument("--cost", action="store_true",
                        help="add usd and usd_per_mtok: each tier's GPU time cost shared by tokens")
    try:
        args = parser.parse_args(sys.argv[1:] if argv is None else argv)
        since_s = None
        if args.since is not None:
            try:
                since_s = parse_since(args.since)
            except ValueError as exc:
                parser.error(f"argument --since: {exc}")
    except SystemExit as exc:  # argparse has printed its message (or --help)
        return int(exc.code or 0)
    try:
        path, url = _where(args)
        cost = None
        if args.cost:
            rows, cost = cost_report(path, since_s, args.by, database_url=url)
        else:
            rows = report(path, since_s, args.by, database_url=url)
    except UsageReportError as exc:
        sys.stderr.write(f"spotinference usage: {exc}\n")
        return 2
    out = sys.stdout
    if args.format == "json":
        doc: dict[str, Any] = {"by": args.by, "since_s": since_s, "groups": rows}
        if cost is not None:
            doc["cost"] = cost
        json.dump(doc, out, indent=2)
        out.write("\n")
    elif args.format == "csv":
        fields = _FIELDS + (_COST_FIELDS if cost is not None else ())
        w = csv.writer(out, lineterminator="\n")
        w.writerow((args.by, *fields))
        for r in rows:
            w.writerow((r[args.by] if r[args.by] is not None else "", *(
                "" if r[f] is None else r[f] for f in fields)))
    else:
        _print_table(rows, args.by, args.since, out, cost)
    return 0


if __name__ == "__main__":
    sys.exit(main())
