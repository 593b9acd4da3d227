"""The hot routes' own path (``gateway.hot_routes``): taken for what it can serve whole, and answering everything
exactly as FastAPI's routes do (status, error body, headers, metrics), which a gateway without it shows."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import fakeredis
import httpx
import pytest
from fastapi import FastAPI
from redis.asyncio import Redis
from starlette.types import Message, Receive, Scope, Send

from conveyor import contract, key_layout
from gateway.hot_routes import HotRoutes
from gateway.settings import GatewaySettings
from tests.unit.conftest import running_gateway
from tests.unit.test_gateway_app import register

SETTINGS = GatewaySettings(models=["chat", "idle"], max_queue_depth=2, request_timeout=5, max_body_bytes=4096)
JSON = {"content-type": "application/json"}
EMBED = {"model": "ghost", "input": "a text"}
CHAT = {"model": "idle", "messages": [{"role": "user", "content": "hi"}]}


def _nested(depth: int) -> str:
    return "[" * depth + "]" * depth


async def _chunks() -> AsyncIterator[bytes]:
    """A body without a Content-Length that grows past the limit."""
    yield b'{"model": "ghost", "input": "'
    for _ in range(10):
        yield b"x" * 1000
    yield b'"}'


#: (path, headers, body): bodies the hot path takes, and every kind it hands on or refuses
CASES: list[tuple[str, dict[str, str], Any]] = [
    ("/v1/embeddings", JSON, json.dumps(EMBED)),  # unknown model: 404
    ("/v1/chat/completions", JSON, json.dumps(CHAT)),  # no live worker: 503
    ("/v1/chat/completions", JSON, json.dumps(CHAT | {"stream": True})),
    ("/v1/completions", JSON, json.dumps({"model": "idle", "prompt": "hi"})),
    ("/v1/embeddings", {"content-type": "application/json; charset=utf-8"}, json.dumps(EMBED)),
    ("/v1/embeddings", {"content-type": "Application/JSON"}, json.dumps(EMBED)),
    ("/v1/embeddings", {"content-type": "application/vnd.api+json"}, json.dumps(EMBED)),
    ("/v1/embeddings", {"content-type": "text/plain"}, json.dumps(EMBED)),
    ("/v1/embeddings", {}, json.dumps(EMBED)),
    ("/v1/embeddings", JSON, ""),
    ("/v1/embeddings", JSON, '{"model": '),
    ("/v1/embeddings", JSON, '{"model": "ghost", "input": ""}'),
    ("/v1/embeddings", JSON, '{"model": 5, "input": "a"}'),
    ("/v1/embeddings", JSON, '{"model": "ghost", "input": "\\ud800"}'),  # a lone surrogate: json reads it, jiter not
    ("/v1/embeddings", JSON, b"\xef\xbb\xbf" + json.dumps(EMBED).encode()),  # a byte-order mark
    ("/v1/embeddings", JSON, '{"model": "ghost", "input": "a", "x": NaN, "y": 1e400}'),
    ("/v1/embeddings", JSON, json.dumps(EMBED)[:-1] + ', "x": ' + _nested(150) + "}"),
    ("/v1/embeddings", JSON, json.dumps(EMBED)[:-1] + ', "x": ' + _nested(1500) + "}"),
    ("/v1/embeddings", JSON, json.dumps(EMBED | {"pad": "x" * 5000})),  # over the limit by Content-Length
    ("/v1/embeddings", JSON, _chunks),  # over the limit while it arrives
    ("/v1/embeddings", JSON | {"x-conveyor-timeout": "never"}, json.dumps(EMBED)),
    ("/v1/embeddings/", JSON, json.dumps(EMBED)),
    ("/v1/chat/completions", JSON, json.dumps(CHAT | {"stream_options": {"include_usage": True}})),
    ("/v1/chat/completions", JSON, json.dumps(CHAT | {"messages": []})),
    ("/v1/chat/completions", JSON, "[1, 2]"),
]


#: the headers compared (the request id is a fresh one each time: only whether it is there)
KEPT_HEADERS = ("content-type", "retry-after", "location", "cache-control")


def _without_hot_routes(app: FastAPI) -> FastAPI:
    app.user_middleware = [m for m in app.user_middleware if m.cls is not HotRoutes]
    return app


def _hot_routes(app: FastAPI) -> HotRoutes:
    app.middleware_stack = app.build_middleware_stack()
    layer: Any = app.middleware_stack
    while not isinstance(layer, HotRoutes):
        layer = layer.app
    return layer


async def _outcomes(app: FastAPI) -> tuple[list[tuple[int, Any, dict[str, str]]], list[str]]:
    answers = []
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as http:
        for path, headers, body in CASES:
            response = await http.post(path, headers=headers, content=body() if callable(body) else body)
            kept = {h: response.headers[h] for h in KEPT_HEADERS if h in response.headers}
            kept["has-request-id"] = str("x-request-id" in response.headers)
            answers.append((response.status_code, response.json() if response.content else None, kept))
        scraped = (await http.get("/metrics")).text.splitlines()
    counted = [line for line in scraped if line.startswith(("conveyor_requests_total", "conveyor_request_failures"))]
    return answers, sorted(counted)


def _counts(lines: list[str]) -> list[str]:
    return [line for line in lines if "_created" not in line]  # a series' creation time differs between the apps


async def test_every_answer_and_count_is_the_one_fastapi_gives() -> None:
    async with running_gateway(fakeredis.FakeServer(), SETTINGS) as app:
        taken = await _outcomes(app)
    async with running_gateway(fakeredis.FakeServer(), SETTINGS) as app:
        handed_on = await _outcomes(_without_hot_routes(app))
    for case, hot, fastapi in zip(CASES, taken[0], handed_on[0], strict=True):
        assert hot == fastapi, case[:2]
    assert _counts(taken[1]) == _counts(handed_on[1])
    assert {status for status, _, _ in taken[0]} >= {400, 404, 413, 503}  # the cases reach every kind of answer


@pytest.fixture
async def gateway(fake_server: fakeredis.FakeServer) -> AsyncIterator[FastAPI]:
    async with running_gateway(fake_server, SETTINGS) as app:
        yield app


async def test_a_valid_request_never_reaches_fastapi_and_an_invalid_one_does(gateway: FastAPI, redis: Redis) -> None:
    await register(redis, "chat", ["generate"])
    hot = _hot_routes(gateway)
    handed_on: list[bytes] = []
    fastapi = hot.app

    async def recording(scope: Scope, receive: Receive, send: Send) -> None:
        async def reading() -> Message:
            message = await receive()
            handed_on.append(message.get("body", b""))
            return message

        await fastapi(scope, reading, send)

    hot.app = recording

    async def fake_worker() -> None:
        _, job_id, _ = await redis.bzpopmin(key_layout.queue_name("chat"), timeout=5)
        reply = contract.Reply(job_id.decode(), body=b'{"ok":true}')
        await redis.rpush(key_layout.inbox_key(gateway.state.service.inbox.gateway_id), reply.encode())

    worker = asyncio.create_task(fake_worker())
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=gateway), base_url="http://gw") as http:
        answered = await http.post("/v1/chat/completions", json=CHAT | {"model": "chat"})
        refused = await http.post("/v1/chat/completions", json={"model": "chat"})
        scraped = (await http.get("/metrics")).text
    await worker
    assert answered.status_code == 200 and answered.json() == {"ok": True}
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "messages"
    assert handed_on == [b'{"model":"chat"}']  # the invalid body, once, as the client sent it
    assert 'endpoint="/v1/chat/completions",model="chat",status="200"' in scraped


@pytest.mark.parametrize("content_type", [None, "application/x-www-form-urlencoded", "text/plain"])
async def test_a_json_body_without_the_json_content_type_is_told_so(gateway: FastAPI, content_type: str | None) -> None:
    headers = {"content-type": content_type} if content_type else {}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=gateway), base_url="http://gw") as http:
        response = await http.post("/v1/embeddings", headers=headers, content=json.dumps(EMBED))
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "invalid_content_type"
    assert "Content-Type: application/json" in response.json()["error"]["message"]


async def test_a_request_without_a_body_is_told_so(gateway: FastAPI) -> None:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=gateway), base_url="http://gw") as http:
        response = await http.post("/v1/embeddings")
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "missing_body"
    assert "no body" in response.json()["error"]["message"]


async def test_a_validator_s_message_is_given_without_pydantic_s_prefix(gateway: FastAPI) -> None:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=gateway), base_url="http://gw") as http:
        response = await http.post("/v1/embeddings", json=EMBED | {"input": ""})
    assert response.status_code == 400
    assert response.json()["error"]["message"] == "input must not be empty"


@pytest.mark.parametrize(("path", "methods"), [("/v1/batches", "GET, POST"), ("/v1/files/f1", "DELETE, GET")])
async def test_a_method_the_path_does_not_take_is_405_with_every_method_it_does(
    gateway: FastAPI, path: str, methods: str
) -> None:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=gateway), base_url="http://gw") as http:
        response = await http.put(path)
    assert response.status_code == 405
    assert response.headers["allow"] == methods
    assert response.json()["error"]["code"] == "http_405"
