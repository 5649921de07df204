"""Parity report: figures folded from attempt records, and the self-contained HTML page.

Strategy: everything here is pure and synchronous; the input is the attempt records that
loadtest/parity produces (plain dicts, JSON-ready), the output is plain dicts and one HTML string.
So the HTML can be regenerated from a `--json` file, and tests check figures without running a page.
The page has no external resource at all (no scripts, fonts, CDNs): inline CSS and hand-drawn inline
SVG -- latency strips with P50/P95 marks, P50/P95 bars, and CDFs for the tail -- then one row per
case with a word-level A/B diff in a <details> block. Everything user-supplied goes through
html.escape. Keep the figure names in sync with parity.summary_table and the JSON consumers.
"""

from __future__ import annotations

import difflib
import html
import math
import re
import statistics
import time
from typing import Any

COLORS = {"a": "#2563eb", "b": "#ea580c"}
_METRICS = (("ttft_ms", "TTFT (streaming)"), ("latency_ms", "latency (non-streaming)"),
            ("stream_total_ms", "total (streaming)"))


# -- figures ---------------------------------------------------------------------------------------

def percentile(values: list[float], q: float) -> float | None:
    """Linear-interpolated percentile (q in 0..100) of values; None when empty."""
    if not values:
        return None
    s = sorted(values)
    pos = (len(s) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def _dist(values: list[float]) -> dict[str, Any]:
    return {"n": len(values), "p50": percentile(values, 50), "p95": percentile(values, 95),
            "p99": percentile(values, 99), "max": max(values) if values else None}


def output_of(rec: dict[str, Any]) -> str:
    """The text compared between attempts: content, then each tool call as name(arguments)."""
    calls = "\n".join(f"{c['name']}({c['arguments']})" for c in rec["tool_calls"])
    return rec["text"] + ("\n" + calls if calls and rec["text"] else calls)


def _rate(flags: list[bool | None]) -> float | None:
    judged = [f for f in flags if f is not None]
    return sum(judged) / len(judged) if judged else None


def _ok(recs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in recs if r["error"] is None]


def side_figures(attempts: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-endpoint figures over all of that endpoint's attempts."""
    ok = _ok(attempts)
    plain = [r for r in ok if not r["stream"]]
    streamed = [r for r in ok if r["stream"]]
    pairs = {}
    for r in ok:
        pairs.setdefault((r["case"], r["run"]), {})[r["stream"]] = output_of(r)
    same = [p[True] == p[False] for p in pairs.values() if len(p) == 2]
    errors: dict[str, int] = {}
    for r in attempts:
        if r["error"] is not None:
            errors[r["error"]] = errors.get(r["error"], 0) + 1
    return {
        "requests": len(attempts), "errors": len(attempts) - len(ok), "error_counts": errors,
        "prompt_tokens": sum(r["prompt_tokens"] or 0 for r in ok),
        "completion_tokens": sum(r["completion_tokens"] or 0 for r in ok),
        "ttft_ms": _dist([r["ttft_ms"] for r in streamed if r["ttft_ms"] is not None]),
        "latency_ms": _dist([r["latency_ms"] for r in plain]),
        "stream_total_ms": _dist([r["latency_ms"] for r in streamed]),
        "tool_valid_rate": _rate([r["tool_valid"] for r in ok]),
        "schema_valid_rate": _rate([r["schema_valid"] for r in ok]),
        "stream_consistency": sum(same) / len(same) if same else None,
    }


def _case_side(recs: list[dict[str, Any]]) -> dict[str, Any]:
    ok = _ok(recs)
    first = next((r for r in ok if not r["stream"]), ok[0] if ok else None)
    ttfts = [r["ttft_ms"] for r in ok if r["ttft_ms"] is not None]
    lat = [r["latency_ms"] for r in ok if not r["stream"]]
    return {
        "text": output_of(first) if first else "",
        "prompt_tokens": first["prompt_tokens"] if first else None,
        "completion_tokens": first["completion_tokens"] if first else None,
        "usage_stable": len({(r["prompt_tokens"], r["completion_tokens"]) for r in ok}) <= 1,
        "latency_ms": statistics.median(lat) if lat else None,
        "ttft_ms": statistics.median(ttfts) if ttfts else None,
        "tool_valid": _rate([r["tool_valid"] for r in ok]),
        "schema_valid": _rate([r["schema_valid"] for r in ok]),
        "problems": sorted({p for r in ok for p in r["problems"]}),
        "errors": sorted({r["error"] for r in recs if r["error"] is not None}),
    }


def similarity(x: str, y: str) -> float:
    """difflib ratio of two outputs (1.0 identical)."""
    return difflib.SequenceMatcher(None, x, y, autojunk=False).ratio()


def case_figures(case_id: str, kind: str, attempts: list[dict[str, Any]]) -> dict[str, Any]:
    """One golden case: both sides' figures, and A/B similarity over attempts paired by run and mode."""
    by_key = {(r["side"], r["run"], r["stream"]): r for r in attempts}
    sims = []
    for (side, run, stream), ra in by_key.items():
        rb = by_key.get(("b", run, stream))
        if side == "a" and rb is not None and ra["error"] is None and rb["error"] is None:
            sims.append(similarity(output_of(ra), output_of(rb)))
    return {
        "id": case_id, "kind": kind,
        "a": _case_side([r for r in attempts if r["side"] == "a"]),
        "b": _case_side([r for r in attempts if r["side"] == "b"]),
        "similarity": statistics.fmean(sims) if sims else None,
        "exact": all(s == 1.0 for s in sims) if sims else None,
        "attempts": attempts,
    }


def comparison(cases: list[dict[str, Any]]) -> dict[str, Any]:
    """A-versus-B figures over all cases."""
    compared = [c for c in cases if c["similarity"] is not None]
    sims = [c["similarity"] for c in compared]
    tokens = [c for c in cases if c["a"]["prompt_tokens"] is not None and c["b"]["prompt_tokens"] is not None]
    return {
        "compared_cases": len(compared),
        "exact_cases": sum(1 for c in compared if c["exact"]),
        "mean_similarity": statistics.fmean(sims) if sims else None,
        "min_similarity": min(sims) if sims else None,
        "token_mismatch_cases": sum(
            1 for c in tokens if (c["a"]["prompt_tokens"], c["a"]["completion_tokens"])
            != (c["b"]["prompt_tokens"], c["b"]["completion_tokens"])),
    }


# -- SVG -------------------------------------------------------------------------------------------

def _ticks(hi: float, count: int = 5) -> list[float]:
    if hi <= 0:
        return [0.0]
    raw = hi / count
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    return [i * step for i in range(int(hi / step + 1e-9) + 1)]


def _fmt(v: float) -> str:
    return f"{v:,.0f}" if v >= 100 else f"{v:,.1f}".rstrip("0").rstrip(".")


def _axis(x0: float, x1: float, y: float, top: float, ticks: list[float], scale: Any, unit: str) -> list[str]:
    out = [f'<line x1="{x0}" y1="{y}" x2="{x1}" y2="{y}" class="ax"/>']
    for t in ticks:
        x = scale(t)
        out.append(f'<line x1="{x:.1f}" y1="{top}" x2="{x:.1f}" y2="{y}" class="grid"/>')
        out.append(f'<text x="{x:.1f}" y="{y + 14}" text-anchor="middle">{_fmt(t)}</text>')
    out.append(f'<text x="{x1}" y="{y + 28}" text-anchor="end" class="unit">{unit}</text>')
    return out


def _svg(plot_id: str, title: str, w: int, h: int, body: list[str]) -> str:
    return (f'<svg class="plot" id="{plot_id}" role="img" aria-label="{html.escape(title)}" '
            f'xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {w} {h}" width="{w}" height="{h}">'
            f'<title>{html.escape(title)}</title>' + "".join(body) + "</svg>")


def _values(cases: list[dict[str, Any]], side: str, metric: str) -> list[float]:
    recs = [r for c in cases for r in c["attempts"] if r["side"] == side and r["error"] is None]
    if metric == "ttft_ms":
        return [r["ttft_ms"] for r in recs if r["stream"] and r["ttft_ms"] is not None]
    return [r["latency_ms"] for r in recs if r["stream"] == (metric == "stream_total_ms")]


def strip_plot(report: dict[str, Any]) -> str:
    """Every attempt as a dot per metric and side, with P50 and P95 marked."""
    w, left, right, row = 900, 190, 30, 34
    data = [(m, label, s, _values(report["cases"], s, m)) for m, label in _METRICS for s in ("a", "b")]
    hi = max((max(v) for *_, v in data if v), default=1.0) * 1.05
    h = 30 + row * len(data) + 40
    scale = lambda v: left + (w - left - right) * v / hi
    body = _axis(left, w - right, h - 40, 20, _ticks(hi), scale, "ms")
    for i, (_, label, side, vals) in enumerate(data):
        y = 20 + row * i + row / 2
        body.append(f'<text x="{left - 8}" y="{y + 4:.1f}" text-anchor="end">{label} · {side.upper()}</text>')
        for j, v in enumerate(vals):
            jitter = ((j * 7919) % 13 - 6) * 1.1
            body.append(f'<circle cx="{scale(v):.1f}" cy="{y + jitter:.1f}" r="2.6" fill="{COLORS[side]}" '
                        f'fill-opacity="0.55"/>')
        for q, dash in ((50, ""), (95, ' stroke-dasharray="4 3"')):
            p = percentile(vals, q)
            if p is not None:
                body.append(f'<line x1="{scale(p):.1f}" y1="{y - 12:.1f}" x2="{scale(p):.1f}" y2="{y + 12:.1f}" '
                            f'stroke="#111" stroke-width="2"{dash}><title>P{q} {p:.1f} ms</title></line>')
    return _svg("plot-latency", "Latency distributions per attempt (solid: P50, dashed: P95)", w, h, body)


def bar_plot(report: dict[str, Any]) -> str:
    """P50 and P95 side by side for A and B, per metric."""
    w, h, left, bottom = 900, 300, 60, 60
    groups = [(label, [(s, q, report[s][m][f"p{q}"]) for s in ("a", "b") for q in (50, 95)]) for m, label in _METRICS]
    hi = max((v for _, bars in groups for *_, v in bars if v is not None), default=1.0) * 1.1
    plot_h = h - bottom - 20
    ys = lambda v: h - bottom - plot_h * v / hi
    body = [f'<line x1="{left}" y1="{h - bottom}" x2="{w - 10}" y2="{h - bottom}" class="ax"/>']
    for t in _ticks(hi):
        body.append(f'<line x1="{left}" y1="{ys(t):.1f}" x2="{w - 10}" y2="{ys(t):.1f}" class="grid"/>')
        body.append(f'<text x="{left - 6}" y="{ys(t) + 4:.1f}" text-anchor="end">{_fmt(t)}</text>')
    body.append(f'<text x="{left - 6}" y="14" text-anchor="end" class="unit">ms</text>')
    gw = (w - left - 10) / len(groups)
    for g, (label, bars) in enumerate(groups):
        x0 = left + g * gw + gw * 0.12
        bw = gw * 0.76 / len(bars)
        for k, (side, q, v) in enumerate(bars):
            if v is None:
                continue
            x = x0 + k * bw
            opacity = "1" if q == 50 else "0.55"
            body.append(f'<rect x="{x:.1f}" y="{ys(v):.1f}" width="{bw - 4:.1f}" height="{h - bottom - ys(v):.1f}" '
                        f'fill="{COLORS[side]}" fill-opacity="{opacity}"><title>{side.upper()} P{q} {v:.1f} ms'
                        f'</title></rect>')
            body.append(f'<text x="{x + bw / 2 - 2:.1f}" y="{ys(v) - 4:.1f}" text-anchor="middle" class="small">'
                        f'{_fmt(v)}</text>')
            body.append(f'<text x="{x + bw / 2 - 2:.1f}" y="{h - bottom + 14}" text-anchor="middle" class="small">'
                        f'{side.upper()} P{q}</text>')
        body.append(f'<text x="{left + g * gw + gw / 2:.1f}" y="{h - bottom + 34}" text-anchor="middle">{label}</text>')
    return _svg("plot-percentiles", "P50 and P95 per endpoint", w, h, body)


def cdf_plot(report: dict[str, Any], metric: str, label: str) -> str:
    """Empirical CDF of one metric for A and B; the P95 line shows the tail."""
    w, h, left, bottom, top = 440, 290, 50, 45, 30
    series = {s: sorted(_values(report["cases"], s, metric)) for s in ("a", "b")}
    hi = max((v[-1] for v in series.values() if v), default=1.0) * 1.05
    xs = lambda v: left + (w - left - 15) * v / hi
    ys = lambda p: h - bottom - (h - bottom - top) * p
    body = _axis(left, w - 15, h - bottom, top, _ticks(hi, 4), xs, "ms")
    for p in (0.0, 0.5, 0.95, 1.0):
        cls = "p95" if p == 0.95 else "grid"
        body.append(f'<line x1="{left}" y1="{ys(p):.1f}" x2="{w - 15}" y2="{ys(p):.1f}" class="{cls}"/>')
        if p < 1.0:  # 1 would sit on top of 0.95
            body.append(f'<text x="{left - 6}" y="{ys(p) + 4:.1f}" text-anchor="end">{p:g}</text>')
    for side, vals in series.items():
        if not vals:
            continue
        pts = [f"{xs(vals[0]):.1f},{ys(0):.1f}"]
        for i, v in enumerate(vals):
            pts += [f"{xs(v):.1f},{ys(i / len(vals)):.1f}", f"{xs(v):.1f},{ys((i + 1) / len(vals)):.1f}"]
        body.append(f'<polyline points="{" ".join(pts)}" fill="none" stroke="{COLORS[side]}" stroke-width="2"/>')
    body.append(f'<text x="{left}" y="14">{label}: fraction of requests ≤ x (dashed: 0.95)</text>')
    return _svg(f"plot-cdf-{metric}", f"CDF of {label}", w, h, body)


# -- HTML ------------------------------------------------------------------------------------------

def word_diff(a: str, b: str) -> str:
    """A/B word diff as HTML: <del> only in A, <ins> only in B."""
    ta, tb = re.split(r"(\s+)", a), re.split(r"(\s+)", b)
    out = []
    for op, i1, i2, j1, j2 in difflib.SequenceMatcher(None, ta, tb, autojunk=False).get_opcodes():
        if op == "equal":
            out.append(html.escape("".join(ta[i1:i2])))
            continue
        if i2 > i1:
            out.append(f"<del>{html.escape(''.join(ta[i1:i2]))}</del>")
        if j2 > j1:
            out.append(f"<ins>{html.escape(''.join(tb[j1:j2]))}</ins>")
    return "".join(out)


def _cell(v: Any, kind: str = "") -> str:
    if v is None:
        return "<td>-</td>"
    if kind == "pct":
        bad = ' class="bad"' if v < 1 else ""
        return f"<td{bad}>{v * 100:.0f} %</td>"
    if kind == "ms":
        return f"<td>{v:,.1f}</td>"
    return f"<td>{html.escape(str(v))}</td>"


def _case_rows(cases: list[dict[str, Any]]) -> str:
    rows = []
    for c in cases:
        a, b = c["a"], c["b"]
        sim = c["similarity"]
        flag = "" if c["exact"] else " differs"
        rows.append(
            f'<tr class="case{flag}" id="case-{html.escape(c["id"])}"><td><a href="#d-{html.escape(c["id"])}">'
            f'{html.escape(c["id"])}</a></td><td>{c["kind"]}</td>'
            + ("<td>-</td>" if sim is None else f"<td>{sim:.3f}</td>")
            + f"<td>{a['prompt_tokens'] or '-'} / {b['prompt_tokens'] or '-'}</td>"
            + f"<td>{a['completion_tokens'] or '-'} / {b['completion_tokens'] or '-'}</td>"
            + _cell(a["ttft_ms"], "ms") + _cell(b["ttft_ms"], "ms")
            + _cell(a["latency_ms"], "ms") + _cell(b["latency_ms"], "ms")
            + _cell(a["tool_valid"] if c["kind"] == "tools" else a["schema_valid"], "pct")
            + _cell(b["tool_valid"] if c["kind"] == "tools" else b["schema_valid"], "pct")
            + f"<td>{len(a['errors'])} / {len(b['errors'])}</td></tr>")
        notes = "".join(f"<li>{side.upper()}: {html.escape(p)}</li>" for side in ("a", "b")
                        for p in c[side]["problems"] + c[side]["errors"])
        is_open = " open" if notes else ""  # failures are shown without a click
        rows.append(
            f'<tr class="detail"><td colspan="12"><details id="d-{html.escape(c["id"])}"{is_open}><summary>diff</summary>'
            f'<pre class="diff">{word_diff(a["text"], b["text"])}</pre>'
            + (f"<ul>{notes}</ul>" if notes else "") + "</details></td></tr>")
    return "".join(rows)


def _summary_rows(report: dict[str, Any]) -> str:
    a, b = report["a"], report["b"]

    def ms(d: dict[str, Any]) -> str:
        return "-" if d["p50"] is None else f"{d['p50']:,.1f} / {d['p95']:,.1f} ms"

    def pct(v: float | None) -> str:
        return "-" if v is None else f"{v * 100:.1f} %"

    rows = [("endpoint", a["url"], b["url"]), ("model", a["model"], b["model"]),
            ("requests (errors)", f"{a['requests']} ({a['errors']})", f"{b['requests']} ({b['errors']})"),
            ("prompt tokens (usage)", f"{a['prompt_tokens']:,}", f"{b['prompt_tokens']:,}"),
            ("completion tokens (usage)", f"{a['completion_tokens']:,}", f"{b['completion_tokens']:,}")]
    rows += [(f"{label} P50 / P95", ms(a[m]), ms(b[m])) for m, label in _METRICS]
    rows += [("tool-call validity", pct(a["tool_valid_rate"]), pct(b["tool_valid_rate"])),
             ("structured-output validity", pct(a["schema_valid_rate"]), pct(b["schema_valid_rate"])),
             ("stream == non-stream output", pct(a["stream_consistency"]), pct(b["stream_consistency"]))]
    return "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(x)}</td><td>{html.escape(y)}</td></tr>"
                   for k, x, y in rows)


_CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,sans-serif;margin:24px auto;max-width:1180px;color:#111}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 8px}.meta{color:#555}
table{border-collapse:collapse}th,td{padding:3px 9px;border-bottom:1px solid #e5e7eb;text-align:right}
th:first-child,td:first-child{text-align:left}table.summary td{font-variant-numeric:tabular-nums}
.key{display:inline-block;width:12px;height:12px;border-radius:2px;vertical-align:-1px;margin:0 4px 0 12px}
svg text{font:11px system-ui,sans-serif;fill:#333}svg .small{font-size:10px}svg .unit{fill:#777}
svg .ax{stroke:#333}svg .grid{stroke:#e5e7eb}svg .p95{stroke:#999;stroke-dasharray:4 3}
tr.differs td:nth-child(3){color:#b45309;font-weight:600}td.bad{color:#b91c1c;font-weight:600}
tr.detail td{border:0;padding:0 9px;text-align:left}details summary{cursor:pointer;color:#555;font-size:12px}
pre.diff{white-space:pre-wrap;background:#f8fafc;padding:8px;margin:4px 0 10px;border-radius:4px}
del{background:#dbeafe;color:#1e3a8a;text-decoration:line-through}ins{background:#ffedd5;color:#7c2d12;text-decoration:none}
"""


def render_html(report: dict[str, Any]) -> str:
    """The whole report as one self-contained HTML document."""
    cmp = report["comparison"]
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(report["started"]))
    sim = "-" if cmp["mean_similarity"] is None else f"{cmp['mean_similarity']:.3f}"
    head = ("<th>case</th><th>kind</th><th>similarity</th><th>prompt tok A / B</th><th>completion tok A / B</th>"
            "<th>TTFT A</th><th>TTFT B</th><th>latency A</th><th>latency B</th><th>valid A</th><th>valid B</th>"
            "<th>errors A / B</th>")
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>spotinference parity report</title>
<style>{_CSS}</style></head><body>
<h1>Parity report</h1>
<p class="meta">{html.escape(report['golden'])} · {len(report['cases'])} cases × {report['runs']} run(s), streaming and
non-streaming · {when}<span class="key" style="background:{COLORS['a']}"></span>A
<span class="key" style="background:{COLORS['b']}"></span>B</p>
<h2>Summary</h2>
<table class="summary"><tr><th></th><th>A</th><th>B</th></tr>{_summary_rows(report)}</table>
<p>Exact match A = B: <b>{cmp['exact_cases']} / {cmp['compared_cases']}</b> cases · mean similarity
<b>{sim}</b> · cases with different token counts: <b>{cmp['token_mismatch_cases']}</b></p>
<h2>Latency distributions</h2>
{strip_plot(report)}
<h2>P50 / P95</h2>
{bar_plot(report)}
<h2>Tail (CDF)</h2>
{cdf_plot(report, "ttft_ms", "TTFT")}
{cdf_plot(report, "latency_ms", "non-streaming latency")}
<h2>Cases</h2>
<p class="meta">Latencies are medians in ms; valid = tool-call validity for tool cases, schema validity for
json_schema cases. In the diffs, <del>struck blue</del> is only in A and <ins>orange</ins> only in B.</p>
<table class="cases"><tr>{head}</tr>{_case_rows(report['cases'])}</table>
</body></html>
"""
