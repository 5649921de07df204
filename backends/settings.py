"""How the GPU hosts of a tier run vLLM (`[tiers.backend]` in the gateway's TOML).

Strategy: backends owns the shape of its own settings so that it never imports `proxy`; the gateway's
config embeds this Struct. Strict: unknown fields are errors; every field has a default. Range checks
live in `__post_init__` (msgspec reports them with the table's TOML path). Flag names rendered from
these fields follow vLLM's CLI (`vllm/engine/arg_utils.py`, `vllm/entrypoints/openai/cli_args.py`);
see backends/render.py.
"""

from __future__ import annotations

import re

import msgspec

_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_PARSER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*\Z")  # vLLM's parser names: hermes, llama3_json, qwen3


class BackendConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """How the GPU hosts of a tier run vLLM (rendered by `spotinference backend render`)."""

    model: str = ""  # Hugging Face id or local path: `vllm serve MODEL`
    # Names clients use (`--served-model-name`); None = the tier's `models`.
    served_model_name: str | None = None
    tensor_parallel_size: int = 2
    port: int = 8000
    max_model_len: int = 8192
    gpu_memory_utilization: float = 0.90
    # Name of an environment variable on the GPU host (from `env_file`) holding vLLM's API key; it is
    # handed to vLLM as VLLM_API_KEY, never written on a command line or into user data.
    api_key_env: str | None = None
    # Tool calling: `--tool-call-parser NAME` (vLLM refuses "required"/named tool choices without one)
    # and, while `auto_tool_choice` stays true, `--enable-auto-tool-choice` with it (vLLM refuses
    # tool_choice "auto" -- the default of any request with tools -- without both). None: neither flag.
    tool_call_parser: str | None = None
    auto_tool_choice: bool = True
    reasoning_parser: str | None = None  # `--reasoning-parser NAME`
    # The Responses API's store (`store: true`, GET /v1/responses/{id}, previous_response_id): vLLM keeps
    # responses only with VLLM_ENABLE_RESPONSES_API_STORE=1 in its environment (the gateway routes a
    # retrieve to the host that made it). Off: vLLM's own default, nothing kept.
    responses_store: bool = True
    extra_args: list[str] = msgspec.field(default_factory=list)
    host: str = "0.0.0.0"
    vllm_version: str | None = None  # pip pin for the cloud-init install; None = latest
    install_dir: str = "/opt/vllm"
    user: str = "vllm"
    env_file: str = "/etc/spotinference/vllm.env"
    # The host-side spot-interruption agent (IMDS spot/instance-action -> refuse new connections).
    interruption_agent: bool = True
    agent_poll_s: int = 5  # AWS recommends checking for the notice every 5 seconds

    def __post_init__(self) -> None:
        if self.tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be >= 1, got {self.tensor_parallel_size}")
        if not 0 < self.port < 65536:
            raise ValueError(f"port out of range: {self.port}")
        if self.max_model_len < 1:
            raise ValueError(f"max_model_len must be >= 1, got {self.max_model_len}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be within (0, 1], got {self.gpu_memory_utilization}")
        if self.api_key_env is not None and not _ENV_NAME.match(self.api_key_env):
            raise ValueError(f"api_key_env must be an environment variable name, got {self.api_key_env!r}")
        for field, name in (("tool_call_parser", self.tool_call_parser), ("reasoning_parser", self.reasoning_parser)):
            if name is not None and not _PARSER_NAME.match(name):
                raise ValueError(f"{field} must be a parser name such as 'hermes', got {name!r}")
        if not _ENV_NAME.match(self.user):
            raise ValueError(f"user must be a plain account name, got {self.user!r}")
        if self.agent_poll_s < 1:
            raise ValueError(f"agent_poll_s must be >= 1, got {self.agent_poll_s}")
