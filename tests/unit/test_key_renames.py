"""Records written under the control plane's old names move to their tagged names, once."""

from __future__ import annotations

from redis.asyncio import Redis

from conveyor import key_layout
from conveyor.key_renames import rename_old_keys


async def test_old_control_plane_names_move_and_the_rest_stays(redis: Redis) -> None:
    await redis.hset("conveyor:apikey:k1", "name", "ci")
    await redis.zadd("conveyor:apikeys", {"k1": 1})
    await redis.hset("conveyor:apikeys:hashes", "sha", "k1")
    await redis.hset("conveyor:usage:k1:2026-12-03", "m|requests", 4)
    await redis.set("conveyor:file:f1", "{}")
    await redis.hset("conveyor:batch:b1", "record", "{}")
    await redis.sadd("conveyor:batches:active", "b1")
    await redis.hset("conveyor:fleet:models", "m", "{}")
    await redis.set("conveyor:inbox:g", "answer")  # a gateway's: not the control plane's
    await redis.set("conveyor:{m}:job:r", "job")  # already tagged
    await redis.hset(key_layout.api_key_key("k2"), "name", "new")
    await redis.hset("conveyor:apikey:k2", "name", "old")  # both: the one under the new name wins

    assert await rename_old_keys(redis) == 8
    assert await redis.hget(key_layout.api_key_key("k1"), "name") == b"ci"
    assert await redis.zscore(key_layout.API_KEYS_INDEX, "k1") == 1
    assert await redis.hget(key_layout.API_KEY_HASHES, "sha") == b"k1"
    assert await redis.hget(key_layout.usage_key("k1", "2026-12-03"), "m|requests") == b"4"
    assert await redis.get(key_layout.file_key("f1")) == b"{}"
    assert await redis.exists(key_layout.batch_key("b1"), key_layout.ACTIVE_BATCHES, key_layout.FLEET_MODELS) == 3
    assert await redis.hget(key_layout.api_key_key("k2"), "name") == b"new"
    assert await redis.get("conveyor:inbox:g") == b"answer"
    assert await redis.get("conveyor:{m}:job:r") == b"job"
    assert await rename_old_keys(redis) == 0  # once
