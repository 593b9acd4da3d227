"""Fair order within a lane (``conveyor.fair_share``), through the real scripts: a gateway's submit and a worker's
claim. Each test runs on arq's layout and on Redis Streams."""

from __future__ import annotations

import random
import time

import pytest
from redis.asyncio import Redis

from conveyor import key_layout, registry
from conveyor.contract import JobEnvelope, JobKind, QueueBackend, TenantRef
from conveyor.keys import KeyCreate, KeyStore
from gateway.redis_queue import RedisJobQueue
from tests.unit.test_queue_backends import MODEL, Layout, served_queue
from worker.job_source import JobSource
from worker.queue_backends import open_source


@pytest.fixture(params=list(QueueBackend))
async def queue(request: pytest.FixtureRequest, redis: Redis) -> RedisJobQueue:
    return await served_queue(redis, request.param, max_depth=1000)


@pytest.fixture
def worker(queue: RedisJobQueue) -> JobSource:
    return open_source(queue.BACKEND, queue.redis, MODEL, "w1", 5.0)


async def tenant(redis: Redis, name: str, weight: float | None = None) -> TenantRef:
    key = await KeyStore(redis).create(KeyCreate(name=name, weight=weight))
    return TenantRef(key_id=key.id, name=name, second=int(time.time()), weight=key.weight or 1.0)


def job(
    request_id: str, owner: TenantRef | None, priority: int | None = None, deadline_in: float = 60.0
) -> JobEnvelope:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
    return JobEnvelope(
        request_id=request_id,
        reply_to="gw",
        model=MODEL,
        kind=JobKind.CHAT,
        body=body | ({"priority": priority} if priority is not None else {}),
        deadline=time.time() + deadline_in,
        tenant=owner,
    )


async def taken(worker: JobSource, count: int) -> list[str]:
    """The next ``count`` jobs, claimed one at a time (a worker with one free slot each time)."""
    order = []
    for _ in range(count):
        claims = await worker.claim(1)
        order += [c.job_id for c in claims]
    return order


def ready_set(queue: RedisJobQueue) -> str:
    """The sorted set of a lane's waiting jobs by tag: arq's lane itself; a stream's ready set."""
    lane = queue.lane(MODEL)
    return lane if queue.BACKEND is QueueBackend.ARQ else key_layout.stream_ready_key(lane)


async def fair_keys(redis: Redis, ready: str) -> set[str]:
    return {k.decode() async for k in redis.scan_iter(match=ready + key_layout.FAIR_SUFFIX + "*")}


async def test_a_key_arriving_behind_a_flood_is_served_one_for_one_with_it(
    redis: Redis, queue: RedisJobQueue, worker: JobSource
) -> None:
    a, b = await tenant(redis, "a"), await tenant(redis, "b")
    for i in range(20):
        await queue.submit(job(f"a{i:02}", a))
    assert await taken(worker, 5) == [f"a{i:02}" for i in range(5)]
    for i in range(3):
        await queue.submit(job(f"b{i}", b))
    following = await taken(worker, 6)
    # first come, first served would give a05..a10; fair order gives b's three within the next six, one for one
    assert sorted(following) == ["a05", "a06", "a07", "b0", "b1", "b2"]
    assert [j[0] for j in following[::2]] != [j[0] for j in following[1::2]]  # pairs, never two of b's in a row
    assert await taken(worker, 20) == [f"a{i:02}" for i in range(8, 20)]  # a keeps everything b leaves


async def test_weights_share_the_lane_in_proportion(redis: Redis, queue: RedisJobQueue, worker: JobSource) -> None:
    heavy, light = await tenant(redis, "heavy", weight=2), await tenant(redis, "light")
    for i in range(12):
        await queue.submit(job(f"h{i:02}", heavy))
        await queue.submit(job(f"l{i:02}", light))
    first = await taken(worker, 9)
    assert sum(j.startswith("h") for j in first) == 6 and sum(j.startswith("l") for j in first) == 3


async def test_requests_without_a_managed_key_are_one_tenant(
    redis: Redis, queue: RedisJobQueue, worker: JobSource
) -> None:
    keyed = await tenant(redis, "keyed")
    for i in range(4):
        await queue.submit(job(f"x{i}", None))
    await queue.submit(job("k0", keyed))
    assert "k0" in await taken(worker, 2)


async def test_within_a_key_lower_priority_goes_first_then_the_earlier_deadline(
    redis: Redis, queue: RedisJobQueue, worker: JobSource
) -> None:
    a = await tenant(redis, "a")
    await queue.submit(job("default-late", a, deadline_in=60))
    await queue.submit(job("default-early", a, deadline_in=30))
    await queue.submit(job("urgent", a, priority=-5))
    await queue.submit(job("background", a, priority=5, deadline_in=5))
    assert await taken(worker, 4) == ["urgent", "default-early", "default-late", "background"]


async def test_one_claim_takes_every_waiting_job_it_has_room_for_when_a_more_urgent_one_came_later(
    queue: RedisJobQueue, worker: JobSource
) -> None:
    # the later job is its key's most urgent, so the first tag goes to it: the job it swapped with still waits, and a
    # claim with room for both must take it too (a job skipped here waited for the next poll: 0.5 s, by default)
    await queue.submit(job("early", None, deadline_in=60))
    await queue.submit(job("urgent", None, deadline_in=30))
    claims = await worker.claim(2)
    assert sorted(c.job_id for c in claims) == ["early", "urgent"]


