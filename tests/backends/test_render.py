"""backends.render and `spotinference backend render`: exact artefacts, flags as vLLM's CLI spells them."""

from __future__ import annotations

import shlex
import shutil

import msgspec
import pytest
import yaml

from backends.render import render, vllm_argv
from backends.settings import BackendConfig
from proxy.commands import backend as cmd_backend
from tests.support.systemd import verify_units

BACKEND = BackendConfig(model="Qwen/Qwen3-Coder-30B-A3B-Instruct", max_model_len=32768,
                        gpu_memory_utilization=0.92, api_key_env="TIER_KEY", vllm_version="0.11.0",
                        extra_args=["--enable-prefix-caching"])


def test_vllm_command_flags() -> None:
    argv = vllm_argv(["qwen3-coder", "qwen3-coder-fast"], BACKEND)
    assert argv[:3] == ["/opt/vllm/bin/vllm", "serve", "Qwen/Qwen3-Coder-30B-A3B-Instruct"]
    flags = " ".join(argv[3:])
    assert "--served-model-name qwen3-coder qwen3-coder-fast" in flags
    assert "--tensor-parallel-size 2" in flags
    assert "--host 0.0.0.0 --port 8000" in flags
    assert "--max-model-len 32768" in flags
    assert "--gpu-memory-utilization 0.92" in flags
    assert argv[-1] == "--enable-prefix-caching"
    assert "--api-key" not in argv  # the key travels in the environment only


def test_tool_and_reasoning_parser_flags() -> None:
    tools = BackendConfig(model="org/m", tool_call_parser="hermes", reasoning_parser="qwen3",
                          extra_args=["--enable-prefix-caching"])
    assert render("t", ["m"], tools).command == (
        "/opt/vllm/bin/vllm serve org/m --served-model-name m --host 0.0.0.0 --port 8000 "
        "--tensor-parallel-size 2 --max-model-len 8192 --gpu-memory-utilization 0.9 "
        "--enable-auto-tool-choice --tool-call-parser hermes --reasoning-parser qwen3 --enable-prefix-caching")
    start = next(line for line in render("t", ["m"], tools).unit.splitlines() if line.startswith("ExecStart="))
    assert start == ("ExecStart=/opt/vllm/bin/vllm serve org/m --served-model-name m --host 0.0.0.0 --port 8000 "
                     "--tensor-parallel-size 2 --max-model-len 8192 --gpu-memory-utilization 0.9 "
                     "--enable-auto-tool-choice --tool-call-parser hermes --reasoning-parser qwen3 "
                     "--enable-prefix-caching")
    parser_only = BackendConfig(model="org/m", tool_call_parser="llama3_json", auto_tool_choice=False)
    assert vllm_argv(["m"], parser_only)[-2:] == ["--tool-call-parser", "llama3_json"]
    assert "--enable-auto-tool-choice" not in vllm_argv(["m"], parser_only)
    plain = vllm_argv(["m"], BackendConfig(model="org/m"))
    assert not {"--enable-auto-tool-choice", "--tool-call-parser", "--reasoning-parser"} & set(plain)
    assert vllm_argv(["m"], BackendConfig(model="org/m", reasoning_parser="deepseek_r1"))[-2:] == [
        "--reasoning-parser", "deepseek_r1"]


def test_shell_command_maps_the_key_variable() -> None:
    art = render("h100x2", ["qwen3-coder"], BACKEND)
    assert art.command.startswith('VLLM_API_KEY="$TIER_KEY" /opt/vllm/bin/vllm serve ')
    assert shlex.split(art.command)[1:4] == ["/opt/vllm/bin/vllm", "serve", "Qwen/Qwen3-Coder-30B-A3B-Instruct"]
    plain = render("h100x2", ["m"], BackendConfig(model="org/m", api_key_env="VLLM_API_KEY"))
    assert plain.command.startswith("/opt/vllm/bin/vllm serve org/m ")


def test_systemd_unit() -> None:
    unit = render("h100x2", ["qwen3-coder"], BACKEND).unit
    lines = unit.splitlines()
    assert "EnvironmentFile=-/etc/spotinference/vllm.env" in lines
    assert "User=vllm" in lines and "StateDirectory=vllm" in lines and "Restart=on-failure" in lines
    assert "WantedBy=multi-user.target" in lines
    start = next(line for line in lines if line.startswith("ExecStart="))
    assert start.startswith("ExecStart=/usr/bin/env VLLM_API_KEY=${TIER_KEY} /opt/vllm/bin/vllm serve ")
    pre = next(line for line in lines if line.startswith("ExecStartPre="))
    assert '"$$TIER_KEY"' in pre  # systemd turns $$ into $: the shell checks the variable is not empty
    # vLLM keeps Responses API responses (for retrieve / previous_response_id) only when told to.
    assert ("Environment=HOME=/var/lib/vllm HF_HOME=/var/lib/vllm/huggingface "
            "XDG_CACHE_HOME=/var/lib/vllm/cache VLLM_ENABLE_RESPONSES_API_STORE=1") in lines
    off = render("h100x2", ["m"], msgspec.structs.replace(BACKEND, responses_store=False)).unit.splitlines()
    assert "Environment=HOME=/var/lib/vllm HF_HOME=/var/lib/vllm/huggingface XDG_CACHE_HOME=/var/lib/vllm/cache" in off


def test_systemd_quoting_of_odd_arguments() -> None:
    odd = BackendConfig(model="/models/my model", extra_args=["--chat-template", "{% if x %}$y"])
    start = next(line for line in render("t", ["m"], odd).unit.splitlines() if line.startswith("ExecStart="))
    assert '"/models/my model"' in start
    assert "{%% if x %%}$$y" in start


