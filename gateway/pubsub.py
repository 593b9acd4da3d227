"""One pub/sub connection per gateway process, fanned out to one asyncio queue per open stream."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.client import PubSub

from conveyor import redis_client

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
    enqueue can never be missed (pub/sub drops what was published before the subscriber subscribed).

    One connection (``_Link``) per Redis, or on a cluster per node: a sharded channel is subscribed to on the node
    that owns its slot (``redis_client.subscriber``)."""

    def __init__(self, redis: Redis) -> None:
        self._redis = redis
        self._commands = redis_client.pubsub(redis)
        self._links: dict[int, _Link] = {}  # by id() of the client each reads through
        self._link_of: dict[str, _Link] = {}  # the channels open now

    async def start(self) -> None:
        """Nothing to do: a link connects with its first channel."""

    async def stop(self) -> None:
        links, self._links = list(self._links.values()), {}
        for link in links:
            await link.stop()

    async def subscribe(self, channel: str) -> asyncio.Queue[Any]:
        link = self._link(await redis_client.subscriber(self._redis, channel))
        queue = await link.subscribe(channel)
        self._link_of[channel] = link
        return queue

    async def unsubscribe(self, channel: str) -> None:
        link = self._link_of.pop(channel, None)
        if link is not None:
            await link.unsubscribe(channel)

    def _link(self, client: Redis) -> _Link:
        link = self._links.get(id(client))
        if link is None or link.closed:
            link = self._links[id(client)] = _Link(client, self._commands, self._lost)
            link.start()
        return link

    async def _lost(self, link: _Link, channels: list[str]) -> None:
        if self._links.get(id(link.client)) is link:
            del self._links[id(link.client)]
        for channel in channels:
            self._link_of.pop(channel, None)
        await redis_client.forget_slots(self._redis)


class _Link:
    """One pub/sub connection and the task that reads it, fanned out to one asyncio queue per open channel."""

    def __init__(
        self, client: Redis, commands: redis_client.PubSubCommands, lost: Callable[[_Link, list[str]], Awaitable[None]]
    ) -> None:
        self.client = client
        self._commands = commands
        self._message, self._subscribed, self._unsubscribed = (
            kind.encode() for kind in (commands.message, commands.subscribed, commands.unsubscribed)
        )
        self._lost = lost
        self._pubsub: PubSub | None = None
        self._queues: dict[str, asyncio.Queue[Any]] = {}
        self._confirmations: dict[str, asyncio.Future[None]] = {}
        self._reader: asyncio.Task[None] | None = None
        self._connecting = asyncio.Lock()
        self.closed = False

    def start(self) -> None:
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
            if self.closed:  # the reader ended meanwhile, after failing the channels it knew
                raise ConnectionError("the pub/sub connection was lost")
            await redis_client.send(pubsub, self._commands.subscribe, channel)
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
                await redis_client.send(self._pubsub, self._commands.unsubscribe, channel)

    async def _connection(self) -> PubSub:
        # one at a time: a subscribe racing the reader's (re)connection would otherwise open a second connection,
        # and the confirmations arriving on the one the reader does not read would never come
        async with self._connecting:
            if self.closed:  # its reader has ended: nobody would read a confirmation (the multiplexer opens a new link)
                raise ConnectionError("the pub/sub connection was lost")
            if self._pubsub is None:
                pubsub = self.client.pubsub()
                await pubsub.connect()  # type: ignore[no-untyped-call]
                self._pubsub = pubsub
            return self._pubsub

    async def _drop_connection(self) -> None:
        pubsub, self._pubsub = self._pubsub, None
        if pubsub is not None:
            with contextlib.suppress(Exception):
                await pubsub.aclose()  # type: ignore[no-untyped-call]

    async def _read_forever(self) -> None:
        try:
            pubsub = await self._connection()
            while True:
                # what PubSub.get_message does, without its retry wrapper and a dict per message (with the model on
                # the same cores, 14.5 us a message against 19.5): the health check's PING (_dispatch drops its pong),
                # then one read
                await pubsub.check_health()  # type: ignore[no-untyped-call]
                connection = pubsub.connection
                if connection is None or not connection.is_connected:
                    raise ConnectionError("the pub/sub connection was closed")
                response = await connection.read_response(
                    timeout=READ_SECONDS, disconnect_on_error=False, push_request=True
                )
                if response is not None:
                    self._dispatch(response)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # this link is done: the next subscribe opens a new one
            log.warning("pub/sub connection lost: %s; failing %d open streams", exc, len(self._queues))
            self.closed = True
            lost = list(self._queues)
            for channel, queue in list(self._queues.items()):
                queue.put_nowait(CONNECTION_LOST)
                future = self._confirmations.pop(channel, None)
                if future and not future.done():
                    future.set_exception(exc)
            self._queues.clear()
            await self._drop_connection()
            await self._lost(self, lost)

    def _dispatch(self, response: Any) -> None:
        """One reply read on the connection: ``[type, channel, data]``, or a health check's ``[pong, text]``."""
        if not isinstance(response, list) or len(response) != 3:
            return
        kind, channel = response[0], response[1].decode()
        if kind == self._message:
            queue = self._queues.get(channel)
            if queue is not None:
                queue.put_nowait(response[2])
        elif kind == self._subscribed:
            future = self._confirmations.pop(channel, None)
            if future is not None and not future.done():
                future.set_result(None)
        elif kind == self._unsubscribed and channel in self._queues:
            # not asked for: the channel's slot moved to another node, whose subscribers now get its messages
            log.warning("pub/sub: Redis dropped channel %s (its slot moved); failing its stream", channel)
            self._queues.pop(channel).put_nowait(CONNECTION_LOST)
