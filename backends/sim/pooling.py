"""The simulated vLLM's pooling and tokenizer endpoints: /score and /v1/score, /rerank, /v1/rerank and
/v2/rerank, /pooling, /classify, /tokenize, /detokenize.

Strategy: pure functions from a request body to (model, prompt tokens, answer bytes), so the server
books them like /v1/embeddings (a running engine request, its prompt tokens, finish "stop"). The
pooling endpoints are served by the embedding models (vLLM serves one model per process; here the
chat models answer "The model does not support ... API" as vLLM does for a model without the task).
Values are deterministic: a text's vector is the one /v1/embeddings returns for it, a score is the
cosine of the two vectors (vLLM's bi-encoder scoring), a classification is a softmax over two
hash-derived logits with the Hugging Face default labels. Prompt tokens follow the planner's rule,
max(1, ceil(chars/4)) per text; token ids are the simulated tokenizer's (`_token_id`, the ids that
`return_token_ids` shows) and decode to " t<id>".

Shapes, from vLLM's `vllm/entrypoints/pooling/` and `serve/tokenize/` (scoring/serving.py and
scoring/protocol.py @004706d8, scoring/api_router.py @facb56e2, pooling/protocol.py @01cfbaf6,
classify/protocol.py @dff4cad3, tokenize/protocol.py @343bacaf, tokenize/serving.py @cf34c18c):
- score: {"id": "score-<hex>", "object": "list", "created", "model", "data": [{"index", "object":
  "score", "score"}], "usage": UsageInfo}; text_1/text_2, queries/documents, queries/items or
  data_1/data_2, paired 1:1, 1:N or N:N;
- rerank: {"id": "score-<hex>", "model", "usage": {"prompt_tokens", "total_tokens"}, "results":
  [{"index", "document": {"text", "multi_modal": null}, "relevance_score"}]} sorted by score, cut at
  top_n when 0 < top_n < len(documents);
- pooling: {"id": "pool-<hex>", "object": "list", "created", "model", "data": [{"index", "object":
  "pooling", "data": [...]}], "usage"}; classify: {"id": "classify-<hex>", ..., "data": [{"index",
  "label", "probs", "num_classes"}], "usage"};
- tokenize: {"count", "max_model_len", "tokens", "token_strs"}; detokenize: {"prompt"}.
"""

from __future__ import annotations

import base64
import math
import struct
import time
import uuid
import zlib
from typing import Any

import msgspec

from backends.sim.planning import Planner, chat_prompt_tokens, text_tokens, vector
from backends.sim.responses import _VOCAB, SimError, _token_id, bad_request, error, invalid_body

_enc = msgspec.json.Encoder()
_raw = msgspec.json.Decoder(dict[str, Any])
LABELS = ("LABEL_0", "LABEL_1")  # transformers' default id2label


def _body(body: bytes) -> dict[str, Any]:
    try:
        value = _raw.decode(body)
    except msgspec.DecodeError:
        raise invalid_body("JSON decode error", ("body", 0), "json_invalid") from None
    except msgspec.ValidationError:
        raise invalid_body("Input should be a valid dictionary or object to extract fields from",
                           ("body",), "model_attributes_type") from None
    return value


def _texts(value: Any, field: str) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return value
    raise invalid_body("Input should be a valid string", ("body", field), "string_type")


def _usage(prompt: int) -> dict[str, Any]:
    return {"prompt_tokens": prompt, "total_tokens": prompt, "completion_tokens": 0, "prompt_tokens_details": None}


def _rid(prefix: str, request_id: str | None) -> str:
    return f"{prefix}-{request_id or uuid.uuid4().hex}"


