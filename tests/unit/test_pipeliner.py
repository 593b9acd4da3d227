"""Script calls from many tasks in shared round trips (fakeredis): results per caller, failures per caller, scripts
Redis lost loaded again."""

from __future__ import annotations

import asyncio

import fakeredis
import pytest
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from conveyor.pipeliner import Grouped, Pipeliner

INCRBY = "return redis.call('INCRBY', KEYS[1], ARGV[1])"
SET = "return redis.call('SET', KEYS[1], ARGV[1])"


async def test_calls_sent_together_share_a_round_trip_and_each_caller_gets_its_own_result(redis: Redis) -> None:
    pipeliner, incrby = Pipeliner(redis), redis.register_script(INCRBY)
    results = await asyncio.gather(*(pipeliner.call(incrby, ["n"], [i]) for i in (1, 2, 3)))
    assert results == [1, 3, 6]  # in the order sent
    assert await pipeliner.call(incrby, ["n"], [0]) == 6  # a lone call goes on its own


async def test_a_call_that_fails_fails_its_group_and_the_next_group_is_sent(redis: Redis) -> None:
    pipeliner, incrby = Pipeliner(redis), redis.register_script(INCRBY)
    await redis.set("text", "not a number")
    results = await asyncio.gather(
        pipeliner.call(incrby, ["n"], [1]), pipeliner.call(incrby, ["text"], [1]), return_exceptions=True
    )
    assert all(isinstance(r, ResponseError) for r in results), results  # as redis-py's pipeline: its first error
    assert await redis.get("n") == b"1"  # the other call ran
    assert await pipeliner.call(incrby, ["n"], [1]) == 2


async def test_scripts_redis_lost_are_loaded_again(redis: Redis) -> None:
    """A restarted Redis has no scripts: the calls it answers NOSCRIPT go again, their scripts loaded first."""
    pipeliner, incrby = Pipeliner(redis), redis.register_script(INCRBY)
    assert await pipeliner.call(incrby, ["n"], [1]) == 1
    await redis.script_flush()
    assert await asyncio.gather(pipeliner.call(incrby, ["n"], [1]), pipeliner.call(incrby, ["n"], [1])) == [2, 3]


async def test_a_group_that_cannot_reach_redis_fails_each_of_its_callers_and_the_next_one_is_sent(
    redis: Redis, fake_server: fakeredis.FakeServer
) -> None:
    pipeliner = Pipeliner(redis)
    fake_server.connected = False  # Redis unreachable
    incrby = redis.register_script(INCRBY)
    results = await asyncio.gather(*(pipeliner.call(incrby, ["n"], [1]) for _ in range(2)), return_exceptions=True)
    assert all(isinstance(r, RedisConnectionError) for r in results), results
    fake_server.connected = True
    assert await pipeliner.call(incrby, ["n"], [1]) == 1  # nothing of the failed group was applied


async def test_a_caller_cancelled_while_its_command_is_on_its_way_does_not_stop_the_others(redis: Redis) -> None:
    pipeliner, set_ = Pipeliner(redis), redis.register_script(SET)
    first = asyncio.create_task(pipeliner.call(set_, ["a"], [1]))
    second = asyncio.create_task(pipeliner.call(set_, ["b"], [2]))
    await asyncio.sleep(0)  # both queued, one turn of the loop
    first.cancel()
    assert await second == b"OK"
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
