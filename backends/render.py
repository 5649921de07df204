"""Render what a dual-GPU spot host of a tier runs: the `vllm serve` command, its systemd unit, the
spot-interruption agent (script + unit), and cloud-init user data that installs and enables them.

Strategy: pure string rendering from `BackendConfig` (no I/O), so every artefact is tested for exact
content. Flags follow vLLM's CLI (`vllm/engine/arg_utils.py` EngineArgs, `vllm/entrypoints/openai/
cli_args.py` FrontendArgs): `--tensor-parallel-size`, `--served-model-name` (one or more names: the
tier's models, which must appear in /v1/models for the waker to call the host ready), `--host`,
`--port`, `--max-model-len`, `--gpu-memory-utilization`, and from `tool_call_parser` /
`reasoning_parser` `--enable-auto-tool-choice --tool-call-parser NAME` (the first one only while
`auto_tool_choice` is true; vLLM refuses tool_choice "auto" without both and "required"/named
choices without a parser) and `--reasoning-parser NAME`; `extra_args` come last. The API key never appears on a command line,
in a unit or in user data (user data is readable by any process through IMDS): vLLM reads
`VLLM_API_KEY` from its environment (`args.api_key or envs.VLLM_API_KEY`), which the unit takes from
`env_file`, provisioned by the operator's secret store. When `api_key_env` names another variable, the
unit maps it with `env VLLM_API_KEY=${NAME}` and refuses to start while it is empty (an empty key would
silently turn authentication off).

The interruption agent polls IMDSv2 `spot/instance-action` (200 with {"action", "time"} about two
minutes before the stop/terminate, 404 otherwise) and then makes the host refuse NEW TCP connections to
vLLM's port (iptables REJECT with tcp-reset on SYNs): the gateway's /health probe fails, the host leaves
rotation, and requests already streaming finish or end at the interruption. The rule is not persisted,
so a restarted instance serves again. Units are started at every boot (cloud-init runs once, systemd
brings vLLM back on each start of a stopped instance).
"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass

from backends.settings import BackendConfig

UNIT_NAME = "vllm.service"
AGENT_NAME = "spotinference-spot-agent"
AGENT_PATH = f"/usr/local/sbin/{AGENT_NAME}"


@dataclass(frozen=True)
class Artefacts:
    command: str  # shell form of the vllm serve command
    unit: str  # /etc/systemd/system/vllm.service
    agent_script: str | None  # /usr/local/sbin/spotinference-spot-agent
    agent_unit: str | None  # /etc/systemd/system/spotinference-spot-agent.service
    cloud_init: str  # #cloud-config user data


def served_names(models: list[str], backend: BackendConfig) -> list[str]:
    return [backend.served_model_name] if backend.served_model_name else list(models)


def vllm_argv(models: list[str], backend: BackendConfig) -> list[str]:
    """argv of the vLLM OpenAI server for this tier (without the key: see the module comment)."""
    if not backend.model:
        raise ValueError("backend.model is empty: set the Hugging Face id or path `vllm serve` loads")
    argv = [f"{backend.install_dir}/bin/vllm", "serve", backend.model,
            "--served-model-name", *served_names(models, backend),
            "--host", backend.host,
            "--port", str(backend.port),
            "--tensor-parallel-size", str(backend.tensor_parallel_size),
            "--max-model-len", str(backend.max_model_len),
            "--gpu-memory-utilization", f"{backend.gpu_memory_utilization:g}"]
    if backend.tool_call_parser is not None:
        if backend.auto_tool_choice:
            argv.append("--enable-auto-tool-choice")
        argv += ["--tool-call-parser", backend.tool_call_parser]
    if backend.reasoning_parser is not None:
        argv += ["--reasoning-parser", backend.reasoning_parser]
    return argv + list(backend.extra_args)


def shell_command(models: list[str], backend: BackendConfig) -> str:
    """The command as one would type it; the key comes from the environment."""
    argv = " ".join(shlex.quote(a) for a in vllm_argv(models, backend))
    if backend.api_key_env and backend.api_key_env != "VLLM_API_KEY":
        return f'VLLM_API_KEY="${backend.api_key_env}" {argv}'
    return argv


def _sd(arg: str) -> str:
    """Quote one word for a systemd command line (systemd.service "Command lines"; %/$ specifiers)."""
    escaped = arg.replace("\\", "\\\\").replace('"', '\\"').replace("%", "%%").replace("$", "$$")
    return f'"{escaped}"' if (not arg or any(c.isspace() or c in "\"'\\;" for c in arg)) else escaped


def systemd_unit(tier: str, models: list[str], backend: BackendConfig) -> str:
    state = f"/var/lib/{backend.user}"
    argv = " ".join(_sd(a) for a in vllm_argv(models, backend))
    lines = [
        "[Unit]",
        f"Description=vLLM OpenAI server for spotinference tier {tier}",
        "Wants=network-online.target",
        "After=network-online.target",
        "",
        "[Service]",
        "Type=exec",
        f"User={backend.user}",
        f"Group={backend.user}",
        f"EnvironmentFile=-{backend.env_file}",
        f"Environment=HOME={state} HF_HOME={state}/huggingface XDG_CACHE_HOME={state}/cache"
        + (" VLLM_ENABLE_RESPONSES_API_STORE=1" if backend.responses_store else ""),
        f"StateDirectory={backend.user}",
    ]
    if backend.api_key_env and backend.api_key_env != "VLLM_API_KEY":
        name = backend.api_key_env
        lines.append(f"ExecStartPre=/bin/sh -c 'test -n \"$${name}\" || {{ echo \"{name} is empty\" >&2; exit 1; }}'")
        lines.append(f"ExecStart=/usr/bin/env VLLM_API_KEY=${{{name}}} {argv}")
    else:
        lines.append(f"ExecStart={argv}")
    lines += [
        "Restart=on-failure",
        "RestartSec=5",
        "# Loading weights onto two GPUs takes minutes; the wake budget accounts for it.",
        "TimeoutStartSec=1200",
        "TimeoutStopSec=60",
        "LimitNOFILE=65536",
        "NoNewPrivileges=yes",
        "ProtectSystem=full",
        "ProtectHome=yes",
        "PrivateTmp=yes",
        "",
        "[Install]",
        "WantedBy=multi-user.target",
        "",
    ]
    return "\n".join(lines)


def agent_script(backend: BackendConfig) -> str:
    port, poll = backend.port, backend.agent_poll_s
    return f"""#!/bin/bash
