"""The pool's check of a connection before reuse, without an event-loop turn.

redis-py's asyncio pool checks every connection it hands out for bytes nobody read (a reply left over, or the
server's end of the stream): a command must never read an earlier command's reply. redis-py 5.3 does it, with hiredis,
by reading the socket under ``asyncio.timeout(0)``: the caller's task sleeps for one loop turn and is woken by a
cancellation turned into ``TimeoutError``. That is paid on every command and pipeline taken from a pool: ~7.5 us of
CPU in the process here, and a plain ``GET`` costs ~13 us less without it (docs/performance-log.md, "A connection's
reuse checked without a loop turn").

redis-py 7 replaced that read with a look at what has already arrived (redis/redis-py#4063): bytes the hiredis reader
holds, bytes in the connection's stream buffer, or the stream's end. ``install`` gives redis-py 5.3 (arq keeps it below
6) the same check. Its answers are the old one's for everything that arrived before the check; bytes still in the
kernel's buffer are read at the loop's next turn, and a connection that received them is found out at its next
reuse, as bytes arriving just after the old check were.
"""

from __future__ import annotations

import asyncio
from typing import cast

import hiredis
from redis._parsers.hiredis import _AsyncHiredisParser
from redis._parsers.socket import SERVER_CLOSED_CONNECTION_ERROR
from redis.exceptions import ConnectionError as RedisConnectionError

_redis_pys_check = _AsyncHiredisParser.can_read_destructive


async def _has_unread_bytes(self: _AsyncHiredisParser) -> bool:
    """True when the connection holds bytes nobody asked for, or its server closed it: the pool replaces it."""
    reader, stream = cast(hiredis.Reader, self._reader), self._stream
    if not self._connected or stream is None:
        raise RedisConnectionError(SERVER_CLOSED_CONNECTION_ERROR)
    if not isinstance(stream, asyncio.StreamReader):  # another kind of stream (fakeredis's): checked as redis-py does
        return bool(await _redis_pys_check(self))
    return bool(reader.has_data() or stream.at_eof() or stream._buffer)  # type: ignore[attr-defined]


def install() -> None:
    """Every hiredis asyncio connection is checked this way from now on (idempotent)."""
    _AsyncHiredisParser.can_read_destructive = _has_unread_bytes  # type: ignore[method-assign]
