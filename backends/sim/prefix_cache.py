"""vLLM's automatic prefix caching, reduced to block hashes: which leading prompt blocks an engine has.

Strategy: a prompt's tokens (`prompt_tokens` segments) are cut into full blocks of `block_tokens` (a
partial last block is never cached, as in vLLM) and block i is named by a chained hash, h_i =
hash(h_{i-1}, tokens of block i), so a block can only hit when every block before it is the same
(vLLM's `hash_block_tokens`). The cache
holds at most capacity_tokens // block_tokens blocks, in two parts, as vLLM's block pool does:
- referenced blocks (`_refs`: hash -> number of running requests holding it) are never evicted;
- free cached blocks (`_free`: an LRU, least recently used first) are evicted first-in when a new
  block needs room. A request gives its blocks back in reverse order (vLLM's `free_blocks`), so a
  prefix's tail goes before its head and what survives is still a usable prefix.
A block that finds no room (every cached block referenced) is not cached, and neither is the rest of
that prompt (a chain with a hole is useless). Pure: no I/O, no clock. Python's `hash` is salted per
process; the hashes are only compared within one.
"""

from __future__ import annotations

import collections
from collections.abc import Hashable, Sequence

from backends.sim.prompt_tokens import CHARS_PER_TOKEN

BLOCK_TOKENS = 16  # vLLM's default --block-size
_ROOT = 0x5EED  # the parent of a prompt's first block (vLLM's NONE_HASH)


def block_hashes(segments: Sequence[Hashable], block_tokens: int = BLOCK_TOKENS) -> list[int]:
    """The chained hashes of the full blocks of a token sequence given as `prompt_tokens` segments: a
    `str`/`bytes` segment is a run of ceil(len/4) text tokens, anything else one token. A block is
    hashed as the slices of the runs and the other tokens it covers (equal tokens, equal slices)."""
    out: list[int] = []
    parent = _ROOT
    parts: list[Hashable] = []
    need = block_tokens  # tokens still missing from the current block
    width = CHARS_PER_TOKEN
    for seg in segments:
        if isinstance(seg, (str, bytes)):
            pos, end = 0, len(seg)
            while pos < end:
                take = min(need * width, end - pos)
                parts.append(seg[pos:pos + take])
                pos += take
                need -= -(-take // width)
                if not need:
                    parent = hash((parent, tuple(parts)))
                    out.append(parent)
                    parts, need = [], block_tokens
        else:
            parts.append(seg)
            need -= 1
            if not need:
                parent = hash((parent, tuple(parts)))
                out.append(parent)
                parts, need = [], block_tokens
    return out


class PrefixCache:
    """The cached blocks of one engine (see the module docstring)."""

    __slots__ = ("_free", "_refs", "block_tokens", "capacity_blocks", "evicted")

    def __init__(self, capacity_tokens: int, block_tokens: int = BLOCK_TOKENS) -> None:
        if block_tokens < 1 or capacity_tokens < 0:
            raise ValueError("block_tokens must be >= 1 and capacity_tokens >= 0")
        self.block_tokens = block_tokens
        self.capacity_blocks = capacity_tokens // block_tokens
        self._free: collections.OrderedDict[int, None] = collections.OrderedDict()
        self._refs: dict[int, int] = {}
        self.evicted = 0  # blocks evicted so far

    def __len__(self) -> int:
        return len(self._free) + len(self._refs)

    def __contains__(self, block: int) -> bool:
        return block in self._refs or block in self._free

    @property
    def cached_tokens(self) -> int:
        return len(self) * self.block_tokens

    @property
    def referenced_blocks(self) -> int:
        return len(self._refs)

    def usage(self) -> float:
        """Blocks held by running requests / capacity, 0..1 -- vLLM's meaning of kv_cache_usage_perc:
        cached blocks nobody holds count as free (they are evicted on demand), so an idle server reads 0
        however much it has cached."""
        return len(self._refs) / self.capacity_blocks if self.capacity_blocks else 0.0

    def hit_tokens(self, hashes: Sequence[int], num_tokens: int) -> int:
        """Tokens of the leading blocks that are cached, stopping at the first miss; at most
        num_tokens - 1, since vLLM always computes a prompt's last token (`max_cache_hit_length`)."""
        limit = max(num_tokens - 1, 0) // self.block_tokens
        hits = 0
        for h in hashes[:limit]:
            if h not in self._refs and h not in self._free:
                break
            hits += 1
        return hits * self.block_tokens

    def acquire(self, hashes: Sequence[int]) -> list[int]:
        """Insert or touch the blocks, in order, and reference them for a running request; returns the
        blocks referenced (a prefix of `hashes`: it stops where no room was left)."""
        refs, free = self._refs, self._free
        held: list[int] = []
        for h in hashes:
            n = refs.get(h)
            if n is not None:
                refs[h] = n + 1
            elif h in free:
                del free[h]
                refs[h] = 1
            else:
                if len(refs) + len(free) >= self.capacity_blocks:
                    if not free:
                        break
                    free.popitem(last=False)
                    self.evicted += 1
                refs[h] = 1
            held.append(h)
        return held

    def release(self, held: Sequence[int]) -> None:
        """A request is done with the blocks `acquire` gave it: unreferenced ones become the most
        recently used free blocks, the last block first (so the head of a prefix outlives its tail)."""
        refs, free = self._refs, self._free
        for h in reversed(held):
            n = refs[h] - 1
            if n:
                refs[h] = n
            else:
                del refs[h]
                free[h] = None

    def touch(self, hashes: Sequence[int]) -> None:
        """Insert or touch the blocks without holding them (acquire + release)."""
        self.release(self.acquire(hashes))


__all__ = ["BLOCK_TOKENS", "PrefixCache", "block_hashes"]
