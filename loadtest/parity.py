"""`spotinference parity`: a golden set run against two OpenAI-compatible endpoints, side by side.

Strategy: the migration check a customer runs, so it talks to both endpoints exactly as their code
does, through the official OpenAI SDK (sync client, in a small thread pool; the SDK is thread-safe).
Every golden case runs `--runs` times, non-streaming and streaming, on both sides; requests for A
and B are interleaved so both endpoints see the same conditions. Each request becomes one attempt
record (plain dict, JSON-ready): output text, tool calls, `usage` tokens (the server's tokenizer,
never a client-side estimate), TTFT (streaming: first content or tool-call delta), total latency,
tool-call and structured-output validity (golden_io), and the error if any. The attempts are folded
into one report dict that feeds the terminal table, `--json` and the HTML (parity_report), so the
three never disagree.

Bad input ends with a one-line message and exit 2, never a traceback: a missing or malformed golden
file (with its line number), an unset key variable, an endpoint that cannot be reached or rejects
the key (both probed with GET /v1/models before any case runs). Exit 1: the run finished but some
requests failed (they are in the report). Exit 0: every request answered; differences between
the endpoints are findings, not failures. Retries are off so latencies are what one request saw.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from loadtest import golden_io, parity_report
from loadtest.golden_io import GoldenCase, GoldenError, ToolCall
from loadtest.progress import progress

# Request fields the SDK takes as keyword arguments; any other golden param goes in extra_body.
_SDK_PARAMS = frozenset({
    "temperature", "top_p", "max_tokens", "max_completion_tokens", "seed", "stop", "n",
    "presence_penalty", "frequency_penalty", "logit_bias", "logprobs", "top_logprobs",
    "parallel_tool_calls", "user",
})


class Fatal(Exception):
    """A problem that stops the run before it starts; the message is shown as-is."""


@dataclass(frozen=True)
class Endpoint:
    side: str  # "a" or "b"
    url: str
    model: str
    client: Any  # openai.OpenAI
    listed: tuple[str, ...] = ()  # what GET /v1/models answered (empty: no such route)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="spotinference parity",
        description="Run a golden set against two OpenAI-compatible endpoints and compare them. "
        "Exit 0: all requests answered; 1: some requests failed; 2: bad input or unreachable endpoint.",
    )
    p.add_argument("--a", required=True, metavar="URL", help="endpoint A base URL (e.g. https://api.openai.com/v1)")
    p.add_argument("--b", required=True, metavar="URL", help="endpoint B base URL")
    p.add_argument("--golden", required=True, metavar="FILE.jsonl", help="golden cases, one JSON object a line")
    p.add_argument("--a-key-env", metavar="VAR", help="environment variable holding A's API key")
    p.add_argument("--b-key-env", metavar="VAR", help="environment variable holding B's API key")
    p.add_argument("--model-a", metavar="NAME", help="model on A (default: the first one A lists)")
    p.add_argument("--model-b", metavar="NAME", help="model on B (default: the first one B lists)")
    p.add_argument("--runs", type=int, default=1, metavar="N", help="repetitions of each case (default 1)")
    p.add_argument("--concurrency", type=int, default=2, metavar="N", help="requests in flight (default 2)")
    p.add_argument("--timeout-s", type=float, default=600.0, metavar="S",
                   help="per-request timeout; keep it above a cold tier's wake cap (default 600)")
    p.add_argument("--out", default="parity-report", metavar="DIR", help="folder for report.html (default parity-report)")
    p.add_argument("--json", metavar="FILE", help="also write the full report as JSON")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of `spotinference parity`; returns the exit status."""
    args = _parser().parse_args(argv)
    err = Console(stderr=True, highlight=False, soft_wrap=True)
    try:
        if args.runs < 1 or args.concurrency < 1 or args.timeout_s <= 0:
            raise Fatal("--runs, --concurrency and --timeout-s must be positive")
        cases = golden_io.load_golden(args.golden)
        a = _endpoint("a", args.a, args.a_key_env, args.model_a, args.timeout_s)
        b = _endpoint("b", args.b, args.b_key_env, args.model_b, args.timeout_s)
    except (GoldenError, Fatal) as exc:
        err.print(f"[bold red]parity:[/] {exc}")
        return 2
    _note_unpinned(cases, err)
    for ep in (a, b):
        if ep.listed and ep.model not in ep.listed:
            err.print(f"[yellow]note:[/] endpoint {ep.side.upper()} does not list model {ep.model!r} "
                      f"(it lists {', '.join(ep.listed[:8])}); its requests will likely fail")
    started = time.time()
    try:
        attempts = _run_all(cases, (a, b), args.runs, args.concurrency, err)
    finally:
        a.client.close()
        b.client.close()
    report = build_report(cases, (a, b), attempts, started=started, runs=args.runs, golden=args.golden)
    Console(highlight=False).print(summary_table(report))
    try:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "report.html").write_text(parity_report.render_html(report), encoding="utf-8")
        if args.json:
            Path(args.json).write_text(json.dumps(report, indent=1), encoding="utf-8")
    except OSError as exc:
        err.print(f"[bold red]parity:[/] cannot write the report: {exc}")
        return 2
    err.print(f"report: {out / 'report.html'}" + (f", json: {args.json}" if args.json else ""))
    failed = report["a"]["errors"] + report["b"]["errors"]
    if failed:
        err.print(f"[yellow]parity:[/] {failed} request(s) failed; see the report's errors")
    return 1 if failed else 0


