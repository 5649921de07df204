"""A request's leading prompt blocks, as chained hashes: what prefix routing (policy.py) matches on.

Strategy: vLLM's prefix cache holds the rendered prompt's leading token blocks, and a block is only
reused when everything before it matches. The gateway does not render prompts, but the prompt is made
of the body's prompt material in order -- the tools, the system prompt, the messages -- so block i here
is everything up to the i-th piece of that material, hashed as a chain: h_i = H(h_{i-1} || piece_i).
Two requests share block i exactly when their first i pieces are byte-identical JSON, which for one
client and one conversation they are (the SDKs serialize the history the same way every turn); the
next turn of a conversation extends its previous turn's chain, and conversations that share a system
prompt and tools share their first block.
- chat (`messages`, `tools`), Anthropic Messages (`system`, `tools`, `messages`), the Responses API
  (`instructions`, `tools`, `input` items), completions (`prompt`, cut in 2 KiB pieces).
- Only the first `MAX_PIECES` pieces are hashed: the home of a conversation is decided by its first
  turns, so a hundred-turn history costs no more than an eight-turn one. The pieces are the body's own
  bytes (msgspec.Raw: sliced, not parsed into Python objects); BLAKE2b with an 8-byte digest, stable
  across processes.
- The model name is folded into the first block (two models of a tier never share a cache entry).
Anything else (embeddings, pooling, audio) has no blocks: the policy then goes by load alone.
"""

from __future__ import annotations

import hashlib

import msgspec

MAX_PIECES = 8
PROMPT_PIECE = 2048  # bytes of a completions prompt per piece


class _Material(msgspec.Struct):
    model: msgspec.Raw = msgspec.Raw(b"")
    tools: msgspec.Raw = msgspec.Raw(b"")
    system: msgspec.Raw = msgspec.Raw(b"")
    instructions: msgspec.Raw = msgspec.Raw(b"")
    messages: list[msgspec.Raw] | None = None
    input: msgspec.Raw = msgspec.Raw(b"")
    prompt: msgspec.Raw = msgspec.Raw(b"")


_decode = msgspec.json.Decoder(_Material).decode
_decode_items = msgspec.json.Decoder(list[msgspec.Raw]).decode


def _pieces(m: _Material) -> list[bytes]:
    if m.messages is not None:
        return [bytes(x) for x in m.messages[:MAX_PIECES]]
    if m.input:
        raw = bytes(m.input)
        if raw[:1] == b"[":
            try:
                return [bytes(x) for x in _decode_items(raw)[:MAX_PIECES]]
            except msgspec.DecodeError:
                return []
        return [raw[i:i + PROMPT_PIECE] for i in range(0, min(len(raw), PROMPT_PIECE * MAX_PIECES), PROMPT_PIECE)]
    if m.prompt:
        raw = bytes(m.prompt)
        return [raw[i:i + PROMPT_PIECE] for i in range(0, min(len(raw), PROMPT_PIECE * MAX_PIECES), PROMPT_PIECE)]
    return []


def prefix_blocks(body: bytes) -> tuple[int, ...]:
    """The chained block hashes of `body`'s prompt material (empty when it has none or does not decode;
    the view was validated before, so that is an API without a prompt)."""
    try:
        m = _decode(body)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return ()
    pieces = _pieces(m)
    if not pieces:
        return ()
    out = []
    h = hashlib.blake2b(bytes(m.model) + b"\x00" + bytes(m.tools) + b"\x00" + bytes(m.system) + b"\x00"
                        + bytes(m.instructions), digest_size=8).digest()
    for piece in pieces:
        h = hashlib.blake2b(h + piece, digest_size=8).digest()
        out.append(int.from_bytes(h, "little"))
    return tuple(out)
