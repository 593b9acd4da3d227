"""The pool's check of a connection before reuse (``conveyor.redis_reuse_check``): a connection holding a reply nobody
asked for, or one its server closed, is replaced before the next command, as redis-py's own check does; the check
answers at once instead of after a loop turn; and every client ``redis_client`` builds uses it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import hiredis
import pytest
from redis._parsers.hiredis import _AsyncHiredisParser
from redis.asyncio import Redis
from redis.asyncio.connection import Connection

from conveyor import redis_client, redis_reuse_check

#: what the server does after answering a connection's first ``ECHO``: sends a stray reply, or closes the connection
AfterFirst = Callable[[asyncio.StreamWriter], None]


def stray_reply(writer: asyncio.StreamWriter) -> None:
    writer.write(b"$5\r\nstray\r\n")


def close(writer: asyncio.StreamWriter) -> None:
    writer.close()


@asynccontextmanager
async def echo_server(after_first: AfterFirst | None = None) -> AsyncIterator[tuple[int, list[int]]]:
    """A server answering ``PING`` (redis-py's health check), and every other command with its last argument
    (``ECHO``'s answer; redis-py reads and ignores what its ``CLIENT SETINFO`` gets on connecting); yields its port and
    a count of the connections it took."""
    connections = [0]
    served: list[tuple[asyncio.Task[None], asyncio.StreamWriter]] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections[0] += 1
        served.append((asyncio.current_task(), writer))  # type: ignore[arg-type]
        parser = hiredis.Reader()
        echoed = 0
        while data := await reader.read(65536):
            parser.feed(data)
            while (command := parser.gets()) is not False:
                if command[0].upper() == b"PING":  # the health check
                    writer.write(b"+PONG\r\n")
                    continue
                word = command[-1]
                writer.write(b"$%d\r\n%s\r\n" % (len(word), word))
                if command[0].upper() == b"ECHO":
                    echoed += 1
                    if echoed == 1 and after_first is not None:
                        after_first(writer)
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1], connections
    finally:
        server.close()
        for _, writer in served:
            writer.close()  # its task sees the end of its stream and ends
        await asyncio.gather(*(task for task, _ in served))
        await server.wait_closed()


async def until(condition: Callable[[], bool]) -> None:
    """Wait for what the loop delivers in its own time (the server's bytes, its end of the stream); no event says so."""
    async with asyncio.timeout(30):  # the bound of a hang
        while not condition():  # noqa: ASYNC110
            await asyncio.sleep(0)


def arrived(connection: Connection) -> bool:
    """Whether the stray reply or the end of the stream reached the client (the stray reply may come in one read
    with the first answer, into the parser's buffer)."""
    stream = connection._reader
    assert stream is not None
    return bool(connection._parser._reader.has_data() or stream._buffer or stream.at_eof())  # type: ignore[attr-defined]


def pooled(client: Redis) -> Connection:
    (connection,) = client.connection_pool._available_connections  # type: ignore[attr-defined]
    return connection  # type: ignore[no-any-return]


@pytest.mark.parametrize("after_first", [stray_reply, close], ids=["stray reply", "closed by the server"])
async def test_a_connection_that_is_not_clean_is_replaced_before_the_next_command(after_first: AfterFirst) -> None:
    async with echo_server(after_first) as (port, connections):
        client = redis_client.connect(f"redis://127.0.0.1:{port}/0")
        try:
            assert await client.echo("first") == b"first"
            connection = pooled(client)
            await until(lambda: arrived(connection))
            assert await client.echo("second") == b"second"  # not the stray reply, not a closed connection's error
            assert connections[0] == 2
        finally:
            await redis_client.close(client)


async def test_a_clean_connection_is_kept_and_the_check_answers_without_a_loop_turn() -> None:
    async with echo_server() as (port, connections):
        client = redis_client.connect(f"redis://127.0.0.1:{port}/0")
        try:
            assert await client.echo("first") == b"first"
            check = pooled(client).can_read_destructive()
            try:
                with pytest.raises(StopIteration) as answered:
                    check.send(None)  # redis-py 5.3's own check suspends here until the loop's next turn
                assert answered.value.value is False
            finally:
                check.close()
            assert await client.echo("second") == b"second"
            assert connections[0] == 1
        finally:
            await redis_client.close(client)


def test_every_connection_is_checked_with_it() -> None:
    assert redis_client.connect("redis://127.0.0.1:1/0")  # building a client installs it (redis_client's import)
    assert _AsyncHiredisParser.can_read_destructive is redis_reuse_check._has_unread_bytes