# -- endpoints -------------------------------------------------------------------------------------

def _base_url(url: str) -> str:
    """Accept `http://host:port` or `http://host:port/v1`; the SDK wants the /v1 prefix."""
    url = url.rstrip("/")
    if "://" not in url:
        raise Fatal(f"not a URL: {url!r} (expected e.g. http://127.0.0.1:8080/v1)")
    path = url.split("://", 1)[1].partition("/")[2]
    return url if path else url + "/v1"


def _endpoint(side: str, url: str, key_env: str | None, model: str | None, timeout_s: float) -> Endpoint:
    import openai  # lazy: the SDK is heavy and only this command needs it

    label = side.upper()
    base = _base_url(url)
    if key_env:
        key = os.environ.get(key_env)
        if not key:
            raise Fatal(f"--{side}-key-env: environment variable {key_env} is not set")
    else:
        key = os.environ.get("OPENAI_API_KEY") or "none"
    client = openai.OpenAI(base_url=base, api_key=key, max_retries=0, timeout=timeout_s)
    try:
        listed = [m.id for m in client.models.list()]
    except openai.AuthenticationError as exc:
        raise Fatal(f"endpoint {label} ({base}) rejected the API key (HTTP 401: {_api_message(exc)}); "
                    f"pass the variable holding the right key with --{side}-key-env") from None
    except openai.PermissionDeniedError as exc:
        raise Fatal(f"endpoint {label} ({base}) refused access (HTTP 403: {_api_message(exc)})") from None
    except openai.NotFoundError:
        listed = []  # no /models route: fine if the model is named
    except openai.APIStatusError as exc:
        raise Fatal(f"endpoint {label} ({base}) answered HTTP {exc.status_code}: {_api_message(exc)}") from None
    except openai.APIConnectionError as exc:
        cause = exc.__cause__ or exc
        raise Fatal(f"cannot reach endpoint {label} at {base}: {cause}") from None
    except openai.OpenAIError as exc:
        raise Fatal(f"endpoint {label} ({base}) does not speak the OpenAI API: {exc}") from None
    if model is None:
        if not listed:
            raise Fatal(f"endpoint {label} ({base}) lists no models; name one with --model-{side}")
        model = listed[0]
    return Endpoint(side=side, url=base, model=model, client=client, listed=tuple(listed))


def _api_message(exc: Any) -> str:
    body = getattr(exc, "body", None)
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict) and inner.get("message"):
            return str(inner["message"])
        if isinstance(inner, str):  # vLLM's --api-key rejection: {"error": "Unauthorized"}
            return inner
    return str(getattr(exc, "message", exc))


def _note_unpinned(cases: list[GoldenCase], err: Console) -> None:
    loose = [c.id for c in cases if c.unpinned()]
    if loose:
        shown = ", ".join(loose[:5]) + (" ..." if len(loose) > 5 else "")
        err.print(f"[yellow]note:[/] {len(loose)} case(s) leave some of {', '.join(golden_io.PINNED)} "
                  f"to server defaults, which differ between providers: {shown}")


