"""The worker registry in Redis: workers announce themselves with a heartbeat, the gateway reads who is alive.

Per model, a sorted set maps worker id -> the unix time its last heartbeat is good until; a worker that stops
heartbeating drops out on its own. A model card (capabilities, context length) is refreshed alongside.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import cast

from pydantic import BaseModel
from redis.asyncio import Redis

from conveyor import contract


class WorkerInfo(BaseModel):
    worker_id: str
    model: str
    capabilities: list[str]
    max_model_len: int | None = None
    max_jobs: int
    host: str
    pid: int
    metrics_port: int | None = None
    started: float


class ModelInfo(BaseModel):
    model: str
    capabilities: list[str]
    max_model_len: int | None = None


@dataclass(frozen=True)
class ModelStatus:
    live_workers: int
    info: ModelInfo | None
    queue_depth: int


async def heartbeat(redis: Redis, worker: WorkerInfo, ttl: float) -> None:
    now = time.time()
    card = ModelInfo(model=worker.model, capabilities=worker.capabilities, max_model_len=worker.max_model_len)
    px = int(ttl * 1000)
    async with redis.pipeline(transaction=False) as pipe:
        pipe.zadd(contract.model_workers_key(worker.model), {worker.worker_id: now + ttl})
        pipe.zremrangebyscore(contract.model_workers_key(worker.model), "-inf", now)
        pipe.set(contract.worker_info_key(worker.worker_id), worker.model_dump_json(), px=px)
        pipe.set(contract.model_card_key(worker.model), card.model_dump_json(), px=px)
        pipe.sadd(contract.MODELS_KEY, worker.model)
        await pipe.execute()


async def deregister(redis: Redis, worker: WorkerInfo) -> None:
    async with redis.pipeline(transaction=False) as pipe:
        pipe.zrem(contract.model_workers_key(worker.model), worker.worker_id)
        pipe.delete(contract.worker_info_key(worker.worker_id))
        await pipe.execute()


async def model_status(redis: Redis, model: str) -> ModelStatus:
    """Live workers, advertised card and queue depth of one model, in one round trip."""
    async with redis.pipeline(transaction=False) as pipe:
        pipe.zcount(contract.model_workers_key(model), time.time(), "+inf")
        pipe.get(contract.model_card_key(model))
        pipe.zcard(contract.queue_name(model))
        live, card, depth = await pipe.execute()
    info = ModelInfo.model_validate_json(card) if card and live else None
    return ModelStatus(live_workers=int(live), info=info, queue_depth=int(depth))


async def known_models(redis: Redis) -> set[str]:
    members = await cast(Awaitable[set[bytes]], redis.smembers(contract.MODELS_KEY))
    return {m.decode() if isinstance(m, bytes) else m for m in members}


async def live_workers(redis: Redis, model: str) -> list[WorkerInfo]:
    ids = await redis.zrangebyscore(contract.model_workers_key(model), time.time(), "+inf")
    if not ids:
        return []
    raw = await redis.mget([contract.worker_info_key(i.decode() if isinstance(i, bytes) else i) for i in ids])
    return [WorkerInfo.model_validate_json(r) for r in raw if r]
