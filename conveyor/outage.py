"""Riding out a Redis outage: every loop of a process reports into one ``Outage``, which logs the outage once when it
starts and once when it ends, and hands each loop its next backoff delay."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from redis.exceptions import RedisClusterException, RedisError

#: what a lost, refused, reset or timed-out Redis connection raises; a Redis Cluster none of whose nodes answers
#: raises ``RedisClusterException`` (no ``RedisError``) while its client looks for the slot map
REDIS_DOWN = (RedisError, OSError, TimeoutError, RedisClusterException)

BACKOFF_FIRST_SECONDS = 0.05
#: the longest wait between tries: a returning Redis is noticed within about this long
BACKOFF_MAX_SECONDS = 1.0


class Outage:
    """``failed`` on every error, ``ok`` on every success; ``on_recovery`` callbacks run when Redis is back."""

    def __init__(self, log: logging.Logger, what: str) -> None:
        self.log = log
        self.what = what
        self.down_since: float | None = None
        self.outages = 0
        self._failures = 0
        self._on_recovery: list[Callable[[], None]] = []

    @property
    def down(self) -> bool:
        return self.down_since is not None

    def on_recovery(self, callback: Callable[[], None]) -> None:
        self._on_recovery.append(callback)

    def failed(self, exc: BaseException) -> float:
        """Record a failure; returns how long the caller should wait before its next try."""
        if self.down_since is None:
            self.down_since = time.monotonic()
            self.outages += 1
            self._failures = 0
            self.log.warning("%s: Redis unreachable (%s); retrying until it is back", self.what, type(exc).__name__)
        self._failures += 1
        return float(min(BACKOFF_FIRST_SECONDS * 2.0 ** (self._failures - 1), BACKOFF_MAX_SECONDS))

    def ok(self) -> None:
        if self.down_since is None:
            return
        seconds = time.monotonic() - self.down_since
        self.down_since = None
        self.log.warning("%s: Redis is back after %.1f s", self.what, seconds)
        for callback in self._on_recovery:
            callback()
