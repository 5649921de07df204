"""The simulated vLLM's pooling and tokenizer endpoints through real sockets: score, rerank (all three
paths), pooling, classify, tokenize, detokenize -- vLLM's field order, deterministic values that agree
with /v1/embeddings, usage, errors, auth scope and the books.

Every test binds 127.0.0.1 port 0, runs under `trio.fail_after`, and stops the server it started.
"""

from __future__ import annotations

import pytest
import trio

from tests.support.sim_client import running


def cosine(u: list[float], v: list[float]) -> float:
    return sum(a * b for a, b in zip(u, v, strict=True))


async def test_score_agrees_with_embeddings() -> None:
    with trio.fail_after(15):
        async with running() as (server, _port, c):
            r = await c.post("/score", json={"model": "sim-embed", "text_1": "query", "text_2": ["alpha", "beta"]})
            body = r.json()
            assert r.status_code == 200 and list(body) == ["id", "object", "created", "model", "data", "usage"]
            assert body["id"].startswith("score-") and body["object"] == "list" and body["model"] == "sim-embed"
            assert [list(d) for d in body["data"]] == [["index", "object", "score"]] * 2
            emb = (await c.post("/v1/embeddings", json={"input": ["query", "alpha", "beta"]})).json()["data"]
            vectors = [d["embedding"] for d in emb]
            assert body["data"][0]["score"] == pytest.approx(cosine(vectors[0], vectors[1]))
            assert body["data"][1]["score"] == pytest.approx(cosine(vectors[0], vectors[2]))
            assert body["usage"] == {"prompt_tokens": 2 + 2 + 1, "total_tokens": 5, "completion_tokens": 0,
                                     "prompt_tokens_details": None}
            # the other request shapes, the v1 path, N:N pairing; bad pairings are refused
            for shape in ({"queries": ["a", "b"], "documents": ["c", "d"]}, {"queries": "a", "items": ["c"]},
                          {"data_1": ["a"], "data_2": ["c", "d"]}):
                r = await c.post("/v1/score", json=shape)
                assert r.status_code == 200 and len(r.json()["data"]) == len(shape.get("documents") or
                                                                             shape.get("items") or shape["data_2"])
            r = await c.post("/score", json={"text_1": ["a", "b"], "text_2": ["c", "d", "e"]})
            assert r.status_code == 400 and r.json()["error"]["message"] == "Input lengths must be either 1:1, 1:N or N:N"
            assert (await c.post("/score", json={"text_1": "a"})).json()["error"]["type"] == "Bad Request"
            stats = server.statistics()
            assert stats.finished_stop == 5 and stats.generation_tokens_total == 0


async def test_rerank_sorted_and_cut_at_top_n() -> None:
    with trio.fail_after(15):
        async with running() as (_server, _port, c):
            docs = ["one", "two", "three", "four"]
            bodies = [(await c.post(path, json={"query": "q", "documents": docs, "top_n": 2})).json()
                      for path in ("/rerank", "/v1/rerank", "/v2/rerank")]
            body = bodies[0]
            assert list(body) == ["id", "model", "usage", "results"] and body["id"].startswith("score-")
            assert body["usage"] == {"prompt_tokens": 1 + 1 + 1 + 2 + 1, "total_tokens": 6}
            assert len(body["results"]) == 2 and list(body["results"][0]) == ["index", "document", "relevance_score"]
            full = (await c.post("/rerank", json={"query": "q", "documents": docs})).json()["results"]
            scores = [r["relevance_score"] for r in full]
            assert scores == sorted(scores, reverse=True) and len(full) == 4
            assert body["results"] == full[:2] and all(b["results"] == body["results"] for b in bodies)
            assert full[0]["document"] == {"text": docs[full[0]["index"]], "multi_modal": None}
            r = await c.post("/rerank", json={"model": "sim-chat", "query": "q", "documents": docs})
            assert r.status_code == 400 and r.json()["error"]["message"] == \
                "The model does not support Rerank (Score) API"
            r = await c.post("/rerank", json={"model": "nope", "query": "q", "documents": docs})
            assert r.status_code == 404


