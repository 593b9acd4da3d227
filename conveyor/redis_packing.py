"""Commands packed by hiredis (C) instead of redis-py's Python, on every asyncio connection.

redis-py's synchronous client packs commands with ``hiredis.pack_command`` when hiredis is installed; its asyncio
client (5.3) always packs them in Python, one ``Encoder.encode`` and a few joins per argument. Conveyor's scripts take
many arguments (an admission carries 19, a group of stream frames 8 or more per frame): packing an admission took
13 us instead of 2, and the worker's CPU per stream chunk was a tenth higher (docs/performance-log.md, "Commands
packed in C").
``install`` gives the asyncio connections the synchronous client's packing: the same bytes for every str,
bytes, int and float (a unit test compares them), one buffer per command. Anything else hiredis refuses (a
memoryview, a bool, None) goes to redis-py's own packing, which sends the memoryview and raises ``DataError`` for
the rest, as before. A connection whose encoder is not strict UTF-8 (Conveyor builds none) keeps redis-py's packing.
"""

from __future__ import annotations

from typing import Any

import hiredis
from redis.asyncio.connection import AbstractConnection

_python_pack = AbstractConnection.pack_command


def _pack_command(self: AbstractConnection, *args: Any) -> list[bytes]:
    encoder = self.encoder
    if encoder.encoding != "utf-8" or encoder.encoding_errors != "strict":
        return _python_pack(self, *args)
    name = args[0]
    if isinstance(name, str):  # a command name with words in it ("CONFIG GET") is sent as separate arguments
        args = (*name.encode().split(), *args[1:])
    elif b" " in name:
        args = (*name.split(), *args[1:])
    try:
        return [hiredis.pack_command(args)]
    except TypeError:
        return _python_pack(self, *args)


def install() -> None:
    """Pack every asyncio connection's commands with hiredis from now on (idempotent)."""
    AbstractConnection.pack_command = _pack_command  # type: ignore[method-assign]