def test_agent_script_and_unit() -> None:
    art = render("h100x2", ["qwen3-coder"], BACKEND)
    assert art.agent_script is not None and art.agent_unit is not None
    assert "latest/api/token" in art.agent_script
    assert "latest/meta-data/spot/instance-action" in art.agent_script
    assert "--dport 8000 --syn -j REJECT --reject-with tcp-reset" in art.agent_script
    assert "sleep 5" in art.agent_script
    assert "ExecStart=/usr/local/sbin/spotinference-spot-agent" in art.agent_unit
    none = render("t", ["m"], BackendConfig(model="m", interruption_agent=False))
    assert none.agent_script is None and "spot-agent" not in none.cloud_init


def test_cloud_init_is_valid_yaml_carrying_the_units() -> None:
    art = render("h100x2", ["qwen3-coder"], BACKEND)
    assert art.cloud_init.startswith("#cloud-config\n")
    doc = yaml.safe_load(art.cloud_init)
    files = {f["path"]: f for f in doc["write_files"]}
    assert files["/etc/systemd/system/vllm.service"]["content"] == art.unit
    assert files["/usr/local/sbin/spotinference-spot-agent"]["content"] == art.agent_script
    assert files["/usr/local/sbin/spotinference-spot-agent"]["permissions"] == "0755"
    assert files["/etc/systemd/system/spotinference-spot-agent.service"]["content"] == art.agent_unit
    install = doc["runcmd"][0]
    assert install[:2] == ["sh", "-c"] and "pip install vllm==0.11.0" in install[2]
    assert doc["runcmd"][-1] == ["systemctl", "enable", "--now", "vllm.service",
                                 "spotinference-spot-agent.service"]
    assert {"name": "vllm", "system": True, "homedir": "/var/lib/vllm", "shell": "/usr/sbin/nologin"} in doc["users"]
    assert "TIER_KEY=" not in art.cloud_init and "VLLM_API_KEY=" not in art.cloud_init.replace(
        "VLLM_API_KEY=${TIER_KEY}", "")


@pytest.mark.parametrize("field, value", [("tensor_parallel_size", 0), ("port", 70000),
                                          ("gpu_memory_utilization", 1.5), ("api_key_env", "A-B"),
                                          ("max_model_len", 0), ("tool_call_parser", "hermes --x"),
                                          ("reasoning_parser", "")])
def test_backend_settings_ranges(field: str, value: object) -> None:
    with pytest.raises(msgspec.ValidationError, match=field):
        msgspec.convert({"model": "m", field: value}, BackendConfig)


def test_empty_model_is_an_error() -> None:
    with pytest.raises(ValueError, match="backend.model"):
        render("t", ["m"], BackendConfig())


CONFIG = """
[[tiers]]
name = "h100x2"
upstreams = ["http://10.0.1.5:8000"]
models = ["qwen3-coder"]
[tiers.backend]
model = "Qwen/Qwen3-Coder-30B-A3B-Instruct"
api_key_env = "TIER_KEY"

[[tiers]]
name = "bare"
upstreams = ["http://10.0.1.6:8000"]
models = ["other"]
"""


def test_cli_render_prints_headed_artefacts(tmp_path, capsys) -> None:
    path = tmp_path / "gateway.toml"
    path.write_text(CONFIG)
    assert cmd_backend.main(["render", "--config", str(path), "--tier", "h100x2"]) == 0
    out = capsys.readouterr().out
    headings = [line for line in out.splitlines() if line.startswith("# ==== ")]
    assert [h.split(" ")[2] for h in headings] == ["vllm", "systemd", "spot-interruption", "systemd", "cloud-init"]
    assert "--served-model-name qwen3-coder" in out and "#cloud-config" in out


def test_tool_parser_from_the_gateway_toml(tmp_path, capsys) -> None:
    path = tmp_path / "gateway.toml"
    path.write_text(CONFIG.replace('api_key_env = "TIER_KEY"',
                                   'api_key_env = "TIER_KEY"\ntool_call_parser = "hermes"'))
    assert cmd_backend.main(["render", "--config", str(path), "--tier", "h100x2"]) == 0
    assert "--enable-auto-tool-choice --tool-call-parser hermes" in capsys.readouterr().out


@pytest.mark.parametrize("text, tier, message", [
    (CONFIG, "nope", "no tier named 'nope'"),
    (CONFIG, "bare", "has no [tiers.backend] table"),
    (CONFIG.replace('model = "Qwen', 'modle = "Qwen'), "h100x2", "unknown field 'tiers[0].backend.modle'"),
    (CONFIG.replace('model = "Qwen/Qwen3-Coder-30B-A3B-Instruct"', 'model = ""'), "h100x2", "backend.model"),
])
def test_cli_render_errors(tmp_path, capsys, text: str, tier: str, message: str) -> None:
    path = tmp_path / "gateway.toml"
    path.write_text(text)
    assert cmd_backend.main(["render", "--config", str(path), "--tier", tier]) == 1
    captured = capsys.readouterr()
    assert message in captured.err and captured.out == ""


def test_cli_render_missing_file(tmp_path, capsys) -> None:
    assert cmd_backend.main(["render", "--config", str(tmp_path / "absent.toml"), "--tier", "x"]) == 1
    assert "cannot read" in capsys.readouterr().err


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_systemd_analyze_accepts_the_rendered_units(tmp_path) -> None:
    art = render("h100x2", ["qwen3-coder"], BACKEND)
    vllm, agent = tmp_path / "vllm.service", tmp_path / "spotinference-spot-agent.service"
    vllm.write_text(art.unit)
    agent.write_text(art.agent_unit or "")
    assert verify_units([vllm, agent]) == []
