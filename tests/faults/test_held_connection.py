"""The connection the hot path's script calls are pipelined on (``conveyor.held_connection``), against a real
redis-server that hangs and then dies: a hung Redis is a ``TimeoutError`` after the client's read timeout, not a hang; a
dead one a ``ConnectionError``; and each time the next group, once Redis is back, is answered on a new connection."""

from __future__ import annotations

import os
import signal

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from conveyor import redis_client
from conveyor.held_connection import HeldConnection
from launcher.redis_server import RedisServer


async def test_a_hung_redis_times_out_a_dead_one_fails_and_each_time_the_next_group_goes_on_a_new_connection(
    own_redis: RedisServer,
) -> None:
    client = redis_client.connect(own_redis.url)
    held = HeldConnection(client)
    try:
        assert await held.execute([("SET", "k", "1"), ("INCR", "k")]) == [b"OK", 2]
        assert own_redis.process is not None
        os.kill(own_redis.process.pid, signal.SIGSTOP)  # alive, answering nothing
        try:
            with pytest.raises(RedisTimeoutError):
                await held.execute([("INCR", "k")])
        finally:
            os.kill(own_redis.process.pid, signal.SIGCONT)
        assert await held.execute([("PING",)]) == [b"PONG"]
        own_redis.stop()
        with pytest.raises(RedisConnectionError):
            await held.execute([("INCR", "k")])
        own_redis.start()
        assert await held.execute([("SET", "k", "9"), ("GET", "k")]) == [b"OK", b"9"]
    finally:
        await redis_client.close(client)
