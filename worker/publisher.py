"""Stream frames from every running job, published in pipelined batches.

With many streams in flight the engine yields one chunk per stream per step, all at once: sending them as one
pipeline costs one round trip instead of one each. Each ``publish`` still waits until its own frame is sent, so a
job's frames leave in order and a job cannot run ahead of Redis.
"""

from __future__ import annotations

import asyncio
import contextlib

from redis.asyncio import Redis


class BatchPublisher:
    def __init__(self, redis: Redis) -> None:
        self.redis = redis
        self._pending: list[tuple[str, bytes, asyncio.Future[None]]] = []
        self._ready = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def publish(self, channel: str, data: bytes) -> None:
        future = asyncio.get_running_loop().create_future()
        self._pending.append((channel, data, future))
        self._ready.set()
        if self._task is None:
            self._task = asyncio.create_task(self._send_forever(), name="stream-publisher")
        await future

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _send_forever(self) -> None:
        while True:
            await self._ready.wait()
            self._ready.clear()
            while self._pending:
                batch, self._pending = self._pending, []
                try:
                    async with self.redis.pipeline(transaction=False) as pipe:
                        for channel, data, _ in batch:
                            pipe.publish(channel, data)
                        await pipe.execute()
                except Exception as exc:  # each waiting job sees the failure as its own
                    for _, _, future in batch:
                        if not future.done():
                            future.set_exception(exc)
                else:
                    for _, _, future in batch:
                        if not future.done():
                            future.set_result(None)
