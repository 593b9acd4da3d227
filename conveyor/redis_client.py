"""The one way both processes build their Redis client: arq's subclass, JSON job serialisation, bounded timeouts."""

from __future__ import annotations

from arq.connections import ArqRedis
from redis.asyncio import ConnectionPool

from conveyor import contract

#: a Redis that does not answer within this long counts as down (never a hang)
CONNECT_TIMEOUT_SECONDS = 2.0


def connect(url: str) -> ArqRedis:
    """A client on a fresh pool. Blocking reads (BLPOP) pass their own timeouts, so no socket timeout is set."""
    pool = ConnectionPool.from_url(url, socket_connect_timeout=CONNECT_TIMEOUT_SECONDS, health_check_interval=30)
    return ArqRedis(pool, job_serializer=contract.dumps, job_deserializer=contract.loads)


async def close(redis: ArqRedis) -> None:
    await redis.aclose()
    await redis.connection_pool.disconnect()
