"""One pub/sub connection per gateway process, fanned out to one asyncio queue per open stream."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.client import PubSub

from conveyor import contract, redis_client

log = logging.getLogger("conveyor.gateway")

#: put on every open queue when the pub/sub connection breaks; the relay turns it into an error event
CONNECTION_LOST = object()
#: Redis confirms a SUBSCRIBE within a round trip; far longer than this means it is not answering
CONFIRM_TIMEOUT_SECONDS = 5.0
#: the reader never blocks longer than this on one read (the client's socket timeout would call a quiet
#: connection dead)
READ_SECONDS = 1.0


class PubSubMultiplexer:
    """``subscribe`` returns only once Redis has confirmed the subscription, so a publish that follows an
    enqueue can never be missed (pub/sub drops what was published before the subscriber subscribed)."""

    def __init__(self, redis: Redis) -> None:
        # the client SUBSCRIBE goes through: ``redis`` itself, or a plain client to a node of a Redis Cluster (which
        # sees every node's PUBLISH); ``redis_client.close(redis)`` closes it
        self._redis = redis_client.subscriber(redis)
        self._pubsub: PubSub | None = None
        self._queues: dict[str, asyncio.Queue[Any]] = {}
        self._confirmations: dict[str, asyncio.Future[None]] = {}
        self._reader: asyncio.Task[None] | None = None
        self._connecting = asyncio.Lock()
        # a channel of our own keeps the connection subscribed while no stream is open
        self._home = f"{contract.KEY_PREFIX}:gateway:{uuid.uuid4().hex}"

    async def start(self) -> None:
        self._reader = asyncio.create_task(self._read_forever(), name="pubsub-reader")

    async def stop(self) -> None:
        if self._reader:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        await self._drop_connection()

    async def subscribe(self, channel: str) -> asyncio.Queue[Any]:
        pubsub = await self._connection()
        queue: asyncio.Queue[Any] = asyncio.Queue()
        confirmed = asyncio.get_running_loop().create_future()
        self._queues[channel] = queue
        self._confirmations[channel] = confirmed
        try:
            await pubsub.subscribe(channel)
            await asyncio.wait_for(confirmed, CONFIRM_TIMEOUT_SECONDS)
        except BaseException:
            self._queues.pop(channel, None)
            self._confirmations.pop(channel, None)
            raise
        return queue

    async def unsubscribe(self, channel: str) -> None:
        self._queues.pop(channel, None)
        self._confirmations.pop(channel, None)
        if self._pubsub is not None:
            with contextlib.suppress(Exception):
                await self._pubsub.unsubscribe(channel)

    async def _connection(self) -> PubSub:
        # one at a time: a subscribe racing the reader's (re)connection would otherwise open a second connection,
        # and the confirmations arriving on the one the reader does not read would never come
        async with self._connecting:
            if self._pubsub is None:
                pubsub = self._redis.pubsub()
                await pubsub.subscribe(self._home)
                self._pubsub = pubsub
            return self._pubsub

    async def _drop_connection(self) -> None:
        pubsub, self._pubsub = self._pubsub, None
        if pubsub is not None:
            with contextlib.suppress(Exception):
                await pubsub.aclose()  # type: ignore[no-untyped-call]

    async def _read_forever(self) -> None:
        while True:
            try:
                pubsub = await self._connection()
                while True:
                    message = await pubsub.get_message(timeout=READ_SECONDS)
                    if message is not None:
                        self._dispatch(message)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("pub/sub connection lost: %s; failing %d open streams", exc, len(self._queues))
                for channel, queue in list(self._queues.items()):
                    queue.put_nowait(CONNECTION_LOST)
                    future = self._confirmations.pop(channel, None)
                    if future and not future.done():
                        future.set_exception(exc)
                self._queues.clear()
                await self._drop_connection()
                await asyncio.sleep(0.5)

    def _dispatch(self, message: dict[str, Any]) -> None:
        channel = message["channel"]
        channel = channel.decode() if isinstance(channel, bytes) else channel
        if message["type"] == "subscribe":
            future = self._confirmations.pop(channel, None)
            if future is not None and not future.done():
                future.set_result(None)
        elif message["type"] == "message":
            queue = self._queues.get(channel)
            if queue is not None:
                queue.put_nowait(message["data"])