@pytest.mark.parametrize("seed", range(4))
async def test_claims_of_any_size_fill_their_room_while_jobs_of_mixed_keys_and_urgency_wait(
    redis: Redis, queue: RedisJobQueue, seed: int
) -> None:
    """Jobs of three keys with mixed priorities and deadlines arrive between claims of random sizes, so fair order
    hands tags around within each key: every claim takes as many as it has room for while jobs wait, each job once
    (on arq a claim between sweeps walks from the lane's clock, and a job passed over would wait for a sweep; on
    Streams a job whose entry went to another waits behind a new entry, which the claim must read too)."""
    rng = random.Random(seed)
    owners = [await tenant(redis, name) for name in "abc"]
    worker = open_source(queue.BACKEND, redis, MODEL, "w1", 3600.0)  # sweeps at its first claim only
    submitted: list[str] = []
    claimed: list[str] = []
    while len(submitted) < 80 or len(claimed) < len(submitted):
        for _ in range(rng.randint(0, 4) if len(submitted) < 80 else 0):
            urgency = {"priority": rng.choice([None, -1, 1]), "deadline_in": rng.uniform(30, 90)}
            await queue.submit(job(f"j{len(submitted)}", rng.choice(owners), **urgency))
            submitted.append(f"j{len(submitted)}")
        waiting = len(submitted) - len(claimed)
        if waiting:
            room = rng.randint(1, 4)
            claims = await worker.claim(room)
            assert len(claims) == min(room, waiting)
            claimed += [c.job_id for c in claims]
    assert sorted(claimed) == sorted(submitted)


async def test_a_priority_orders_only_its_own_keys_jobs(redis: Redis, queue: RedisJobQueue, worker: JobSource) -> None:
    a, b = await tenant(redis, "a"), await tenant(redis, "b")
    for i in range(3):
        await queue.submit(job(f"a{i}", a))
    for i in range(3):
        await queue.submit(job(f"b{i}", b, priority=-100))
    order = await taken(worker, 6)
    assert sorted(order[:2]) == ["a0", "b0"] and sorted(order[2:4]) == ["a1", "b1"]


async def test_a_lost_workers_job_goes_before_new_work(redis: Redis, queue: RedisJobQueue, worker: JobSource) -> None:
    a = await tenant(redis, "a")
    for i in range(3):
        await queue.submit(job(f"a{i}", a))
    assert await taken(worker, 1) == ["a0"]
    await Layout(queue.BACKEND, redis).lapse("a0", "w1")  # the worker is gone
    assert await taken(open_source(queue.BACKEND, redis, MODEL, "w2", 5.0), 2) == ["a0", "a1"]


async def test_a_lost_workers_job_is_found_after_its_key_priority_moved_it(
    redis: Redis, queue: RedisJobQueue, worker: JobSource
) -> None:
    """On Streams the job taken is given the entry read, whose id names another job: a sweep after its worker died
    must still find it (the last CI lost such a job until its deadline)."""
    a = await tenant(redis, "a")
    await queue.submit(job("routine", a))
    await queue.submit(job("urgent", a, priority=-1))
    assert await taken(worker, 1) == ["urgent"]
    await Layout(queue.BACKEND, redis).lapse("urgent", "w1")  # the worker is gone
    assert await taken(open_source(queue.BACKEND, redis, MODEL, "w2", 5.0), 2) == ["urgent", "routine"]
    assert (await registry.model_status(redis, MODEL)).queue_depth == 2


async def test_the_fair_state_holds_only_waiting_jobs(redis: Redis, queue: RedisJobQueue, worker: JobSource) -> None:
    a, b = await tenant(redis, "a"), await tenant(redis, "b")
    ready = ready_set(queue)
    await queue.submit(job("taken", a))
    await queue.submit(job("cancelled", b))
    await queue.submit(job("expired", b, priority=-1))
    assert len(await fair_keys(redis, ready)) == 4  # tags, job tenants, a's and b's waiting jobs
    await queue.cancel(job("cancelled", b))
    await redis.delete(queue.job_prefix(MODEL) + "expired")  # its deadline passed
    assert await taken(worker, 3) == ["taken"]
    assert await fair_keys(redis, ready) == {ready + key_layout.FAIR_SUFFIX + "tags"}
    assert await redis.hkeys(ready + key_layout.FAIR_SUFFIX + "tags") == [b""]  # only the clock
    assert (await registry.model_status(redis, MODEL)).queue_depth == 1  # the running one
    assert await redis.zcard(ready) == (1 if queue.BACKEND is QueueBackend.ARQ else 0)  # arq's lane lists it too


async def test_a_job_queued_by_a_gateway_before_fair_order_is_not_left_behind(
    redis: Redis, queue: RedisJobQueue, worker: JobSource
) -> None:
    """A rolling upgrade: an older gateway put a job on the lane as it did then (arq: scored by its enqueue time in
    ms; streams: an entry and a record, nothing in the ready set); new gateways keep the lane busy."""
    a = await tenant(redis, "a")
    for i in range(3):
        await queue.submit(job(f"new{i}", a))
    old = job("old", None)
    lane, record = queue.lane(MODEL), queue.job_prefix(MODEL) + "old"
    data = queue.job_data(old, int(old.created * 1000))
    if queue.BACKEND is QueueBackend.ARQ:
        await redis.set(record, data, px=60_000)
        await redis.zadd(lane, {"old": int(old.created * 1000)})
    else:
        entry = await redis.xadd(lane, {"id": "old"})
        await redis.hset(record, mapping={"data": data, "entry": entry, "lane": lane, "tries": 0})
    if queue.BACKEND is QueueBackend.ARQ:  # scored far behind every tag, it would wait for an empty lane: it goes first
        assert await taken(worker, 1) == ["old"]
    else:  # taken when its entry is read, in the stream's order
        assert await taken(worker, 4) == ["new0", "new1", "new2", "old"]
