"""An API key's limits inside the admission script, at chosen clock times (fakeredis runs the same Lua): the sliding
windows, Retry-After from the window, revocation, allowed models, the queued-jobs bound, and the worker's fenced
reconciliation and usage."""

from __future__ import annotations

import time
from typing import Any

import pytest
from redis.asyncio import Redis

from conveyor import key_layout, registry
from conveyor.contract import JobEnvelope, JobKind, QueueBackend, TenantRef
from conveyor.fair_share import fair_args
from conveyor.keys import KeyCreate, KeyStore, KeyUpdate
from conveyor.redis_client import publish_lua
from gateway.arq_queue import LANE_LUA
from gateway.key_admission import KeyAdmission, KeyLimits
from gateway.rate_limits import duration
from gateway.redis_queue import admission_script
from worker.arq_source import ArqJobSource
from worker.key_usage import KeyUsage

MODEL = "m"


class Admission:
    """Admits as ``RedisJobQueue.submit`` does, with the clock given: the key's reservation, the model's admission
    script, and the refund when the model refuses. Returns {code, depth (-1 when the key refused), then the key's
    windows as the reservation found them}."""

    def __init__(self, redis: Redis, key_id: str) -> None:
        self.redis = redis
        self.key_id = key_id
        self.limits = KeyLimits(redis)
        self.script = redis.register_script(admission_script(QueueBackend.ARQ, publish_lua(redis) + LANE_LUA))
        self.count = 0

    async def __call__(self, now: float, tokens: int = 1, model: str = MODEL, deadline: float = 1e12) -> list[int]:
        self.count += 1
        job_id = f"job{self.count}"
        tenant = TenantRef(key_id=self.key_id, name="k", second=int(now), reserved=tokens)
        envelope = JobEnvelope(
            request_id=job_id, model=model, kind=JobKind.CHAT, body={}, deadline=deadline, tenant=tenant
        )
        code, windows = await self.limits.reserve(tenant, envelope, now)
        limits = []
        for unit in ("requests", "tokens"):
            window = windows.get(unit)
            limits += [window.limit, window.used, window.retry_ms, window.reset_ms] if window else [-1, -1, -1, -1]
        if code != KeyAdmission.RESERVED:
            return [code, -1, *limits]
        keys = [
            key_layout.model_workers_key(MODEL),
            key_layout.model_card_key(MODEL),
            key_layout.queue_name(MODEL),
            key_layout.wake_channel(MODEL),
            key_layout.scale_to_zero_key(MODEL),
            f"arq:job:{job_id}",
        ]
        args: list[Any] = [repr(now), 1000, "generate", b"job", 60_000, job_id, *fair_args(envelope)]
        code, depth = await self.script(keys=keys, args=args)
        if code != 1:
            await self.limits.refund(tenant, windows, job_id)
        return [int(code), int(depth), *limits]


@pytest.fixture
async def keys(redis: Redis) -> KeyStore:
    info = registry.WorkerInfo(
        worker_id="w", model=MODEL, capabilities=["generate"], max_jobs=8, host="h", pid=1, started=time.time()
    )
    await registry.heartbeat(redis, info, ttl=60)
    return KeyStore(redis)


async def admission_for(keys: KeyStore, **limits: Any) -> tuple[Admission, str]:
    key = await keys.create(KeyCreate(name="k", **limits))
    return Admission(keys.redis, key.id), key.id


async def test_requests_per_minute_slide_and_retry_after_comes_from_the_window(keys: KeyStore) -> None:
    admit, _ = await admission_for(keys, rpm=3)
    assert [(await admit(t))[0] for t in (1000.2, 1000.7, 1010.5)] == [1, 1, 1]
    refused = await admit(1020.0)
    # {code, depth, requests: limit, used, retry ms, reset ms, tokens: -1 ...}
    assert refused[:2] == [7, -1] and refused[2:6] == [3, 3, 40_000, 50_000]
    assert refused[6:] == [-1, -1, -1, -1]
    assert (await admit(1059.9))[0] == 7  # second 1000 still counts until 1060
    assert (await admit(1060.0))[0] == 1  # ... and its two requests leave together
    assert (await admit(1060.5))[0] == 1
    assert (await admit(1060.6))[0] == 7


async def test_tokens_per_minute_wait_for_as_many_seconds_as_must_leave(keys: KeyStore) -> None:
    admit, _ = await admission_for(keys, tpm=100)
    assert (await admit(1000.0, tokens=60))[0] == 1
    assert (await admit(1005.0, tokens=30))[0] == 1
    refused = await admit(1010.0, tokens=50)
    assert refused[0] == 8 and refused[6:10] == [100, 90, 50_000, 55_000]  # second 1000 must leave: at 1060
    assert (await admit(1010.0, tokens=10))[0] == 1  # a smaller one fits now
    assert (await admit(1011.0, tokens=101))[0] == 9  # can never fit
    after_a_day = await admit(87_400.0, tokens=100)  # everything left the window long ago
    assert after_a_day[0] == 1 and after_a_day[6:10] == [100, 0, 0, 0]


