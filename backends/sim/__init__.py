"""A simulated vLLM OpenAI-compatible server: the gateway's embedded default upstream, and the upstream
of every integration test and benchmark.

Strategy: `SimServer(SimOptions(...)).serve(host, port, task_status=...)` is the whole public surface;
`planning` decides what an answer contains (vLLM's validation order, deterministic token rules),
`responses` renders vLLM's exact bytes, `responses_api` (OpenAI Responses and its store), `messages`
(Anthropic Messages), `audio` (speech to text, multipart) and `pooling` (score, rerank, pooling,
classify, tokenize) plan and render the other APIs, `wire` is HTTP/1.1 on a socket (h11 parsing,
bounds), `server` owns routes, timing and counters, `cli` is the `spotinference sim` command and
`bench` measures the simulator itself. Nothing here imports `proxy`.

Prefix caching and scheduling, so prefix-aware routing is measurable without GPUs (off by default:
the timing is then exactly ttft_ms + decode): `prompt_tokens` renders a request's prompt material
(chat: system prompt, tools, messages; completions: prompt; Responses: instructions + input;
Messages: system + messages) as the simulated tokenizer's tokens, `prefix_cache` keeps an LRU of
chained hashes of their full blocks, as vLLM's automatic prefix caching does (hits stop at the first
miss; running requests' blocks are never evicted), and `scheduler` admits at most `max_num_seqs`
generations (the others wait, FIFO) and books each prompt's uncached tokens on one prefill timeline:
TTFT = wait + uncached / prefill_tokens_per_s + ttft_ms. /metrics adds vLLM's
`vllm:prefix_cache_queries_total` / `vllm:prefix_cache_hits_total` (tokens), and
`vllm:num_requests_waiting` / `vllm:kv_cache_usage_perc` follow the model. Flags of `spotinference sim`
(and `SimOptions` fields): --prefill-tokens-per-s, --kv-cache-tokens (0 = off), --max-num-seqs
(0 = unlimited), --block-tokens (16).
"""

from backends.sim.responses import VLLM_VERSION, SimOptions
from backends.sim.server import RecordedRequest, SimServer, SimStatistics

__all__ = ["VLLM_VERSION", "RecordedRequest", "SimOptions", "SimServer", "SimStatistics"]
