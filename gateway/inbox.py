"""One reply list per gateway process, read by one task: every non-streamed answer arrives here.

Workers push ``contract.Reply`` frames (each names its request) to this gateway's inbox; one reader pops them and
resolves the waiting request's future. However many requests wait, the gateway holds one Redis connection for them,
not one blocked ``BLPOP`` each. A Redis outage does not fail the waiting requests: the reader retries until Redis is
back (the answers are in a list, not on pub/sub, so nothing pushed meanwhile is lost), and each request is bounded by
its own deadline. An answer nobody waits for any more (the client left) is dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Awaitable
from typing import cast

from redis.asyncio import Redis
from redis.exceptions import ResponseError

from conveyor import key_layout
from conveyor.contract import Reply
from conveyor.outage import REDIS_DOWN, Outage
from conveyor.pipeliner import round_trip
from conveyor.redis_client import is_cluster

log = logging.getLogger("conveyor.gateway")

#: the reader never blocks longer than this on Redis, so a dead connection is noticed
READ_SECONDS = 1
#: answers taken per round trip once one has arrived
BATCH = 256


class ReplyInbox:
    def __init__(self, redis: Redis, outage: Outage) -> None:
        self.redis = redis
        self.outage = outage
        self.gateway_id = uuid.uuid4().hex
        self.key = key_layout.inbox_key(self.gateway_id)
        self._waiting: dict[str, asyncio.Future[Reply]] = {}
        self._reader: asyncio.Task[None] | None = None
        self.cluster = is_cluster(redis)

    def start(self) -> None:
        self._reader = asyncio.create_task(self._read_forever(), name="reply-inbox")

    async def stop(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader

    def expect(self, request_id: str) -> asyncio.Future[Reply]:
        """Register before enqueueing: the future resolves with the job's answer."""
        future: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        self._waiting[request_id] = future
        return future

    def forget(self, request_id: str) -> None:
        self._waiting.pop(request_id, None)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    async def _read_forever(self) -> None:
        while True:
            try:
                popped, more = await self._pop()
                if popped is not None:
                    for raw in [popped[1], *(more or [])]:
                        self._dispatch(raw)
                self.outage.ok()
            except asyncio.CancelledError:
                raise
            except REDIS_DOWN as exc:
                await asyncio.sleep(self.outage.failed(exc))
            except Exception as exc:  # every non-streamed answer comes through here: the reader must not end
                log.exception("the reply inbox's reader failed; reading on")
                await asyncio.sleep(self.outage.failed(exc))

    async def _pop(self) -> tuple[list[bytes] | None, list[bytes] | None]:
        """The first answer to arrive (``BLPOP``), and those that had arrived with it (``LPOP``). Both go in one round
        trip: Redis runs the ``LPOP`` as soon as the ``BLPOP`` is answered (on a cluster: one after the other)."""
        if self.cluster:
            popped = await cast(Awaitable[list[bytes] | None], self.redis.blpop([self.key], timeout=READ_SECONDS))
            more = await cast(Awaitable[list[bytes] | None], self.redis.lpop(self.key, BATCH)) if popped else None
            return popped, more
        replies = await round_trip(self.redis, [("BLPOP", self.key, READ_SECONDS), ("LPOP", self.key, BATCH)])
        for reply in replies:
            if isinstance(reply, ResponseError):
                raise reply
        return replies[0], replies[1]

    def _dispatch(self, raw: bytes) -> None:
        try:
            reply = Reply.decode(raw)
        except ValueError:
            log.warning("dropping an unreadable reply (%d bytes)", len(raw))
            return
        future = self._waiting.pop(reply.request_id, None)
        if future is not None and not future.done():
            future.set_result(reply)
