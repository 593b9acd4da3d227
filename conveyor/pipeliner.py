"""Redis work from many tasks, sent in groups: one write and one read for a group instead of a round trip each.

An item goes at once when nothing is on its way; items that arrive while a group is on its way wait and go together
in the next one. Each caller awaits its own item's result, or the group's failure as its own; a caller cancelled
before its group went takes its item back. A caller's items leave in the order it sends them (it awaits each before
sending the next). ``Pipeliner`` sends a group of script calls in one round trip; ``worker.frames`` sends a group of
stream frames, and ``gateway.redis_queue`` a group of one model's admissions, as one script call.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Generic, TypeVar

from redis.asyncio import Redis
from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError, ResponseError

from conveyor.held_connection import HeldConnection
from conveyor.redis_client import connection_closed_in_use, is_cluster

#: a Lua script's call: the script, its keys, its arguments
ScriptCall = tuple[AsyncScript, Sequence[Any], Sequence[Any]]

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


class Pipeliner(Grouped[ScriptCall, Any]):
    """Script calls of many tasks, a group in one round trip. The group is written on a connection the pipeliner holds
    and its replies read by that connection's reader (``conveyor.held_connection``), without redis-py's pipeline object
    (its per-command bookkeeping cost ~7 us a call: docs/performance-log.md, "Script calls sent without redis-py's
    pipeline") or its command path."""

    def __init__(self, redis: Redis) -> None:
        super().__init__(self._execute)
        self.redis = redis
        #: None on a cluster, which takes no pipelined scripts
        self._held = None if is_cluster(redis) else HeldConnection(redis)
        #: the scripts this pipeliner loaded into Redis and has not seen answered ``NOSCRIPT`` since
        self._loaded: set[str] = set()

    async def call(self, script: AsyncScript, keys: Sequence[Any], args: Sequence[Any]) -> Any:
        """The script's reply, sent in the next group."""
        return await self.send((script, keys, args))

    async def run(self, calls: list[ScriptCall]) -> list[Any]:
        """These calls' replies, at once in one round trip (for a caller that groups its own items)."""
        return await self._execute(calls)

    async def _execute(self, calls: list[ScriptCall], again: bool = False) -> list[Any]:
        """One round trip for the group, once its scripts are loaded (a round trip each, the first time only). Calls
        that Redis answers ``NOSCRIPT`` (it lost its scripts: a restart) did not run: they go again, loaded first."""
        if self._held is None:  # a cluster takes no pipelined scripts: the group's calls go at once, each to its node
            return list(await asyncio.gather(*(script(keys, args, self.redis) for script, keys, args in calls)))
        for script in {script.sha: script for script, _, _ in calls if script.sha not in self._loaded}.values():
            await self.redis.script_load(script.script)
            self._loaded.add(script.sha)
        commands = [("EVALSHA", script.sha, len(keys), *keys, *args) for script, keys, args in calls]
        results = await self._held.execute(commands)
        missing = [i for i, result in enumerate(results) if isinstance(result, NoScriptError)]
        self._loaded -= {calls[i][0].sha for i in missing}
        if missing and not again:
            retried = await self._execute([calls[i] for i in missing], again=True)
            for i, result in zip(missing, retried, strict=True):
                results[i] = result
        for result in results:  # as redis-py's pipeline would have: the group fails with its first error
            if isinstance(result, ResponseError):
                raise result
        return results


async def round_trip(redis: Redis, commands: list[tuple[Any, ...]]) -> list[Any]:
    """Commands written at once on one connection of the client's pool (not a cluster's), and their raw replies read
    in order; a command that failed has its ``ResponseError`` as its reply, the others' replies follow."""
    pool = redis.connection_pool
    with connection_closed_in_use():
        connection = await pool.get_connection()
        try:
            await connection.send_packed_command(connection.pack_commands(commands))
            results: list[Any] = []
            for _ in commands:
                try:
                    results.append(await connection.read_response())
                except ResponseError as exc:  # that command's error: the others' replies follow
                    results.append(exc)
            return results
        except BaseException:
            await connection.disconnect()  # replies may be left unread: no later command may read them as its own
            raise
        finally:
            await pool.release(connection)