async def test_a_refused_job_is_not_queued_and_charges_nothing(keys: KeyStore, redis: Redis) -> None:
    admit, key_id = await admission_for(keys, rpm=1, tpm=10)
    assert (await admit(1000.0, tokens=5))[0] == 1
    assert (await admit(1000.1, tokens=5))[0] == 7
    assert await redis.zcard(key_layout.queue_name(MODEL)) == 1
    assert await redis.hgetall(key_layout.rate_window_key(key_id, "tokens")) == {
        b"1000": b"5",
        b"t": b"5",
        b"o": b"1000",
        b"n": b"1000",
    }


async def test_a_job_the_model_refuses_gives_its_key_the_charge_back(keys: KeyStore, redis: Redis) -> None:
    admit, key_id = await admission_for(keys, rpm=5, tpm=100, max_queued=5)
    assert (await admit(1000.0, tokens=40))[0] == 1
    await redis.delete(key_layout.model_workers_key(MODEL))  # the model's last worker left
    assert (await admit(1001.0, tokens=20))[:2] == [0, 1]  # reserved on the key, then refused by the model
    tokens = await redis.hmget(key_layout.rate_window_key(key_id, "tokens"), ["1000", "1001", "t"])
    assert tokens == [b"40", b"0", b"40"]
    assert await redis.hmget(key_layout.rate_window_key(key_id, "requests"), ["1000", "1001", "t"]) == [
        b"1",
        b"0",
        b"1",
    ]
    assert await redis.zrange(key_layout.key_jobs_key(key_id), 0, -1) == [b"job1"]


async def test_revoked_keys_and_barred_models_are_refused_before_anything_else(keys: KeyStore) -> None:
    admit, key_id = await admission_for(keys, models=["other"])
    assert (await admit(1000.0))[0] == 6
    await keys.update(key_id, KeyUpdate(models=None))
    assert (await admit(1000.0))[0] == 1
    await keys.revoke(key_id)
    assert (await admit(1000.0))[0] == 5


async def test_queued_jobs_are_bounded_and_expired_ones_stop_counting(keys: KeyStore) -> None:
    admit, _ = await admission_for(keys, max_queued=2)
    assert (await admit(1000.0, deadline=1005.0))[0] == 1
    assert (await admit(1000.0, deadline=2000.0))[0] == 1
    assert (await admit(1001.0))[0] == 10
    assert (await admit(1006.0))[0] == 1  # the first one's deadline passed: it no longer counts


async def test_the_worker_reconciles_the_charge_and_counts_usage_once(keys: KeyStore, redis: Redis) -> None:
    admit, key_id = await admission_for(keys, tpm=1000, max_queued=5)
    now = time.time()
    assert (await admit(now, tokens=300))[0] == 1
    tenant = TenantRef(key_id=key_id, name="k", second=int(now), reserved=300)
    usage = KeyUsage(tenant, MODEL, JobKind.CHAT, 1, prompt_tokens=12, completion_tokens=20, at=now)
    a, b = ArqJobSource(redis, MODEL, "A", 5), ArqJobSource(redis, MODEL, "B", 5)
    await a.claim(1)
    assert not await b.finish("job1", None, usage)  # not B's job: nothing counted
    assert await a.finish("job1", None, usage)
    window = key_layout.rate_window_key(key_id, "tokens")
    assert await redis.hmget(window, [str(int(now)), "t"]) == [b"32", b"32"]
    assert await redis.zcard(key_layout.key_jobs_key(key_id)) == 0
    rows = await keys.usage(key_id, days=1)
    assert [(r.model, r.requests, r.prompt_tokens, r.completion_tokens) for r in rows] == [(MODEL, 1, 12, 20)]


async def test_keys_store_only_a_hash_and_names_stay_unique_among_active_keys(keys: KeyStore, redis: Redis) -> None:
    created = await keys.create(KeyCreate(name="team"))
    stored = [await redis.dump(k) for k in await redis.keys("*")]
    assert not any(created.value.encode() in (value or b"") for value in stored)
    assert (await keys.resolve(created.value)).id == created.id  # type: ignore[union-attr]
    with pytest.raises(Exception, match="already named"):
        await keys.create(KeyCreate(name="team"))
    other = await keys.create(KeyCreate(name="other"))
    with pytest.raises(Exception, match="already named"):
        await keys.update(other.id, KeyUpdate(name="team"))
    await keys.revoke("team")
    assert await keys.resolve(created.value) is None
    assert (await keys.create(KeyCreate(name="team"))).id != created.id  # a revoked key's name is free again


WAITS = [(0, "0ms"), (250, "250ms"), (1500, "1.5s"), (59_999, "59.999s"), (60_000, "1m0s"), (359_000, "5m59s")]


@pytest.mark.parametrize(("ms", "text"), WAITS)
def test_waits_are_written_as_openai_writes_them(ms: int, text: str) -> None:
    assert duration(ms) == text
