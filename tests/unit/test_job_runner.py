from __future__ import annotations

import json
import time
from typing import Any

from arq.connections import ArqRedis

from conveyor import contract
from conveyor.contract import JobEnvelope, JobKind, Reply, StreamFrame
from worker.engines.fake import FakeEngine
from worker.jobs import JobRunner

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}


def envelope(stream: bool = False, deadline_in: float = 10.0, body: dict[str, Any] | None = None) -> JobEnvelope:
    return JobEnvelope(
        request_id="req",
        model="m",
        kind=JobKind.CHAT,
        body=body or CHAT,
        stream=stream,
        deadline=time.time() + deadline_in,
    )


async def reply_of(redis: ArqRedis) -> Reply:
    popped = await redis.blpop([contract.reply_key("req")], timeout=1)
    assert popped is not None
    return Reply.decode(popped[1])


async def test_sync_job_pushes_the_body_to_the_reply_list(redis: ArqRedis) -> None:
    await JobRunner(redis, FakeEngine("m"), "m").job({}, envelope().model_dump(mode="json"))
    assert 0 < await redis.ttl(contract.reply_key("req")) <= 60  # an unread reply does not linger
    reply = await reply_of(redis)
    assert reply.error is None and reply.body is not None
    assert json.loads(reply.body)["usage"]["completion_tokens"] == 3


async def test_stream_job_publishes_ordered_chunks_then_end(redis: ArqRedis) -> None:
    pubsub = redis.pubsub()
    await pubsub.subscribe(contract.stream_channel("req"))
    await pubsub.get_message(timeout=1)  # the subscribe confirmation
    await JobRunner(redis, FakeEngine("m"), "m").run(envelope(stream=True))
    messages = []
    while (raw := await pubsub.get_message(timeout=0.5)) is not None:
        messages.append(StreamFrame.decode(raw["data"]))
    await pubsub.aclose()
    assert [m.seq for m in messages] == list(range(len(messages)))
    assert [m.type for m in messages] == ["chunk"] * (len(messages) - 1) + ["end"]
    assert len(messages) == 1 + 3 + 1 + 1  # role chunk, 3 tokens, finish chunk, end


async def test_expired_job_is_answered_504_without_running(redis: ArqRedis) -> None:
    engine = FakeEngine("m")
    await JobRunner(redis, engine, "m").run(envelope(deadline_in=-1))
    reply = await reply_of(redis)
    assert reply.error is not None and reply.error.status == 504


async def test_engine_refusal_is_answered_with_its_status(redis: ArqRedis) -> None:
    await JobRunner(redis, FakeEngine("m"), "m").run(envelope(body=CHAT | {"max_tokens": 99_999}))
    reply = await reply_of(redis)
    assert reply.error is not None and reply.error.status == 400


async def test_deadline_during_the_run_is_answered_504(redis: ArqRedis) -> None:
    await JobRunner(redis, FakeEngine("m", token_delay=0.05), "m").run(
        envelope(deadline_in=0.2, body=CHAT | {"max_tokens": 100})
    )
    reply = await reply_of(redis)
    assert reply.error is not None and reply.error.code == "deadline_exceeded"


async def test_unknown_envelope_version_is_refused_with_a_reason(redis: ArqRedis) -> None:
    raw = envelope().model_dump(mode="json") | {"v": contract.ENVELOPE_VERSION + 1}
    await JobRunner(redis, FakeEngine("m"), "m").job({}, raw)
    reply = await reply_of(redis)
    assert reply.error is not None and reply.error.code == "envelope_version"


async def test_malformed_envelope_is_refused(redis: ArqRedis) -> None:
    await JobRunner(redis, FakeEngine("m"), "m").job({}, {"request_id": "req", "kind": "nonsense"})
    reply = await reply_of(redis)
    assert reply.error is not None and reply.error.status == 400
