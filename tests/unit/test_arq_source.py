"""The arq seam's Lua scripts on both sides: claims are leases, renewals, fenced finishes, hand-backs, cancels."""

from __future__ import annotations

import asyncio
import time

import pytest
from arq.constants import in_progress_key_prefix, job_key_prefix, retry_key_prefix
from redis.asyncio import Redis

from conveyor import contract, registry
from conveyor.contract import JobEnvelope, JobKind
from gateway.arq_queue import ArqJobQueue
from gateway.directory import ModelDirectory
from gateway.queue import JobState
from gateway.settings import GatewaySettings
from worker.arq_source import ArqJobSource
from worker.job_source import Delivery

MODEL = "m"


def envelope(request_id: str, deadline_in: float = 30.0) -> JobEnvelope:
    return JobEnvelope(
        request_id=request_id,
        reply_to="gw",
        model=MODEL,
        kind=JobKind.CHAT,
        body={"model": MODEL, "messages": [{"role": "user", "content": "hi"}]},
        deadline=time.time() + deadline_in,
    )


@pytest.fixture
async def queue(redis: Redis) -> ArqJobQueue:
    settings = GatewaySettings(models=[MODEL], max_queue_depth=100)
    info = registry.WorkerInfo(
        worker_id="w", model=MODEL, capabilities=["generate"], max_jobs=8, host="h", pid=1, started=time.time()
    )
    await registry.heartbeat(redis, info, ttl=60)
    return ArqJobQueue(redis, settings, ModelDirectory(redis, settings))


def source(redis: Redis, worker: str, lease: float = 5.0) -> ArqJobSource:
    return ArqJobSource(redis, MODEL, worker, lease)


async def three_held_by_a(redis: Redis, queue: ArqJobQueue) -> ArqJobSource:
    """Jobs j0, j1, j2 queued and claimed by worker A; A's source."""
    for i in range(3):
        await queue.submit(envelope(f"j{i}"))
    a = source(redis, "A")
    await a.claim(3)
    return a


async def test_claims_are_leases_held_by_one_worker(redis: Redis, queue: ArqJobQueue) -> None:
    for i in range(3):
        await queue.submit(envelope(f"j{i}"))
    a, b = source(redis, "A"), source(redis, "B")
    first = await a.claim(2)
    assert [c.job_id for c in first] == ["j0", "j1"]
    assert first[0].envelope["request_id"] == "j0" and first[0].tries == 1
    assert await redis.get(in_progress_key_prefix + "j0") == b"A"
    # running jobs stay listed in the queue; B skips them and gets the one left
    assert [c.job_id for c in await b.claim(5)] == ["j2"]
    assert await a.claim(5) == []
    assert await queue.state(envelope("j0")) is JobState.RUNNING


async def test_a_lapsed_lease_is_claimed_again_with_its_try_counted(redis: Redis, queue: ArqJobQueue) -> None:
    await queue.submit(envelope("j"))
    (claimed,) = await source(redis, "A").claim(1)
    await redis.delete(in_progress_key_prefix + "j")  # what the lease's expiry does when A dies
    assert await queue.state(envelope("j")) is JobState.QUEUED
    (again,) = await source(redis, "B").claim(1)
    assert again.job_id == "j" and again.tries == claimed.tries + 1
    assert await redis.pttl(retry_key_prefix + "j") > 0  # the try count expires with the job


async def test_a_job_whose_data_expired_is_dropped_not_run(redis: Redis, queue: ArqJobQueue) -> None:
    await queue.submit(envelope("old"))
    await redis.delete(job_key_prefix + "old")  # what its deadline does
    assert await source(redis, "A").claim(5) == []
    assert await redis.zcard(contract.queue_name(MODEL)) == 0


