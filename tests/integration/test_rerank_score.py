"""Rerank and score (issue 21, item 4) through HTTP against a real gateway, real redis-server and real worker
processes with the fake engine: every path vLLM serves them at, top_n, a batch of rerank lines, and the refusal of a
model that cannot score. (The real engine's scores: tests/engine/test_vllm_engine.py, ``TestEmbed``.)"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.integration.conftest import CHAT, EMBED, Stack
from tests.integration.test_batches import finished, jsonl, line, upload, wait_batch

DOCUMENTS = ["a line of people waiting", "a red apple", "what is a queue", "jobs wait in a queue"]
QUERY = "what is a queue"


def post(stack: Stack, path: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(f"{stack.gateway.base_url}{path}", json=body, timeout=10)


def embedding_cosines(stack: Stack, query: str, documents: list[str]) -> list[float]:
    """The cosine similarity of the query's embedding with each document's, from the same model's /v1/embeddings:
    what a bi-encoder's score is."""
    response = post(stack, "/v1/embeddings", {"model": EMBED, "input": [query, *documents], "encoding_format": "float"})
    vectors = [item["embedding"] for item in response.json()["data"]]

    def cosine(a: list[float], b: list[float]) -> float:
        return sum(x * y for x, y in zip(a, b, strict=True)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))

    return [cosine(vectors[0], v) for v in vectors[1:]]


@pytest.mark.parametrize("path", ["/v1/rerank", "/v2/rerank", "/rerank"])
def test_rerank_ranks_the_documents_by_the_models_own_similarity(stack: Stack, path: str) -> None:
    response = post(stack, path, {"model": EMBED, "query": QUERY, "documents": DOCUMENTS})
    assert response.status_code == 200, response.text
    assert response.headers["x-request-id"]
    body = response.json()
    assert set(body) == {"id", "model", "usage", "results"} and body["model"] == EMBED
    assert body["id"] == f"score-{response.headers['x-request-id']}"
    cosines = embedding_cosines(stack, QUERY, DOCUMENTS)
    ranked = sorted(range(len(DOCUMENTS)), key=lambda i: cosines[i], reverse=True)
    assert [r["index"] for r in body["results"]] == ranked and ranked[0] == 2  # the query's own text first
    for result in body["results"]:
        assert result["document"] == {"text": DOCUMENTS[result["index"]], "multi_modal": None}
        assert result["relevance_score"] == pytest.approx(cosines[result["index"]], abs=1e-9)
    assert body["usage"]["prompt_tokens"] == body["usage"]["total_tokens"] > 0


def test_top_n_keeps_the_best(stack: Stack) -> None:
    every = post(stack, "/v1/rerank", {"model": EMBED, "query": QUERY, "documents": DOCUMENTS}).json()["results"]
    for top_n, expected in ((1, 1), (3, 3), (0, 4), (10, 4)):
        body = {"model": EMBED, "query": QUERY, "documents": DOCUMENTS, "top_n": top_n}
        got = post(stack, "/v2/rerank", body).json()["results"]
        assert got == every[:expected], top_n


@pytest.mark.parametrize("path", ["/v1/score", "/score"])
def test_score_answers_each_pair_in_order(stack: Stack, path: str) -> None:
    one_to_many = post(stack, path, {"model": EMBED, "queries": QUERY, "documents": DOCUMENTS})
    assert one_to_many.status_code == 200, one_to_many.text
    body = one_to_many.json()
    assert body["object"] == "list" and body["model"] == EMBED and isinstance(body["created"], int)
    assert [(d["index"], d["object"]) for d in body["data"]] == [(i, "score") for i in range(len(DOCUMENTS))]
    cosines = embedding_cosines(stack, QUERY, DOCUMENTS)
    assert [d["score"] for d in body["data"]] == pytest.approx(cosines, abs=1e-9)
    assert body["usage"]["completion_tokens"] == 0 and body["usage"]["prompt_tokens"] > 0
    pairs = post(stack, path, {"model": EMBED, "text_1": ["a red apple", "b"], "text_2": ["a red apple", "c"]}).json()
    assert pairs["data"][0]["score"] == pytest.approx(1.0)  # N:N pairs each with its own


def test_a_model_that_cannot_score_is_a_400_and_nothing_is_queued(stack: Stack) -> None:
    for path, body in (
        ("/v1/rerank", {"model": CHAT, "query": QUERY, "documents": DOCUMENTS}),
        ("/v2/rerank", {"model": CHAT, "query": QUERY, "documents": DOCUMENTS}),
        ("/v1/score", {"model": CHAT, "queries": QUERY, "documents": DOCUMENTS}),
    ):
        response = post(stack, path, body)
        assert response.status_code == 400, (path, response.text)
        error = response.json()["error"]
        assert error["code"] == "unsupported_model_capability" and error["param"] == "model"
        assert error["type"] == "invalid_request_error" and CHAT in error["message"]


def test_an_invalid_request_is_refused_at_the_gateway(stack: Stack) -> None:
    response = post(stack, "/v1/rerank", {"model": EMBED, "query": QUERY, "documents": [], "top_n": 2})
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "documents"
    response = post(stack, "/score", {"model": EMBED, "text_1": ["a", "b"], "text_2": ["c", "d", "e"]})
    assert response.status_code == 400 and "1:1, 1:N or N:N" in response.json()["error"]["message"]


def test_a_batch_of_rerank_lines_answers_each_as_the_api_would(stack: Stack, tmp_path: Path) -> None:
    client = stack.gateway.client()
    inputs = [
        line(f"rr-{i}", "/v1/rerank", {"model": EMBED, "query": f"query {i}", "documents": DOCUMENTS, "top_n": 2})
        for i in range(5)
    ]
    inputs[3]["body"]["query"] = QUERY
    batch = client.batches.create(
        input_file_id=upload(client, tmp_path, inputs),
        endpoint="/v1/rerank",  # type: ignore[arg-type]  # the SDK's list of endpoints is OpenAI's
        completion_window="24h",
    )
    batch = wait_batch(client, batch.id, finished)
    assert batch.status == "completed", batch
    assert batch.request_counts is not None and (batch.request_counts.completed, batch.request_counts.failed) == (5, 0)
    output = {o["custom_id"]: o for o in jsonl(client, batch.output_file_id)}
    assert sorted(output) == sorted(x["custom_id"] for x in inputs)
    for item in inputs:
        answer = output[item["custom_id"]]["response"]
        assert answer["status_code"] == 200
        alone = post(stack, "/v1/rerank", item["body"]).json()
        assert answer["body"]["results"] == alone["results"] and answer["body"]["usage"] == alone["usage"]
        assert len(alone["results"]) == 2
    assert output["rr-3"]["response"]["body"]["results"][0]["index"] == 2
    assert batch.usage is not None and batch.usage.input_tokens == sum(
        o["response"]["body"]["usage"]["prompt_tokens"] for o in output.values()
    )
