"""Redis work from many tasks, sent in groups: one write and one read for a group instead of a round trip each.

An item goes at once when nothing is on its way; items that arrive while a group is on its way wait and go together
in the next one. Each caller awaits its own item's result, or the group's failure as its own; a caller cancelled
before its group went takes its item back. A caller's items leave in the order it sends them (it awaits each before
sending the next). ``Pipeliner`` sends a group of commands as one pipeline; ``worker.frames`` sends a group of
stream frames as one script call.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Generic, TypeVar, cast

from redis.asyncio import Redis
from redis.asyncio.client import Pipeline
from redis.exceptions import NoScriptError, ResponseError

from conveyor.redis_client import is_cluster

#: queues one command on the pipeline it is given (a Lua script's call is awaited to queue it)
Queue = Callable[[Pipeline], Awaitable[Any] | Any]

T = TypeVar("T")
R = TypeVar("R")


class Grouped(Generic[T, R]):
    """Items of many tasks handed to ``flush`` in groups; ``flush`` answers one result per item, in order."""

    def __init__(self, flush: Callable[[list[T]], Awaitable[Sequence[R]]]) -> None:
        self._flush = flush
        self._pending: list[tuple[T, asyncio.Future[R]]] = []
        self._sender: asyncio.Task[None] | None = None

    async def send(self, item: T) -> R:
        """The result of ``item``, once its group went."""
        result: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._pending.append((item, result))
        if self._sender is None or self._sender.done():
            self._sender = asyncio.create_task(self._send_pending(), name=f"redis-{type(self).__name__}")
        return await result

    async def close(self) -> None:
        if self._sender is not None:
            self._sender.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sender

    async def _send_pending(self) -> None:
        while self._pending:
            # an item whose caller was cancelled before its group went is not sent, as a call never made: a request
            # whose client left before its admission went is not enqueued behind the cancel sent for it
            batch = [(item, result) for item, result in self._pending if not result.cancelled()]
            self._pending = []
            if not batch:
                continue
            try:
                results = await self._flush([item for item, _ in batch])
            except Exception as exc:  # a Redis outage: each caller sees it as its own, and retries on its own
                for _, result in batch:
                    if not result.done():
                        result.set_exception(exc)
                continue
            for (_, result), value in zip(batch, results, strict=True):
                if not result.done():  # its caller was cancelled meanwhile
                    result.set_result(value)


class Pipeliner(Grouped[Queue, Any]):
    def __init__(self, redis: Redis) -> None:
        super().__init__(self._execute)
        self.redis = redis
        self.cluster = is_cluster(redis)
        #: the scripts this pipeliner saw loaded in Redis
        self._loaded: set[str] = set()

    async def _execute(self, queues: list[Queue], again: bool = False) -> list[Any]:
        """One round trip for the group. redis-py asks ``SCRIPT EXISTS`` (and loads what is missing) before every
        pipeline that calls scripts, a second round trip each time: here only until a script is known to be loaded.
        Calls that Redis answers ``NOSCRIPT`` (it lost its scripts: a restart) did not run: they go again, checked."""
        if self.cluster:  # a cluster pipeline cannot carry scripts: the group's calls go at once, each to its node
            return list(await asyncio.gather(*(queue(cast(Pipeline, self.redis)) for queue in queues)))
        async with self.redis.pipeline(transaction=False) as pipe:
            for queue in queues:
                queued = queue(pipe)
                if inspect.isawaitable(queued):
                    await queued
            shas = {script.sha for script in pipe.scripts}
            if shas <= self._loaded:
                pipe.scripts.clear()
            results = list(await pipe.execute(raise_on_error=False))
        missing = [i for i, result in enumerate(results) if isinstance(result, NoScriptError)]
        self._loaded = self._loaded - shas if missing else self._loaded | shas
        if missing and not again:
            retried = await self._execute([queues[i] for i in missing], again=True)
            for i, result in zip(missing, retried, strict=True):
                results[i] = result
        for result in results:  # as ``execute()`` would have: the group fails with its first error
            if isinstance(result, ResponseError):
                raise result
        return results
