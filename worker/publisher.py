"""Stream frames from every running job, published in pipelines.

With many streams in flight the engine yields one chunk per stream per step, all at once: sending them as one
pipeline costs one round trip instead of one each (``worker.pipeliner``). Each ``publish`` still waits until its own
frame is sent, so a job's frames leave in order and a job cannot run ahead of Redis.
"""

from __future__ import annotations

from redis.asyncio import Redis

from worker.pipeliner import Pipeliner


class BatchPublisher:
    def __init__(self, redis: Redis) -> None:
        self._pipeliner = Pipeliner(redis)

    async def publish(self, channel: str, data: bytes) -> None:
        await self._pipeliner.send(lambda pipe: pipe.publish(channel, data))

    async def close(self) -> None:
        await self._pipeliner.close()
