"""A connection held for pipelined commands (fakeredis): replies in order to their own commands, an error reply as that
command's, a cancelled caller leaving the connection usable, a failed connection failing what waits and replaced by
the next group, one closed while idle replaced without failing anyone, and the client's close closing it."""

from __future__ import annotations

import asyncio
from typing import Any

import fakeredis
import pytest
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from conveyor.held_connection import HeldConnection
from tests.unit.conftest import fake_connect


async def test_groups_sent_together_each_get_their_own_replies_in_order(redis: Redis) -> None:
    held = HeldConnection(redis)
    await redis.set("text", "not a number")
    first, second = await asyncio.gather(
        held.execute([("INCRBY", "n", 1), ("INCRBY", "text", 1), ("INCRBY", "n", 1)]),
        held.execute([("INCRBY", "n", 10), ("GET", "n")]),
    )
    assert first[0] == 1 and first[2] == 2
    assert isinstance(first[1], ResponseError)  # that command's reply; the commands after it ran
    assert second == [12, b"12"]


async def test_a_caller_cancelled_on_the_way_leaves_the_connection_to_the_next(
    redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    held = HeldConnection(redis)
    await held.execute([("PING",)])
    assert held._line is not None
    connection, groups_written, both_written = held._line.connection, [], asyncio.Event()
    pack = connection.pack_commands

    def packing(commands: Any) -> Any:  # a group is packed just before it is written
        groups_written.append(commands)
        if len(groups_written) == 2:
            both_written.set()
        return pack(commands)

    monkeypatch.setattr(connection, "pack_commands", packing)
    leaving = asyncio.create_task(held.execute([("SET", "a", "1")]))
    staying = asyncio.create_task(held.execute([("SET", "b", "2"), ("GET", "a")]))
    await both_written.wait()
    leaving.cancel()
    assert await staying == [b"OK", b"1"]  # the left caller's reply did not become this one's
    assert held._line is not None and held._line.connection is connection  # kept, not dropped


async def test_a_failed_connection_fails_what_waits_and_the_next_group_takes_a_new_one(
    redis: Redis, fake_server: fakeredis.FakeServer
) -> None:
    held = HeldConnection(redis)
    await held.execute([("PING",)])
    failed = held._line
    fake_server.connected = False  # Redis gone
    results = await asyncio.gather(held.execute([("SET", "a", "1")]), return_exceptions=True)
    assert isinstance(results[0], RedisConnectionError), results
    fake_server.connected = True
    assert await held.execute([("SET", "a", "2"), ("GET", "a")]) == [b"OK", b"2"]
    assert held._line is not None and held._line is not failed  # taken again from the pool, connected anew


async def test_a_connection_closed_while_idle_is_replaced_before_the_next_group_without_failing_it(
    redis: Redis,
) -> None:
    """As the pool checks a connection before reuse: a Redis that restarted while nothing was owed fails nobody."""
    held = HeldConnection(redis)
    await held.execute([("PING",)])
    idle = held._line
    assert idle is not None
    await idle.connection.disconnect()  # closed under it while it owed nothing
    assert await held.execute([("SET", "a", "1"), ("GET", "a")]) == [b"OK", b"1"]
    assert held._line is not idle


async def test_closing_the_client_closes_the_held_connection(fake_server: fakeredis.FakeServer) -> None:
    client = fake_connect(fake_server)
    held = HeldConnection(client)
    await held.execute([("PING",)])
    assert held._line is not None and held._line.connection.is_connected
    await client.aclose()
    await client.connection_pool.disconnect()
    assert not held._line.connection.is_connected
