"""``gateway.pubsub``: one connection's reader fans messages out to the open streams' queues."""

from __future__ import annotations

import asyncio

import fakeredis
import pytest

from conveyor import redis_client
from gateway.pubsub import CONNECTION_LOST, PubSubMultiplexer, _Link


async def test_a_subscription_is_confirmed_and_its_messages_reach_its_queue_in_order() -> None:
    redis = fakeredis.FakeAsyncRedis()
    mux = PubSubMultiplexer(redis)
    try:
        queue = await mux.subscribe("stream:a")  # returns once Redis confirmed it
        other = await mux.subscribe("stream:b")
        for i in range(3):
            await redis.publish("stream:a", f"frame {i}")
        await redis.publish("stream:b", "elsewhere")
        got = [await asyncio.wait_for(queue.get(), 5) for _ in range(3)]
        assert got == [b"frame 0", b"frame 1", b"frame 2"]
        assert await asyncio.wait_for(other.get(), 5) == b"elsewhere"
    finally:
        await mux.stop()


@pytest.fixture
def link() -> _Link:
    async def lost(link: _Link, channels: list[str]) -> None:
        pass

    return _Link(fakeredis.FakeAsyncRedis(), redis_client.CLASSIC, lost)


async def test_a_health_checks_pong_is_dropped(link: _Link) -> None:
    queue: asyncio.Queue[object] = asyncio.Queue()
    link._queues["stream:a"] = queue
    link._dispatch([b"pong", b"redis-py-health-check"])
    link._dispatch(b"PONG")
    assert queue.empty()


async def test_a_channel_redis_unsubscribed_unasked_fails_its_stream(link: _Link) -> None:
    queue: asyncio.Queue[object] = asyncio.Queue()
    link._queues["stream:a"] = queue
    link._dispatch([b"unsubscribe", b"stream:a", 0])
    assert queue.get_nowait() is CONNECTION_LOST
    assert "stream:a" not in link._queues
