"""Which managed API key a bearer secret is, as this gateway knows it: read from Redis (``conveyor.keys``) and trusted
for ``key_cache_seconds``, so a key costs one lookup per gateway per that interval, and a revoked or changed key is
seen by every gateway within it. Unknown secrets are remembered too, so guessing costs Redis nothing more.
"""

from __future__ import annotations

import time

from conveyor.keys import ApiKey, KeyStore
from gateway.queue import redis_errors

#: the cache is emptied when it holds more secrets than this (a flood of made-up keys cannot grow it)
MAX_CACHED = 10_000


class KeyCache:
    def __init__(self, store: KeyStore, ttl: float) -> None:
        self.store = store
        self.ttl = ttl
        self._keys: dict[str, tuple[float, ApiKey | None]] = {}
        self._required: tuple[float, bool] = (0.0, False)

    async def resolve(self, secret: str) -> ApiKey | None:
        """The active managed key of ``secret``, or None. Raises ``BackendUnavailable`` when Redis is down."""
        now = time.monotonic()
        cached = self._keys.get(secret)
        if cached is not None and now - cached[0] < self.ttl:
            return cached[1]
        with redis_errors():
            key = await self.store.resolve(secret)
        if len(self._keys) >= MAX_CACHED:
            self._keys.clear()
        self._keys[secret] = (now, key)
        return key

    async def required(self) -> bool:
        """Whether requests need a key: once any managed key was created. Latched: once true it stays true for this
        gateway's life, even if Redis comes back empty (a lost Redis must not open the doors)."""
        now = time.monotonic()
        checked, required = self._required
        if required or now - checked < self.ttl:
            return required
        with redis_errors():
            required = await self.store.ever_created()
        self._required = (now, required)
        return required
