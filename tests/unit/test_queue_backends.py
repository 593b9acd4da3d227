"""Both queue backends' Lua scripts, on both sides, held to one contract: claims are leases, renewals, fenced
finishes, hand-backs, cancels. Each test runs on arq's layout and on Redis Streams."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any

import pytest
from arq.constants import in_progress_key_prefix, job_key_prefix, retry_key_prefix
from redis.asyncio import Redis
from redis.asyncio.connection import AbstractConnection

from conveyor import contract, key_layout, registry
from conveyor.contract import JobEnvelope, JobKind, QueueBackend, TenantRef
from conveyor.errors import NoLiveWorker, Overloaded
from conveyor.keys import KeyCreate, KeyStore
from conveyor.outage import Outage
from gateway.directory import ModelDirectory
from gateway.queue import JobState
from gateway.queue_backends import BACKENDS
from gateway.redis_queue import RedisJobQueue
from gateway.settings import GatewaySettings
from worker.consumer import Consumer, Done
from worker.job_source import Claim, Delivery, JobSource
from worker.key_usage import KeyUsage
from worker.queue_backends import open_source
from worker.streams_source import HANDED_BACK_IDLE_MS, StreamsJobSource

MODEL = "m"


@dataclass(frozen=True)
class Layout:
    """Where a backend keeps a job's lease, data and try count, and what time does to a dead worker's lease."""

    backend: QueueBackend
    redis: Redis

    def lease(self, job_id: str) -> str:
        if self.backend is QueueBackend.ARQ:
            return in_progress_key_prefix + job_id
        return key_layout.stream_lease_prefix(MODEL) + job_id

    def data(self, job_id: str) -> str:
        return (
            job_key_prefix + job_id
            if self.backend is QueueBackend.ARQ
            else key_layout.stream_job_prefix(MODEL) + job_id
        )

    def tries(self, job_id: str) -> str:
        return retry_key_prefix + job_id if self.backend is QueueBackend.ARQ else self.data(job_id)

    async def depth(self) -> int:
        return (await registry.model_status(self.redis, MODEL)).queue_depth

    async def lapse(self, job_id: str, holder: str) -> None:
        """What the lease's expiry does when its holder dies: the lease key is gone, and on Streams the entry has
        been idle longer than a lease."""
        await self.redis.delete(self.lease(job_id))
        if self.backend is QueueBackend.STREAMS:
            lane = key_layout.stream_lane_key(MODEL)
            entry = await self.redis.hget(self.data(job_id), "entry")
            await self.redis.xclaim(
                lane, key_layout.STREAM_GROUP, holder, 0, [entry], idle=HANDED_BACK_IDLE_MS, justid=True
            )


@pytest.fixture(params=list(QueueBackend))
def layout(request: pytest.FixtureRequest, redis: Redis) -> Layout:
    return Layout(request.param, redis)


def envelope(request_id: str, deadline_in: float = 30.0) -> JobEnvelope:
    return JobEnvelope(
        request_id=request_id,
        reply_to="gw",
        model=MODEL,
        kind=JobKind.CHAT,
        body={"model": MODEL, "messages": [{"role": "user", "content": "hi"}]},
        deadline=time.time() + deadline_in,
    )


async def served_queue(redis: Redis, backend: QueueBackend, max_depth: int = 100) -> RedisJobQueue:
    """A gateway's queue on ``backend`` for MODEL, which a live worker on that backend serves."""
    settings = GatewaySettings(models=[MODEL], max_queue_depth=max_depth)
    info = registry.WorkerInfo(
        worker_id="w",
        model=MODEL,
        capabilities=["generate"],
        max_jobs=8,
        host="h",
        pid=1,
        started=time.time(),
        queue_backend=backend,
    )
    await registry.heartbeat(redis, info, ttl=60)
    return BACKENDS[backend](redis, settings, ModelDirectory(redis, settings))


@pytest.fixture
async def queue(redis: Redis, layout: Layout) -> RedisJobQueue:
    return await served_queue(redis, layout.backend)


def source(layout: Layout, worker: str, lease: float = 5.0) -> JobSource:
    return open_source(layout.backend, layout.redis, MODEL, worker, lease)


