"""A simulated vLLM OpenAI-compatible server: the gateway's embedded default upstream, and the upstream
of every integration test and benchmark.

Strategy: `SimServer(SimOptions(...)).serve(host, port, task_status=...)` is the whole public surface;
`planning` decides what an answer contains (vLLM's validation order, deterministic token rules),
`responses` renders vLLM's exact bytes, `responses_api` (OpenAI Responses and its store), `messages`
(Anthropic Messages), `audio` (speech to text, multipart) and `pooling` (score, rerank, pooling,
classify, tokenize) plan and render the other APIs, `wire` is HTTP/1.1 on a socket (h11 parsing,
bounds), `server` owns routes, timing and counters, `cli` is the `spotinference sim` command and
`bench` measures the simulator itself. Nothing here imports `proxy`.
"""

from backends.sim.responses import VLLM_VERSION, SimOptions
from backends.sim.server import RecordedRequest, SimServer, SimStatistics

__all__ = ["VLLM_VERSION", "RecordedRequest", "SimOptions", "SimServer", "SimStatistics"]
