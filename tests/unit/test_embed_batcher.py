"""The worker's merging of concurrent embedding requests into engine calls (fake engine, no Redis)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from conveyor.contract import JobKind
from worker.embed_batcher import EmbeddingBatcher
from worker.engines.fake import FakeEngine


class Recording(FakeEngine):
    """A fake embedding engine that records the requests of each ``embed_many`` call, and can hold calls."""

    def __init__(self) -> None:
        super().__init__("m", embed=True)
        self.calls: list[list[str]] = []
        self.gate: asyncio.Event | None = None
        self.called = asyncio.Event()

    async def embed_many(
        self, bodies: list[dict[str, Any]], request_ids: list[str]
    ) -> list[dict[str, Any] | bytes | Exception]:
        self.calls.append(list(request_ids))
        self.called.set()
        if self.gate is not None:
            await self.gate.wait()
        return await super().embed_many(bodies, request_ids)


def _body(text: Any, **params: Any) -> dict[str, Any]:
    return {"model": "m", "input": text, **params}


async def test_requests_arriving_together_share_one_call_and_get_what_each_gets_alone() -> None:
    engine = Recording()
    batcher = EmbeddingBatcher(engine, "m")
    inputs: list[Any] = ["one two", ["three", "four five six"], "seven"]
    answers = await asyncio.gather(*(batcher.embed(_body(x), f"r{i}") for i, x in enumerate(inputs)))
    assert engine.calls == [["r0", "r1", "r2"]]
    alone = FakeEngine("m", embed=True)
    for text, answer in zip(inputs, answers, strict=True):
        expected = await alone.run(JobKind.EMBEDDING, _body(text), "x")
        assert isinstance(answer, dict)
        assert answer["data"] == expected["data"] and answer["usage"] == expected["usage"]


async def test_a_request_alone_runs_alone_without_waiting_for_company() -> None:
    engine = Recording()
    batcher = EmbeddingBatcher(engine, "m")  # default: no wait beyond the current turn of the event loop
    async with asyncio.timeout(5):
        await batcher.embed(_body("solo"), "solo")
    assert engine.calls == [["solo"]]


async def test_requests_with_other_parameters_or_token_inputs_do_not_share_a_call() -> None:
    engine = Recording()
    batcher = EmbeddingBatcher(engine, "m")
    await asyncio.gather(
        batcher.embed(_body("a"), "a"),
        batcher.embed(_body("b", dimensions=8), "b"),
        batcher.embed(_body("c"), "c"),
        batcher.embed(_body([1, 2, 3]), "tokens"),  # token ids run alone, through run()
    )
    assert sorted(engine.calls) == [["a", "c"], ["b"]]


async def test_an_extra_field_orjson_cannot_write_still_groups_and_is_answered() -> None:
    engine = Recording()
    batcher = EmbeddingBatcher(engine, "m")
    huge = {"extra": -(2**70)}  # an integer past 64 bits: the grouping key failed on it, the job with it
    answers = await asyncio.gather(batcher.embed(_body("a", **huge), "a"), batcher.embed(_body("b", **huge), "b"))
    assert engine.calls == [["a", "b"]]
    assert all(isinstance(answer, dict) and answer["data"] for answer in answers)


async def test_a_group_runs_when_it_holds_max_inputs() -> None:
    engine = Recording()
    batcher = EmbeddingBatcher(engine, "m", max_inputs=3)
    await asyncio.gather(*(batcher.embed(_body(["x", "y"] if i == 1 else "x"), f"r{i}") for i in range(5)))
    assert engine.calls == [["r0", "r1"], ["r2", "r3", "r4"]]  # 1 + 2 inputs fill the first


async def test_with_a_wait_requests_of_later_loop_turns_join_the_group() -> None:
    engine = Recording()
    batcher = EmbeddingBatcher(engine, "m", wait=0.05)
    first = asyncio.create_task(batcher.embed(_body("a"), "a"))
    await asyncio.sleep(0)  # a later turn of the loop, well inside the wait
    second = asyncio.create_task(batcher.embed(_body("b"), "b"))
    await asyncio.gather(first, second)
    assert engine.calls == [["a", "b"]]


async def test_without_a_wait_a_later_loop_turn_starts_a_new_group() -> None:
    engine = Recording()
    engine.gate = asyncio.Event()
    batcher = EmbeddingBatcher(engine, "m")
    first = asyncio.create_task(batcher.embed(_body("a"), "a"))
    await engine.called.wait()  # the first group has gone to the engine
    engine.called.clear()
    second = asyncio.create_task(batcher.embed(_body("b"), "b"))
    await engine.called.wait()
    engine.gate.set()
    await asyncio.gather(first, second)
    assert engine.calls == [["a"], ["b"]]


async def test_a_request_cancelled_while_its_group_waits_leaves_the_group() -> None:
    engine = Recording()
    batcher = EmbeddingBatcher(engine, "m", wait=0.05)
    leaving = asyncio.create_task(batcher.embed(_body("a"), "leaving"))
    staying = asyncio.create_task(batcher.embed(_body("b"), "staying"))
    await asyncio.sleep(0)
    leaving.cancel()
    answer = await staying
    assert isinstance(answer, dict) and len(answer["data"]) == 1
    assert engine.calls == [["staying"]]
    with pytest.raises(asyncio.CancelledError):
        await leaving


async def test_an_engine_failure_under_the_call_reaches_every_request() -> None:
    engine = Recording()
    batcher = EmbeddingBatcher(engine, "m")

    async def dead(*_: Any) -> Any:
        raise RuntimeError("engine died")

    engine.embed_many = dead  # type: ignore[method-assign]
    results = await asyncio.gather(*(batcher.embed(_body(t), t) for t in "ab"), return_exceptions=True)
    assert all(isinstance(r, RuntimeError) for r in results)


async def test_a_refused_request_gets_its_own_error_and_the_rest_their_answers() -> None:
    engine = Recording()
    batcher = EmbeddingBatcher(engine, "m")
    too_long = " ".join(["w"] * 10_000)  # past the fake's context length
    results = await asyncio.gather(
        *(batcher.embed(_body(t), t[:5]) for t in ("fine", too_long, "also fine")), return_exceptions=True
    )
    assert isinstance(results[0], dict) and isinstance(results[2], dict)
    assert isinstance(results[1], Exception) and "context length" in str(results[1])


def _split(answer: Any) -> tuple[list[float], str]:
    """A score or rerank answer's scores, and the rest of it (its creation second left out) as JSON."""
    assert isinstance(answer, dict)
    rows = answer.get("data") or answer["results"]
    scores = [row.pop("score" if "score" in row else "relevance_score") for row in rows]
    return scores, json.dumps({k: v for k, v in answer.items() if k != "created"}, sort_keys=True)