def count_script_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """From now on, how many script calls each group of commands written at once carries (one entry per group)."""
    script_calls_per_send: list[int] = []
    pack = AbstractConnection.pack_commands

    def counting(self: AbstractConnection, commands: Any) -> list[bytes]:
        packed = pack(self, commands)
        script_calls_per_send.append(b"".join(packed).count(b"EVALSHA"))
        return packed

    monkeypatch.setattr(AbstractConnection, "pack_commands", counting)
    return script_calls_per_send


async def three_held_by_a(layout: Layout, queue: RedisJobQueue) -> JobSource:
    """Jobs j0, j1, j2 queued and claimed by worker A; A's source."""
    for i in range(3):
        await queue.submit(envelope(f"j{i}"))
    a = source(layout, "A")
    assert len(await a.claim(3)) == 3
    return a


async def test_claims_are_leases_held_by_one_worker(layout: Layout, queue: RedisJobQueue) -> None:
    for i in range(3):
        await queue.submit(envelope(f"j{i}"))
    a, b = source(layout, "A"), source(layout, "B")
    first = await a.claim(2)
    assert [c.job_id for c in first] == ["j0", "j1"]
    assert first[0].envelope["request_id"] == "j0" and first[0].tries == 1
    assert await layout.redis.get(layout.lease("j0")) == b"A"
    assert first[0].fence is not None and first[0].fence.key == layout.lease("j0")
    # running jobs still count in the lane's depth; B gets the one left
    assert [c.job_id for c in await b.claim(5)] == ["j2"]
    assert await a.claim(5) == []
    assert await queue.state(envelope("j0")) is JobState.RUNNING
    assert await layout.depth() == 3


async def test_a_lapsed_lease_is_claimed_again_with_its_try_counted(layout: Layout, queue: RedisJobQueue) -> None:
    await queue.submit(envelope("j"))
    (claimed,) = await source(layout, "A").claim(1)
    await layout.lapse("j", "A")
    assert await queue.state(envelope("j")) is JobState.QUEUED
    (again,) = await source(layout, "B").claim(1)
    assert again.job_id == "j" and again.tries == claimed.tries + 1
    assert await layout.redis.pttl(layout.tries("j")) > 0  # the try count expires with the job


async def test_a_claim_says_whether_its_job_was_cut_with_progress_recorded(
    layout: Layout, queue: RedisJobQueue
) -> None:
    await queue.submit(envelope("j"))
    (first,) = await source(layout, "A").claim(1)
    assert not first.progress  # a fresh start: the runner reads no cut
    await layout.redis.rpush(key_layout.progress_key(MODEL, "j"), b"a frame's entry")  # as A's stream recorded
    await layout.lapse("j", "A")
    (again,) = await source(layout, "B").claim(1)
    assert again.job_id == "j" and again.progress


async def test_a_live_lease_is_not_taken_over(layout: Layout, queue: RedisJobQueue) -> None:
    await queue.submit(envelope("j"))
    assert len(await source(layout, "A").claim(1)) == 1
    assert await source(layout, "B").claim(1) == []  # B's first claim sweeps too: A's lease is fresh


async def test_a_job_whose_data_expired_is_dropped_not_run(layout: Layout, queue: RedisJobQueue) -> None:
    await queue.submit(envelope("old"))
    await layout.redis.delete(layout.data("old"))  # what its deadline does
    a = source(layout, "A")
    assert await a.claim(5) == []
    assert await a.claim(5) == []
    assert await layout.depth() == 0


async def test_renewal_reports_lost_and_aborted_jobs_and_retakes_a_lapsed_lease(
    layout: Layout, queue: RedisJobQueue
) -> None:
    redis = layout.redis
    a = await three_held_by_a(layout, queue)
    await redis.set(layout.lease("j0"), "B")  # taken over by B after A's lease lapsed
    await redis.delete(layout.lease("j1"))  # lapsed (an outage), nobody took it
    await queue.cancel(envelope("j2"))  # running: the client's cancel leaves a marker
    renewal = await a.renew(["j0", "j1", "j2"])
    assert renewal.lost == ["j0"] and renewal.aborted == ["j2"]
    assert await redis.get(layout.lease("j1")) == b"A"
    assert 0 < await redis.pttl(layout.lease("j1")) <= 5000


