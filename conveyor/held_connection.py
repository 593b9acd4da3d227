"""One connection of a client's pool, held for the hot path's pipelined commands: a group of commands is written at
once, and the replies owed are read in order by one reader task and handed to the commands they answer.

Through redis-py's command path a script call costs its caller 88-107 us of CPU here, and 79-89 on a connection taken
from the pool for the group: a checkout and release, the send in a task of its own (``asyncio.wait_for`` on Python 3.11)
and the read in the caller's. Written to the held connection and answered by its reader it costs 61-81
(docs/performance-log.md, "Script calls on a held connection").

The connection is one the client's pool made, so its address, TLS, password and database, and Sentinel's current master,
are the client's; it stays taken from the pool, so closing the client closes it too. Replies are read with the
connection's own ``read_response``, so each read is bounded by the client's read timeout and a demoted Sentinel master
is a ``ConnectionError``, as anywhere else. A reply that is an error is that command's reply. A connection that fails
(closed, unreachable, or a read that timed out) fails every command still waiting on it with that error, and the next
group takes a new connection from the pool; one closed while it owed nothing (a Redis restart) is found before the next
group is written, as the pool finds it, and replaced without failing anyone. A caller cancelled while its replies are on
their way leaves them to the reader: the commands after it still get their own. The reader runs only while replies are
owed. Not for a Redis Cluster, and not for blocking commands.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Sequence
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError

from conveyor.redis_client import connection_closed_in_use


class _Line:
    """A held connection, the replies it owes (oldest first) and the task that reads them."""

    __slots__ = ("connection", "reader", "waiting")

    def __init__(self, connection: AbstractConnection) -> None:
        self.connection = connection
        self.waiting: deque[asyncio.Future[Any]] = deque()
        self.reader: asyncio.Task[None] | None = None


class HeldConnection:
    def __init__(self, redis: Redis) -> None:
        self._pool = redis.connection_pool
        self._line: _Line | None = None
        self._taking = asyncio.Lock()

    async def execute(self, commands: Sequence[tuple[Any, ...]]) -> list[Any]:
        """Each command's reply, in order (a command Redis refused has its ``ResponseError`` as its reply)."""
        line = await self._usable_line()
        loop = asyncio.get_running_loop()
        replies = [loop.create_future() for _ in commands]
        line.waiting.extend(replies)
        try:
            line.connection._writer.writelines(line.connection.pack_commands(commands))  # type: ignore[union-attr]
        except Exception as exc:  # the connection was closed under it
            failure = RedisConnectionError(f"Error writing to Redis: {exc}")
            await self._drop(line, failure)
            raise failure from exc
        if line.reader is None or line.reader.done():
            line.reader = loop.create_task(self._read_owed(line), name="redis-held-connection")
        await replies[-1]  # replies come in order: once the last is in, so are the others
        return [reply.result() for reply in replies]

    async def _usable_line(self) -> _Line:
        """The held line; while it owes nothing, checked as the pool checks a connection before reuse (a Redis that
        restarted or closed it while idle), and replaced quietly if it fails that check."""
        line = self._line
        if line is not None and not line.waiting:
            try:
                stale = await line.connection.can_read_destructive()  # type: ignore[no-untyped-call]
            except RedisError:
                stale = True
            if stale:
                await self._drop(line, RedisConnectionError("the held connection was closed while idle"))
                line = None
        return line or await self._take()

    async def _take(self) -> _Line:
        async with self._taking:
            if self._line is None:
                with connection_closed_in_use():
                    self._line = _Line(await self._pool.get_connection())
            return self._line

    async def _read_owed(self, line: _Line) -> None:
        try:
            while line.waiting:
                try:
                    reply: Any = await line.connection.read_response(disconnect_on_error=False)
                except ResponseError as refused:
                    reply = refused
                waiter = line.waiting.popleft()
                if not waiter.done():  # its caller was cancelled: the reply is dropped
                    waiter.set_result(reply)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # redis-py's ConnectionError or TimeoutError, or the connection closed under the read
            closed_under = RedisConnectionError(f"connection closed under the read ({type(exc).__name__}: {exc})")
            await self._drop(line, exc if isinstance(exc, RedisError) else closed_under)

    async def _drop(self, line: _Line, failure: Exception) -> None:
        """Fail what ``line`` still owes and give its connection back to the pool closed."""
        if self._line is not line:
            return  # dropped already
        self._line = None
        while line.waiting:
            waiter = line.waiting.popleft()
            if not waiter.done():
                waiter.set_exception(failure)
                waiter.exception()  # its caller may have left: no "never retrieved" log (an await still raises)
        if line.reader is not None and line.reader is not asyncio.current_task():
            line.reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await line.reader
        await line.connection.disconnect()
        await self._pool.release(line.connection)
