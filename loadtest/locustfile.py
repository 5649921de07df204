"""Locust users that speak the OpenAI API: chat (plain and streamed) and embeddings.

Strategy: the load a real client puts on the gateway, at user level, with locust's own reporting
(P50/P95/P99 per request name, CSV with --csv). It is the coarse, familiar harness; the precise one
is `spotinference bench overhead` (loadtest/overhead.py). Rules:
- `--host` is the target (the gateway, or vLLM/the sim directly). Setting LOADTEST_DIRECT_HOST adds a
  second user class that sends the same mix straight to that upstream, so ONE run measures both and
  the names say which side ("[direct] chat" beside "[host] chat"); locust applies --host to every
  User class, so the direct user builds absolute URLs instead.
- A stream is reported twice: "chat stream" (the whole stream, until `data: [DONE]`) and
  "chat stream TTFB" (time to the first SSE event), the latter fired as its own request event.
- Bearer key from SPOTINFERENCE_API_KEY (optional; loopback gateways without a keys file need none).
- Knobs, all env: LOADTEST_MODEL (sim-chat), LOADTEST_EMBED_MODEL (sim-embed), LOADTEST_MAX_TOKENS (16),
  LOADTEST_LABEL (host), LOADTEST_WAIT_S (0: back to back).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator

from locust import between, constant, task
from locust.contrib.fasthttp import FastHttpUser

MODEL = os.environ.get("LOADTEST_MODEL", "sim-chat")
EMBED_MODEL = os.environ.get("LOADTEST_EMBED_MODEL", "sim-embed")
MAX_TOKENS = int(os.environ.get("LOADTEST_MAX_TOKENS", "16"))
WAIT_S = float(os.environ.get("LOADTEST_WAIT_S", "0"))
API_KEY = os.environ.get("SPOTINFERENCE_API_KEY")
DIRECT_HOST = os.environ.get("LOADTEST_DIRECT_HOST", "").rstrip("/")
LABEL = os.environ.get("LOADTEST_LABEL", "host")

_MESSAGES = [{"role": "user", "content": "Say hello in a few words."}]
_CHAT = json.dumps({"model": MODEL, "messages": _MESSAGES, "max_tokens": MAX_TOKENS})
_STREAM = json.dumps({"model": MODEL, "messages": _MESSAGES, "max_tokens": MAX_TOKENS, "stream": True})
_EMBED = json.dumps({"model": EMBED_MODEL, "input": "The quick brown fox."})


def _sse_events(resp) -> Iterator[bytes]:
    """SSE events of a `stream=True` response, each as soon as its blank line arrives.

    geventhttpclient's response has `readline(sep)`, which returns once `sep` is buffered; locust's
    `iter_content(n)` would block until n bytes, hiding the time to first event.
    """
    raw = getattr(resp, "_response", None)
    if raw is not None and hasattr(raw, "readline"):
        while event := raw.readline(b"\n\n"):
            yield event
        return
    pending = b""
    for chunk in resp.iter_content(chunk_size=1024, decode_content=False):
        pending += chunk if isinstance(chunk, bytes) else chunk.encode()
        while b"\n\n" in pending:
            event, pending = pending.split(b"\n\n", 1)
            yield event


class _OpenAIUser(FastHttpUser):
    """The request mix; subclasses say where it goes (`base`) and how it is labelled."""

    abstract = True
    wait_time = between(0, WAIT_S) if WAIT_S else constant(0)
    label = LABEL
    base = ""  # "" = relative to --host; else an absolute http://host:port

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json"}
        if API_KEY:
            headers["Authorization"] = f"Bearer {API_KEY}"
        return headers

    @task(4)
    def chat(self) -> None:
        name = f"[{self.label}] chat"
        with self.client.post(f"{self.base}/v1/chat/completions", data=_CHAT, headers=self._headers(),
                              name=name, catch_response=True) as resp:
            if resp.status_code != 200:
                resp.failure(f"status {resp.status_code}")
            elif b'"choices"' not in (resp.content or b""):
                resp.failure("no choices in the answer")

    @task(4)
    def chat_stream(self) -> None:
        name = f"[{self.label}] chat stream"
        headers = {**self._headers(), "Accept": "text/event-stream"}
        start = time.perf_counter()
        with self.client.post(f"{self.base}/v1/chat/completions", data=_STREAM, headers=headers,
                              name=name, stream=True, catch_response=True) as resp:
            if resp.status_code != 200:
                resp.failure(f"status {resp.status_code}")
                return
            first_ms = None
            events = 0
            done = False
            for event in _sse_events(resp):
                if first_ms is None:
                    first_ms = (time.perf_counter() - start) * 1000.0
                if event.strip() == b"data: [DONE]":
                    done = True
                else:
                    events += 1
            total_ms = (time.perf_counter() - start) * 1000.0
            if first_ms is not None:
                self.environment.events.request.fire(
                    request_type="POST", name=f"[{self.label}] chat stream TTFB", response_time=first_ms,
                    response_length=0, exception=None, context={})
            if not done:
                resp.failure(f"stream ended without [DONE] after {events} events")
            else:
                # Report the whole stream, not just the head (locust's default for stream=True).
                resp.request_meta["response_time"] = total_ms
                resp.request_meta["response_length"] = events
                resp.success()

    @task(2)
    def embeddings(self) -> None:
        name = f"[{self.label}] embeddings"
        with self.client.post(f"{self.base}/v1/embeddings", data=_EMBED, headers=self._headers(),
                              name=name, catch_response=True) as resp:
            if resp.status_code != 200:
                resp.failure(f"status {resp.status_code}")
            elif b'"embedding"' not in (resp.content or b""):
                resp.failure("no embedding in the answer")


class TargetUser(_OpenAIUser):
    """The mix against `--host` (the gateway, usually)."""


if DIRECT_HOST:

    class DirectUser(_OpenAIUser):
        """The same mix straight to the upstream, in the same run, for comparison."""

        label = "direct"
        base = DIRECT_HOST
