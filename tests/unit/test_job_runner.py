"""The job runner: what a claimed job produces (an answer to deliver, or stream frames), and when it gives up."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
from redis.asyncio import Redis

from conveyor import contract, key_layout
from conveyor.contract import JobEnvelope, JobKind, Reply, StreamFrame
from worker.consumer import Done, EngineDead
from worker.engines.fake import FakeEngine
from worker.job_source import Claim
from worker.jobs import JobRunner

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}


def envelope(stream: bool = False, deadline_in: float = 10.0, body: dict[str, Any] | None = None) -> JobEnvelope:
    return JobEnvelope(
        request_id="req",
        reply_to="gw",
        model="m",
        kind=JobKind.CHAT,
        body=body or CHAT,
        stream=stream,
        deadline=time.time() + deadline_in,
    )


def claim(raw: dict[str, Any], tries: int = 1) -> Claim:
    return Claim("req", raw, tries)


def reply_of(done: Done) -> Reply:
    assert done.delivery is not None and done.delivery.inbox == key_layout.inbox_key("gw")
    return Reply.decode(done.delivery.payload)


async def test_sync_job_answers_with_the_engine_body(redis: Redis) -> None:
    done = await JobRunner(redis, FakeEngine("m"), "m").job(claim(envelope().model_dump(mode="json")))
    reply = reply_of(done)
    assert reply.request_id == "req" and reply.error is None and reply.body is not None
    assert json.loads(reply.body)["usage"]["completion_tokens"] == 3


async def test_stream_job_publishes_ordered_chunks_then_end(redis: Redis) -> None:
    pubsub = redis.pubsub()
    await pubsub.subscribe(key_layout.stream_channel("m", "req"))
    await pubsub.get_message(timeout=1)  # the subscribe confirmation
    done = await JobRunner(redis, FakeEngine("m"), "m").run(envelope(stream=True))
    assert done.delivery is None
    messages = []
    while (raw := await pubsub.get_message(timeout=0.5)) is not None:
        messages.append(StreamFrame.decode(raw["data"]))
    await pubsub.aclose()
    assert [m.seq for m in messages] == list(range(len(messages)))
    assert [m.type for m in messages] == ["chunk"] * (len(messages) - 1) + ["end"]
    assert len(messages) == 1 + 3 + 1 + 1  # role chunk, 3 tokens, finish chunk, end


async def test_expired_job_is_answered_504_without_running(redis: Redis) -> None:
    engine = FakeEngine("m")
    reply = reply_of(await JobRunner(redis, engine, "m").run(envelope(deadline_in=-1)))
    assert reply.error is not None and reply.error.status == 504
    assert engine.progress() == 0


async def test_engine_refusal_is_answered_with_its_status(redis: Redis) -> None:
    reply = reply_of(await JobRunner(redis, FakeEngine("m"), "m").run(envelope(body=CHAT | {"max_tokens": 99_999})))
    assert reply.error is not None and reply.error.status == 400


async def test_deadline_during_the_run_is_answered_504(redis: Redis) -> None:
    runner = JobRunner(redis, FakeEngine("m", token_delay=0.05), "m")
    reply = reply_of(await runner.run(envelope(deadline_in=0.2, body=CHAT | {"max_tokens": 100})))
    assert reply.error is not None and reply.error.code == "deadline_exceeded"


async def test_unknown_envelope_version_is_refused_with_a_reason(redis: Redis) -> None:
    raw = envelope().model_dump(mode="json") | {"v": contract.ENVELOPE_VERSION + 1}
    reply = reply_of(await JobRunner(redis, FakeEngine("m"), "m").job(claim(raw)))
    assert reply.error is not None and reply.error.code == "envelope_version"


async def test_malformed_envelope_is_refused(redis: Redis) -> None:
    done = await JobRunner(redis, FakeEngine("m"), "m").job(claim({"reply_to": "gw", "kind": "nonsense"}))
    reply = reply_of(done)
    assert reply.error is not None and reply.error.status == 400


async def test_a_job_lost_max_tries_times_is_answered_worker_lost_not_run(redis: Redis) -> None:
    engine = FakeEngine("m")
    runner = JobRunner(redis, engine, "m", max_tries=2)
    assert reply_of(await runner.job(claim(envelope().model_dump(mode="json"), tries=2))).error is None
    progress = engine.progress()
    reply = reply_of(await runner.job(claim(envelope().model_dump(mode="json"), tries=3)))
    assert reply.error is not None and reply.error.code == "worker_lost" and reply.error.status == 503
    assert engine.progress() == progress  # not run again


async def test_a_dead_engine_hands_the_job_back_instead_of_answering(redis: Redis) -> None:
    runner = JobRunner(redis, FakeEngine("m"), "m")
    with pytest.raises(EngineDead):
        await runner.run(envelope(body=CHAT | {"fake_fault": "die"}))


async def _frames_of_a_run(redis: Redis, body: dict[str, Any]) -> list[StreamFrame]:
    pubsub = redis.pubsub()
    await pubsub.subscribe(key_layout.stream_channel("m", "req"))
    await pubsub.get_message(timeout=1)  # the subscribe confirmation
    await JobRunner(redis, FakeEngine("m"), "m").run(envelope(stream=True, body=body))
    frames = []
    while (raw := await pubsub.get_message(timeout=0.5)) is not None:
        frames.append(StreamFrame.decode(raw["data"]))
    await pubsub.aclose()
    return frames


async def test_a_generation_claimed_with_no_progress_recorded_reads_no_cut(
    redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    runner = JobRunner(redis, FakeEngine("m"), "m")

    async def no_cut(request_id: str, deadline: float) -> None:
        raise AssertionError("read a cut its claim said was not there")

    monkeypatch.setattr(runner.migration, "cut", no_cut)
    for stream in (False, True):  # a non-streamed chat runs as a stream too, recording its progress
        done = await runner.job(Claim("req", envelope(stream).model_dump(mode="json"), 1, progress=False))
        assert done.delivery is None if stream else reply_of(done).error is None


@pytest.mark.parametrize("cut_after", [1, 3, 4, 5, 6], ids=lambda n: f"{n}-frames")
async def test_a_stream_cut_anywhere_goes_on_with_exactly_the_frames_left(redis: Redis, cut_after: int) -> None:
    """An uninterrupted stream (role, 3 tokens, finish, usage, end: 7 frames), then the same stream cut after
    ``cut_after`` frames (its progress list as the first worker left it) and run again: the frames sent then are
    exactly the uninterrupted run's from there on, even when the cut came after the finish or after the usage."""
    body = CHAT | {"stream_options": {"include_usage": True}}
    whole = await _frames_of_a_run(redis, body)
    assert [f.type for f in whole] == ["chunk"] * 6 + ["end"]
    entries = await redis.lrange(key_layout.progress_key("m", "req"), 0, -1)  # left by a run nobody finished
    assert len(entries) == 7
    await redis.ltrim(key_layout.progress_key("m", "req"), 0, cut_after - 1)
    rest = await _frames_of_a_run(redis, body)
    assert [f.seq for f in rest] == list(range(cut_after, 7))
    strip = [
        (f.type, json.loads(f.payload or b"{}").get("choices"), json.loads(f.payload or b"{}").get("usage"))
        for f in whole[cut_after:]
    ]
    assert [
        (f.type, json.loads(f.payload or b"{}").get("choices"), json.loads(f.payload or b"{}").get("usage"))
        for f in rest
    ] == strip