async def test_pooling_and_classify() -> None:
    with trio.fail_after(15):
        async with running(embedding_dim=4) as (server, _port, c):
            r = await c.post("/pooling", json={"input": ["hello", "world!"]})
            body = r.json()
            assert list(body) == ["id", "object", "created", "model", "data", "usage"] and body["id"].startswith("pool-")
            assert body["data"][0]["object"] == "pooling" and len(body["data"][0]["data"]) == 4
            emb = (await c.post("/v1/embeddings", json={"input": "hello"})).json()["data"][0]["embedding"]
            assert body["data"][0]["data"] == emb and body["usage"]["prompt_tokens"] == 2 + 2
            r = await c.post("/pooling", json={"input": [[1, 2, 3]], "encoding_format": "base64"})
            assert isinstance(r.json()["data"][0]["data"], str) and r.json()["usage"]["prompt_tokens"] == 3
            r = await c.post("/classify", json={"input": ["good", "bad"]})
            body = r.json()
            assert body["id"].startswith("classify-") and list(body["data"][0]) == ["index", "label", "probs",
                                                                                   "num_classes"]
            probs = body["data"][0]["probs"]
            assert body["data"][0]["num_classes"] == 2 and sum(probs) == pytest.approx(1.0)
            assert body["data"][0]["label"] == ("LABEL_0" if probs[0] > probs[1] else "LABEL_1")
            assert (await c.post("/classify", json={"input": ["good", "bad"]})).json()["data"] == body["data"]
            r = await c.post("/classify", json={"input": ""})
            assert r.status_code == 400 and r.json()["error"]["message"] == "Input or messages must be provided"
            r = await c.post("/classify", json={"messages": [{"role": "user", "content": "hi"}]})
            assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == 3 + 4 + 1
            assert server.statistics().prompt_tokens_total == 4 + 2 + 3 + 2 + 2 + 8


async def test_tokenize_and_detokenize() -> None:
    with trio.fail_after(15):
        async with running(max_model_len=100, api_key="k") as (server, _port, c):
            r = await c.post("/tokenize", json={"prompt": "hello world"})  # outside /v1: no key needed
            body = r.json()
            assert r.status_code == 200 and list(body) == ["count", "max_model_len", "tokens", "token_strs"]
            assert body["count"] == 3 == len(body["tokens"]) and body["max_model_len"] == 100
            assert body["token_strs"] is None
            # the same count /v1/completions reports for the prompt
            done = await c.post("/v1/completions", headers={"authorization": "Bearer k"},
                                json={"model": "sim-chat", "prompt": "hello world", "max_tokens": 1})
            assert done.json()["usage"]["prompt_tokens"] == 3
            chat = {"messages": [{"role": "user", "content": "Say hello."}], "return_token_strs": True}
            body = (await c.post("/tokenize", json=chat)).json()
            assert body["count"] == 3 + 4 + 3 and body["token_strs"] == [f" t{t}" for t in body["tokens"]]
            assert (await c.post("/tokenize", json={"prompt": "", "add_special_tokens": False})).json()["count"] == 0
            r = await c.post("/tokenize", json={"prompt": "x" * 500})
            assert r.status_code == 400 and r.json()["error"]["param"] == "input_tokens"
            r = await c.post("/tokenize", json={"model": "nope", "prompt": "x"})
            assert r.status_code == 404
            r = await c.post("/tokenize", json={"messages": [], "add_generation_prompt": True,
                                                "continue_final_message": True})
            assert r.status_code == 400 and "Cannot set both" in r.json()["error"]["message"]
            r = await c.post("/detokenize", json={"tokens": [101, 8020]})
            assert r.json() == {"prompt": " t101 t8020"}
            r = await c.post("/detokenize", json={"tokens": [-1]})
            assert r.status_code == 400 and "out of range integral type conversion" in r.json()["error"]["message"]
            assert (await c.post("/detokenize", json={})).status_code == 400
            stats = server.statistics()
            assert stats.running == 0 and stats.finished_total == 1  # only the completion ran the engine
