"""`spotinference usage`: report the usage log per key, model or tier.

Strategy: read-only SQL over the table `proxy.usage.log` writes (opened with ``mode=ro``, so a report never
creates or changes a database, and runs beside a live gateway thanks to WAL). Counts and token sums are
one GROUP BY; latency percentiles (nearest rank) come from a second query ordered by group and latency,
consumed as a stream, so memory stays flat however large the log. Errors are rows with status >= 400
(499 included: the client went away). A missing, unreadable or foreign file is a one-line message and
exit status 2, never a traceback.
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
_FIELDS = ("requests", "errors", "prompt_tokens", "completion_tokens", "estimated", "p50_ms", "p95_ms")


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
        conn.execute("SELECT ts, status, latency_ms, key_name, model, tier FROM usage LIMIT 1").fetchall()
    except sqlite3.DatabaseError as exc:
        raise UsageReportError(f"{path} is not a readable usage database ({exc})") from None
    return conn


def _percentile_rank(n: int, q: float) -> int:
    # Nearest-rank: the smallest value with at least q of the sample at or below it (1-based rank).
    return max(1, math.ceil(q * n))


def report(path: str, since_s: float | None, by: str, now: float | None = None) -> list[dict[str, Any]]:
    """One dict per group, sorted by requests (most first), then name."""
    col = _GROUP_COLUMN[by]
    cutoff = float("-inf")
    if since_s is not None:
        cutoff = (time.time() if now is None else now) - since_s
    conn = _connect(path)
    try:
        groups: dict[Any, dict[str, Any]] = {}
        try:
            for g, req, err, pt, ct, est, nlat in conn.execute(
                f"SELECT {col}, count(*), sum(status >= 400), total(prompt_tokens), "
                f"total(completion_tokens), "
                f"sum(estimated), count(latency_ms) FROM usage WHERE ts >= ? GROUP BY {col}",
                (cutoff,),
            ):
                groups[g] = {by: g, "requests": req, "errors": err or 0, "prompt_tokens": int(pt),
                             "completion_tokens": int(ct), "estimated": est or 0, "p50_ms": None,
                             "p95_ms": None, "_n": nlat}
            current, rank = object(), 0
            for g, lat in conn.execute(
                f"SELECT {col}, latency_ms FROM usage WHERE ts >= ? AND latency_ms IS NOT NULL "
                f"ORDER BY {col}, latency_ms",
                (cutoff,),
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
        except sqlite3.DatabaseError as exc:
            raise UsageReportError(f"{path}: cannot read the usage table ({exc})") from None
    finally:
        conn.close()
    rows = sorted(groups.values(), key=lambda r: (-r["requests"], str(r[by])))
    for r in rows:
        del r["_n"]
    return rows


def _fmt_ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}"


def _totals(rows: list[dict[str, Any]]) -> dict[str, int]:
    return {k: sum(r[k] for r in rows) for k in ("requests", "errors", "prompt_tokens", "completion_tokens")}


def _print_table(rows: list[dict[str, Any]], by: str, since: str | None, out) -> None:
    from rich.console import Console
    from rich.table import Table

    title = f"usage by {by}" + (f", last {since}" if since else "")
    table = Table(title=title)
    table.add_column(by)
    for name in ("requests", "errors", "prompt tokens", "completion tokens", "p50 ms", "p95 ms"):
        table.add_column(name, justify="right")
    for r in rows:
        table.add_row("-" if r[by] is None else str(r[by]), str(r["requests"]), str(r["errors"]),
                      str(r["prompt_tokens"]), str(r["completion_tokens"]), _fmt_ms(r["p50_ms"]),
                      _fmt_ms(r["p95_ms"]))
    if rows:
        t = _totals(rows)
        table.add_section()
        table.add_row("total", str(t["requests"]), str(t["errors"]), str(t["prompt_tokens"]),
                      str(t["completion_tokens"]), "", "")
    Console(file=out, soft_wrap=True).print(table)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="spotinference usage", description="Report the usage log.")
    parser.add_argument("--db", required=True, help="the usage SQLite file ([usage] path)")
    parser.add_argument("--since", default=None, metavar="DURATION",
                        help="only requests newer than this (30m, 24h, 7d); default: all")
    parser.add_argument("--by", choices=sorted(_GROUP_COLUMN), default="key")
    parser.add_argument("--format", choices=("table", "csv", "json"), default="table")
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
        rows = report(args.db, since_s, args.by)
    except UsageReportError as exc:
        sys.stderr.write(f"spotinference usage: {exc}\n")
        return 2
    out = sys.stdout
    if args.format == "json":
        json.dump({"by": args.by, "since_s": since_s, "groups": rows}, out, indent=2)
        out.write("\n")
    elif args.format == "csv":
        w = csv.writer(out, lineterminator="\n")
        w.writerow((args.by, *_FIELDS))
        for r in rows:
            w.writerow((r[args.by] if r[args.by] is not None else "", *(
                "" if r[f] is None else r[f] for f in _FIELDS)))
    else:
        _print_table(rows, args.by, args.since, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
