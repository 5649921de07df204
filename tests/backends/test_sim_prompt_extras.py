"""The simulator's vLLM extras of a non-streaming body: ``return_token_ids`` and ``prompt_logprobs``.

vLLM (`chat_completion/protocol.py` `ChatCompletionResponse`) puts ``usage`` before ``prompt_logprobs``,
``prompt_token_ids`` and ``kv_transfer_params``; with these options on a long prompt most of the body
follows ``usage``. Pure: `Planner` and `Plan`, `prompt_options` read from the request body as the planner
would.
"""

from __future__ import annotations

import json

import msgspec
import pytest

from backends.sim.planning import Planner
from backends.sim.responses import SimOptions, prompt_options


def planned(kind: str = "chat", **fields):
    if kind == "chat":
        body = {"model": "sim-chat", "messages": [{"role": "user", "content": "Say hello, " * 50}], **fields}
    else:
        body = {"model": "sim-chat", "prompt": "Say hello, " * 50, **fields}
    raw = msgspec.json.encode(body)
    plan = getattr(Planner(SimOptions()), kind)(raw)
    plan.return_token_ids, plan.prompt_logprobs = prompt_options(raw)
    return plan


@pytest.mark.parametrize("fields, expected", [
    ({}, (False, None)), ({"return_token_ids": True}, (True, None)), ({"return_token_ids": None}, (False, None)),
    ({"prompt_logprobs": 0}, (False, 0)), ({"prompt_logprobs": 3}, (False, 3)), ({"prompt_logprobs": -1}, (False, 20)),
    ({"prompt_logprobs": 50, "return_token_ids": True}, (True, 20)),
])
def test_prompt_options(fields, expected) -> None:
    assert prompt_options(msgspec.json.encode({"model": "m", **fields})) == expected
    assert prompt_options(b"not json") == (False, None)


def test_chat_body_order_and_the_extras() -> None:
    plan = planned(return_token_ids=True, prompt_logprobs=2, max_tokens=3)
    raw = plan.body()
    body = json.loads(raw)
    assert list(body) == ["id", "object", "created", "model", "choices", "service_tier",
                          "system_fingerprint", "usage", "prompt_logprobs", "prompt_token_ids",
                          "kv_transfer_params"]
    n = plan.prompt_tokens
    assert body["usage"]["prompt_tokens"] == n == len(body["prompt_token_ids"]) == len(body["prompt_logprobs"])
    assert body["prompt_logprobs"][0] is None  # the first prompt token has no logprob
    for ids, entry in zip(body["prompt_token_ids"][1:], body["prompt_logprobs"][1:], strict=True):
        assert len(entry) == 2 and str(ids) in entry and entry[str(ids)]["rank"] == 1
        assert all(list(v) == ["logprob", "rank", "decoded_token"] for v in entry.values())
    assert len(body["choices"][0]["token_ids"]) == 3
    assert len(raw) - raw.index(b'"usage":') > 10 * 1024  # most of the body follows usage


def test_chat_body_without_the_options_is_unchanged() -> None:
    body = json.loads(planned(max_tokens=2).body())
    assert (body["prompt_logprobs"], body["prompt_token_ids"], body["choices"][0]["token_ids"]) == (None, None, None)


def test_completion_body_carries_them_per_choice() -> None:
    plan = planned("completion", return_token_ids=True, prompt_logprobs=0, max_tokens=2, n=2)
    body = json.loads(plan.body())
    assert list(body) == ["id", "object", "created", "model", "choices", "service_tier", "system_fingerprint",
                          "usage", "kv_transfer_params"]
    for choice in body["choices"]:
        assert len(choice["prompt_token_ids"]) == plan.prompt_tokens == len(choice["prompt_logprobs"])
        assert all(len(e) == 1 for e in choice["prompt_logprobs"][1:])  # prompt_logprobs 0: the token itself
        assert len(choice["token_ids"]) == 2
    assert body["choices"][0]["token_ids"] != body["choices"][1]["token_ids"]
