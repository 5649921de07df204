"""`spotinference backend render --config FILE --tier NAME`: what a tier's GPU hosts run.

Strategy: load the gateway config the same way `serve` does (strict, errors name the field), pick the
tier, and print each artefact of backends.render under a heading: the `vllm serve` command, the systemd
unit, the spot-interruption agent (script and unit) and the cloud-init user data that installs all of
it. A missing tier, a tier without `[tiers.backend]` or a backend that cannot be rendered exits 1 with
a message on stderr; nothing secret is printed (the vLLM key stays in the host's env file).
"""

from __future__ import annotations

import argparse
import sys

from backends.render import AGENT_NAME, AGENT_PATH, UNIT_NAME, render
from backends.settings import BackendConfig
from proxy.config import ConfigError, load


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="spotinference backend",
                                description="Render the vLLM launch command, systemd units and cloud-init "
                                            "user data for a tier's GPU hosts.")
    sub = p.add_subparsers(dest="action", required=True)
    r = sub.add_parser("render", help="print the artefacts for one tier")
    r.add_argument("--config", required=True, help="gateway config file (TOML)")
    r.add_argument("--tier", required=True, help="tier name")
    return p


def _heading(title: str) -> str:
    return f"# ==== {title} " + "=" * max(3, 72 - len(title))


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    try:
        config = load(args.config)
    except ConfigError as exc:
        sys.stderr.write(f"spotinference backend: {args.config}: {exc}\n")
        return 1
    tier = next((t for t in config.tiers if t.name == args.tier), None)
    if tier is None:
        names = ", ".join(t.name for t in config.tiers) or "none"
        sys.stderr.write(f"spotinference backend: no tier named {args.tier!r} in {args.config} (tiers: {names})\n")
        return 1
    backend: BackendConfig | None = tier.backend
    if backend is None:
        sys.stderr.write(f"spotinference backend: tier {args.tier!r} has no [tiers.backend] table\n")
        return 1
    try:
        out = render(tier.name, tier.models, backend)
    except ValueError as exc:
        sys.stderr.write(f"spotinference backend: tier {args.tier!r}: {exc}\n")
        return 1
    parts = [_heading("vllm serve command"), out.command, "",
             _heading(f"systemd unit: /etc/systemd/system/{UNIT_NAME}"), out.unit]
    if out.agent_script is not None and out.agent_unit is not None:
        parts += [_heading(f"spot-interruption agent: {AGENT_PATH}"), out.agent_script,
                  _heading(f"systemd unit: /etc/systemd/system/{AGENT_NAME}.service"), out.agent_unit]
    parts += [_heading("cloud-init user data"), out.cloud_init]
    sys.stdout.write("\n".join(parts))
    return 0
