"""The `spotinference` command: one entry point, subcommands dispatched by name.

Strategy: every subcommand lives in the module that owns it and exposes `main(argv) -> int`
(check-config: `check_config_main`), imported lazily so that
`spotinference serve` never pays for boto3, rich or the openai SDK at start-up.
The base install is what a gateway host needs; the tools and the demo need extras (pyproject.toml).
A command whose extra is missing says so in one line naming the install command, exit status 2;
any other missing module is a bug and raises.
"""

from __future__ import annotations

import importlib
import sys

# subcommand -> module with `main(argv: list[str]) -> int`
_DELEGATED = {
    "serve": "proxy.commands.serve",
    "keys": "proxy.commands.keys",
    "check-config": "proxy.commands.serve",
    "sim": "backends.sim.cli",
    "backend": "proxy.commands.backend",
    "demo": "proxy.commands.demo",
    "usage": "proxy.commands.usage",
    "parity": "loadtest.parity",
    "bench": "loadtest.bench",
    "_worker": "proxy.process.worker",  # internal: one worker process under `serve --workers N`
}

# top-level module of an optional dependency -> the extra that installs it
_EXTRAS = {"moto": "demo", "werkzeug": "demo", "flask": "demo", "flask_cors": "demo",
           "openai": "tools", "pydantic": "tools", "jsonschema": "tools",
           "locust": "loadtest", "gevent": "loadtest", "psycopg": "cluster"}

_HELP = """usage: spotinference COMMAND [ARGS]

commands:
  serve         run the gateway (no arguments: embedded simulated tier on 127.0.0.1:8080)
  check-config  validate a config file; exit non-zero naming the bad field
  keys          add / list / revoke API keys in a keys file or the keys database
  sim           run a simulated vLLM OpenAI server
  backend       render vLLM launch command, systemd unit and cloud-init for a tier
  demo          wake a sleeping simulated tier end to end on this machine
  usage         report the usage log
  parity        golden-set parity between two OpenAI-compatible endpoints
  bench         load-test harnesses (throughput, overhead)

Run `spotinference COMMAND --help` for a command's options.
"""


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help", "help"):
        sys.stdout.write(_HELP)
        return 0 if args else 2
    name, rest = args[0], args[1:]
    target = _DELEGATED.get(name)
    if target is None:
        sys.stderr.write(f"spotinference: unknown command {name!r}\n\n{_HELP}")
        return 2
    try:
        module = importlib.import_module(target)
        if name == "check-config":
            return module.check_config_main(rest)
        return int(module.main(rest) or 0)
    except ModuleNotFoundError as exc:
        extra = _EXTRAS.get((exc.name or "").partition(".")[0])
        if extra is None:
            raise
        sys.stderr.write(f"spotinference {name} needs the '{extra}' extra ({exc.name} is not installed): "
                         f"pip install 'spotinference[{extra}]'  (in a checkout: pip install -e '.[{extra}]')\n")
        return 2


if __name__ == "__main__":
    sys.exit(main())
