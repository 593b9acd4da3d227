"""redis-py's per-read timeout, without a timer per read.

Every reply a Conveyor process reads from Redis is bounded by ``redis_client.READ_TIMEOUT_SECONDS``, so a Redis that
hangs is noticed. redis-py 5.3's asyncio connection puts ``asyncio.timeout`` around each read for that (and around
each connect). That costs ~5 us a read here: a timer set and cancelled on the loop (uvloop: ~1.7 us), three
``get_running_loop`` calls (each a ``getpid`` system call on Python 3.11) and a state machine in Python. A worker reads
about three replies per job (docs/performance-log.md, "Reads bounded without a timer each").

``ReadTimeout`` does the same job. A read bounded by ``WATCHED_FROM_SECONDS`` or more (the 5 s read timeout, the 2 s
connect, the 1 s pub/sub polls) joins its loop's watch: one timer per loop, ticking every ``TICK_SECONDS`` while any
such read is pending, which expires the reads whose deadline passed. Such a read ends at most a tick late. A shorter
bound gets its own timer, as before. When a read expires, its task is cancelled; leaving the block, that cancellation
becomes ``TimeoutError`` unless the task was also cancelled from elsewhere, in which case the cancellation goes on
(Python 3.11's ``Timeout.__aexit__`` decides the same way). redis-py then raises its own ``TimeoutError`` as before.
``install`` puts it where redis-py's connection module looks the timeout up, for every connection in the process.
"""

from __future__ import annotations

import asyncio
import weakref
from types import TracebackType

import redis.asyncio.connection as redis_connection

#: reads bounded by at least this long share their loop's watch instead of a timer each
WATCHED_FROM_SECONDS = 1.0
#: how often a loop's watch looks for expired reads (so how late one may end)
TICK_SECONDS = 0.1


class ReadTimeout:
    """``asyncio.timeout(delay)`` for one read or connect (``None``: no limit)."""

    __slots__ = ("_cancelling", "_deadline", "_delay", "_expired", "_task", "_timer", "_watch")

    def __init__(self, delay: float | None) -> None:
        self._delay = delay
        self._timer: asyncio.TimerHandle | None = None
        self._watch: _Watch | None = None
        self._expired = False

    async def __aenter__(self) -> None:
        if self._delay is None:
            return
        loop = asyncio.get_running_loop()
        task = asyncio.current_task(loop)
        if task is None:
            raise RuntimeError("a read timeout must be used inside a task")
        self._task = task
        self._cancelling = task.cancelling()
        if self._delay < WATCHED_FROM_SECONDS:
            self._timer = loop.call_later(self._delay, self.expire)
        else:
            self._deadline = loop.time() + self._delay
            self._watch = _Watch.join(loop, self)

    def expire(self) -> None:
        self._expired = True
        self._task.cancel()

    def due(self, now: float) -> bool:
        return self._deadline <= now

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._timer is not None:
            self._timer.cancel()
        elif self._watch is not None:
            self._watch.reads.discard(self)
        if self._expired and self._task.uncancel() <= self._cancelling and exc_type is asyncio.CancelledError:
            raise TimeoutError from exc


class _Watch:
    """One loop's pending reads with a long bound, looked at every ``TICK_SECONDS`` while there are any."""

    #: the watch of each loop with reads pending (a watch with none left forgets itself; a loop closed with reads
    #: pending is forgotten with the loop)
    of_loop: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Watch] = weakref.WeakKeyDictionary()

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.reads: set[ReadTimeout] = set()

    @classmethod
    def join(cls, loop: asyncio.AbstractEventLoop, read: ReadTimeout) -> _Watch:
        watch = cls.of_loop.get(loop)
        if watch is None:
            watch = cls.of_loop[loop] = cls(loop)
            loop.call_later(TICK_SECONDS, watch.tick)
        watch.reads.add(read)
        return watch

    def tick(self) -> None:
        now = self.loop.time()
        for read in [read for read in self.reads if read.due(now)]:
            self.reads.discard(read)
            read.expire()
        if self.reads:
            self.loop.call_later(TICK_SECONDS, self.tick)
        else:
            del self.of_loop[self.loop]


def install() -> None:
    """Every redis-py asyncio connection's reads and connects use ``ReadTimeout`` from now on (idempotent)."""
    redis_connection.async_timeout = ReadTimeout  # type: ignore[attr-defined,assignment]
