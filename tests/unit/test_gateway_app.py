"""The gateway app in-process on fakeredis: admission, validation mapping and the stream relay."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import fakeredis
import httpx
import pytest
from fastapi import FastAPI
from redis.asyncio import Redis

from conveyor import contract, key_layout, registry
from conveyor.contract import StreamFrame
from conveyor.keys import KeyCreate, KeyStore
from gateway.settings import GatewaySettings
from tests.unit.conftest import running_gateway

CHAT = {"model": "chat", "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture
async def app(fake_server: fakeredis.FakeServer) -> AsyncIterator[FastAPI]:
    async with running_gateway(
        fake_server, GatewaySettings(models=["chat", "idle"], max_queue_depth=2, request_timeout=5)
    ) as application:
        yield application


async def register(redis: Redis, model: str, capabilities: list[str]) -> None:
    info = registry.WorkerInfo(
        worker_id=f"w-{model}", model=model, capabilities=capabilities, max_jobs=1, host="h", pid=1, started=time.time()
    )
    await registry.heartbeat(redis, info, ttl=30)


async def test_validation_error_is_openai_shaped_400(client: httpx.AsyncClient) -> None:
    response = await client.post("/v1/chat/completions", json={"model": "chat", "messages": "nope"})
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "messages"
    assert set(response.json()["error"]) == {"message", "type", "param", "code"}


async def test_unknown_route_is_openai_shaped_404(client: httpx.AsyncClient) -> None:
    response = await client.get("/v1/nothing")
    assert response.status_code == 404 and response.json()["error"]["code"] == "not_found"


async def test_admission_order(client: httpx.AsyncClient, redis: Redis) -> None:
    assert (await client.post("/v1/chat/completions", json=CHAT | {"model": "ghost"})).status_code == 404
    assert (await client.post("/v1/chat/completions", json=CHAT | {"model": "idle"})).status_code == 503
    await register(redis, "embedder", ["embed"])
    refused = await client.post("/v1/chat/completions", json=CHAT | {"model": "embedder"})
    assert refused.status_code == 400 and refused.json()["error"]["code"] == "unsupported_model_capability"
    await register(redis, "chat", ["generate"])
    await redis.zadd(key_layout.queue_name("chat"), {"a": 1, "b": 2})
    full = await client.post("/v1/chat/completions", json=CHAT)
    assert full.status_code == 429 and full.headers["retry-after"] == "1"


async def test_sync_request_gets_the_reply_pushed_by_a_worker(
    app: FastAPI, client: httpx.AsyncClient, redis: Redis
) -> None:
    await register(redis, "chat", ["generate"])

    async def fake_worker() -> None:
        _, job_id, _ = await redis.bzpopmin(key_layout.queue_name("chat"), timeout=5)
        reply = contract.Reply(job_id.decode(), body=b'{"ok":true}')
        await redis.rpush(key_layout.inbox_key(app.state.service.inbox.gateway_id), reply.encode())

    worker = asyncio.create_task(fake_worker())
    response = await client.post("/v1/chat/completions", json=CHAT)
    await worker
    assert response.status_code == 200 and response.json() == {"ok": True}


async def test_gap_in_the_stream_becomes_an_error_event(client: httpx.AsyncClient, redis: Redis) -> None:
    await register(redis, "chat", ["generate"])

    async def fake_worker() -> None:
        _, job_id, _ = await redis.bzpopmin(key_layout.queue_name("chat"), timeout=5)
        channel = key_layout.stream_channel("chat", job_id.decode())
        for seq in (0, 2):  # chunk 1 is lost
            await redis.publish(channel, StreamFrame.chunk(seq, {"n": seq}).encode())

    worker = asyncio.create_task(fake_worker())
    response = await client.post("/v1/chat/completions", json=CHAT | {"stream": True})
    await worker
    events = [line for line in response.text.splitlines() if line.startswith("data:")]
    assert events[0] == 'data: {"n":0}'
    assert '"code":"stream_gap"' in events[1]
    assert events[-1] == "data: [DONE]"


async def test_ready_reports_each_configured_model(client: httpx.AsyncClient, redis: Redis) -> None:
    not_ready = await client.get("/ready")
    assert not_ready.status_code == 503
    this_gateway = await client.get("/ready", params={"scope": "gateway"})  # Redis answers: it can serve
    assert this_gateway.status_code == 200 and this_gateway.json()["models"] == {}
    await register(redis, "chat", ["generate"])
    await register(redis, "idle", ["generate"])
    ready = await client.get("/ready")
    assert ready.status_code == 200 and ready.json()["models"]["chat"] == {"status": "serving", "live_workers": 1}


async def test_not_ready_while_no_model_is_configured(fake_server: fakeredis.FakeServer, redis: Redis) -> None:
    """What a gateway of ``conveyor up`` sees before the fleet is written: nothing to serve is not ready. Once the
    fleet names a model, ready waits for its worker."""
    async with (
        running_gateway(fake_server, GatewaySettings(models=[])) as application,
        httpx.AsyncClient(transport=httpx.ASGITransport(app=application), base_url="http://gw") as http,
    ):
        empty = await http.get("/ready")
        assert empty.status_code == 503 and empty.json() == {"ready": False, "redis": True, "models": {}}
        assert (await http.get("/ready", params={"scope": "gateway"})).status_code == 200
        await redis.hset(key_layout.FLEET_MODELS, "chat", "{}")
        assert (await http.get("/ready")).json()["models"] == {"chat": {"status": "unavailable", "live_workers": 0}}
        await register(redis, "chat", ["generate"])
        assert (await http.get("/ready")).status_code == 200


async def test_a_model_allowed_at_zero_queues_its_requests_and_is_ready(
    fake_server: fakeredis.FakeServer, redis: Redis
) -> None:
    """No worker at all: a model the gateway lets scale to zero takes the request into its queue (a worker that
    starts later answers it) and counts as ready; a model that may not answers 503 at once."""
    settings = GatewaySettings(models=["strict"], scale_to_zero=["lazy"], request_timeout=5)
    async with (
        running_gateway(fake_server, settings) as application,
        httpx.AsyncClient(transport=httpx.ASGITransport(app=application), base_url="http://gw") as http,
    ):
        await application.state.service.refresh_known_models()
        cards = {c["id"]: c for c in (await http.get("/v1/models")).json()["data"]}
        assert cards["lazy"]["status"] == "scaled_to_zero" and cards["strict"]["status"] == "unavailable"
        assert (await http.post("/v1/chat/completions", json=CHAT | {"model": "strict"})).status_code == 503

        async def worker_starting_later() -> None:
            _, job_id, _ = await redis.bzpopmin(key_layout.queue_name("lazy"), timeout=5)
            reply = contract.Reply(job_id.decode(), body=b'{"woke":true}')
            await redis.rpush(key_layout.inbox_key(application.state.service.inbox.gateway_id), reply.encode())

        worker = asyncio.create_task(worker_starting_later())
        answer = await http.post("/v1/chat/completions", json=CHAT | {"model": "lazy"})
        await worker
        assert answer.status_code == 200 and answer.json() == {"woke": True}
        await register(redis, "strict", ["generate"])
        ready = await http.get("/ready")
        assert ready.status_code == 200 and ready.json()["models"]["lazy"]["status"] == "scaled_to_zero"
        await redis.set(key_layout.scale_to_zero_key("lazy"), '["embed"]')  # what it can do, when known
        wrong = await http.post("/v1/chat/completions", json=CHAT | {"model": "lazy"})
        assert wrong.status_code == 400 and wrong.json()["error"]["code"] == "unsupported_model_capability"
        failure = registry.Failure(worker_id="w", reason="engine_dead", at=time.time())
        await redis.set(key_layout.model_failure_key("lazy"), failure.model_dump_json())  # its worker just died
        await application.state.service.refresh_known_models()
        failed = await http.post("/v1/chat/completions", json=CHAT | {"model": "lazy"})
        assert failed.status_code == 503 and failed.json()["error"]["code"] == "model_failed"  # not a 600 s wait


def test_placeholder_api_keys_are_refused() -> None:
    with pytest.raises(ValueError, match="placeholder"):
        GatewaySettings(api_keys="changeme")  # type: ignore[arg-type]
    assert GatewaySettings(models="a, b").models == ["a", "b"]  # type: ignore[arg-type]


async def test_gauges_are_refreshed_without_requests(app: FastAPI, redis: Redis) -> None:
    await register(redis, "chat", ["generate"])
    await redis.zadd(key_layout.queue_name("chat"), {"a": 1, "b": 2, "c": 3})
    await app.state.service.refresh_gauges()
    registry_ = app.state.metrics.registry
    assert registry_.get_sample_value("conveyor_queue_depth", {"model": "chat"}) == 3
    assert registry_.get_sample_value("conveyor_live_workers", {"model": "chat"}) == 1
    assert registry_.get_sample_value("conveyor_live_workers", {"model": "idle"}) == 0


async def test_the_admin_api_does_not_exist_without_an_admin_key(client: httpx.AsyncClient) -> None:
    response = await client.get("/admin/keys", headers={"Authorization": "Bearer anything-at-all"})
    assert response.status_code == 404 and response.json()["error"]["code"] == "not_found"


async def test_the_first_managed_key_turns_authentication_on_for_good(
    fake_server: fakeredis.FakeServer, redis: Redis, client: httpx.AsyncClient
) -> None:
    assert (await client.get("/v1/models")).status_code == 200
    created = await KeyStore(redis).create(KeyCreate(name="first"))
    settings = GatewaySettings(models=["chat"], key_cache_seconds=0)
    async with running_gateway(fake_server, settings) as application:
        transport = httpx.ASGITransport(app=application)
        async with httpx.AsyncClient(transport=transport, base_url="http://gw") as fresh:
            assert (await fresh.get("/v1/models")).status_code == 401
            bearer = {"Authorization": f"Bearer {created.value}"}
            assert (await fresh.get("/v1/models", headers=bearer)).status_code == 200
            assert (await fresh.get("/health")).status_code == 200  # probes stay open
            await KeyStore(redis).revoke(created.id)
            assert (await fresh.get("/v1/models")).status_code == 401  # revoking the last key opens no door


async def test_fleet_changes_are_refused_while_no_conveyor_up_runs_the_fleet(fake_server: fakeredis.FakeServer) -> None:
    settings = GatewaySettings(models=["chat"], **{"CONVEYOR_ADMIN_KEY": "admin-key-for-unit"})
    async with running_gateway(fake_server, settings) as application:
        transport = httpx.ASGITransport(app=application)
        headers = {"Authorization": "Bearer admin-key-for-unit"}
        async with httpx.AsyncClient(transport=transport, base_url="http://gw", headers=headers) as admin:
            refused = await admin.post("/admin/models", json={"name": "m", "engine": "fake"})
            assert refused.status_code == 409 and refused.json()["error"]["code"] == "no_supervisor"
            assert (await admin.get("/admin/models")).json() == {"object": "list", "data": []}
            assert (await admin.get("/admin/models/m")).status_code == 404
