from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import fakeredis
import httpx
import pytest
from fakeredis.aioredis import FakeAsyncRedisConnection
from fastapi import FastAPI
from redis.asyncio import ConnectionPool, Redis

from gateway.app import create_app
from gateway.settings import GatewaySettings


@pytest.fixture(autouse=True)
def _default_queue_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    """Unit tests build settings in-process: the process tiers' backend (``CONVEYOR_QUEUE_BACKEND``, set for the
    session) must not reach them; a test that wants a backend says so."""
    monkeypatch.delenv("CONVEYOR_QUEUE_BACKEND", raising=False)


@pytest.fixture
def fake_server() -> fakeredis.FakeServer:
    return fakeredis.FakeServer()


def fake_connect(server: fakeredis.FakeServer) -> Redis:
    pool = ConnectionPool(connection_class=FakeAsyncRedisConnection, server=server)
    return Redis(connection_pool=pool)


@pytest.fixture
async def redis(fake_server: fakeredis.FakeServer) -> AsyncIterator[Redis]:
    client = fake_connect(fake_server)
    yield client
    await client.aclose()
    await client.connection_pool.disconnect()


@asynccontextmanager
async def running_gateway(server: fakeredis.FakeServer, settings: GatewaySettings) -> AsyncIterator[FastAPI]:
    """The gateway app in-process, its lifespan running, on fakeredis."""
    application = create_app(settings, connect=lambda _url: fake_connect(server))
    async with application.router.lifespan_context(application):
        yield application


@pytest.fixture
async def client(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    """An HTTP client of the module's ``app`` fixture (a running gateway)."""
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as http:
        yield http
