from __future__ import annotations

from collections.abc import AsyncIterator

import fakeredis
import pytest
from fakeredis.aioredis import FakeAsyncRedisConnection
from redis.asyncio import ConnectionPool, Redis


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
