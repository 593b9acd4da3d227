"""The real engine on the CPU: ``VLLMEngine`` in-process with the packaged offline models, against vLLM's own server.

One engine per model, held by a class-scoped fixture, so the two engines are never loaded at the same time. These
check the adapter's own contract (errors, cancellation); test_serving.py checks the whole system through the SDK.
Slow: every engine start takes ~20-70 s.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import pytest_asyncio

from conveyor.contract import JobKind
from conveyor.errors import InvalidRequest, ModelNotFound
from worker import model_prep
from worker.embed_batcher import EmbeddingBatcher
from worker.engines.base import Piece, Resume
from worker.engines.vllm_engine import VLLMEngine
from worker.migration import continued_body
from worker.settings import WorkerSettings

pytestmark = [
    pytest.mark.engine,
    # vLLM, torch and transformers warn at import and load time about things that are not ours to fix
    pytest.mark.filterwarnings(
        "ignore::DeprecationWarning",
        "ignore::FutureWarning",
        "ignore::UserWarning",
        "ignore::ResourceWarning",
        "ignore::pytest.PytestUnraisableExceptionWarning",
    ),
]

CHAT_MODEL = "smollm2"
EMBED_MODEL = "minilm"
THREADS = "0-1"  # both cores, for the in-process engine and vLLM's server alike
PARIS = [{"role": "user", "content": "What is the capital of France?"}]


async def _running(model: str, weights: str, **engine_args: Any) -> AsyncIterator[VLLMEngine]:
    engine = VLLMEngine(
        WorkerSettings(model=model, model_path=weights, cpu_threads_bind=THREADS, engine_args=engine_args)
    )
    await engine.start()
    print(f"\n{model}: engine started in {engine.start_seconds:.1f} s")
    yield engine
    await engine.stop()


async def _until(condition: Callable[[], bool]) -> None:
    """Poll the engine's own state until ``condition`` holds, for 30 s at most (vLLM offers no event for it)."""
    async with asyncio.timeout(30):
        while not condition():  # noqa: ASYNC110
            await asyncio.sleep(0.05)


async def _run(engine: VLLMEngine, kind: JobKind, body: dict[str, Any], request_id: str) -> dict[str, Any]:
    """The engine's answer (JSON text, as it crosses Redis) parsed."""
    parsed: dict[str, Any] = json.loads(await engine.run(kind, body, request_id))
    return parsed


def _text(body: dict[str, Any]) -> str:
    choice = body["choices"][0]
    return str(choice["message"]["content"] if "message" in choice else choice["text"])


def _parsed(pieces: list[Piece]) -> list[dict[str, Any]]:
    return [json.loads(p.chunk) if isinstance(p.chunk, str) else p.chunk for p in pieces]


def _joined(chunks: list[dict[str, Any]]) -> str:
    parts = []
    for chunk in chunks:
        for choice in chunk["choices"]:
            parts.append((choice.get("delta") or {}).get("content") or choice.get("text") or "")
    return "".join(parts)


