"""How the GPU hosts of a tier run vLLM (`[tiers.backend]` in the gateway's TOML).

Strategy: backends owns the shape of its own settings so that it never imports `proxy`; the gateway's
config embeds this Struct. Strict: unknown fields are errors; every field has a default.
"""

from __future__ import annotations

import msgspec


class BackendConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """How the GPU hosts of a tier run vLLM (rendered by `spotinference backend render`)."""

    model: str = ""
    served_model_name: str | None = None
    tensor_parallel_size: int = 2
    port: int = 8000
    max_model_len: int = 8192
    gpu_memory_utilization: float = 0.90
    api_key_env: str | None = None
    extra_args: list[str] = msgspec.field(default_factory=list)
