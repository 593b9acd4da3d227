"""The one way every process builds its Redis client: bounded connect and read timeouts, so a Redis that hangs is
noticed instead of hanging its caller. Nothing blocks on Redis longer than a second by design (the reply inbox and
the pub/sub readers wait in bounded slices), so a read that takes longer than ``READ_TIMEOUT_SECONDS`` means Redis
is not answering."""

from __future__ import annotations

from redis.asyncio import ConnectionPool, Redis

#: where every process looks for Redis unless ``CONVEYOR_REDIS_URL`` (or ``--redis-url``) says otherwise
DEFAULT_REDIS_URL = "redis://localhost:6379/0"

#: a Redis that does not accept a connection within this long counts as down
CONNECT_TIMEOUT_SECONDS = 2.0
#: ... and one that does not answer a command within this long
READ_TIMEOUT_SECONDS = 5.0


def connect(url: str) -> Redis:
    pool = ConnectionPool.from_url(
        url,
        socket_connect_timeout=CONNECT_TIMEOUT_SECONDS,
        socket_timeout=READ_TIMEOUT_SECONDS,
        health_check_interval=30,
    )
    return Redis(connection_pool=pool)


async def close(redis: Redis) -> None:
    await redis.aclose()
    await redis.connection_pool.disconnect()
