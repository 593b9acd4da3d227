"""Rerank and score on the real engine: ``VLLMEngine`` in-process with the packaged MiniLM (issue 21, item 4).

No cross-encoder is packaged on PyPI, so these use vLLM's bi-encoder scoring of an embedding model: a pair's score
is the cosine similarity of the two texts' embeddings. The answers are vLLM's own (``ServingScores``), passed on
untouched; these check that they are what that definition says, computed from this engine's own embeddings.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
import pytest
import pytest_asyncio

from conveyor.contract import JobKind
from conveyor.errors import InvalidRequest
from tests.engine.test_vllm_engine import EMBED_MODEL, _run, _running
from worker import model_prep
from worker.engines.vllm_engine import VLLMEngine

pytestmark = [
    pytest.mark.engine,
    pytest.mark.filterwarnings(
        "ignore::DeprecationWarning",
        "ignore::FutureWarning",
        "ignore::UserWarning",
        "ignore::ResourceWarning",
        "ignore::pytest.PytestUnraisableExceptionWarning",
    ),
]

QUERY = "What is the capital of France?"
DOCUMENTS = [
    "Bananas are rich in potassium.",
    "Paris is the capital and largest city of France.",
    "The stock market fell sharply on Monday.",
    "France's capital city is Paris, on the Seine.",
]
RELEVANT = {1, 3}


async def cosines(engine: VLLMEngine, query: str, documents: list[str]) -> list[float]:
    """The cosine similarity of the query's embedding with each document's, from this engine's /v1/embeddings."""
    body = await _run(engine, JobKind.EMBEDDING, {"model": EMBED_MODEL, "input": [query, *documents]}, "emb-ref")
    vectors = np.array([d["embedding"] for d in body["data"]], dtype=np.float64)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return [float(vectors[0] @ v) for v in vectors[1:]]


@pytest.mark.asyncio(loop_scope="class")
class TestScoring:
    @pytest_asyncio.fixture(scope="class", loop_scope="class")
    async def engine(self) -> AsyncIterator[VLLMEngine]:
        async for engine in _running(EMBED_MODEL, model_prep.MINILM):
            yield engine

    async def test_minilm_advertises_score(self, engine: VLLMEngine) -> None:
        assert "score" in engine.capabilities and "embed" in engine.capabilities

    async def test_rerank_puts_the_relevant_documents_first_with_the_embeddings_cosine(
        self, engine: VLLMEngine
    ) -> None:
        body: dict[str, Any] = {"model": EMBED_MODEL, "query": QUERY, "documents": DOCUMENTS}
        got = await _run(engine, JobKind.RERANK, body, "rr-1")
        print(f"\nrerank: {json.dumps(got['results'])}")
        assert list(got) == ["id", "model", "usage", "results"] and got["id"] == "score-rr-1"
        assert got["model"] == EMBED_MODEL and got["usage"]["prompt_tokens"] == got["usage"]["total_tokens"] > 0
        order = [r["index"] for r in got["results"]]
        assert set(order[:2]) == RELEVANT, order  # both relevant documents above both irrelevant ones
        scores = [r["relevance_score"] for r in got["results"]]
        assert scores == sorted(scores, reverse=True)
        expected = await cosines(engine, QUERY, DOCUMENTS)
        for result in got["results"]:
            assert result["document"] == {"text": DOCUMENTS[result["index"]], "multi_modal": None}
            assert result["relevance_score"] == pytest.approx(expected[result["index"]], abs=1e-4)
        top = await _run(engine, JobKind.RERANK, body | {"top_n": 2}, "rr-2")
        assert [r["index"] for r in top["results"]] == order[:2]

    async def test_score_pairs_equal_the_cosine_of_their_embeddings(self, engine: VLLMEngine) -> None:
        body = {"model": EMBED_MODEL, "queries": QUERY, "documents": DOCUMENTS}
        got = await _run(engine, JobKind.SCORE, body, "sc-1")
        assert got["object"] == "list" and got["id"] == "score-sc-1"
        assert [(d["index"], d["object"]) for d in got["data"]] == [(i, "score") for i in range(len(DOCUMENTS))]
        expected = await cosines(engine, QUERY, DOCUMENTS)
        print(f"\nscore: {[round(d['score'], 6) for d in got['data']]}\ncosine: {[round(x, 6) for x in expected]}")
        assert [d["score"] for d in got["data"]] == pytest.approx(expected, abs=1e-4)
        pairs = {"model": EMBED_MODEL, "text_1": [QUERY, DOCUMENTS[0]], "text_2": [DOCUMENTS[1], DOCUMENTS[0]]}
        n_to_n = await _run(engine, JobKind.SCORE, pairs, "sc-2")
        assert n_to_n["data"][0]["score"] == pytest.approx(expected[1], abs=1e-4)
        assert n_to_n["data"][1]["score"] == pytest.approx(1.0, abs=1e-4)  # a text with itself

    async def test_a_document_past_the_context_is_the_clients_error(self, engine: VLLMEngine) -> None:
        too_long = "word " * 2 * (engine.max_model_len or 512)
        with pytest.raises(InvalidRequest):
            await engine.run(JobKind.RERANK, {"model": EMBED_MODEL, "query": QUERY, "documents": [too_long]}, "long")
