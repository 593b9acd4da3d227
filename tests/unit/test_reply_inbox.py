"""The gateway's reply inbox (fakeredis): its one reader is the only way non-streamed answers arrive, so no error
ends it."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest
from redis.asyncio import Redis

import gateway.inbox
from conveyor.contract import Reply
from conveyor.outage import Outage
from conveyor.pipeliner import round_trip
from gateway.inbox import ReplyInbox


async def test_the_reader_reads_on_after_an_error_that_is_not_redis_being_down(
    redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    inbox = ReplyInbox(redis, Outage(logging.getLogger("test"), "gateway"))
    failures = [RuntimeError("a client library's own failure")]

    async def failing_once(*args: Any, **kwargs: Any) -> Any:
        if failures:
            raise failures.pop()
        return await round_trip(*args, **kwargs)

    monkeypatch.setattr(gateway.inbox, "round_trip", failing_once)
    answer = inbox.expect("request-1")
    inbox.start()
    try:
        await redis.rpush(inbox.key, Reply(request_id="request-1", body=b"{}").encode())
        reply = await asyncio.wait_for(answer, 10)
    finally:
        await inbox.stop()
    assert failures == [] and reply.request_id == "request-1"
