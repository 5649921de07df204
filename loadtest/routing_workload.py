"""The agent workload of `spotinference bench routing`: seeded multi-turn conversations, pure data.

Strategy: one `random.Random(seed)` draws everything, in a fixed order, so the same spec gives the same
conversations byte for byte on every machine and for every router compared (nothing here reads the
clock, the network or the environment). The shape is what a fleet of coding / support agents sends:
- conversations come in `groups` that share one long system prompt and one tool list (the same agent
  deployed many times), followed by per-conversation specifics (the user's project, ticket, ...), so a
  system prompt is worth 1,500-3,000 tokens and most of it is common to a group;
- each conversation has `turns` turns; turn k sends the whole history: the system message, every
  earlier user message and the assistant's actual answer to it (the caller supplies those), then a new
  user message -- a short instruction, or, on `tool_output_frac` of the turns, a tool result (file
  contents, a log) of a few hundred tokens, the way an agent loop feeds its tools' output back;
- `long_frac` of the turns ask for a long generation (`long_max_tokens`), the rest 32-128 tokens;
- between turns a conversation "thinks" for `think_s` (drawn per turn).
Tools are sent as JSON schemas with `tool_choice: "none"`: they weigh on the prompt as in a real agent,
and the answer is text (a simulated vLLM would otherwise answer every turn with a tool call); with
`tools_mode="inline"` the same JSON is part of the system prompt instead (same prefix, no `tools` field).
Sizes are in the simulated tokenizer's tokens (about 4 characters: backends/sim's rule); the texts are
words of a fixed vocabulary, never a real model's output, and never sent anywhere by this module.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, field
from typing import Any

CHARS_PER_TOKEN = 4  # the simulated tokenizer: ceil(chars / 4)

_VOCAB_TEXT = (
    "agent repository function module request response latency cache prefix token stream tier host "
    "gateway upstream config deploy schema field value error retry timeout budget metric trace span "
    "ticket customer invoice order refund account policy clause contract review patch commit branch test "
    "build release rollback incident alert query index table column migration backup restore region "
    "cluster node pod container image volume secret certificate domain route handler worker queue job "
    "the a an of to in for on with by from and or but not when then if else must should may always "
    "never each every only before after during between under over keep check read write call return"
)
_VOCAB = tuple(_VOCAB_TEXT.split())
_VERBS = ("read", "write", "list", "search", "run", "open", "update", "delete", "fetch", "create", "explain")
_NOUNS = ("file", "ticket", "order", "log", "test", "branch", "table", "invoice", "metric", "page", "issue")
_TYPES = ("string", "integer", "boolean", "number")


@dataclass(frozen=True)
class WorkloadSpec:
    """What to generate. Token figures are ranges (inclusive) drawn per item."""

    conversations: int = 128
    turns: int = 10
    groups: int = 4  # conversations i and j share a system prompt and tools when i % groups == j % groups
    system_tokens: tuple[int, int] = (1200, 2400)  # the group's shared part of the system prompt
    specific_tokens: tuple[int, int] = (300, 600)  # the conversation's own part, after it
    tools: tuple[int, int] = (4, 8)  # tools per group
    user_tokens: tuple[int, int] = (20, 80)  # an instruction
    tool_output_frac: float = 0.4  # share of turns (after the first) whose user message is a tool result
    tool_output_tokens: tuple[int, int] = (150, 600)
    short_max_tokens: tuple[int, int] = (32, 128)
    long_frac: float = 0.1
    long_max_tokens: int = 512
    think_s: tuple[float, float] = (0.05, 0.3)
    seed: int = 1
    # "schema": tools sent as the request's `tools` (JSON schemas, tool_choice "none"); "inline": the same
    # JSON written into the system prompt after the group's text, no `tools` field (for routers that treat
    # a request with tools differently: vllm-router asks the worker to render such a prompt first).
    tools_mode: str = "schema"

    @classmethod
    def quick(cls, seed: int = 1) -> WorkloadSpec:
        """Seconds, for CI: a few conversations of tiny prompts."""
        return cls(conversations=6, turns=3, groups=2, system_tokens=(60, 120), specific_tokens=(20, 40),
                   tools=(1, 2), user_tokens=(5, 15), tool_output_tokens=(20, 60), short_max_tokens=(4, 8),
                   long_max_tokens=16, think_s=(0.0, 0.02), seed=seed)

    def describe(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Turn:
    user: str  # the new user message
    max_tokens: int
    think_s: float  # pause before this turn is sent (after the previous one ended)


@dataclass(frozen=True)
class Conversation:
    index: int
    group: int
    system: str  # the group's shared prompt followed by this conversation's specifics
    tools: list[dict[str, Any]] = field(default_factory=list)
    turns: list[Turn] = field(default_factory=list)


def _text(rng: random.Random, tokens: int) -> str:
    """About `tokens` simulated tokens of words (4 characters a token)."""
    want = max(1, tokens) * CHARS_PER_TOKEN
    words: list[str] = []
    size = 0
    while size < want:
        w = rng.choice(_VOCAB)
        words.append(w)
        size += len(w) + 1
    text = " ".join(words)[:want]
    return text.rstrip() + "."


def _between(rng: random.Random, lo_hi: tuple[int, int]) -> int:
    return rng.randint(lo_hi[0], lo_hi[1])


def _tool(rng: random.Random, taken: set[str]) -> dict[str, Any]:
    while True:
        name = f"{rng.choice(_VERBS)}_{rng.choice(_NOUNS)}"
        if name not in taken or len(taken) >= len(_VERBS) * len(_NOUNS):
            break
    taken.add(name)
    props = {}
    for _ in range(rng.randint(2, 5)):
        key = rng.choice(_NOUNS) + "_" + rng.choice(("id", "name", "path", "limit", "query", "mode"))
        props[key] = {"type": rng.choice(_TYPES), "description": _text(rng, rng.randint(8, 24))}
    return {"type": "function", "function": {
        "name": name, "description": _text(rng, rng.randint(20, 60)),
        "parameters": {"type": "object", "properties": props, "required": sorted(props)[:1]}}}


def build(spec: WorkloadSpec) -> list[Conversation]:
    """The conversations of `spec` (pure: the same spec gives the same list)."""
    if spec.conversations < 1 or spec.turns < 1 or spec.groups < 1:
        raise ValueError("conversations, turns and groups must be at least 1")
    if spec.tools_mode not in ("schema", "inline"):
        raise ValueError(f"tools_mode must be 'schema' or 'inline', got {spec.tools_mode!r}")
    rng = random.Random(spec.seed)
    shared = []
    for g in range(spec.groups):
        head = f"You are agent #{g} of the fleet. Follow the rules below exactly.\n"
        taken: set[str] = set()
        tools = [_tool(rng, taken) for _ in range(_between(rng, spec.tools))]
        shared.append((head + _text(rng, _between(rng, spec.system_tokens)), tools))
    convs = []
    for i in range(spec.conversations):
        group = i % spec.groups
        system, group_tools = shared[group]
        tools = group_tools
        if spec.tools_mode == "inline":
            system, tools = system + "\n\nTools (JSON schemas):\n" + json.dumps(group_tools), []
        specifics = (f"\n\nSession {i}: the user's context follows.\n"
                     + _text(rng, _between(rng, spec.specific_tokens)))
        turns = []
        for k in range(spec.turns):
            if k > 0 and rng.random() < spec.tool_output_frac:
                tool = rng.choice(group_tools)["function"]["name"] if group_tools else "tool"
                user = f"[{tool} output, turn {k}]\n" + _text(rng, _between(rng, spec.tool_output_tokens))
            else:
                user = f"Conversation {i}, turn {k}: " + _text(rng, _between(rng, spec.user_tokens))
            long = rng.random() < spec.long_frac
            max_tokens = spec.long_max_tokens if long else _between(rng, spec.short_max_tokens)
            think = 0.0 if k == 0 else rng.uniform(*spec.think_s)
            turns.append(Turn(user=user, max_tokens=max_tokens, think_s=round(think, 4)))
        convs.append(Conversation(index=i, group=group, system=system + specifics, tools=tools, turns=turns))
    return convs


def messages(conv: Conversation, k: int, answers: list[str]) -> list[dict[str, str]]:
    """The chat messages of turn k: system, then (user, assistant answer) per earlier turn, then user k."""
    if len(answers) < k:
        raise ValueError(f"turn {k} needs the {k} earlier answers, got {len(answers)}")
    out = [{"role": "system", "content": conv.system}]
    for j in range(k):
        out.append({"role": "user", "content": conv.turns[j].user})
        out.append({"role": "assistant", "content": answers[j]})
    out.append({"role": "user", "content": conv.turns[k].user})
    return out


def request_body(conv: Conversation, k: int, answers: list[str], model: str) -> dict[str, Any]:
    """The streamed chat-completions body of turn k (usage in the last chunk)."""
    body: dict[str, Any] = {
        "model": model, "messages": messages(conv, k, answers), "max_tokens": conv.turns[k].max_tokens,
        "temperature": 0, "stream": True, "stream_options": {"include_usage": True},
        "ignore_eos": True,  # vLLM extra: generate exactly max_tokens
    }
    if conv.tools:
        body["tools"] = conv.tools
        body["tool_choice"] = "none"
    return body


def summary(spec: WorkloadSpec, convs: list[Conversation]) -> dict[str, Any]:
    """Sizes a reader can check (in simulated tokens, history excluded): for the report's metadata."""
    def tok(s: str) -> int:
        return (len(s) + CHARS_PER_TOKEN - 1) // CHARS_PER_TOKEN

    turns = [t for c in convs for t in c.turns]
    systems = [tok(c.system) for c in convs]
    tools = [tok(json.dumps(c.tools)) for c in convs]
    return {
        "conversations": len(convs), "requests": len(turns),
        "system_tokens": {"min": min(systems), "max": max(systems),
                          "mean": round(sum(systems) / len(systems))},
        "tools_tokens": {"min": min(tools), "max": max(tools)},
        "user_tokens_total": sum(tok(t.user) for t in turns),
        "max_tokens_total": sum(t.max_tokens for t in turns),
        "long_turns": sum(1 for t in turns if t.max_tokens == spec.long_max_tokens),
    }