# spotinference spot-interruption agent: on an IMDS spot/instance-action notice, refuse NEW connections
# to vLLM (port {port}) so the gateway's /health probe fails and the host leaves rotation; connections
# already open (streams in flight) carry on until the instance goes. Not persisted across reboots.
set -u
IMDS=http://169.254.169.254
RULE=(INPUT -p tcp --dport {port} --syn -j REJECT --reject-with tcp-reset)
while true; do
  token=$(curl -sf -m 2 -X PUT "$IMDS/latest/api/token" -H "X-aws-ec2-metadata-token-ttl-seconds: 300")
  if [ -n "$token" ]; then
    notice=$(curl -sf -m 2 -H "X-aws-ec2-metadata-token: $token" "$IMDS/latest/meta-data/spot/instance-action")
    if [ -n "$notice" ] && ! iptables -C "${{RULE[@]}}" 2>/dev/null; then
      logger -t {AGENT_NAME} "spot interruption notice $notice: refusing new connections on port {port}"
      iptables -I "${{RULE[@]}}"
    fi
  fi
  sleep {poll}
done
"""


def agent_unit(tier: str) -> str:
    return "\n".join([
        "[Unit]",
        f"Description=spotinference spot-interruption agent (tier {tier})",
        "Wants=network-online.target",
        "After=network-online.target",
        "",
        "[Service]",
        "Type=simple",
        f"ExecStart={AGENT_PATH}",
        "Restart=always",
        "RestartSec=5",
        "# root only for iptables: nothing else is granted.",
        "CapabilityBoundingSet=CAP_NET_ADMIN CAP_NET_RAW",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "ReadWritePaths=/run",  # iptables takes /run/xtables.lock
        "ProtectHome=yes",
        "PrivateTmp=yes",
        "",
        "[Install]",
        "WantedBy=multi-user.target",
        "",
    ])


def _block(text: str, indent: int = 6) -> str:
    pad = " " * indent
    return "\n".join(pad + line if line else "" for line in text.rstrip("\n").split("\n"))


def cloud_init(tier: str, models: list[str], backend: BackendConfig) -> str:
    """#cloud-config: user, packages, units and agent written, vLLM installed once, units enabled."""
    pin = f"vllm=={backend.vllm_version}" if backend.vllm_version else "vllm"
    venv = backend.install_dir
    install = (f"test -x {venv}/bin/vllm || (python3 -m venv {venv} && {venv}/bin/pip install --upgrade pip "
               f"&& {venv}/bin/pip install {shlex.quote(pin)})")
    files = [(f"/etc/systemd/system/{UNIT_NAME}", "0644", systemd_unit(tier, models, backend))]
    enable = [UNIT_NAME]
    if backend.interruption_agent:
        files += [(AGENT_PATH, "0755", agent_script(backend)),
                  (f"/etc/systemd/system/{AGENT_NAME}.service", "0644", agent_unit(tier))]
        enable.append(f"{AGENT_NAME}.service")
    out = [
        "#cloud-config",
        f"# spotinference tier {tier}: vLLM on {backend.tensor_parallel_size} GPUs "
        + "(rendered by `spotinference backend render`).",
        f"# The API key is NOT here: provision {backend.env_file} from your secret store.",
        "users:",
        "  - default",
        f"  - name: {backend.user}",
        "    system: true",
        f"    homedir: /var/lib/{backend.user}",
        "    shell: /usr/sbin/nologin",
        "packages: [python3-venv, curl, iptables]",
        "write_files:",
    ]
    for path, mode, content in files:
        out += [f"  - path: {path}", f"    permissions: {json.dumps(mode)}", "    content: |", _block(content)]
    out += [
        "runcmd:",
        f"  - [sh, -c, {json.dumps(install)}]",
        "  - [systemctl, daemon-reload]",
        f"  - [systemctl, enable, --now, {', '.join(enable)}]",
        "",
    ]
    return "\n".join(out)


def render(tier: str, models: list[str], backend: BackendConfig) -> Artefacts:
    """Every artefact for one tier; ValueError when the backend cannot be rendered (no model)."""
    return Artefacts(
        command=shell_command(models, backend),
        unit=systemd_unit(tier, models, backend),
        agent_script=agent_script(backend) if backend.interruption_agent else None,
        agent_unit=agent_unit(tier) if backend.interruption_agent else None,
        cloud_init=cloud_init(tier, models, backend),
    )
