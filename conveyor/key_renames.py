"""Records written before the control plane had its hash tag move to their tagged names, once.

Until the control plane got one hash tag (``key_layout.CONTROL``, so its scripts run on a Redis Cluster), its keys were
``conveyor:<name>`` (``conveyor:apikey:<id>``, ``conveyor:usage:<id>:<day>``, ``conveyor:batch:<id>`` ...). API keys,
usage, files' and batches' records and the fleet's desired state outlive a restart, so a gateway, ``conveyor up`` and
``conveyor keys`` rename what they find under the old names before they start (``RENAMENX``: a name already written
under the new layout wins; running it again, or on many processes at once, is harmless). A model's registry keys and a
job's own keys moved too, but they are refreshed by heartbeats or die with their job: nothing of theirs is renamed.
"""

from __future__ import annotations

from redis.asyncio import Redis

from conveyor.key_layout import CONTROL, KEY_PREFIX
from conveyor.redis_client import is_cluster

#: what followed ``conveyor:`` in the control plane's old names: these whole, or starting with one of ``OLD_FAMILIES``
OLD_NAMES = ("models", "gateways", "files", "batches", "apikeys")
OLD_FAMILIES = ("fleet:", "file:", "batches:", "batch:", "apikeys:", "apikey:", "rate:", "usage:")


def new_name(old: str) -> str | None:
    """The tagged name of a key under the old layout, or None when it is not one of the control plane's."""
    prefix = f"{KEY_PREFIX}:"
    if not old.startswith(prefix):
        return None
    rest = old[len(prefix) :]
    if rest in OLD_NAMES or rest.startswith(OLD_FAMILIES):
        return f"{CONTROL}:{rest}"
    return None


async def rename_old_keys(redis: Redis) -> int:
    """Rename every control-plane key under an old name; returns how many moved. A Redis Cluster never held the old
    layout (it could not run it)."""
    if is_cluster(redis):
        return 0
    moved = 0
    async for raw in redis.scan_iter(match=f"{KEY_PREFIX}:*", count=1000):
        old = raw.decode() if isinstance(raw, bytes) else raw
        new = new_name(old)
        if new is not None and await redis.renamenx(old, new):
            moved += 1
    return moved
