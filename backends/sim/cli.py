"""`spotinference sim`: run the simulated vLLM OpenAI server in the foreground.

Strategy: parse flags into a frozen `SimOptions`, bind, print exactly one line
`spotinference sim listening on http://HOST:PORT` to stdout (flushed; port 0 prints the real port)
so scripts and end-to-end tests can wait for it, then serve until SIGINT/SIGTERM and exit 0.
Everything else goes to `logging` on stderr; prompts and the API key are never printed.
"""

from __future__ import annotations

import argparse
import gc
import logging
import signal
import sys

import trio

from backends.sim.responses import SimOptions
from backends.sim.server import SimServer


def _listen(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {value!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="spotinference sim",
                                description="Run a simulated vLLM OpenAI-compatible server.")
    d = SimOptions()
    p.add_argument("--listen", type=_listen, default=("127.0.0.1", 8000), metavar="HOST:PORT",
                   help="address to bind (port 0 picks a free port; default 127.0.0.1:8000)")
    p.add_argument("--model", action="append", dest="models", metavar="NAME",
                   help=f"served chat/completions model name, repeatable (default {d.models[0]})")
    p.add_argument("--embedding-model", action="append", dest="embedding_models", metavar="NAME",
                   help=f"served embedding model name, repeatable (default {d.embedding_models[0]})")
    p.add_argument("--tokens-per-s", type=float, default=d.tokens_per_s,
                   help="decode rate per stream; 0 = as fast as possible")
    p.add_argument("--ttft-ms", type=float, default=d.ttft_ms, help="delay before the first token")
    p.add_argument("--latency-ms", type=float, default=d.latency_ms,
                   help="extra service time of non-streaming answers")
    p.add_argument("--max-model-len", type=int, default=d.max_model_len)
    p.add_argument("--default-max-tokens", type=int, default=d.default_max_tokens,
                   help="answer length when a request sets no max_tokens")
    p.add_argument("--embedding-dim", type=int, default=d.embedding_dim)
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1/*")
    p.add_argument("--reply", default=None, help="fixed reply text instead of synthetic words")
    p.add_argument("--break-tool-json", action="store_true",
                   help="emit syntactically broken tool-call arguments")
    p.add_argument("--enable-auto-tool-choice", action="store_true",
                   help='accept tool_choice "auto" (vLLM refuses it without this and --tool-call-parser)')
    p.add_argument("--tool-call-parser", default=None, metavar="NAME",
                   help='tool-call parser name (needed for "required" and named tool choices)')
    p.add_argument("--reasoning-parser", default=None, metavar="NAME",
                   help="reasoning parser name (accepted; no reasoning is simulated)")
    p.add_argument("--disable-responses-store", action="store_true",
                   help="run as vLLM without VLLM_ENABLE_RESPONSES_API_STORE: store is ignored")
    p.add_argument("--prefill-tokens-per-s", type=float, default=d.prefill_tokens_per_s, metavar="F",
                   help="prefill rate of the engine (uncached prompt tokens/s, prefills one after another); "
                        "0 = prefill takes no time")
    p.add_argument("--kv-cache-tokens", type=int, default=d.kv_cache_tokens, metavar="N",
                   help="prefix-cache capacity in tokens (LRU of prompt blocks); 0 = no prefix-cache model")
    p.add_argument("--max-num-seqs", type=int, default=d.max_num_seqs, metavar="N",
                   help="generations running at once, the others wait in FIFO order; 0 = unlimited")
    p.add_argument("--block-tokens", type=int, default=d.block_tokens, metavar="N",
                   help=f"tokens per prefix-cache block (vLLM's --block-size; default {d.block_tokens})")
    p.add_argument("--log-level", default="WARNING", help="logging level on stderr")
    return p


def options_from(args: argparse.Namespace) -> SimOptions:
    """The SimOptions described by parsed command-line arguments."""
    d = SimOptions()
    return SimOptions(
        models=tuple(args.models) if args.models else d.models,
        embedding_models=tuple(args.embedding_models) if args.embedding_models else d.embedding_models,
        tokens_per_s=args.tokens_per_s, ttft_ms=args.ttft_ms, latency_ms=args.latency_ms,
        max_model_len=args.max_model_len, default_max_tokens=args.default_max_tokens,
        api_key=args.api_key, reply=args.reply, break_tool_json=args.break_tool_json,
        embedding_dim=args.embedding_dim, enable_auto_tool_choice=args.enable_auto_tool_choice,
        tool_call_parser=args.tool_call_parser, reasoning_parser=args.reasoning_parser,
        enable_responses_store=not args.disable_responses_store,
        prefill_tokens_per_s=args.prefill_tokens_per_s, kv_cache_tokens=args.kv_cache_tokens,
        max_num_seqs=args.max_num_seqs, block_tokens=args.block_tokens)


def _invalid(args: argparse.Namespace) -> str | None:
    """What is wrong with the numeric flags, or None."""
    for name, value in (("--tokens-per-s", args.tokens_per_s), ("--ttft-ms", args.ttft_ms),
                        ("--latency-ms", args.latency_ms),
                        ("--prefill-tokens-per-s", args.prefill_tokens_per_s),
                        ("--kv-cache-tokens", args.kv_cache_tokens), ("--max-num-seqs", args.max_num_seqs)):
        if not value >= 0:  # NaN too
            return f"{name} must be >= 0"
    if args.block_tokens < 1:
        return "--block-tokens must be >= 1"
    if 0 < args.kv_cache_tokens < args.block_tokens:
        return (f"--kv-cache-tokens must be 0 (off) or at least --block-tokens ({args.block_tokens}): "
                f"{args.kv_cache_tokens} tokens hold no block")
    return None


async def _run(server: SimServer, host: str, port: int) -> None:
    async with trio.open_nursery() as nursery:
        bound_host, bound_port = await nursery.start(server.serve, host, port)
        shown = f"[{bound_host}]" if ":" in bound_host else bound_host
        sys.stdout.write(f"spotinference sim listening on http://{shown}:{bound_port}\n")
        sys.stdout.flush()
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for signum in signals:
                logging.getLogger(__name__).info("signal %d: shutting down", signum)
                nursery.cancel_scope.cancel()
                break


def main(argv: list[str]) -> int:
    """Entry point of `spotinference sim`; returns the exit status."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    problem = _invalid(args)
    if problem is not None:
        sys.stderr.write(f"spotinference sim: {problem}\n")
        return 2
    if args.enable_auto_tool_choice and not args.tool_call_parser:  # vLLM's validate_parsed_serve_args
        sys.stderr.write("spotinference sim: Error: --enable-auto-tool-choice requires --tool-call-parser\n")
        return 2
    host, port = args.listen
    # A standalone simulator allocates many short-lived objects per request; like `vllm serve`
    # (freeze_gc_heap) keep start-up objects out of collections, and collect young objects less often.
    gc.freeze()
    gc.set_threshold(20_000, 20, 20)
    try:
        trio.run(_run, SimServer(options_from(args)), host, port)
    except OSError as exc:
        sys.stderr.write(f"spotinference sim: cannot listen on {host}:{port}: {exc.strerror or exc}\n")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
