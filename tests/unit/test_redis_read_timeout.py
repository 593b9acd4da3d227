"""The read timeout every Redis connection uses (``conveyor.redis_read_timeout``): with a timer of its own and on its
loop's watch, it behaves as ``asyncio.timeout`` in each case redis-py relies on; a Redis that never answers still fails
with redis-py's ``TimeoutError``; a watch expires only the reads that are due and forgets a loop with none pending; and
every client ``redis_client`` builds uses it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager

import pytest
import redis.asyncio.connection as redis_connection
from redis.asyncio import Redis
from redis.exceptions import TimeoutError as RedisTimeoutError

from conveyor import redis_client, redis_read_timeout
from conveyor.redis_read_timeout import ReadTimeout, _Watch

Timeout = Callable[[float | None], AbstractAsyncContextManager[None]]


@pytest.fixture(params=["asyncio", "timer", "watched"])
def bound(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Timeout:
    """``asyncio.timeout``, or Conveyor's with a timer per read, or with every read on its loop's watch."""
    if request.param == "asyncio":
        return asyncio.timeout
    if request.param == "watched":
        watched_every_read(monkeypatch)
    return ReadTimeout


def watched_every_read(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(redis_read_timeout, "WATCHED_FROM_SECONDS", 0)
    monkeypatch.setattr(redis_read_timeout, "TICK_SECONDS", 0.005)


async def test_a_block_that_outlives_its_delay_raises_timeout_error(bound: Timeout) -> None:
    async def read() -> None:
        async with bound(0.01):
            await asyncio.Event().wait()

    task = asyncio.create_task(read())
    await asyncio.wait({task}, timeout=30)  # the bound of a hang, far above the delay
    assert isinstance(task.exception(), TimeoutError)


async def test_no_delay_means_no_limit(bound: Timeout) -> None:
    done = asyncio.get_running_loop().create_future()
    asyncio.get_running_loop().call_soon(done.set_result, "answered")
    async with bound(None):
        assert await done == "answered"


async def test_a_block_that_ends_in_time_leaves_no_timer_behind(bound: Timeout) -> None:
    async with bound(0):  # due at once, but the block ends before the loop runs its timers
        pass
    for _ in range(3):
        await asyncio.sleep(0)  # a timer left running would cancel this task here
    assert asyncio.current_task().cancelling() == 0  # type: ignore[union-attr]


async def test_a_cancel_from_elsewhere_stays_a_cancel(bound: Timeout) -> None:
    inside = asyncio.Event()

    async def read() -> None:
        async with bound(60):
            inside.set()
            await asyncio.Event().wait()

    task = asyncio.create_task(read())
    await inside.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_a_cancel_from_elsewhere_as_the_delay_passes_stays_a_cancel(bound: Timeout) -> None:
    async def read() -> None:
        async with bound(0):
            try:
                await asyncio.Event().wait()  # the timer cancels this
            finally:
                asyncio.current_task().cancel()  # type: ignore[union-attr]  # and a cancel from elsewhere comes too

    with pytest.raises(asyncio.CancelledError):
        await asyncio.create_task(read())


@asynccontextmanager
async def silent_redis() -> AsyncIterator[int]:
    """A server that accepts connections and reads commands but never answers: a Redis that hangs."""

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(-1)
        writer.close()

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()


@pytest.mark.parametrize("watched", [False, True], ids=["timer", "watched"])
async def test_a_redis_that_never_answers_fails_with_redis_pys_timeout_error(
    watched: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    if watched:
        watched_every_read(monkeypatch)
    async with silent_redis() as port:
        client = Redis(host="127.0.0.1", port=port, socket_timeout=0.05)
        try:
            with pytest.raises(RedisTimeoutError, match="Timeout reading from"):
                await asyncio.wait_for(client.ping(), 30)  # the bound of a hang, far above the timeout
        finally:
            await client.aclose()


async def test_a_watch_expires_only_the_reads_that_are_due_then_forgets_its_loop(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    watched_every_read(monkeypatch)
    answer = asyncio.get_running_loop().create_future()

    async def read(delay: float) -> str:
        async with ReadTimeout(delay):
            return str(await asyncio.shield(answer))

    short, long = asyncio.create_task(read(0.01)), asyncio.create_task(read(60))
    await asyncio.wait({short}, timeout=30)  # the bound of a hang, far above the delay
    assert isinstance(short.exception(), TimeoutError)
    assert not long.done()
    answer.set_result("answered")
    assert await long == "answered"
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(10):
        while loop in _Watch.of_loop:  # noqa: ASYNC110  # its next tick finds nothing pending: no event says so
            await asyncio.sleep(0)


def test_every_connection_reads_with_it() -> None:
    assert redis_client.connect("redis://127.0.0.1:1/0")  # building a client installs it (redis_client's import)
    assert redis_connection.async_timeout is ReadTimeout  # type: ignore[attr-defined]
