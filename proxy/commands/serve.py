"""`spotinference serve` and `spotinference check-config`.

Strategy: `serve` with no arguments is the embedded default -- a simulated vLLM tier `local`
(serving `sim-chat` and `sim-embed`) started in the same process on a free loopback port, the gateway
on 127.0.0.1:8080 in front of it, no keys. The simulated tier is paced like a real one (a first token
after 300 ms, then 30 tokens/s; `--sim-ttft-ms`, `--sim-tokens-per-s`, 0 = unpaced), so a newcomer
sees a stream arrive token by token rather than in one 2 ms burst that would look like buffering; the
sim's 16-token default answer takes under a second. A `--config` run has no sim, and refuses the
`--sim-*` flags. Without a keys file the gateway runs open, and therefore
refuses to bind anything but a loopback address. One line `spotinference listening on http://H:P`
goes to stdout once the socket is bound (scripts and harnesses wait for it); logs go to stderr.
"""

from __future__ import annotations

import argparse
import functools
import ipaddress
import signal
import socket
import sys

import trio

from proxy import errors
from proxy.admit.keys import KeysError
from proxy.config import Config, ConfigError, embedded_default, load, parse_listen, usable_cores
from proxy.observe import logs

# The embedded tier's pace: what a dual-GPU vLLM host serving a mid-size model looks like to a client.
SIM_TTFT_MS = 300.0
SIM_TOKENS_PER_S = 30.0


def _workers_arg(value: str) -> int:
    if value == "auto":
        return usable_cores()
    if not value.isdigit() or int(value) < 1:
        raise ConfigError(f'--workers must be a number >= 1 or "auto", got {value!r}')
    return int(value)


def _is_loopback(host: str) -> bool:
    try:
        infos = socket.getaddrinfo(host, None)
    except socket.gaierror:
        return False
    return all(ipaddress.ip_address(info[4][0]).is_loopback for info in infos)


def check_open_bind(config: Config) -> None:
    host, _ = parse_listen(config.server.listen)
    if not config.auth.keys_file and not _is_loopback(host):
        raise ConfigError(
            f"field 'server.listen': refusing to bind {host!r} without API keys: set [auth] keys_file "
            "(create keys with `spotinference keys add`) or listen on 127.0.0.1"
        )


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="spotinference serve", description="Run the gateway.")
    p.add_argument("--config", help="TOML config file (default: embedded simulated tier)")
    p.add_argument("--listen", help="HOST:PORT to bind (overrides [server] listen)")
    p.add_argument("--workers", help='worker processes, or "auto" (one per usable core); overrides [server] workers')
    sim = p.add_argument_group("embedded simulated tier (no --config)",
                               "paced like a real GPU tier, so a stream is seen arriving token by token")
    sim.add_argument("--sim-ttft-ms", type=float, metavar="MS",
                     help=f"time to first token (default {SIM_TTFT_MS:g}; 0: none)")
    sim.add_argument("--sim-tokens-per-s", type=float, metavar="RATE",
                     help=f"decode rate per stream (default {SIM_TOKENS_PER_S:g}; 0: unpaced)")
    return p


def _pace(ttft_ms: float, tokens_per_s: float) -> str:
    """The banner's words for the sim's pace."""
    if ttft_ms == 0 and tokens_per_s == 0:
        return "unpaced"
    rate = f"{tokens_per_s:g} tokens/s" if tokens_per_s > 0 else "the rest at once"
    return f"paced: first token after {ttft_ms:g} ms, then {rate}"


async def _serve_embedded(listen: str, ttft_ms: float = SIM_TTFT_MS,
                          tokens_per_s: float = SIM_TOKENS_PER_S, sock=None) -> None:
    from backends.sim.server import SimOptions, SimServer
    from proxy.process.services import run_gateway

    async with trio.open_nursery() as nursery:
        # Like a vLLM started with `--enable-auto-tool-choice --tool-call-parser hermes`, so tool
        # calling works out of the box (vLLM itself refuses tool_choice "auto" without them).
        options = SimOptions(models=("sim-chat",), embedding_models=("sim-embed",), ttft_ms=ttft_ms,
                             tokens_per_s=tokens_per_s, enable_auto_tool_choice=True, tool_call_parser="hermes")
        sim_host, sim_port = await nursery.start(SimServer(options).serve, "127.0.0.1", 0)
        config = embedded_default(f"http://{sim_host}:{sim_port}", listen)
        host, port = await nursery.start(functools.partial(run_gateway, config, sock=sock))
        base = f"http://{host}:{port}"
        print(f"spotinference listening on {base}", flush=True)
        print(
            f"  embedded simulated tier 'local' (models sim-chat, sim-embed) at http://{sim_host}:{sim_port},\n"
            f"  {_pace(ttft_ms, tokens_per_s)} (--sim-ttft-ms, --sim-tokens-per-s; 0 = unpaced)\n"
            f"  try: curl {base}/v1/chat/completions -H 'Content-Type: application/json' \\\n"
            f"         -d '{{\"model\": \"sim-chat\", \"messages\": [{{\"role\": \"user\", \"content\": \"Say hello.\"}}]}}'\n"
            f"  or:  OpenAI(base_url=\"{base}/v1\", api_key=\"none\")",
            flush=True,
        )
        await _wait_for_stop_signal()
        nursery.cancel_scope.cancel()


