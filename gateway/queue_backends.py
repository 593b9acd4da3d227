"""The gateway's queue backend, as ``CONVEYOR_QUEUE_BACKEND`` chooses it."""

from __future__ import annotations

from redis.asyncio import Redis

from conveyor.contract import QueueBackend
from gateway.arq_queue import ArqJobQueue
from gateway.directory import ModelDirectory
from gateway.redis_queue import RedisJobQueue
from gateway.settings import GatewaySettings
from gateway.streams_queue import StreamsJobQueue

BACKENDS: dict[QueueBackend, type[RedisJobQueue]] = {
    QueueBackend.ARQ: ArqJobQueue,
    QueueBackend.STREAMS: StreamsJobQueue,
}


def open_queue(redis: Redis, settings: GatewaySettings, directory: ModelDirectory) -> RedisJobQueue:
    return BACKENDS[settings.queue_backend](redis, settings, directory)
