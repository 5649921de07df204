"""The engine's scheduler, as far as timing goes: admission (`max_num_seqs`, FIFO), the prefix cache
(`prefix_cache`) and the prefill timeline of one simulated vLLM server.

Strategy: the server asks for a `Ticket` when a generation's request is planned. With a free slot
(fewer than `max_num_seqs` running, nobody queued; 0 = unlimited) it is admitted at once, otherwise
it waits in FIFO order -- "waiting" is exactly vLLM's waiting queue, and its time counts in the
request's TTFT -- until a running one finishes and hands its slot to the queue's head (the server
parks the waiting task in `ticket.scope`, which the hand-over cancels). On admission `start` looks up
the prompt's leading blocks (hits stop at the first miss), then inserts/references all its full
blocks, which stay referenced -- never evicted -- until `finish` (vLLM keeps a running request's
blocks referenced), and books its prefill on the engine's prefill timeline: the uncached tokens take
uncached / prefill_tokens_per_s seconds, and prefills run one after another in admission order (the
engine has one prefill rate in total, shared by all requests: n concurrent cold prompts finish at
1x, 2x ... nx one prompt's time, as a compute-bound GPU with chunked prefill does on average). A
request aborted before its prefill ended gives back its not yet used share when it is the last one
booked. Decode and output tokens do not take cache room (only prompt blocks are cached). Pure apart
from `trio.CancelScope`: the caller passes the clock.
"""

from __future__ import annotations

import collections
from typing import NamedTuple

import trio

from backends.sim.prefix_cache import PrefixCache, block_hashes
from backends.sim.prompt_tokens import Segment, length


class Ticket:
    """One engine request's place: admitted or waiting; its referenced blocks and prefill booking."""

    __slots__ = ("admitted", "done", "held", "prefill", "scope", "started")

    def __init__(self) -> None:
        self.admitted = False  # holds a slot
        self.started = False  # `start` ran: it is running on the engine
        self.done = False
        self.scope: trio.CancelScope | None = None  # where it waits; cancelled when it is admitted
        self.held: list[int] = []  # blocks referenced while it runs
        self.prefill = (0.0, 0.0)  # (start, end) on the prefill timeline


class Start(NamedTuple):
    """What admission decided: when prefill ends, and the prompt tokens queried / found cached."""

    prefill_end: float
    queried: int
    hits: int


class Scheduler:
    """Admission and prefill of one engine (see the module docstring)."""

    def __init__(self, max_num_seqs: int = 0, prefill_tokens_per_s: float = 0.0, kv_cache_tokens: int = 0,
                 block_tokens: int = 16) -> None:
        self.max_num_seqs = max_num_seqs
        self.prefill_tokens_per_s = prefill_tokens_per_s
        self.cache = PrefixCache(kv_cache_tokens, block_tokens) if kv_cache_tokens > 0 else None
        self.running = 0
        self._queue: collections.deque[Ticket] = collections.deque()
        self._prefill_free_at = float("-inf")

    @property
    def waiting(self) -> int:
        return len(self._queue)

    def enqueue(self) -> Ticket:
        """A new request: admitted at once if a slot is free and nobody waits, else queued last."""
        ticket = Ticket()
        if self.max_num_seqs <= 0 or (self.running < self.max_num_seqs and not self._queue):
            ticket.admitted = True
            self.running += 1
        else:
            ticket.scope = trio.CancelScope()
            self._queue.append(ticket)
        return ticket

    def start(self, ticket: Ticket, sequences: list[list[Segment]], prompt_tokens: int, now: float) -> Start:
        """An admitted request begins: cache lookup (queried = the tokens of `sequences`, the prompt as
        the cache sees it), its blocks referenced, its prefill booked. Without a cache every prompt
        token is uncached; without a prefill rate prefill takes no time."""
        ticket.started = True
        queried = hits = 0
        cache = self.cache
        if cache is not None:
            for tokens in sequences:
                hashes = block_hashes(tokens, cache.block_tokens)
                n = length(tokens)
                queried += n
                hits += cache.hit_tokens(hashes, n)
                ticket.held += cache.acquire(hashes)
        end = now
        rate = self.prefill_tokens_per_s
        if rate > 0:
            begin = max(now, self._prefill_free_at)
            end = begin + max(prompt_tokens - hits, 0) / rate
            self._prefill_free_at = end
            ticket.prefill = (begin, end)
        return Start(end, queried, hits)

    def finish(self, ticket: Ticket, now: float) -> None:
        """The request ended (finished, aborted, or gave up waiting): its slot goes to the queue's head,
        its blocks become free cached blocks. Idempotent."""
        if ticket.done:
            return
        ticket.done = True
        if not ticket.admitted:
            self._queue.remove(ticket)
            return
        if self.cache is not None:
            self.cache.release(ticket.held)
            ticket.held = []
        begin, end = ticket.prefill
        if end > now and end == self._prefill_free_at:  # cut during its prefill, nobody booked after it
            self._prefill_free_at = max(begin, now)
        self.running -= 1
        while self._queue and (self.max_num_seqs <= 0 or self.running < self.max_num_seqs):
            head = self._queue.popleft()
            head.admitted = True
            self.running += 1
            if head.scope is not None:
                head.scope.cancel()


__all__ = ["Scheduler", "Start", "Ticket"]