async def _wait_for_stop_signal() -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            logs.event("shutdown", signal=signal.Signals(signum).name)
            return


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.config:
            config = load(args.config)
        else:
            config = None
        if args.listen:
            parse_listen(args.listen, "--listen")
        sim_flags = (args.sim_ttft_ms, args.sim_tokens_per_s)
        if config is not None and sim_flags != (None, None):
            raise ConfigError("--sim-ttft-ms and --sim-tokens-per-s apply to the embedded default only, "
                              "not with --config")
        if config is not None:
            import msgspec

            server = config.server
            if args.listen:
                server = msgspec.structs.replace(server, listen=args.listen)
            if args.workers is not None:
                server = msgspec.structs.replace(server, workers=_workers_arg(args.workers))
            config = msgspec.structs.replace(config, server=server)
            check_open_bind(config)
            logs.configure(config.log.level, config.log.access)
        else:
            listen = args.listen or "127.0.0.1:8080"
            ttft_ms = SIM_TTFT_MS if args.sim_ttft_ms is None else args.sim_ttft_ms
            tokens_per_s = SIM_TOKENS_PER_S if args.sim_tokens_per_s is None else args.sim_tokens_per_s
            if ttft_ms < 0 or tokens_per_s < 0:
                raise ConfigError("--sim-ttft-ms and --sim-tokens-per-s must be >= 0")
            check_open_bind(embedded_default("http://127.0.0.1:1", listen))
            logs.configure()
    except (ConfigError, KeysError) as exc:
        sys.stderr.write(f"spotinference: {exc}\n")
        return 2
    address = listen if config is None else config.server.listen
    try:
        # Bound before the event loop starts: a busy port is one line, not a nursery's traceback.
        sock = _bind(address)
    except OSError as exc:
        sys.stderr.write(f"spotinference: cannot listen on {address}: {exc.strerror or exc}\n")
        return 1
    try:
        if config is None:
            trio.run(_serve_embedded, listen, ttft_ms, tokens_per_s, sock)
        elif config.server.workers > 1:
            from proxy.process.supervisor import run_supervisor

            return run_supervisor(config, args.config, sock)
        else:
            from proxy.process.serve import serve_process

            trio.run(functools.partial(serve_process, config, args.config, sock=sock))
    except BaseException as exc:  # one line for an OS error, however deep in the nurseries it was raised
        only = errors.sole_exception(exc)
        if isinstance(only, OSError):
            sys.stderr.write(f"spotinference: cannot serve: {only.strerror or only}\n")
            return 1
        if isinstance(only, (ConfigError, KeysError)):
            sys.stderr.write(f"spotinference: {only}\n")
            return 2
        raise
        sys.stderr.write(f"spotinference: {exc}\n")
        return 2
    return 0


def _bind(listen: str):
    from proxy.accept.listener import bind_socket

    host, port = parse_listen(listen)
    return bind_socket(host, port)


def check_config_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="spotinference check-config", description="Validate a config file.")
    p.add_argument("file")
    args = p.parse_args(argv)
    try:
        config = load(args.file)
        check_open_bind(config)
        if config.auth.keys_file:
            from proxy.gateway import build_runtime

            build_runtime(config)  # the keys file must exist and parse
    except (ConfigError, KeysError) as exc:
        sys.stderr.write(f"{args.file}: {exc}\n")
        return 1
    print(f"{args.file}: ok ({len(config.tiers)} tier(s), "
          f"{sum(len(t.models) for t in config.tiers)} model(s))")
    return 0
