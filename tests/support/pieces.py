"""Byte streams cut where a test wants them (the sans-I/O readers and taps must not care where)."""

from __future__ import annotations

import itertools


def split_at(data: bytes, *cuts: int) -> list[bytes]:
    """`data` cut at the offsets `cuts` (ascending), as consecutive pieces."""
    bounds = [0, *cuts, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]