async def test_plain_score_and_rerank_jobs_share_an_embedding_call_and_answer_as_the_engines_scoring() -> None:
    engine = Recording()
    batcher = EmbeddingBatcher(engine, "m")
    rerank = {"model": "m", "query": "capital of France", "documents": ["Paris is", "bread", "the Seine"], "top_n": 2}
    score = {"model": "m", "text_1": ["a cat", "a dog"], "text_2": ["a kitten", "a puppy"]}
    one_to_many = {"model": "m", "queries": "fruit", "documents": ["apple", "stone"]}
    jobs = [(JobKind.RERANK, rerank), (JobKind.SCORE, score), (JobKind.SCORE, one_to_many)]
    answers = await asyncio.gather(
        batcher.embed(_body("an embedding"), "e"),
        *(batcher.score(kind, body, f"s{i}") for i, (kind, body) in enumerate(jobs)),
    )
    assert engine.calls == [["e", "s0", "s1", "s2"]]  # one engine call for all four
    for i, ((kind, body), answer) in enumerate(zip(jobs, answers[1:], strict=True)):
        alone = await FakeEngine("m", embed=True).run(kind, body, f"s{i}")  # the engine's own scoring
        (scores, rest), (alone_scores, alone_rest) = _split(answer), _split(alone)
        assert scores == pytest.approx(alone_scores, abs=1e-12) and rest == alone_rest, kind


async def test_score_jobs_with_options_or_refused_texts_get_the_engines_own_scoring() -> None:
    engine = Recording()
    batcher = EmbeddingBatcher(engine, "m")
    truncated = {"model": "m", "query": "q", "documents": ["d"], "truncate_prompt_tokens": 3}
    await batcher.score(JobKind.RERANK, truncated, "opt")  # an option vLLM's scoring applies: not an embedding
    multimodal = {"model": "m", "query": "q", "documents": [{"content": [{"type": "text", "text": "d"}]}]}
    await batcher.score(JobKind.RERANK, multimodal, "mm")
    assert engine.calls == []
    # the embedding of a text past the context is refused; the scoring decides for itself (the fake's answers)
    too_long = {"model": "m", "query": "q", "documents": ["word " * 5000]}
    answer = await batcher.score(JobKind.RERANK, too_long, "long")
    assert engine.calls == [["long"]]
    alone = await FakeEngine("m", embed=True).run(JobKind.RERANK, too_long, "long")
    assert _split(answer) == _split(alone)