async def test_finish_delivers_once_and_only_while_the_lease_is_ours(layout: Layout, queue: RedisJobQueue) -> None:
    redis = layout.redis
    await queue.submit(envelope("j"))
    a, b = source(layout, "A"), source(layout, "B")
    await a.claim(1)
    await redis.set(layout.lease("j"), "B")
    inbox = key_layout.inbox_key("gw")
    assert not await a.finish("j", Delivery(inbox, b"from A"))
    assert await redis.llen(inbox) == 0
    assert await b.finish("j", Delivery(inbox, b"from B"))
    assert await redis.lrange(inbox, 0, -1) == [b"from B"]
    assert 0 < await redis.pttl(inbox) <= 60_000
    keys = {k.decode() for k in await redis.keys("*")} - {inbox}
    assert not {k for k in keys if k.endswith(":j")}, keys  # lease, data, tries and queue entry are gone
    assert await layout.depth() == 0


async def test_jobs_finishing_together_go_to_redis_in_one_round_trip_each_with_its_own_result(
    layout: Layout, queue: RedisJobQueue, monkeypatch: pytest.MonkeyPatch
) -> None:
    redis = layout.redis
    a = await three_held_by_a(layout, queue)
    await redis.set(layout.lease("j1"), "B")  # j1 was taken over: its finish must say so
    script_calls_per_send = count_script_calls(monkeypatch)
    inbox = key_layout.inbox_key("gw")
    results = await asyncio.gather(*(a.finish(f"j{i}", Delivery(inbox, f"answer {i}".encode())) for i in range(3)))
    assert results == [True, False, True]
    assert [n for n in script_calls_per_send if n] == [3]  # one send carried the three finishes
    assert sorted(await redis.lrange(inbox, 0, -1)) == [b"answer 0", b"answer 2"]


async def test_hand_back_frees_the_job_for_others_counting_the_try_only_after_a_failure(
    layout: Layout, queue: RedisJobQueue
) -> None:
    await queue.submit(envelope("j"))
    await queue.submit(envelope("later"))
    a, b = source(layout, "A"), source(layout, "B")
    assert [c.job_id for c in await a.claim(1)] == ["j"]
    await a.hand_back(["j"], count_try=False)  # a drain: not the job's fault
    (again,) = await b.claim(1)  # before the job enqueued after it
    assert (again.job_id, again.tries) == ("j", 1)
    await b.hand_back(["j"], count_try=True)  # an engine died under it: it may be what killed the engine
    c = source(layout, "C")
    (third,) = await c.claim(1)
    assert (third.job_id, third.tries) == ("j", 2)


async def test_a_handed_back_job_reaches_a_worker_between_its_sweeps_at_once(
    layout: Layout, queue: RedisJobQueue
) -> None:
    await queue.submit(envelope("first"))
    b = source(layout, "B")
    assert [c.job_id for c in await b.claim(1)] == ["first"]  # on Streams B swept: its next sweep is 1/3 lease away
    await queue.submit(envelope("j"))
    await queue.submit(envelope("later"))
    a = source(layout, "A")
    assert [c.job_id for c in await a.claim(2)] == ["j", "later"]
    await a.hand_back(["j"], count_try=False)  # behind a job taken after it (arq: behind the lane's clock)
    # Streams: the first claim reads the hand-back's nudge, the next sweeps
    taken = await b.claim(1) or await b.claim(1)
    assert [c.job_id for c in taken] == ["j"]
    assert await layout.depth() == 3  # the nudge was read and dropped: only the three jobs are on the lane


async def test_bulk_work_is_taken_only_when_no_interactive_job_waits(layout: Layout, queue: RedisJobQueue) -> None:
    chunk = contract.ChunkRef(
        batch_id="b1", index=0, input_file="f", start=0, end=1, first_line=0, lines=1, expires_at=time.time() + 60
    )
    await queue.release("b1", [envelope("chunk").model_copy(update={"chunk": chunk})], 1.0, time.time())
    await queue.submit(envelope("chat"))
    a = source(layout, "A")
    assert [(c.job_id, c.bulk) for c in await a.claim(1, bulk_limit=1)] == [("chat", False)]
    assert await a.claim(1, bulk_limit=0) == []
    assert [(c.job_id, c.bulk) for c in await a.claim(2, bulk_limit=1)] == [("chunk", True)]
    assert (await registry.model_status(layout.redis, MODEL)).bulk_depth == 1


