"""The simulated tokenizer's token sequence of a prompt, for the prefix-cache model (`prefix_cache`).

Strategy: render the prompt material a chat template would render, in its order, into tokens that
compare equal across requests exactly when the material does -- and exactly as many tokens as the
documented prompt rule counts (`planning`), so `usage.prompt_tokens` and the cache agree:
- chat: 3 header tokens, then the leading system/developer messages, then the tools (their JSON as
  sent, in 4-byte pieces: ceil(bytes/4) tokens), then the other messages in order. A message is 4
  marker tokens (start, role, separator ... end) around the 4-character pieces of its text content
  followed by the names and arguments of its tool calls (ceil(chars/4) tokens). Tools sit after the
  system prompt, as in the Hermes/Qwen templates, so a conversation's next turn extends its
  previous prompt and conversations that share a system prompt and tools share their leading tokens.
- completions: per prompt, the 4-character pieces of its text (at least one token), or its token ids.
A sequence is kept as segments, not one object per token (a long history costs a few slices, not
thousands of strings): a `str` or `bytes` segment is a run of text tokens (ceil(len/4), cut from its
start), a tuple is one marker token, an int one token id. Two text runs are never adjacent (markers
separate them), so equal token sequences have equal segments and `prefix_cache.block_hashes` can
hash blocks from slices of the runs. Pure: no I/O; the planner validated the inputs (text fields
are strings or absent).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

Segment = str | bytes | tuple[str, ...] | int
CHARS_PER_TOKEN = 4
_HEAD: tuple[Segment, ...] = (("begin_of_text",), ("sim",), ("sim",))
_START, _SEP, _END = ("im_start",), ("im_sep",), ("im_end",)
_SYSTEM = ("system", "developer")


def length(segments: Sequence[Segment]) -> int:
    """How many tokens the segments are."""
    return sum(-(-len(s) // CHARS_PER_TOKEN) if isinstance(s, (str, bytes)) else 1 for s in segments)


def flatten(segments: Sequence[Segment]) -> list[Segment]:
    """The tokens one by one (text runs cut in pieces): for tests and debugging."""
    out: list[Segment] = []
    for s in segments:
        if isinstance(s, (str, bytes)):
            out += [s[i:i + CHARS_PER_TOKEN] for i in range(0, len(s), CHARS_PER_TOKEN)]
        else:
            out.append(s)
    return out


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text") or "" for p in content if isinstance(p, dict))
    return ""


def _message(message: dict[str, Any], out: list[Segment]) -> None:
    """One chat message: 4 markers around its text and tool calls (4 + ceil(chars/4) tokens)."""
    text = _text(message.get("content"))
    for call in message.get("tool_calls") or ():
        fn = (call.get("function") or {}) if isinstance(call, dict) else {}
        text += (fn.get("name") or "") + (fn.get("arguments") or "")
    out += (_START, ("role", str(message.get("role"))), _SEP)
    if text:
        out.append(text)
    out.append(_END)


def chat(messages: Sequence[dict[str, Any]], tools_json: bytes = b"") -> list[list[Segment]]:
    """The one engine prompt of a chat request (`tools_json`: the tools array as sent, b"" for none)."""
    lead = 0
    while lead < len(messages) and messages[lead].get("role") in _SYSTEM:
        lead += 1
    out: list[Segment] = list(_HEAD)
    for m in messages[:lead]:
        _message(m, out)
    if tools_json:
        out.append(bytes(tools_json))
    for m in messages[lead:]:
        _message(m, out)
    return [out]


def completion(prompt: Any) -> list[list[Segment]]:
    """The engine prompts of a completions request: one per text prompt or token-id list."""
    if prompt is None or prompt == "" or prompt == []:
        return []
    if isinstance(prompt, str):
        return [[prompt]]
    if isinstance(prompt[0], str):
        return [[p] if p else [("empty",)] for p in prompt]  # an empty text prompt is still one token
    if isinstance(prompt[0], int):
        return [list(prompt)]
    return [list(ids) for ids in prompt if ids]


__all__ = ["CHARS_PER_TOKEN", "Segment", "chat", "completion", "flatten", "length"]
