"""Score and rerank on an embedding model (vLLM's bi-encoder scoring) as an embedding of their texts: each pair's
score is the cosine similarity of its two texts' embeddings, which is what vLLM's ``ServingScores`` computes for such
a model. Answering them from embeddings lets concurrent score, rerank and embedding jobs with the same parameters share
one engine call (``worker.embed_batcher``); the answers take vLLM's shapes (``answer``), which the fake engine uses too.

Only plain requests go this way (``texts``): text inputs, no scoring option that changes what the engine computes
(truncation, instructions, templates, activation). Anything else runs alone through the engine's own scoring.
"""

from __future__ import annotations

import math
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any

import orjson

from conveyor.contract import JobKind
from conveyor.errors import ConveyorError
from conveyor.protocol import SCORE_PAIRS, SCORED_FIELDS

if TYPE_CHECKING:
    from worker.engines.base import Engine

#: the fields a score or rerank request may carry and still be answered from its texts' embeddings
PLAIN_FIELDS = frozenset({"model", "priority", "top_n", *SCORED_FIELDS})


def sides(kind: JobKind, body: dict[str, Any]) -> tuple[list[Any], list[Any]]:
    """The two sides of a score or rerank request (the first one text, or one per pair), as lists."""
    if kind is JobKind.RERANK:
        first, second = body["query"], body["documents"]
    else:
        names = next(pair for pair in SCORE_PAIRS if all(name in body for name in pair))
        first, second = body[names[0]], body[names[1]]
    return (first if isinstance(first, list) else [first]), (second if isinstance(second, list) else [second])


def texts(kind: JobKind, body: dict[str, Any]) -> list[str] | None:
    """Every text of a plain score or rerank request, first side then second; None when it must run alone."""
    if not PLAIN_FIELDS.issuperset(body):
        return None
    try:
        first, second = sides(kind, body)
    except (KeyError, StopIteration):
        return None
    items = [*first, *second]
    return items if all(isinstance(item, str) for item in items) else None


def cosine(a: Sequence[float], b: Sequence[float]) -> float:
    norm = math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b))
    return sum(x * y for x, y in zip(a, b, strict=True)) / max(norm, 1e-8)  # torch's cosine_similarity eps


def pair_scores(firsts: Sequence[Any], seconds: Sequence[Any], score: Callable[[Any, Any], float]) -> list[float]:
    """vLLM's pairing: one first against every second, or the i-th first with the i-th second."""
    return [score(firsts[0 if len(firsts) == 1 else i], second) for i, second in enumerate(seconds)]


def answer(
    kind: JobKind, body: dict[str, Any], request_id: str, model: str, scores: list[float], tokens: int
) -> dict[str, Any]:
    """vLLM's score or rerank response (``ScoreResponse``, ``RerankResponse``): ids ``score-<request id>``, every
    text counted once in the usage."""
    rid = f"score-{request_id}"
    if kind is JobKind.SCORE:
        return {
            "id": rid,
            "object": "list",
            "created": int(time.time()),
            "model": model,
            "data": [{"index": i, "object": "score", "score": score} for i, score in enumerate(scores)],
            "usage": {
                "prompt_tokens": tokens,
                "total_tokens": tokens,
                "completion_tokens": 0,
                "prompt_tokens_details": None,
                "completion_tokens_details": None,
            },
        }
    documents = sides(kind, body)[1]
    ranked = sorted(enumerate(scores), key=lambda item: item[1], reverse=True)
    results = [{"index": i, "document": _document(documents[i]), "relevance_score": score} for i, score in ranked]
    top_n = int(body.get("top_n") or 0) or len(results)
    return {
        "id": rid,
        "model": model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        "results": results[:top_n],
    }


def from_embeddings(kind: JobKind, body: dict[str, Any], request_id: str, embedded: dict[str, Any]) -> dict[str, Any]:
    """The answer to a plain score or rerank request from the embedding answer for its ``texts``."""
    queries = len(sides(kind, body)[0])
    vectors = [item["embedding"] for item in embedded["data"]]
    scores = pair_scores(vectors[:queries], vectors[queries:], cosine)
    return answer(kind, body, request_id, embedded["model"], scores, int(embedded["usage"]["prompt_tokens"]))


async def score(
    engine: Engine,
    kind: JobKind,
    body: dict[str, Any],
    request_id: str,
    embed: Callable[[dict[str, Any], str], Awaitable[bytes | dict[str, Any]]],
) -> bytes | dict[str, Any]:
    """The answer to a score or rerank request: on an engine that scores with its embeddings, a plain one from
    ``embed`` of its texts; anything else, and any refusal, from the engine's own scoring (its error, not the
    embedding's)."""
    items = texts(kind, body) if engine.scores_by_embedding() else None
    if items is None:
        return await engine.run(kind, body, request_id)
    embedding = {"model": body["model"], "input": items} | (
        {"priority": body["priority"]} if "priority" in body else {}
    )
    try:
        embedded = await embed(embedding, request_id)
    except ConveyorError:
        return await engine.run(kind, body, request_id)
    return from_embeddings(kind, body, request_id, orjson.loads(embedded) if isinstance(embedded, bytes) else embedded)


def _document(item: Any) -> dict[str, Any]:
    """vLLM's ``RerankDocument``: the text, or the multimodal content's parts."""
    if isinstance(item, str):
        return {"text": item, "multi_modal": None}
    return {"text": None, "multi_modal": item.get("content", [])}