async def test_cancel_removes_a_waiting_job_and_marks_a_running_one(layout: Layout, queue: RedisJobQueue) -> None:
    redis = layout.redis
    await queue.submit(envelope("waiting"))
    await queue.cancel(envelope("waiting"))
    assert await queue.state(envelope("waiting")) is JobState.GONE
    assert await redis.exists(layout.data("waiting")) == 0
    assert await layout.depth() == 0
    await queue.submit(envelope("running", deadline_in=20))
    await source(layout, "A").claim(1)
    await queue.cancel(envelope("running", deadline_in=20))
    assert 0 < await redis.pttl(key_layout.abort_key(MODEL, "running")) <= 20_000  # bounded by the job's deadline
    await queue.cancel(envelope("never-enqueued"))
    assert await redis.exists(key_layout.abort_key(MODEL, "never-enqueued")) == 0  # nothing left behind


async def test_a_gateway_on_another_backend_than_the_models_workers_is_refused_not_left_waiting(
    layout: Layout, queue: RedisJobQueue
) -> None:
    other = next(b for b in QueueBackend if b is not layout.backend)
    settings = GatewaySettings(models=[MODEL])
    mismatched = BACKENDS[other](layout.redis, settings, ModelDirectory(layout.redis, settings))
    with pytest.raises(NoLiveWorker) as refused:
        await mismatched.submit(envelope("lost"))
    assert refused.value.code == "queue_backend_mismatch" and "CONVEYOR_QUEUE_BACKEND" in refused.value.message
    assert await layout.depth() == 0 and await mismatched.state(envelope("lost")) is JobState.GONE
    await queue.submit(envelope("served"))  # the workers' own backend is admitted as ever
    assert await layout.depth() == 1


async def test_admissions_arriving_together_go_as_one_script_call_per_model_each_answered_on_its_own(
    layout: Layout, monkeypatch: pytest.MonkeyPatch
) -> None:
    redis = layout.redis
    queue = await served_queue(redis, layout.backend, max_depth=3)
    other = registry.WorkerInfo(
        worker_id="w2", model="m2", capabilities=["generate"], max_jobs=8, host="h", pid=1, started=time.time()
    )
    await registry.heartbeat(redis, other.model_copy(update={"queue_backend": layout.backend}), ttl=60)
    await queue.submit(envelope("queued"))
    script_calls_per_send = count_script_calls(monkeypatch)
    group = [
        envelope("a"),
        envelope("queued"),  # its id is queued already
        envelope("e").model_copy(update={"kind": JobKind.EMBEDDING}),  # the model's workers cannot embed
        envelope("b"),
        envelope("c"),  # the model's depth is 3 with b: full
        envelope("o").model_copy(update={"model": "m2"}),
    ]
    results = await asyncio.gather(*(queue.submit(e) for e in group), return_exceptions=True)
    assert [n for n in script_calls_per_send if n] == [2]  # one send: a script call for each model
    assert [r if isinstance(r, dict) else getattr(r, "code", r) for r in results] == [
        {},
        "duplicate_request",
        "unsupported_model_capability",
        {},
        "queue_full",
        {},
    ]
    assert isinstance(results[4], Overloaded) and "has 3 jobs queued or running (limit 3)" in results[4].message
    assert [await queue.state(envelope(i)) for i in ("a", "b", "c", "e")] == [JobState.QUEUED] * 2 + [JobState.GONE] * 2
    assert await queue.state(envelope("o").model_copy(update={"model": "m2"})) is JobState.QUEUED
    assert await layout.depth() == 3