class Pooler:
    """The pooling endpoints of one simulated server (see the module docstring)."""

    def __init__(self, planner: Planner) -> None:
        self.planner = planner
        self.options = planner.options

    def _model(self, name: Any, api: str) -> str:
        models = self.options.embedding_models
        model = name or (models[0] if models else "")
        if model in models:
            return model
        if model in self.options.models:
            raise bad_request(f"The model does not support {api} API")
        raise error(404, f"The model `{model}` does not exist.", "NotFoundError", "model")

    def _tokens(self, text: str) -> int:
        n = max(1, text_tokens(text))
        if n > self.options.max_model_len:
            raise self.planner.too_long(n, 0)
        return n

    def _vector(self, text: str) -> list[float]:
        return vector(zlib.crc32(text.encode()), self.options.embedding_dim)

    def _score(self, a: str, b: str) -> float:
        u, v = self._vector(a), self._vector(b)
        return sum(x * y for x, y in zip(u, v, strict=True))

    # -- endpoints ----------------------------------------------------------------------------------

    def score(self, body: bytes, request_id: str | None = None) -> tuple[str, int, bytes]:
        req = _body(body)
        for left, right in (("text_1", "text_2"), ("queries", "documents"), ("queries", "items"),
                            ("data_1", "data_2")):
            if left in req and right in req:
                first, second = _texts(req[left], left), _texts(req[right], right)
                break
        else:
            raise invalid_body("Field required", ("body", "text_1"), "missing")
        model = self._model(req.get("model"), "Score")
        if not first:
            raise bad_request("At least one text element must be given")
        if not second:
            raise bad_request("At least one text_pair element must be given")
        if len(first) > 1 and len(first) != len(second):
            raise bad_request("Input lengths must be either 1:1, 1:N or N:N")
        prompt = sum(self._tokens(t) for t in first) + sum(self._tokens(t) for t in second)
        pairs = zip(first * len(second) if len(first) == 1 else first, second, strict=True)
        data = [{"index": i, "object": "score", "score": self._score(a, b)} for i, (a, b) in enumerate(pairs)]
        return model, prompt, _enc.encode({"id": _rid("score", request_id), "object": "list",
                                           "created": int(time.time()), "model": model, "data": data,
                                           "usage": _usage(prompt)})

    def rerank(self, body: bytes, request_id: str | None = None) -> tuple[str, int, bytes]:
        req = _body(body)
        if "query" not in req:
            raise invalid_body("Field required", ("body", "query"), "missing")
        if "documents" not in req:
            raise invalid_body("Field required", ("body", "documents"), "missing")
        query = _texts(req["query"], "query")
        if len(query) != 1:
            raise invalid_body("Input should be a valid string", ("body", "query"), "string_type")
        documents = _texts(req["documents"], "documents")
        top_n = req.get("top_n", 0)
        if not isinstance(top_n, int) or isinstance(top_n, bool):
            raise invalid_body("Input should be a valid integer", ("body", "top_n"), "int_type")
        model = self._model(req.get("model"), "Rerank (Score)")
        if not documents:
            raise bad_request("At least one text_pair element must be given")
        prompt = self._tokens(query[0]) + sum(self._tokens(d) for d in documents)
        results = [{"index": i, "document": {"text": d, "multi_modal": None},
                    "relevance_score": self._score(query[0], d)} for i, d in enumerate(documents)]
        results.sort(key=lambda r: r["relevance_score"], reverse=True)
        n = top_n if top_n > 0 else len(documents)
        if n < len(documents):
            results = results[:n]
        return model, prompt, _enc.encode({"id": _rid("score", request_id), "model": model,
                                           "usage": {"prompt_tokens": prompt, "total_tokens": prompt},
                                           "results": results})

    def _inputs(self, req: dict[str, Any]) -> list[str]:
        if "messages" in req:
            messages = req["messages"]
            if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
                raise invalid_body("Input should be a valid list", ("body", "messages"), "list_type")
            return ["\n".join(str(m.get("content") or "") for m in messages)]
        if "input" not in req:
            raise invalid_body("Field required", ("body", "input"), "missing")
        raw = req["input"]
        if isinstance(raw, list) and raw and all(isinstance(i, int) for i in raw):
            return [str(raw)]
        if isinstance(raw, list) and raw and all(isinstance(i, list) for i in raw):
            return [str(ids) for ids in raw]
        return _texts(raw, "input")

    def _prompt(self, req: dict[str, Any], texts: list[str]) -> int:
        if "messages" in req:
            n = chat_prompt_tokens(req["messages"])
            if n > self.options.max_model_len:
                raise self.planner.too_long(n, 0)
            return n
        raw = req["input"]
        if isinstance(raw, list) and raw and all(isinstance(i, int) for i in raw):
            return len(raw)
        if isinstance(raw, list) and raw and all(isinstance(i, list) for i in raw):
            return sum(len(ids) for ids in raw)
        return sum(self._tokens(t) for t in texts)

    def pooling(self, body: bytes, request_id: str | None = None) -> tuple[str, int, bytes]:
        req = _body(body)
        texts = self._inputs(req)
        fmt = req.get("encoding_format", "float")
        if fmt not in ("float", "base64"):
            raise invalid_body("Input should be 'float' or 'base64'", ("body", "encoding_format"), "literal_error")
        model = self._model(req.get("model"), "Pooling")
        if not texts:
            raise invalid_body("Value error, Input must not be empty.")
        prompt = self._prompt(req, texts)
        data = []
        for i, text in enumerate(texts):
            v = self._vector(text)
            data.append({"index": i, "object": "pooling",
                         "data": base64.b64encode(struct.pack(f"<{len(v)}f", *v)).decode() if fmt == "base64" else v})
        return model, prompt, _enc.encode({"id": _rid("pool", request_id), "object": "list",
                                           "created": int(time.time()), "model": model, "data": data,
                                           "usage": _usage(prompt)})

    def classify(self, body: bytes, request_id: str | None = None) -> tuple[str, int, bytes]:
        req = _body(body)
        if "messages" not in req and req.get("input") in (None, ""):
            self._model(req.get("model"), "Classification")
            raise bad_request("Input or messages must be provided")
        texts = self._inputs(req)
        model = self._model(req.get("model"), "Classification")
        prompt = self._prompt(req, texts) if texts else 0
        data = []
        for i, text in enumerate(texts):
            h = zlib.crc32(text.encode())
            logits = ((h & 0xFFFF) / 0xFFFF * 4 - 2, (h >> 16) / 0xFFFF * 4 - 2)
            exps = [math.exp(x) for x in logits]
            probs = [e / sum(exps) for e in exps]
            data.append({"index": i, "label": LABELS[probs.index(max(probs))], "probs": probs,
                         "num_classes": len(probs)})
        return model, prompt, _enc.encode({"id": _rid("classify", request_id), "object": "list",
                                           "created": int(time.time()), "model": model, "data": data,
                                           "usage": _usage(prompt)})

    # -- tokenizer ----------------------------------------------------------------------------------

    def _any_model(self, name: Any) -> None:
        if name and name not in self.options.models and name not in self.options.embedding_models:
            raise error(404, f"The model `{name}` does not exist.", "NotFoundError", "model")

    def tokenize(self, body: bytes) -> bytes:
        req = _body(body)
        if "messages" in req:
            if req.get("continue_final_message") and req.get("add_generation_prompt"):
                raise invalid_body("Value error, Cannot set both `continue_final_message` and "
                                   "`add_generation_prompt` to True.")
            messages = req["messages"]
            if not isinstance(messages, list) or not all(isinstance(m, dict) and isinstance(m.get("role"), str)
                                                         for m in messages):
                raise invalid_body("Field required", ("body", "messages", "role"), "missing")
            tools = req.get("tools")
            self._any_model(req.get("model"))
            n = chat_prompt_tokens(messages, len(_enc.encode(tools)) if tools else 0)
        elif "prompt" in req:
            if not isinstance(req["prompt"], str):
                raise invalid_body("Input should be a valid string", ("body", "prompt"), "string_type")
            self._any_model(req.get("model"))
            n = text_tokens(req["prompt"])
            if req.get("add_special_tokens", True):
                n = max(1, n)  # the simulated tokenizer's BOS is folded into the first piece
        else:
            raise invalid_body("Field required", ("body", "prompt"), "missing")
        if n > self.options.max_model_len:
            raise self.planner.too_long(n, 0)
        tokens = [_token_id(i) for i in range(n)]
        strs = [f" t{t}" for t in tokens] if req.get("return_token_strs") else None
        return _enc.encode({"count": n, "max_model_len": self.options.max_model_len, "tokens": tokens,
                            "token_strs": strs})

    def detokenize(self, body: bytes) -> bytes:
        req = _body(body)
        tokens = req.get("tokens")
        if tokens is None:
            raise invalid_body("Field required", ("body", "tokens"), "missing")
        if not isinstance(tokens, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in tokens):
            raise invalid_body("Input should be a valid integer", ("body", "tokens", 0), "int_type")
        self._any_model(req.get("model"))
        if any(t < 0 for t in tokens):  # the tokenizer's OverflowError, re-raised as a validation error
            raise SimError(400, _enc.encode({"error": {
                "message": "1 validation error:\n  'out of range integral type conversion attempted'",
                "type": "Bad Request", "param": None, "code": 400}}))
        return _enc.encode({"prompt": "".join(f" t{t}" for t in tokens if t < _VOCAB)})


__all__ = ["LABELS", "Pooler"]
