"""Redis commands from many tasks, sent in pipelines: one write and one read for a group instead of a round trip each.

A command goes at once when nothing is on its way; commands that arrive while a pipeline is on its way wait and go
together in the next one. Each caller awaits its own command's result, or the pipeline's failure as its own. A
caller's commands leave in the order it sends them (it awaits each before sending the next).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
from collections.abc import Awaitable, Callable
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.client import Pipeline

#: queues one command on the pipeline it is given (a Lua script's call is awaited to queue it)
Queue = Callable[[Pipeline], Awaitable[Any] | Any]


class Pipeliner:
    def __init__(self, redis: Redis) -> None:
        self.redis = redis
        self._pending: list[tuple[Queue, asyncio.Future[Any]]] = []
        self._sender: asyncio.Task[None] | None = None

    async def send(self, queue: Queue) -> Any:
        """The result of the command ``queue`` puts on a pipeline."""
        result: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending.append((queue, result))
        if self._sender is None or self._sender.done():
            self._sender = asyncio.create_task(self._send_pending(), name="redis-pipeliner")
        return await result

    async def close(self) -> None:
        if self._sender is not None:
            self._sender.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sender

    async def _send_pending(self) -> None:
        while self._pending:
            batch, self._pending = self._pending, []
            try:
                async with self.redis.pipeline(transaction=False) as pipe:
                    for queue, _ in batch:
                        queued = queue(pipe)
                        if inspect.isawaitable(queued):
                            await queued
                    results = await pipe.execute()
            except Exception as exc:  # a Redis outage: each caller sees it as its own, and retries on its own
                for _, result in batch:
                    if not result.done():
                        result.set_exception(exc)
                continue
            for (_, result), value in zip(batch, results, strict=True):
                if not result.done():  # its caller was cancelled meanwhile
                    result.set_result(value)