@pytest.mark.asyncio(loop_scope="class")
class TestGenerate:
    @pytest_asyncio.fixture(scope="class", loop_scope="class")
    async def engine(self) -> AsyncIterator[VLLMEngine]:
        async for engine in _running(CHAT_MODEL, model_prep.SMOLLM2):
            yield engine

    async def test_capital_of_france(self, engine: VLLMEngine) -> None:
        assert engine.capabilities == frozenset({"generate"})
        assert engine.concurrency >= 1
        assert (engine.max_model_len or 0) >= 2048
        request = {"model": CHAT_MODEL, "messages": PARIS, "temperature": 0, "max_tokens": 30}
        body = await _run(engine, JobKind.CHAT, request, "paris-1")
        assert body["object"] == "chat.completion"
        assert body["model"] == CHAT_MODEL
        assert "paris-1" in body["id"]
        assert "Paris" in _text(body)
        assert body["choices"][0]["finish_reason"] == "stop"
        assert body["usage"]["completion_tokens"] > 0

    async def test_a_requests_priority_is_dropped_for_an_engine_without_priority_scheduling(
        self, engine: VLLMEngine
    ) -> None:
        # it ordered the request's place in Conveyor's queue; vLLM itself refuses a non-zero one under fcfs
        assert not engine.schedules_by_priority()
        request = {"model": CHAT_MODEL, "messages": PARIS, "temperature": 0, "max_tokens": 5, "priority": 7}
        assert engine._request(JobKind.CHAT, request, "prioritised", stream=True).priority == 0
        body = await _run(engine, JobKind.CHAT, request, "prioritised")
        assert body["usage"]["completion_tokens"] > 0

    @pytest.mark.parametrize("kind", [JobKind.CHAT, JobKind.COMPLETION])
    async def test_streamed_deltas_join_to_the_full_text(self, engine: VLLMEngine, kind: JobKind) -> None:
        body: dict[str, Any] = {"model": CHAT_MODEL, "temperature": 0, "max_tokens": 24}
        body |= (
            {"messages": [{"role": "user", "content": "Name three colours."}]}
            if kind is JobKind.CHAT
            else {"prompt": "A queue is a data structure that"}
        )
        full = await _run(engine, kind, body, f"full-{kind}")
        chunks = _parsed(
            [
                p
                async for p in engine.stream(
                    kind, {**body, "stream_options": {"include_usage": True}}, f"stream-{kind}"
                )
            ]
        )
        assert len(chunks) > 3
        assert not any("token_ids" in c or "prompt_token_ids" in c for c in chunks)  # asked for us, not passed on
        assert chunks[0]["object"] == ("chat.completion.chunk" if kind is JobKind.CHAT else "text_completion")
        assert _joined(chunks) == _text(full)
        finishes = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
        assert finishes[-1] == full["choices"][0]["finish_reason"]
        assert chunks[-1]["choices"] == []
        assert chunks[-1]["usage"] == {
            k: full["usage"][k] for k in ("prompt_tokens", "completion_tokens", "total_tokens")
        }

    @pytest.mark.parametrize("kind", [JobKind.CHAT, JobKind.COMPLETION])
    @pytest.mark.parametrize("asked_ids", [False, True], ids=["", "token-ids-asked"])
    async def test_a_stream_continued_from_its_tokens_equals_the_uninterrupted_one(
        self, engine: VLLMEngine, kind: JobKind, asked_ids: bool
    ) -> None:
        """Request migration on the real engine: cut after a few chunks, then continued from the prompt's token ids
        plus the tokens sent (``max_tokens`` reduced by them), greedy decoding gives the same text token for token,
        the same chunk shape and id, and usage counting each token once; token ids the client asked for come on every
        chunk of text, continued or not."""
        body: dict[str, Any] = {"model": CHAT_MODEL, "temperature": 0, "max_tokens": 40, "ignore_eos": True}
        body |= {"messages": PARIS} if kind is JobKind.CHAT else {"prompt": "The three primary colours are"}
        body |= {"stream_options": {"include_usage": True}} | ({"return_token_ids": True} if asked_ids else {})
        assert engine.unresumable(kind, body) is None
        whole = [p async for p in engine.stream(kind, body, f"whole-{kind}")]
        head: list[Any] = []
        async for piece in engine.stream(kind, body, f"cut-{kind}"):
            head.append(piece)
            if len(head) == 8:
                break  # the worker was lost here
        sent = tuple(i for piece in head for i in piece.token_ids or ())
        prompt = next(p.prompt_token_ids for p in head if p.prompt_token_ids)
        assert sent and prompt
        resume = Resume(sent, prompt)
        rest = [p async for p in engine.stream(kind, continued_body(body, len(sent)), f"cut-{kind}", resume)]
        cut, uncut = _parsed(head + rest), _parsed(whole)
        assert _joined(cut) == _joined(uncut)
        assert tuple(i for p in head + rest for i in p.token_ids or ()) == tuple(
            i for p in whole for i in p.token_ids or ()
        )
        assert cut[-1]["usage"] == uncut[-1]["usage"]
        assert {c["object"] for c in cut} == {uncut[0]["object"]}
        assert {c["id"] for c in cut} == {uncut[0]["id"].replace("whole-", "cut-")}
        assert [c["choices"][0]["finish_reason"] for c in cut if c["choices"]][-1] == "length"
        assert engine.unresumable(JobKind.CHAT, body | {"n": 2}) and engine.unresumable(kind, body | {"logprobs": 2})
        texts = [c["choices"][0] for c in cut if c["choices"] and _joined([c])]
        assert all(bool(choice.get("token_ids")) == asked_ids for choice in texts)

    @pytest.mark.parametrize("kind", [JobKind.CHAT, JobKind.COMPLETION])
    @pytest.mark.parametrize("where", ["mid-way", "after-the-finish"])
    async def test_a_continuation_without_max_tokens_keeps_the_original_default_and_sends_one_finish(
        self, engine: VLLMEngine, kind: JobKind, where: str
    ) -> None:
        """No token limit: the continuation keeps the original's default (the rest of the context for a chat, 16 in
        all for a completion), not the default of a completion of the sent tokens. Cut after the finish chunk, only
        the usage is left to send."""
        body: dict[str, Any] = {"model": CHAT_MODEL, "temperature": 0, "stream_options": {"include_usage": True}}
        body |= {"messages": PARIS} if kind is JobKind.CHAT else {"prompt": "The three primary colours are"}
        whole = [p async for p in engine.stream(kind, body, f"nolimit-{kind}")]
        finish = next(i for i, p in enumerate(whole) if p.finished)
        cut_at = 3 if where == "mid-way" else finish + 1
        head = whole[:cut_at]
        sent = tuple(i for piece in head for i in piece.token_ids or ())
        prompt = next(p.prompt_token_ids for p in head if p.prompt_token_ids)
        resume = Resume(sent, prompt, finished=where != "mid-way")
        rest = [p async for p in engine.stream(kind, continued_body(body, len(sent)), f"nolimit-{kind}", resume)]
        cut, uncut = _parsed(head + rest), _parsed(whole)
        assert _joined(cut) == _joined(uncut)
        assert [c["choices"][0]["finish_reason"] for c in cut if c["choices"] and c["choices"][0]["finish_reason"]] == [
            uncut[finish]["choices"][0]["finish_reason"]
        ]
        assert cut[-1]["usage"] == uncut[-1]["usage"]
        assert all({"id", "object", "created", "model"} <= set(c) for c in cut)

    @pytest.mark.parametrize("kind", [JobKind.CHAT, JobKind.COMPLETION])
    @pytest.mark.parametrize("extra", [{}, {"stop": [","]}, {"return_token_ids": True}], ids=["plain", "stop", "ids"])
    async def test_an_answer_built_from_the_stream_equals_the_non_streamed_one(
        self, engine: VLLMEngine, kind: JobKind, extra: dict[str, Any]
    ) -> None:
        """A non-streamed generation runs as a stream (so another worker can continue it); the answer built from its
        chunks is vLLM's own non-streamed response, field for field (but its id and creation second)."""
        body: dict[str, Any] = {"model": CHAT_MODEL, "temperature": 0, "max_tokens": 24, **extra}
        body |= {"messages": PARIS} if kind is JobKind.CHAT else {"prompt": "A queue is a data structure that"}
        direct = await _run(engine, kind, body, f"direct-{kind}")
        streamed = [p async for p in engine.stream(kind, body | {"stream_options": {"include_usage": True}}, "s")]
        built = json.loads(engine.answer(kind, _parsed(streamed)))
        for answer in (direct, built):
            answer.pop("id"), answer.pop("created")
        assert built == direct

    async def test_json_schema_response_format(self, engine: VLLMEngine) -> None:
        schema = {
            "type": "object",
            "properties": {"city": {"type": "string"}, "country": {"type": "string"}},
            "required": ["city", "country"],
            "additionalProperties": False,
        }
        body = await _run(
            engine,
            JobKind.CHAT,
            {
                "model": CHAT_MODEL,
                "temperature": 0,
                "max_tokens": 60,
                "messages": PARIS,
                "response_format": {"type": "json_schema", "json_schema": {"name": "place", "schema": schema}},
            },
            "json-1",
        )
        parsed = json.loads(_text(body))
        assert set(parsed) == {"city", "country"}
        assert all(isinstance(v, str) for v in parsed.values())

    async def test_invalid_sampling_parameter_is_a_400(self, engine: VLLMEngine) -> None:
        with pytest.raises(InvalidRequest) as caught:
            await engine.run(JobKind.CHAT, {"model": CHAT_MODEL, "messages": PARIS, "temperature": -1}, "bad-1")
        assert caught.value.status == 400
        assert caught.value.param == "temperature"
        with pytest.raises(InvalidRequest):
            await engine.run(JobKind.CHAT, {"model": CHAT_MODEL, "messages": "not a list"}, "bad-2")
        with pytest.raises(InvalidRequest):
            await engine.run(JobKind.EMBEDDING, {"model": CHAT_MODEL, "input": "x"}, "bad-3")
        with pytest.raises(InvalidRequest):  # a streamed request fails before its first chunk
            _ = [
                c
                async for c in engine.stream(
                    JobKind.CHAT, {"model": CHAT_MODEL, "messages": PARIS, "max_tokens": -5}, "bad-4"
                )
            ]
        with pytest.raises(ModelNotFound):
            await engine.run(JobKind.CHAT, {"model": "no-such-model", "messages": PARIS}, "bad-5")

    async def test_cancelling_a_stream_aborts_the_request(self, engine: VLLMEngine) -> None:
        first = asyncio.Event()
        received = 0

        async def consume() -> None:
            nonlocal received
            body = {"model": CHAT_MODEL, "messages": PARIS, "max_tokens": 2000, "ignore_eos": True}
            async for _ in engine.stream(JobKind.CHAT, body, "cancel-1"):
                received += 1
                first.set()

        task = asyncio.create_task(consume())
        await asyncio.wait_for(first.wait(), 60)
        assert engine.running_requests() == 1
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await _until(lambda: engine.running_requests() == 0)
        assert received < 500  # it stopped long before 2000 tokens

    async def test_cancelling_a_non_streamed_request_aborts_it(self, engine: VLLMEngine) -> None:
        body = {"model": CHAT_MODEL, "messages": PARIS, "max_tokens": 2000, "ignore_eos": True}
        task = asyncio.create_task(engine.run(JobKind.CHAT, body, "cancel-2"))
        await _until(lambda: engine.running_requests() == 1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await _until(lambda: engine.running_requests() == 0)


def _count_merged_passes(engine: VLLMEngine) -> list[int]:
    """The sizes of the merged pipeline passes that succeed on ``engine`` from now on."""
    passes: list[int] = []
    merged_pass = engine._embed_merged

    async def counting(requests: list[Any]) -> list[bytes]:
        answers = await merged_pass(requests)
        passes.append(len(requests))
        return answers

    engine._embed_merged = counting  # type: ignore[method-assign]
    return passes


#: rerank and score on MiniLM: vLLM scores with an embedding model as a bi-encoder (no cross-encoder is packaged on
#: PyPI): a pair's score is the cosine similarity of the two texts' embeddings
FRANCE = "What is the capital of France?"
DOCUMENTS = [
    "Bananas are rich in potassium.",
    "Paris is the capital and largest city of France.",
    "The stock market fell sharply on Monday.",
    "France's capital city is Paris, on the Seine.",
]
RELEVANT = {1, 3}


async def _cosines(engine: VLLMEngine, query: str, documents: list[str]) -> list[float]:
    """The cosine similarity of the query's embedding with each document's, from this engine's /v1/embeddings."""
    import numpy as np

    body = await _run(engine, JobKind.EMBEDDING, {"model": EMBED_MODEL, "input": [query, *documents]}, "emb-ref")
    vectors = np.array([d["embedding"] for d in body["data"]], dtype=np.float64)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return [float(vectors[0] @ v) for v in vectors[1:]]


@pytest.mark.asyncio(loop_scope="class")
class TestEmbed:
    @pytest_asyncio.fixture(scope="class", loop_scope="class")
    async def engine(self) -> AsyncIterator[VLLMEngine]:
        async for engine in _running(EMBED_MODEL, model_prep.MINILM):
            yield engine

    async def test_embeddings_match_sentence_transformers(self, engine: VLLMEngine) -> None:
        import numpy as np
        from sentence_transformers import SentenceTransformer

        assert engine.capabilities == frozenset({"embed", "score"})  # vLLM scores with every embedding model
        texts = ["The capital of France is Paris.", "Queues decouple producers from consumers.", "hello"]
        body = await _run(engine, JobKind.EMBEDDING, {"model": EMBED_MODEL, "input": texts}, "embed-1")
        assert body["object"] == "list"
        assert [d["index"] for d in body["data"]] == [0, 1, 2]
        assert body["usage"]["prompt_tokens"] > 0
        got = np.array([d["embedding"] for d in body["data"]], dtype=np.float64)
        assert got.shape == (3, 384)
        reference = SentenceTransformer(str(model_prep.minilm_path()), device="cpu").encode(texts)
        cosine = (got * reference).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(reference, axis=1))
        assert cosine.min() > 0.999, cosine

    async def test_merged_requests_get_what_each_gets_alone(self, engine: VLLMEngine) -> None:
        """One pass through vLLM's embedding pipeline for many requests: per request its own id, indices, usage
        and vectors (equal to a run alone up to float rounding: the engine batches differently), in vLLM's shape."""
        import numpy as np

        inputs: list[Any] = [
            "hello",
            ["The capital of France is Paris.", "Queues decouple producers from consumers."],
            "Queues decouple producers from consumers. " * 12,
        ]
        bodies = [{"model": EMBED_MODEL, "input": x, "encoding_format": "float"} for x in inputs]
        ids = [f"merge-{i}" for i in range(len(bodies))]
        passes = _count_merged_passes(engine)
        merged = await engine.embed_many(bodies, ids)
        assert passes == [3]  # one pass for all three, not each alone
        for body, rid, answer in zip(bodies, ids, merged, strict=True):
            assert isinstance(answer, bytes), answer
            got = json.loads(answer)
            alone = await _run(engine, JobKind.EMBEDDING, body, rid)
            assert got["id"] == alone["id"] == f"embd-{rid}"
            assert got["usage"] == alone["usage"]
            assert list(got) == list(alone)  # the same fields in the same order
            assert [d["index"] for d in got["data"]] == [d["index"] for d in alone["data"]]
            vectors = [np.array([d["embedding"] for d in answer["data"]]) for answer in (got, alone)]
            np.testing.assert_allclose(vectors[0], vectors[1], rtol=0, atol=1e-5)

    async def test_a_request_refused_in_a_merged_call_gets_its_own_error(self, engine: VLLMEngine) -> None:
        too_long = "word " * 2 * (engine.max_model_len or 512)
        bodies = [{"model": EMBED_MODEL, "input": x} for x in ("first", too_long, "third")]
        passes = _count_merged_passes(engine)
        first, refused, third = await engine.embed_many(bodies, ["ok-1", "too-long", "ok-3"])
        assert passes == []  # the merged pass was refused as a whole: each ran alone
        assert isinstance(refused, InvalidRequest) and "token" in refused.message.lower(), refused
        for answer, rid in ((first, "ok-1"), (third, "ok-3")):
            assert isinstance(answer, bytes) and json.loads(answer)["id"] == f"embd-{rid}"

    async def test_generation_on_an_embedding_model_is_refused(self, engine: VLLMEngine) -> None:
        with pytest.raises(InvalidRequest):
            await engine.run(JobKind.CHAT, {"model": EMBED_MODEL, "messages": PARIS}, "chat-on-embed")

    async def test_rerank_puts_the_relevant_documents_first_with_the_embeddings_cosine(
        self, engine: VLLMEngine
    ) -> None:
        body: dict[str, Any] = {"model": EMBED_MODEL, "query": FRANCE, "documents": DOCUMENTS}
        got = await _run(engine, JobKind.RERANK, body, "rr-1")
        print(f"\nrerank: {json.dumps(got['results'])}")
        assert list(got) == ["id", "model", "usage", "results"] and got["id"] == "score-rr-1"
        assert got["model"] == EMBED_MODEL and got["usage"]["prompt_tokens"] == got["usage"]["total_tokens"] > 0
        order = [r["index"] for r in got["results"]]
        assert set(order[:2]) == RELEVANT, order  # both relevant documents above both irrelevant ones
        scores = [r["relevance_score"] for r in got["results"]]
        assert scores == sorted(scores, reverse=True)
        expected = await _cosines(engine, FRANCE, DOCUMENTS)
        for result in got["results"]:
            assert result["document"] == {"text": DOCUMENTS[result["index"]], "multi_modal": None}
            assert result["relevance_score"] == pytest.approx(expected[result["index"]], abs=1e-4)
        top = await _run(engine, JobKind.RERANK, body | {"top_n": 2}, "rr-2")
        assert [r["index"] for r in top["results"]] == order[:2]

    async def test_score_pairs_equal_the_cosine_of_their_embeddings(self, engine: VLLMEngine) -> None:
        body = {"model": EMBED_MODEL, "queries": FRANCE, "documents": DOCUMENTS}
        got = await _run(engine, JobKind.SCORE, body, "sc-1")
        assert got["object"] == "list" and got["id"] == "score-sc-1"
        assert [(d["index"], d["object"]) for d in got["data"]] == [(i, "score") for i in range(len(DOCUMENTS))]
        expected = await _cosines(engine, FRANCE, DOCUMENTS)
        print(f"\nscore: {[round(d['score'], 6) for d in got['data']]}\ncosine: {[round(x, 6) for x in expected]}")
        assert [d["score"] for d in got["data"]] == pytest.approx(expected, abs=1e-4)
        pairs = {"model": EMBED_MODEL, "text_1": [FRANCE, DOCUMENTS[0]], "text_2": [DOCUMENTS[1], DOCUMENTS[0]]}
        n_to_n = await _run(engine, JobKind.SCORE, pairs, "sc-2")
        assert n_to_n["data"][0]["score"] == pytest.approx(expected[1], abs=1e-4)
        assert n_to_n["data"][1]["score"] == pytest.approx(1.0, abs=1e-4)  # a text with itself

    async def test_a_document_past_the_context_is_the_clients_error(self, engine: VLLMEngine) -> None:
        too_long = "word " * 2 * (engine.max_model_len or 512)
        with pytest.raises(InvalidRequest):
            await engine.run(JobKind.RERANK, {"model": EMBED_MODEL, "query": FRANCE, "documents": [too_long]}, "long")

    async def test_score_and_rerank_jobs_arriving_together_share_one_pass_and_answer_as_vllms_scoring(
        self, engine: VLLMEngine
    ) -> None:
        assert engine.scores_by_embedding()
        jobs: list[tuple[JobKind, dict[str, Any]]] = [
            (JobKind.RERANK, {"model": EMBED_MODEL, "query": FRANCE, "documents": DOCUMENTS, "top_n": 3}),
            (JobKind.SCORE, {"model": EMBED_MODEL, "queries": FRANCE, "documents": DOCUMENTS}),
            (JobKind.SCORE, {"model": EMBED_MODEL, "text_1": [FRANCE, DOCUMENTS[0]], "text_2": DOCUMENTS[:2]}),
        ]
        passes = _count_merged_passes(engine)
        batcher = EmbeddingBatcher(engine, EMBED_MODEL)
        merged = await asyncio.gather(
            *(batcher.score(kind, body, f"merged-{i}") for i, (kind, body) in enumerate(jobs))
        )
        assert passes == [3]  # the three jobs' texts in one pass through vLLM's embedding pipeline
        for i, ((kind, body), answer) in enumerate(zip(jobs, merged, strict=True)):
            got = json.loads(answer) if isinstance(answer, bytes) else answer
            alone = await _run(engine, kind, body, f"merged-{i}")  # vLLM's own ServingScores
            assert list(got) == list(alone) and got["id"] == alone["id"] and got["usage"] == alone["usage"]
            rows, alone_rows = (a.get("data") or a["results"] for a in (got, alone))
            key = "score" if kind is JobKind.SCORE else "relevance_score"
            assert [r[key] for r in rows] == pytest.approx([r[key] for r in alone_rows], abs=1e-5)
            assert [{k: v for k, v in r.items() if k != key} for r in rows] == [
                {k: v for k, v in r.items() if k != key} for r in alone_rows
            ]


@pytest.mark.asyncio(loop_scope="class")
class TestPriorityScheduling:
    @pytest_asyncio.fixture(scope="class", loop_scope="class")
    async def engine(self) -> AsyncIterator[VLLMEngine]:
        async for engine in _running(EMBED_MODEL, model_prep.MINILM, scheduling_policy="priority"):
            yield engine

    async def test_batch_lines_may_carry_a_lower_priority(self, engine: VLLMEngine) -> None:
        assert engine.schedules_by_priority()
        body = {"model": EMBED_MODEL, "input": ["a batch line", "another"], "priority": 10}
        assert engine._request(JobKind.EMBEDDING, body, "low-priority", stream=False).priority == 10  # passed on
        answer = await _run(engine, JobKind.EMBEDDING, body, "low-priority")
        assert len(answer["data"]) == 2
