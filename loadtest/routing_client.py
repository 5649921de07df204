"""The load generator of `spotinference bench routing`: conversations in flight, one streamed turn at a time.

Strategy: trio + httpx, reading raw SSE lines and timestamping them with perf_counter as each arrives
(as loadtest/throughput.py does), because the next turn needs the answer's text -- the history an agent
resends -- and not only event times. `concurrency` workers take conversations from one iterator, so at
most that many are in flight; a conversation is sequential: turn k+1 is sent `think_s` after turn k
ended, with the answer of turn k appended. Per request: TTFT = first content delta - sent, end-to-end =
last byte - sent, completion tokens from the final usage chunk (stream_options.include_usage; the
content deltas counted when a server sends none). Everything is bounded: a per-request timeout, and a
deadline for the whole run, after which what is unfinished is cancelled and counted as errors. A failed
turn ends its conversation (its history is broken); the turns it did not send are counted as errors too,
so `ok + errors` is always the workload's request count. Imports nothing from proxy/, ops/ or backends/.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx
import trio

from loadtest.routing_workload import Conversation, request_body
from loadtest.throughput import error_message

SKIPPED = "not sent: an earlier turn of its conversation failed"
CANCELLED = "not finished before the run's deadline"


@dataclass
class Sample:
    """What one turn measured (perf_counter seconds)."""

    conv: int
    turn: int
    sent: float = 0.0
    first: float | None = None  # first content delta
    done: float = 0.0
    completion_tokens: int = 0
    prompt_tokens: int | None = None
    error: str | None = None

    def ttft_s(self) -> float | None:
        return None if self.first is None else self.first - self.sent

    def e2e_s(self) -> float:
        return self.done - self.sent


async def one_turn(client: httpx.AsyncClient, url: str, body: dict[str, Any], s: Sample) -> str:
    """Stream one chat completion into `s`; return the answer's text ("" on error, with s.error set)."""
    parts: list[str] = []
    events = 0
    s.sent = time.perf_counter()
    try:
        async with client.stream("POST", url + "/v1/chat/completions", json=body) as resp:
            if resp.status_code != 200:
                s.error = error_message(resp.status_code, await resp.aread())
                return ""
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue  # blank separators and SSE comments
                now = time.perf_counter()
                payload = line[5:].strip()
                if payload == "[DONE]":
                    break
                obj = json.loads(payload)
                if not isinstance(obj, dict):
                    s.error = "malformed SSE event: not a JSON object"
                    break
                if "error" in obj:
                    err = obj["error"]
                    msg = err.get("message") if isinstance(err, dict) else err
                    s.error = "in-band error: " + str(msg)[:200]
                    break
                usage = obj.get("usage")
                if isinstance(usage, dict) and isinstance(usage.get("completion_tokens"), int):
                    s.completion_tokens = usage["completion_tokens"]
                    s.prompt_tokens = usage.get("prompt_tokens")
                for choice in obj.get("choices") or ():
                    text = (choice.get("delta") or {}).get("content")
                    if text:
                        if s.first is None:
                            s.first = now
                        events += 1
                        parts.append(text)
    except httpx.TimeoutException:
        s.error = "timed out"
    except (httpx.HTTPError, ValueError) as exc:
        s.error = f"{type(exc).__name__}: {str(exc)[:200]}"
    s.done = time.perf_counter()
    if s.error is None and s.first is None:
        s.error = "no content in the stream"
    if s.error is None and s.completion_tokens == 0:
        s.completion_tokens = events
    return "".join(parts)


async def run_workload(url: str, model: str, convs: list[Conversation], *, concurrency: int,
                       timeout_s: float, deadline_s: float,
                       on_done: Callable[[Sample], None] | None = None) -> tuple[list[Sample], float]:
    """Run every conversation against `url` (http://HOST:PORT); return (one sample per turn, wall seconds).

    The wall time runs from the first request sent to the last one ended (or to the deadline)."""
    samples: list[Sample] = []
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    timeout = httpx.Timeout(timeout_s, connect=min(timeout_s, 10.0))
    pending = iter(convs)
    started: list[float] = []

    async def conversation(client: httpx.AsyncClient, conv: Conversation) -> None:
        answers: list[str] = []
        for k, turn in enumerate(conv.turns):
            s = Sample(conv.index, k)
            samples.append(s)
            try:
                if k and turn.think_s > 0:
                    await trio.sleep(turn.think_s)
                answer = await one_turn(client, url, request_body(conv, k, answers, model), s)
            except trio.Cancelled:
                s.error, s.done = CANCELLED, time.perf_counter()
                raise
            if not started:
                started.append(s.sent)
            if on_done is not None:
                on_done(s)
            if s.error is not None:
                for j in range(k + 1, len(conv.turns)):
                    samples.append(Sample(conv.index, j, error=SKIPPED))
                return
            answers.append(answer)

    async def worker(client: httpx.AsyncClient) -> None:
        for conv in pending:
            await conversation(client, conv)

    t0 = time.perf_counter()
    async with httpx.AsyncClient(limits=limits, timeout=timeout) as client:
        with trio.move_on_after(deadline_s):
            async with trio.open_nursery() as nursery:
                for _ in range(min(concurrency, len(convs))):
                    nursery.start_soon(worker, client)
    end = time.perf_counter()
    # What the deadline cut: the turn in flight was marked above; unsent turns and conversations too.
    seen = {(s.conv, s.turn) for s in samples}
    for conv in convs:
        for k in range(len(conv.turns)):
            if (conv.index, k) not in seen:
                samples.append(Sample(conv.index, k, error=CANCELLED))
    ok_done = [s.done for s in samples if s.error is None]
    first = started[0] if started else t0
    wall = (max(ok_done) if ok_done else end) - first
    return samples, wall if wall > 0 else math.nan
