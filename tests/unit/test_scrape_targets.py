"""Prometheus discovery and exposition: the HTTP SD answer from the registry, the worker's text-format /metrics
(vLLM's names intact whatever Prometheus asks for), its probes, and the advertised address."""

from __future__ import annotations

import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator

import fakeredis
import httpx
import pytest
from fastapi import FastAPI
from prometheus_client import REGISTRY, Gauge
from redis.asyncio import Redis

from conveyor import key_layout, registry
from conveyor.netaddr import address_towards, host_port
from gateway.settings import GatewaySettings
from tests.unit.conftest import running_gateway
from worker import http_endpoints

#: the Accept header Prometheus 2.42 sends by default (it prefers OpenMetrics)
PROMETHEUS_2_ACCEPT = (
    "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,"
    "text/plain;version=0.0.4;q=0.5,*/*;q=0.1"
)


@pytest.fixture
async def app(fake_server: fakeredis.FakeServer) -> AsyncIterator[FastAPI]:
    async with running_gateway(
        fake_server, GatewaySettings(models=["chat"], port=8123, advertise_host="10.0.0.7")
    ) as application:
        yield application


def worker(worker_id: str, model: str, state: registry.WorkerState, port: int | None) -> registry.WorkerInfo:
    return registry.WorkerInfo(
        worker_id=worker_id, model=model, state=state, capabilities=["generate"], max_jobs=1, host="box",
        address="10.0.0.9", pid=1, metrics_port=port, started=time.time(),
    )  # fmt: skip


async def test_workers_loading_or_serving_are_scrape_targets(client: httpx.AsyncClient, redis: Redis) -> None:
    await registry.heartbeat(redis, worker("w1", "chat", "serving", 9100), ttl=30)
    await registry.heartbeat(redis, worker("w2", "embed", "loading", 9101), ttl=30)
    await registry.heartbeat(redis, worker("w3", "embed", "serving", 9102), ttl=30)
    await redis.zadd(key_layout.model_workers_key("embed"), {"w3": time.time() - 1})  # its heartbeat lapsed
    response = await client.get("/internal/scrape-targets", params={"role": "worker"})
    assert response.status_code == 200
    assert response.json() == [
        {"targets": ["10.0.0.9:9100"], "labels": {"worker_id": "w1"}},
        {"targets": ["10.0.0.9:9101"], "labels": {"worker_id": "w2"}},
    ]


async def test_every_running_gateway_is_a_scrape_target(client: httpx.AsyncClient, redis: Redis) -> None:
    await registry.gateway_heartbeat(redis, "10.0.0.8:8000", ttl=30)
    response = await client.get("/internal/scrape-targets", params={"role": "gateway"})
    assert response.json() == [
        {"targets": ["10.0.0.7:8123"], "labels": {}},  # this one, advertised by its lifespan
        {"targets": ["10.0.0.8:8000"], "labels": {}},
    ]


async def test_a_stopped_gateway_leaves_the_targets(fake_server: fakeredis.FakeServer, redis: Redis) -> None:
    settings = GatewaySettings(models=["chat"], port=8124, advertise_host="10.0.0.5")
    async with running_gateway(fake_server, settings):
        assert "10.0.0.5:8124" in await registry.live_gateways(redis)
    assert "10.0.0.5:8124" not in await registry.live_gateways(redis)


async def test_an_unknown_role_is_an_openai_shaped_400(client: httpx.AsyncClient) -> None:
    response = await client.get("/internal/scrape-targets", params={"role": "database"})
    assert response.status_code == 400
    assert set(response.json()["error"]) == {"message", "type", "param", "code"}


def _get(url: str, accept: str = "*/*") -> tuple[int, str, str]:
    request = urllib.request.Request(url, headers={"Accept": accept})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, response.headers["Content-Type"], response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.headers["Content-Type"], error.read().decode()


def test_worker_metrics_keep_vllm_names_for_prometheus_2_and_3() -> None:
    gauge = Gauge("vllm:test_requests_running", "a vLLM-style name", registry=REGISTRY)
    gauge.set(3)
    server = http_endpoints.serve("127.0.0.1", 0, lambda: "serving")
    try:
        for accept in (PROMETHEUS_2_ACCEPT, "application/openmetrics-text;version=1.0.0;escaping=allow-utf-8"):
            status, content_type, body = _get(f"http://127.0.0.1:{server.server_port}/metrics", accept)
            assert status == 200 and content_type.startswith("text/plain; version=0.0.4")
            assert "vllm:test_requests_running 3.0" in body
    finally:
        server.shutdown()
        server.server_close()
        REGISTRY.unregister(gauge)


@pytest.mark.parametrize(
    ("state", "health", "ready"), [("loading", 200, 503), ("serving", 200, 200), ("failed", 503, 503)]
)
def test_worker_probes_follow_its_state(state: str, health: int, ready: int) -> None:
    server = http_endpoints.serve("127.0.0.1", 0, lambda: state)
    try:
        assert _get(f"http://127.0.0.1:{server.server_port}/health")[0] == health
        assert _get(f"http://127.0.0.1:{server.server_port}/ready")[0] == ready
    finally:
        server.shutdown()
        server.server_close()


def test_the_advertised_address_is_the_one_redis_is_reached_from() -> None:
    assert address_towards("redis://127.0.0.1:6379/0") == "127.0.0.1"
    assert address_towards("unix:///run/redis.sock") == "127.0.0.1"
    assert host_port("fd00::1", 9100) == "[fd00::1]:9100"
