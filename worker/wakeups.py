"""A model's wake-up channel, read by its workers on either queue backend: ``WAKE_ABORT`` + a job id (a client
cancelled a running job) and, on arq, ``WAKE_JOB`` (work was enqueued or handed back)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError

from conveyor import key_layout, redis_client

#: a wake-up listener notices a lost connection within this long (it never blocks longer on a read)
LISTEN_READ_SECONDS = 1.0


async def listen(redis: Redis, model: str, on_job: Callable[[], None], on_abort: Callable[[str], None]) -> None:
    """Call ``on_job`` on a wake-up (and once when subscribed) and ``on_abort(job_id)`` on a cancel; runs until
    cancelled, raising on a lost connection."""
    channel = key_layout.wake_channel(model)
    commands = redis_client.pubsub(redis)
    pubsub = (await redis_client.subscriber(redis, channel)).pubsub()  # a cluster's: the channel's node
    try:
        await redis_client.send(pubsub, commands.subscribe, channel)
        on_job()  # wake-ups published while not subscribed are lost: look once now
        while True:
            message = await pubsub.get_message(timeout=LISTEN_READ_SECONDS)
            if message is None:
                continue
            if message["type"] == commands.unsubscribed:  # sharded: the channel's slot moved to another node
                raise RedisConnectionError(f"Redis dropped the subscription to {channel} (its slot moved)")
            if message["type"] != commands.message:
                continue
            data: bytes = message["data"]
            if data.startswith(key_layout.WAKE_ABORT):
                on_abort(data[len(key_layout.WAKE_ABORT) :].decode())
            else:
                on_job()
    except Exception:
        await redis_client.forget_slots(redis)  # a cluster's node may have died or handed its slots over
        raise
    finally:
        with contextlib.suppress(Exception):
            await pubsub.aclose()  # type: ignore[no-untyped-call]