async def test_renewal_reports_lost_and_aborted_jobs_and_retakes_a_lapsed_lease(
    redis: Redis, queue: ArqJobQueue
) -> None:
    a = await three_held_by_a(redis, queue)
    await redis.set(in_progress_key_prefix + "j0", "B")  # taken over by B after A's lease lapsed
    await redis.delete(in_progress_key_prefix + "j1")  # lapsed (an outage), nobody took it
    await queue.cancel(envelope("j2"))  # running: the client's cancel leaves a marker
    renewal = await a.renew(["j0", "j1", "j2"])
    assert renewal.lost == ["j0"] and renewal.aborted == ["j2"]
    assert await redis.get(in_progress_key_prefix + "j1") == b"A"
    assert 0 < await redis.pttl(in_progress_key_prefix + "j1") <= 5000


async def test_finish_delivers_once_and_only_while_the_lease_is_ours(redis: Redis, queue: ArqJobQueue) -> None:
    await queue.submit(envelope("j"))
    a, b = source(redis, "A"), source(redis, "B")
    await a.claim(1)
    await redis.set(in_progress_key_prefix + "j", "B")
    inbox = contract.inbox_key("gw")
    assert not await a.finish("j", Delivery(inbox, b"from A"))
    assert await redis.llen(inbox) == 0
    assert await b.finish("j", Delivery(inbox, b"from B"))
    assert await redis.lrange(inbox, 0, -1) == [b"from B"]
    assert 0 < await redis.pttl(inbox) <= 60_000
    keys = {k.decode() for k in await redis.keys("*")} - {inbox}
    assert not {k for k in keys if k.endswith(":j")}, keys  # lease, data, tries and queue entry are gone
    assert await redis.zcard(contract.queue_name(MODEL)) == 0


async def test_jobs_finishing_together_go_to_redis_in_one_pipeline_each_with_its_own_result(
    redis: Redis, queue: ArqJobQueue
) -> None:
    a = await three_held_by_a(redis, queue)
    await redis.set(in_progress_key_prefix + "j1", "B")  # j1 was taken over: its finish must say so
    pipelines = 0
    make_pipeline = redis.pipeline

    def counting(*args: object, **kwargs: object) -> object:
        nonlocal pipelines
        pipelines += 1
        return make_pipeline(*args, **kwargs)  # type: ignore[arg-type]

    redis.pipeline = counting  # type: ignore[method-assign]
    inbox = contract.inbox_key("gw")
    results = await asyncio.gather(*(a.finish(f"j{i}", Delivery(inbox, f"answer {i}".encode())) for i in range(3)))
    assert results == [True, False, True] and pipelines == 1
    assert sorted(await redis.lrange(inbox, 0, -1)) == [b"answer 0", b"answer 2"]


async def test_hand_back_frees_the_job_for_others_counting_the_try_only_after_a_failure(
    redis: Redis, queue: ArqJobQueue
) -> None:
    await queue.submit(envelope("j"))
    a, b = source(redis, "A"), source(redis, "B")
    await a.claim(1)
    await a.hand_back(["j"], count_try=False)  # a drain: not the job's fault
    (again,) = await b.claim(1)
    assert again.tries == 1
    await b.hand_back(["j"], count_try=True)  # an engine died under it: it may be what killed the engine
    (third,) = await a.claim(1)
    assert third.tries == 2


async def test_cancel_removes_a_waiting_job_and_marks_a_running_one(redis: Redis, queue: ArqJobQueue) -> None:
    await queue.submit(envelope("waiting"))
    await queue.cancel(envelope("waiting"))
    assert await queue.state(envelope("waiting")) is JobState.GONE
    assert await redis.exists(job_key_prefix + "waiting") == 0
    await queue.submit(envelope("running", deadline_in=20))
    await source(redis, "A").claim(1)
    await queue.cancel(envelope("running", deadline_in=20))
    assert 0 < await redis.pttl(contract.abort_key("running")) <= 20_000  # bounded by the job's deadline
    await queue.cancel(envelope("never-enqueued"))
    assert await redis.exists(contract.abort_key("never-enqueued")) == 0  # nothing left behind
