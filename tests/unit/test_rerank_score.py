"""Rerank and score (issue 21, item 4): the gateway's validation and paths, the API key guard on the paths outside
``/v1/``, capabilities, batch lines, the token charge, and the fake engine's answers in vLLM's shapes."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Any

import fakeredis
import httpx
import pytest
from fastapi import FastAPI
from redis.asyncio import Redis

from conveyor import registry
from conveyor.batch_lines import LineError, parse_line
from conveyor.contract import JobEnvelope, JobKind, Reply
from conveyor.fleet import ModelSpec
from conveyor.token_estimate import charge
from gateway.batches import BatchCreate
from gateway.settings import GatewaySettings
from tests.unit.conftest import running_gateway
from worker.engines.fake import FakeEngine, fake_vector
from worker.jobs import JobRunner

RERANK = {"model": "embedder", "query": "what is a queue", "documents": ["a line of people", "a red apple"]}
SCORE = {"model": "embedder", "queries": "what is a queue", "documents": ["a line of people", "a red apple"]}
RERANK_PATHS = ("/v1/rerank", "/v2/rerank", "/rerank")
SCORE_PATHS = ("/v1/score", "/score")


@pytest.fixture
async def app(fake_server: fakeredis.FakeServer) -> AsyncIterator[FastAPI]:
    async with running_gateway(fake_server, GatewaySettings(models=["embedder"], request_timeout=5)) as application:
        yield application


async def register(redis: Redis, model: str, capabilities: list[str]) -> None:
    info = registry.WorkerInfo(
        worker_id=f"w-{model}", model=model, capabilities=capabilities, max_jobs=1, host="h", pid=1, started=time.time()
    )
    await registry.heartbeat(redis, info, ttl=30)


def error_of(response: httpx.Response, status: int = 400) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error: dict[str, Any] = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error


# ---- validation at the gateway ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "param", "words"),
    [
        ({"query": None}, "query", "Missing required parameter"),
        ({"documents": None}, "documents", "Missing required parameter"),
        ({"documents": []}, "documents", "at least one text"),
        ({"documents": ["fine", ""]}, "documents", "item 1 must be a non-empty string"),
        ({"documents": ["fine", 3]}, "documents", "item 1 must be a non-empty string"),
        ({"query": ""}, "query", "non-empty string"),
        ({"query": ["a", "b"]}, "query", "non-empty string"),
        ({"top_n": -1}, "top_n", "greater than or equal to 0"),
        ({"top_n": "2"}, "top_n", "integer"),
        ({"top_n": True}, "top_n", "integer"),
        ({"model": ""}, "model", "at least 1 character"),
    ],
)
async def test_a_bad_rerank_request_is_a_400_naming_its_field(
    client: httpx.AsyncClient, change: dict[str, Any], param: str, words: str
) -> None:
    body = {k: v for k, v in (RERANK | change).items() if v is not None}
    for path in RERANK_PATHS:
        error = error_of(await client.post(path, json=body))
        assert error["param"] == param and words in error["message"], (path, error)
        assert error["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    ("body", "words"),
    [
        ({"model": "embedder", "queries": "q"}, "give exactly one pair of sides to score"),
        ({"model": "embedder", "queries": "q", "documents": "d", "text_1": "a", "text_2": "b"}, "exactly one pair"),
        ({"model": "embedder", "queries": "q", "documents": "d", "items": "i"}, "exactly one pair"),
        ({"model": "embedder", "text_1": ["a", "b"], "text_2": ["c", "d", "e"]}, "must pair 1:1, 1:N or N:N"),
        ({"model": "embedder", "data_1": "a", "data_2": []}, "at least one text"),
    ],
)
async def test_a_bad_score_request_is_a_400_that_says_why(
    client: httpx.AsyncClient, body: dict[str, Any], words: str
) -> None:
    for path in SCORE_PATHS:
        assert words in error_of(await client.post(path, json=body))["message"], path


async def test_score_and_rerank_cannot_be_streamed(client: httpx.AsyncClient) -> None:
    for path, body in (("/v1/rerank", RERANK), ("/v1/score", SCORE)):
        assert "cannot be streamed" in error_of(await client.post(path, json=body | {"stream": True}))["message"]


async def test_a_model_without_the_capability_is_refused_like_embeddings_on_a_chat_model(
    client: httpx.AsyncClient, redis: Redis
) -> None:
    await register(redis, "chatter", ["generate"])
    for path in (*RERANK_PATHS, *SCORE_PATHS):
        body = (RERANK if "rerank" in path else SCORE) | {"model": "chatter"}
        error = error_of(await client.post(path, json=body))
        assert error["code"] == "unsupported_model_capability" and error["param"] == "model", (path, error)
        assert f"does not support {'rerank' if 'rerank' in path else 'score'} requests" in error["message"]


async def test_the_paths_outside_v1_need_an_api_key_like_v1(fake_server: fakeredis.FakeServer) -> None:
    settings = GatewaySettings(models=["embedder"], api_keys=["sk-the-right-one"])
    async with (
        running_gateway(fake_server, settings) as application,
        httpx.AsyncClient(transport=httpx.ASGITransport(app=application), base_url="http://gw") as http,
    ):
        for path in (*RERANK_PATHS, *SCORE_PATHS, "/rerank/"):
            assert error_of(await http.post(path, json={}), 401)["code"] == "invalid_api_key", path
            keyed = await http.post(path, json={}, headers={"Authorization": "Bearer sk-the-right-one"})
            assert keyed.status_code in (400, 307), (path, keyed.text)  # past the guard: the body is checked
        assert (await http.get("/health")).status_code == 200  # probes stay open


async def test_the_routes_are_listed_at_the_root(client: httpx.AsyncClient) -> None:
    listed = {(e["method"], e["path"]) for e in (await client.get("/")).json()["endpoints"]}
    assert {("POST", p) for p in (*RERANK_PATHS, *SCORE_PATHS)} <= listed


# ---- capabilities ----------------------------------------------------------------------------------------------------


async def test_an_embedding_models_card_lists_score(client: httpx.AsyncClient, redis: Redis) -> None:
    await register(redis, "embedder", sorted(FakeEngine("embedder", embed=True).capabilities))
    cards = {card["id"]: card for card in (await client.get("/v1/models")).json()["data"]}
    assert cards["embedder"]["capabilities"] == ["embed", "score"]
    assert FakeEngine("chat").capabilities == frozenset({"generate"})
    # a model conveyor up runs scaled to zero is known to score before any worker says so
    assert "score" in ModelSpec(name="e", engine="fake", task="embed").capabilities()


# ---- batch lines and batches ---------------------------------------------------------------------------------------


def batch_line(url: str, body: dict[str, Any]) -> bytes:
    return json.dumps({"custom_id": "x", "method": "POST", "url": url, "body": body}).encode()


def test_rerank_and_score_lines_are_batch_lines() -> None:
    for url in RERANK_PATHS:
        assert parse_line(batch_line(url, RERANK), 1).model == "embedder"
        assert BatchCreate(input_file_id="f", endpoint=url, completion_window="24h").endpoint == url
    for url in SCORE_PATHS:
        assert parse_line(batch_line(url, SCORE), 1).url == url
    with pytest.raises(LineError) as refused:
        parse_line(batch_line("/v1/rerank", RERANK | {"documents": []}), 7)
    assert refused.value.param == "body.documents" and refused.value.message.startswith("Line 7:")
    with pytest.raises(LineError):  # a score body is not a rerank line
        parse_line(batch_line("/v1/rerank", SCORE), 1)


# ---- the token charge ----------------------------------------------------------------------------------------------


def test_rerank_and_score_are_charged_every_text_once_and_no_output() -> None:
    body = {"query": "abcd", "documents": ["abcdefgh", "abcd"], "top_n": 1}
    assert charge(JobKind.RERANK, body, 99) == 1 + 2 + 1
    assert charge(JobKind.SCORE, {"text_1": ["abcd", "abcd"], "text_2": ["abcdefgh", "abcd"]}, 99) == 2 + 3
    multimodal = {"content": [{"type": "text", "text": "abcdefgh"}, {"type": "image_url", "image_url": {}}]}
    assert charge(JobKind.SCORE, {"queries": "abcd", "items": multimodal}, 99) == 1 + 2


# ---- the fake engine, through the job runner -----------------------------------------------------------------------


def job(kind: JobKind, body: dict[str, Any]) -> JobEnvelope:
    return JobEnvelope(request_id="req", reply_to="gw", model="m", kind=kind, body=body, deadline=time.time() + 10)


async def answer(redis: Redis, engine: FakeEngine, kind: JobKind, body: dict[str, Any]) -> Reply:
    done = await JobRunner(redis, engine, "m").run(job(kind, body))
    assert done.delivery is not None
    return Reply.decode(done.delivery.payload)


def cosine(a: str, b: str) -> float:
    return sum(x * y for x, y in zip(fake_vector(a, 32), fake_vector(b, 32), strict=True))


async def test_the_fake_engine_reranks_in_vllms_shape(redis: Redis) -> None:
    documents = ["one two", "three", "what is a queue", "four"]
    body = {"model": "m", "query": "what is a queue", "documents": documents, "top_n": 3}
    reply = await answer(redis, FakeEngine("m", embed=True), JobKind.RERANK, body)
    assert reply.error is None and reply.body is not None
    got = json.loads(reply.body)
    assert list(got) == ["id", "model", "usage", "results"] and got["id"] == "score-req"
    assert got["usage"] == {"prompt_tokens": 4 + 2 + 1 + 4 + 1, "total_tokens": 12}
    expected = sorted(range(4), key=lambda i: cosine("what is a queue", documents[i]), reverse=True)[:3]
    assert [r["index"] for r in got["results"]] == expected and expected[0] == 2  # the same text ranks first
    assert got["results"][0] == {"index": 2, "document": {"text": documents[2], "multi_modal": None},
                                 "relevance_score": pytest.approx(1.0)}  # fmt: skip
    everything = json.loads(
        (await answer(redis, FakeEngine("m", embed=True), JobKind.RERANK, body | {"top_n": 0})).body or b""
    )
    assert len(everything["results"]) == 4  # top_n 0: every document


async def test_the_fake_engine_scores_pairs_in_vllms_shape(redis: Redis) -> None:
    body = {"model": "m", "text_1": ["a b", "c"], "text_2": ["a b", "d"]}
    reply = await answer(redis, FakeEngine("m", embed=True), JobKind.SCORE, body)
    got = json.loads(reply.body or b"")
    assert got["object"] == "list" and got["id"] == "score-req" and got["model"] == "m"
    assert [(d["index"], d["object"]) for d in got["data"]] == [(0, "score"), (1, "score")]
    assert got["data"][0]["score"] == pytest.approx(1.0) and got["data"][1]["score"] == pytest.approx(cosine("c", "d"))
    assert got["usage"]["prompt_tokens"] == 2 + 1 + 2 + 1 and got["usage"]["completion_tokens"] == 0


async def test_a_generate_only_engine_refuses_to_score(redis: Redis) -> None:
    reply = await answer(redis, FakeEngine("m"), JobKind.RERANK, {"model": "m", "query": "q", "documents": ["d"]})
    assert reply.error is not None and reply.error.status == 400 and "does not support" in reply.error.message