# -- running ---------------------------------------------------------------------------------------

def _request(case: GoldenCase, model: str, stream: bool) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"model": model, "messages": case.messages}
    if case.tools:
        kwargs["tools"] = case.tools
    if case.tool_choice is not None:
        kwargs["tool_choice"] = case.tool_choice
    if case.response_format is not None:
        kwargs["response_format"] = case.response_format
    extra = {k: v for k, v in case.params.items() if k not in _SDK_PARAMS}
    kwargs.update({k: v for k, v in case.params.items() if k in _SDK_PARAMS})
    if extra:
        kwargs["extra_body"] = extra
    if stream:
        kwargs["stream"] = True
        kwargs["stream_options"] = {"include_usage": True}
    return kwargs


def run_attempt(ep: Endpoint, case: GoldenCase, run: int, stream: bool) -> dict[str, Any]:
    """One request; never raises (runs in a worker thread): failures land in the record's 'error'."""
    rec: dict[str, Any] = {
        "side": ep.side, "case": case.id, "run": run, "stream": stream, "text": "", "tool_calls": [],
        "prompt_tokens": None, "completion_tokens": None, "ttft_ms": None, "latency_ms": None,
        "finish_reason": None, "tool_valid": None, "schema_valid": None, "problems": [], "error": None,
    }
    t0 = time.perf_counter()
    try:
        calls = _stream(ep, case, rec, t0) if stream else _plain(ep, case, rec)
    except Exception as exc:  # noqa: BLE001 -- worker thread, no trio here; every failure is a finding
        rec["error"] = _describe(exc)
        rec["latency_ms"] = (time.perf_counter() - t0) * 1000.0
        return rec
    rec["latency_ms"] = (time.perf_counter() - t0) * 1000.0
    rec["tool_calls"] = [{"name": c.name, "arguments": c.arguments} for c in calls]
    rec["tool_valid"], tool_problems = golden_io.check_tool_calls(case, calls)
    rec["schema_valid"], schema_problems = golden_io.check_structured(case, rec["text"])
    rec["problems"] = tool_problems + schema_problems
    return rec


def _plain(ep: Endpoint, case: GoldenCase, rec: dict[str, Any]) -> list[ToolCall]:
    resp = ep.client.chat.completions.create(**_request(case, ep.model, stream=False))
    if not resp.choices:
        raise ValueError("response has no choices")
    choice = resp.choices[0]
    rec["text"] = choice.message.content or ""
    rec["finish_reason"] = choice.finish_reason
    _usage(rec, resp.usage)
    return [ToolCall(tc.function.name, tc.function.arguments or "") for tc in choice.message.tool_calls or []]


def _stream(ep: Endpoint, case: GoldenCase, rec: dict[str, Any], t0: float) -> list[ToolCall]:
    parts: list[str] = []
    calls: dict[int, list[str]] = {}  # index -> [name, argument fragments...]
    with ep.client.chat.completions.create(**_request(case, ep.model, stream=True)) as events:
        for chunk in events:
            now = time.perf_counter()
            if chunk.usage is not None:
                _usage(rec, chunk.usage)
            for choice in chunk.choices[:1] if chunk.choices else ():
                delta = choice.delta
                if (delta.content or delta.tool_calls) and rec["ttft_ms"] is None:
                    rec["ttft_ms"] = (now - t0) * 1000.0
                if delta.content:
                    parts.append(delta.content)
                for tc in delta.tool_calls or ():
                    slot = calls.setdefault(tc.index, [""])
                    if tc.function is not None:
                        slot[0] += tc.function.name or ""
                        slot.append(tc.function.arguments or "")
                if choice.finish_reason:
                    rec["finish_reason"] = choice.finish_reason
    rec["text"] = "".join(parts)
    return [ToolCall(slot[0], "".join(slot[1:])) for _, slot in sorted(calls.items())]


def _usage(rec: dict[str, Any], usage: Any) -> None:
    if usage is not None:
        rec["prompt_tokens"] = usage.prompt_tokens
        rec["completion_tokens"] = usage.completion_tokens