async def test_on_a_cluster_a_finish_answers_then_removes_then_accounts_apart(redis: Redis) -> None:
    """A Redis Cluster cannot join the job's keys, the inbox and the key's usage in one script: the answer goes
    first (a repeat is dropped by its gateway), the removal is fenced, and only the finish that removed the job
    counts its usage."""
    layout = Layout(QueueBackend.STREAMS, redis)
    settings = GatewaySettings(models=[MODEL], max_queue_depth=100)
    keys = KeyStore(redis)
    key = await keys.create(KeyCreate(name="k", tpm=1000, max_queued=5))
    info = registry.WorkerInfo(
        worker_id="w", model=MODEL, capabilities=["generate"], max_jobs=8, host="h", pid=1, started=time.time()
    )
    await registry.heartbeat(redis, info.model_copy(update={"queue_backend": QueueBackend.STREAMS}), ttl=60)
    queue = BACKENDS[QueueBackend.STREAMS](redis, settings, ModelDirectory(redis, settings))
    now = time.time()
    tenant = TenantRef(key_id=key.id, name="k", second=int(now), reserved=300)
    await queue.submit(envelope("j").model_copy(update={"tenant": tenant}))
    a, b = source(layout, "A"), source(layout, "B")
    for worker in (a, b):
        assert isinstance(worker, StreamsJobSource)
        worker.cluster = True
    await a.claim(1)
    await redis.set(layout.lease("j"), "B")
    inbox = key_layout.inbox_key("gw")
    usage = KeyUsage(tenant, MODEL, JobKind.CHAT, 1, prompt_tokens=12, completion_tokens=20, at=now)
    assert not await a.finish("j", Delivery(inbox, b"from A"), usage)
    assert await redis.exists(layout.data("j")) == 1  # not A's to remove, nor to count
    assert await redis.zcard(key_layout.key_jobs_key(key.id)) == 1
    assert await b.finish("j", Delivery(inbox, b"from B"), usage)
    assert await redis.lrange(inbox, 0, -1) == [b"from A", b"from B"]
    assert await redis.exists(layout.data("j"), layout.lease("j")) == 0
    assert await redis.hget(key_layout.rate_window_key(key.id, "tokens"), "t") == b"32"  # reconciled once
    assert await redis.zcard(key_layout.key_jobs_key(key.id)) == 0
    rows = await keys.usage(key.id, days=1)
    assert [(r.model, r.requests, r.prompt_tokens) for r in rows] == [(MODEL, 1, 12)]


async def _wake_ups(redis: Redis, pubsub: Any) -> list[bytes]:
    """The wake-ups published on MODEL's channel since the last call: read up to a marker published now."""
    marker = b"marker"
    await redis.publish(key_layout.wake_channel(MODEL), marker)
    seen: list[bytes] = []
    async with asyncio.timeout(5):
        while True:
            message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1)
            if message is not None and message["data"] == marker:
                return seen
            if message is not None:
                seen.append(message["data"])


async def test_on_arq_a_job_joining_waiting_ones_wakes_no_worker(redis: Redis) -> None:
    queue = await served_queue(redis, QueueBackend.ARQ)
    pubsub = redis.pubsub()
    await pubsub.subscribe(key_layout.wake_channel(MODEL))
    await asyncio.gather(*(queue.submit(envelope(f"j{i}")) for i in range(3)))  # one round trip together
    await queue.submit(envelope("j3"))
    assert await _wake_ups(redis, pubsub) == [key_layout.WAKE_JOB]  # the first announced them all
    assert len(await open_source(QueueBackend.ARQ, redis, MODEL, "A", 5).claim(8)) == 4
    await queue.submit(envelope("j4"))  # nothing waits: announced
    chunk = contract.ChunkRef(
        batch_id="b1", index=0, input_file="f", start=0, end=1, first_line=0, lines=1, expires_at=time.time() + 60
    )
    chunks = [envelope(f"c{i}").model_copy(update={"chunk": chunk.model_copy(update={"index": i})}) for i in range(3)]
    await queue.release("b1", chunks, 1.0, time.time())  # three chunks into the empty bulk lane: one wake-up
    assert await _wake_ups(redis, pubsub) == [key_layout.WAKE_JOB, key_layout.WAKE_JOB]
    await pubsub.aclose()


async def test_on_arq_a_burst_is_all_run_by_a_worker_with_fewer_slots_without_its_poll_timer(redis: Redis) -> None:
    queue = await served_queue(redis, QueueBackend.ARQ)
    source = open_source(QueueBackend.ARQ, redis, MODEL, "A", 5)
    ran: list[str] = []

    async def handler(claim: Claim) -> Done:
        ran.append(claim.job_id)
        await asyncio.sleep(0)
        return Done(time.time() + 5)

    worker = Consumer(
        source,
        handler,
        max_jobs=2,
        poll_delay=3600.0,  # never fires here: every claim comes from a wake-up or a freed slot
        renew_interval=60.0,
        outage=Outage(logging.getLogger("test"), "test"),
    )
    running = asyncio.create_task(worker.run())
    burst = [f"j{i}" for i in range(10)]
    await asyncio.gather(*(queue.submit(envelope(job_id)) for job_id in burst))
    async with asyncio.timeout(10):
        while sorted(ran) != sorted(burst):  # noqa: ASYNC110 - a bounded wait on the consumer under test
            await asyncio.sleep(0.01)
    await worker.drain(grace=1)
    await running
