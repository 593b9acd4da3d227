"""Redis commands from many tasks in shared pipelines (fakeredis): results per caller, failures per caller."""

from __future__ import annotations

import asyncio

import fakeredis
import pytest
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError

from conveyor.pipeliner import Grouped, Pipeliner


async def test_commands_sent_together_share_a_pipeline_and_each_caller_gets_its_own_result(redis: Redis) -> None:
    pipeliner = Pipeliner(redis)
    results = await asyncio.gather(*(pipeliner.send(lambda pipe, i=i: pipe.incrby("n", i)) for i in (1, 2, 3)))
    assert results == [1, 3, 6]  # in the order sent
    assert await pipeliner.send(lambda pipe: pipe.get("n")) == b"6"  # a lone command goes on its own


async def test_a_failed_pipeline_fails_each_of_its_callers_and_the_next_one_is_sent(
    redis: Redis, fake_server: fakeredis.FakeServer
) -> None:
    pipeliner = Pipeliner(redis)
    fake_server.connected = False  # Redis unreachable
    results = await asyncio.gather(
        *(pipeliner.send(lambda pipe: pipe.incr("n")) for _ in range(2)), return_exceptions=True
    )
    assert all(isinstance(r, RedisConnectionError) for r in results), results
    fake_server.connected = True
    assert await pipeliner.send(lambda pipe: pipe.incr("n")) == 1  # nothing of the failed pipeline was applied


async def test_a_caller_cancelled_while_its_command_is_on_its_way_does_not_stop_the_others(redis: Redis) -> None:
    pipeliner = Pipeliner(redis)
    first = asyncio.create_task(pipeliner.send(lambda pipe: pipe.set("a", 1)))
    second = asyncio.create_task(pipeliner.send(lambda pipe: pipe.set("b", 2)))
    await asyncio.sleep(0)  # both queued, one turn of the loop
    first.cancel()
    assert await second is True
    with pytest.raises(asyncio.CancelledError):
        await first
    assert await redis.get("b") == b"2"


async def test_an_item_whose_caller_was_cancelled_before_its_group_went_is_not_sent() -> None:
    """As a call never made: a request whose client left before its admission went is not enqueued behind the cancel
    the gateway sends for it."""
    sent: list[str] = []
    on_its_way, gate = asyncio.Event(), asyncio.Event()

    async def flush(items: list[str]) -> list[str]:
        sent.extend(items)
        on_its_way.set()
        await gate.wait()
        return items

    grouped: Grouped[str, str] = Grouped(flush)
    first = asyncio.create_task(grouped.send("first"))
    await on_its_way.wait()
    left = asyncio.create_task(grouped.send("left"))
    stays = asyncio.create_task(grouped.send("stays"))
    await asyncio.sleep(0)  # both wait for the next group
    left.cancel()
    gate.set()
    assert (await first, await stays) == ("first", "stays")
    assert left.cancelled()
    assert sent == ["first", "stays"]
