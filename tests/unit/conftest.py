from __future__ import annotations

from collections.abc import AsyncIterator

import fakeredis
import pytest
from arq.connections import ArqRedis
from fakeredis.aioredis import FakeAsyncRedisConnection
from redis.asyncio import ConnectionPool

from conveyor import contract


@pytest.fixture
def fake_server() -> fakeredis.FakeServer:
    return fakeredis.FakeServer()


def fake_connect(server: fakeredis.FakeServer) -> ArqRedis:
    pool = ConnectionPool(connection_class=FakeAsyncRedisConnection, server=server)
    return ArqRedis(pool, job_serializer=contract.dumps, job_deserializer=contract.loads)


@pytest.fixture
async def redis(fake_server: fakeredis.FakeServer) -> AsyncIterator[ArqRedis]:
    client = fake_connect(fake_server)
    yield client
    await client.aclose()
    await client.connection_pool.disconnect()
