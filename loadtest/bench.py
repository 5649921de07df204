"""`spotinference bench SUB ...`: one entry for the load-test harnesses.

Strategy: a dispatch table from subcommand to the module that owns it, imported lazily so one harness's
dependencies (rich, locust, ...) never load for another. Every harness exposes `main(argv) -> int`.
Harnesses live in loadtest/ and drive the gateway only as a user would: processes and HTTP.
"""

from __future__ import annotations

import importlib
import sys

_SUBCOMMANDS = {
    "overhead": ("loadtest.overhead", "added latency vs direct and nginx, CPU per request, scale checks"),
    "throughput": ("loadtest.throughput", "decode tokens/s, TTFT and ITL of a fleet under canned streaming traffic"),
    "routing": ("loadtest.routing", "routing policies (and vllm-router) on a multi-turn agent workload"),
}


def _usage() -> str:
    lines = ["usage: spotinference bench SUBCOMMAND [ARGS]", "", "subcommands:"]
    lines += [f"  {name:<11} {help_}" for name, (_, help_) in _SUBCOMMANDS.items()]
    lines += ["", "Run `spotinference bench SUBCOMMAND --help` for its options."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Dispatch to the harness named by argv[0]; 2 on a usage error."""
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help", "help"):
        sys.stdout.write(_usage())
        return 0 if args else 2
    entry = _SUBCOMMANDS.get(args[0])
    if entry is None:
        sys.stderr.write(f"spotinference bench: unknown subcommand {args[0]!r}\n\n{_usage()}")
        return 2
    module = importlib.import_module(entry[0])
    return int(module.main(args[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
