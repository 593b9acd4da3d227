"""Commands packed by hiredis are the bytes redis-py's own packing writes, and what hiredis refuses is handled by
redis-py as before."""

from __future__ import annotations

import enum
from typing import Any

import hiredis
import pytest
from redis.asyncio import Connection, Redis
from redis.asyncio.cluster import ClusterNode
from redis.exceptions import DataError

from conveyor import redis_client, redis_packing


class Backend(enum.StrEnum):
    ARQ = "arq"


ARGUMENTS: list[Any] = [
    "plain",
    "snow ☃ and é",  # UTF-8
    b"\x00\xffraw bytes",
    "",
    0,
    -5,
    2**70,
    1 / 3,
    0.1 + 0.2,
    1e20,
    1e-7,
    1733340000.123456,
    float("inf"),
    Backend.ARQ,  # a str enum goes as its value
    "x" * 10_000,  # past redis-py's buffer cutoff, where it splits its output
]


def python_packed(connection: Connection, *args: Any) -> bytes:
    return b"".join(redis_packing._python_pack(connection, *args))


def test_every_argument_kind_is_packed_to_the_bytes_redis_py_writes() -> None:
    connection = Connection()
    for argument in ARGUMENTS:
        packed = connection.pack_command("SET", "key", argument)
        assert packed == [hiredis.pack_command(("SET", "key", argument))]  # one buffer, from hiredis
        assert b"".join(packed) == python_packed(connection, "SET", "key", argument), argument
    many = ["EVALSHA", "a" * 40, 6, *ARGUMENTS]
    assert b"".join(connection.pack_command(*many)) == python_packed(connection, *many)


def test_a_command_name_of_several_words_is_sent_as_separate_arguments() -> None:
    connection = Connection()
    for name in ("CONFIG GET", b"CONFIG GET"):
        packed = b"".join(connection.pack_command(name, "maxmemory"))
        assert packed == b"*3\r\n$6\r\nCONFIG\r\n$3\r\nGET\r\n$9\r\nmaxmemory\r\n"
        assert packed == python_packed(connection, name, "maxmemory")


def test_what_hiredis_refuses_goes_to_redis_py_a_memoryview_is_sent_and_a_bool_or_none_refused() -> None:
    connection = Connection()
    view = memoryview(b"viewed")
    assert b"".join(connection.pack_command("SET", "key", view)) == python_packed(connection, "SET", "key", b"viewed")
    for refused in (True, None, object()):
        with pytest.raises(DataError):
            connection.pack_command("SET", "key", refused)
    with pytest.raises(UnicodeEncodeError):  # a lone surrogate, as redis-py's strict UTF-8 refuses it
        connection.pack_command("SET", "key", "\ud800")


def test_a_connection_with_another_encoding_keeps_redis_py_packing() -> None:
    connection = Connection(encoding="latin-1")
    packed = connection.pack_command("SET", "key", "é")
    assert b"".join(packed) == b"*3\r\n$3\r\nSET\r\n$3\r\nkey\r\n$1\r\n\xe9\r\n"


def test_every_client_conveyor_builds_packs_with_hiredis() -> None:
    plain = redis_client.connect("redis://127.0.0.1:1/0")
    assert isinstance(plain, Redis)
    assert plain.connection_pool.connection_class.pack_command is redis_packing._pack_command
    sentinel = redis_client.connect("redis+sentinel://127.0.0.1:1/conveyor")
    assert sentinel.connection_pool.connection_class.pack_command is redis_packing._pack_command
    assert ClusterNode("127.0.0.1", 1).connection_class.pack_command is redis_packing._pack_command