def _describe(exc: BaseException) -> str:
    status = getattr(exc, "status_code", None)
    if status is not None:
        return f"HTTP {status}: {_api_message(exc)}"
    cause = exc.__cause__
    name = type(exc).__name__
    return f"{name}: {exc}" + (f" ({cause})" if cause else "")


def _run_all(cases: list[GoldenCase], eps: tuple[Endpoint, Endpoint], runs: int, concurrency: int,
             err: Console) -> list[dict[str, Any]]:
    jobs = [(ep, case, run, stream) for run in range(runs) for case in cases
            for stream in (False, True) for ep in eps]
    results: list[dict[str, Any]] = []
    with progress("parity", len(jobs), console=err) as bar, \
            concurrent.futures.ThreadPoolExecutor(max_workers=concurrency) as pool:
        futures = [pool.submit(run_attempt, *job) for job in jobs]
        errors = 0
        for fut in concurrent.futures.as_completed(futures):
            rec = fut.result()
            errors += rec["error"] is not None
            results.append(rec)
            bar.advance(status=f"{errors} errors")
    order = {(c.id): i for i, c in enumerate(cases)}
    results.sort(key=lambda r: (order[r["case"]], r["run"], r["stream"], r["side"]))
    return results


# -- the report ------------------------------------------------------------------------------------

def build_report(cases: list[GoldenCase], eps: tuple[Endpoint, Endpoint], attempts: list[dict[str, Any]],
                 *, started: float, runs: int, golden: str) -> dict[str, Any]:
    """Fold attempt records into the report dict behind the table, --json and the HTML."""
    per_case = [parity_report.case_figures(c.id, c.kind, [r for r in attempts if r["case"] == c.id])
                for c in cases]
    report: dict[str, Any] = {
        "golden": str(golden), "started": started, "runs": runs, "cases": per_case,
        "comparison": parity_report.comparison(per_case),
    }
    for ep in eps:
        mine = [r for r in attempts if r["side"] == ep.side]
        report[ep.side] = {"url": ep.url, "model": ep.model, **parity_report.side_figures(mine)}
    return report


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:,.1f} ms"


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{v * 100:.1f} %"


def summary_table(report: dict[str, Any]) -> Table:
    """The side-by-side terminal table."""
    a, b, cmp = report["a"], report["b"], report["comparison"]
    t = Table(title=f"parity: {len(report['cases'])} cases x {report['runs']} run(s), streaming and not",
              title_justify="left", caption="tokens: from usage; latency: non-streaming; total: streaming",
              caption_justify="left")
    t.add_column("", no_wrap=True)
    t.add_column("A", justify="right", overflow="fold")
    t.add_column("B", justify="right", overflow="fold")

    def both(fn: Any) -> tuple[str, str]:
        return fn(a), fn(b)

    def p50_95(key: str) -> Any:
        return lambda s: f"{_ms(s[key]['p50'])} / {_ms(s[key]['p95'])}"

    t.add_row("endpoint", *both(lambda s: s["url"]))
    t.add_row("model", *both(lambda s: s["model"]))
    t.add_row("requests (errors)", *both(lambda s: f"{s['requests']} ({s['errors']})"))
    t.add_row("prompt tokens", *both(lambda s: f"{s['prompt_tokens']:,}"))
    t.add_row("completion tokens", *both(lambda s: f"{s['completion_tokens']:,}"))
    t.add_row("TTFT P50 / P95", *both(p50_95("ttft_ms")))
    t.add_row("latency P50 / P95", *both(p50_95("latency_ms")))
    t.add_row("total P50 / P95", *both(p50_95("stream_total_ms")))
    t.add_row("tool calls valid", *both(lambda s: _pct(s["tool_valid_rate"])))
    t.add_row("structured valid", *both(lambda s: _pct(s["schema_valid_rate"])))
    t.add_row("stream = non-stream", *both(lambda s: _pct(s["stream_consistency"])))
    t.add_section()
    sim = "-" if cmp["mean_similarity"] is None else f"{cmp['mean_similarity']:.3f}"
    t.add_row("exact match A = B", f"{cmp['exact_cases']} / {cmp['compared_cases']} cases", "")
    t.add_row("mean similarity", sim, "")
    t.add_row("token differences", f"{cmp['token_mismatch_cases']} cases", "")
    return t


if __name__ == "__main__":
    sys.exit(main())
