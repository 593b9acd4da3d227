"""The worker registry in Redis: workers announce themselves with a heartbeat, the gateway reads who is alive.

Per model, a sorted set maps worker id -> the unix time its last heartbeat is good until; a worker that stops
heartbeating drops out on its own. Workers whose engine is still loading beat into a second set, so a model can be
told apart as loading, serving or failed (the last engine failure is kept for ``FAILURE_TTL_SECONDS``). A model
card (capabilities, context length) is refreshed alongside by serving workers.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Iterable
from dataclasses import dataclass
from typing import Literal, cast

from pydantic import BaseModel
from redis.asyncio import Redis

from conveyor import key_layout
from conveyor.contract import QueueBackend

#: how long a model's last engine failure is reported after it happened
FAILURE_TTL_SECONDS = 600

WorkerState = Literal["loading", "serving"]
FailureReason = Literal["engine_dead", "engine_stalled", "engine_start_failed"]


class WorkerInfo(BaseModel):
    worker_id: str
    model: str
    state: WorkerState = "serving"
    capabilities: list[str]
    max_model_len: int | None = None
    max_jobs: int
    host: str
    #: the IP (or name) Prometheus reaches ``metrics_port`` at
    address: str | None = None
    pid: int
    metrics_port: int | None = None
    started: float
    #: where it takes its jobs from (a card of a worker older than this field: arq, the only backend then)
    queue_backend: QueueBackend = QueueBackend.ARQ


class ModelInfo(BaseModel):
    model: str
    capabilities: list[str]
    max_model_len: int | None = None
    #: the queue backend its serving workers take jobs from: admission refuses a gateway on another one
    queue_backend: QueueBackend = QueueBackend.ARQ


class Failure(BaseModel):
    """Why a worker of a model stopped serving: one of Conveyor's own reasons, never exception text."""

    worker_id: str
    reason: FailureReason
    at: float


@dataclass(frozen=True)
class ModelStatus:
    live_workers: int
    info: ModelInfo | None
    queue_depth: int
    loading_workers: int = 0
    failure: Failure | None = None
    #: the model may have no worker at all: its requests wait in the queue for one to start
    may_scale_to_zero: bool = False
    #: batch chunks on its bulk lane, waiting or running
    bulk_depth: int = 0

    @property
    def state(self) -> str:
        """serving (a live worker), loading (only workers still loading), scaled_to_zero (no worker, and requests
        wait for one), failed (a recent engine failure and no worker), or unavailable."""
        if self.live_workers:
            return "serving"
        if self.loading_workers:
            return "loading"
        if self.may_scale_to_zero:
            return "scaled_to_zero"
        return "failed" if self.failure is not None else "unavailable"

    @property
    def can_take_requests(self) -> bool:
        """A request for it is queued now (a live worker, or one that starts on demand)."""
        return self.live_workers > 0 or self.may_scale_to_zero

    @property
    def outstanding(self) -> int:
        """Jobs waiting or running, interactive and bulk: the demand that keeps (or brings) its workers up."""
        return self.queue_depth + self.bulk_depth


def _sets(worker: WorkerInfo) -> tuple[str, str]:
    """The registry set this worker beats into, and the one it must leave."""
    serving, loading = key_layout.model_workers_key(worker.model), key_layout.model_loading_key(worker.model)
    return (serving, loading) if worker.state == "serving" else (loading, serving)


async def heartbeat(redis: Redis, worker: WorkerInfo, ttl: float) -> None:
    now = time.time()
    into, out_of = _sets(worker)
    px = int(ttl * 1000)
    async with redis.pipeline(transaction=False) as pipe:
        pipe.zadd(into, {worker.worker_id: now + ttl})
        pipe.zrem(out_of, worker.worker_id)
        pipe.zremrangebyscore(into, "-inf", now)
        pipe.set(key_layout.worker_info_key(worker.worker_id), worker.model_dump_json(), px=px)
        if worker.state == "serving":
            card = ModelInfo(
                model=worker.model,
                capabilities=worker.capabilities,
                max_model_len=worker.max_model_len,
                queue_backend=worker.queue_backend,
            )
            pipe.set(key_layout.model_card_key(worker.model), card.model_dump_json(), px=px)
        pipe.sadd(key_layout.MODELS_KEY, worker.model)
        await pipe.execute()


async def deregister(redis: Redis, worker: WorkerInfo, failure: Failure | None = None) -> None:
    """Leave the registry at once (drain, or failure: then the reason is kept for the model's status)."""
    async with redis.pipeline(transaction=False) as pipe:
        pipe.zrem(key_layout.model_workers_key(worker.model), worker.worker_id)
        pipe.zrem(key_layout.model_loading_key(worker.model), worker.worker_id)
        pipe.delete(key_layout.worker_info_key(worker.worker_id))
        if failure is not None:
            pipe.set(key_layout.model_failure_key(worker.model), failure.model_dump_json(), ex=FAILURE_TTL_SECONDS)
        await pipe.execute()


async def model_status(redis: Redis, model: str) -> ModelStatus:
    """Live and loading workers, advertised card, last failure and queue depth of one model, in one round trip."""
    now = time.time()
    async with redis.pipeline(transaction=False) as pipe:
        pipe.zcount(key_layout.model_workers_key(model), now, "+inf")
        pipe.get(key_layout.model_card_key(model))
        pipe.zcount(key_layout.model_loading_key(model), now, "+inf")
        pipe.get(key_layout.model_failure_key(model))
        pipe.exists(key_layout.scale_to_zero_key(model))
        for bulk_lane in (False, True):  # each lane on both backends' layouts: one of each pair is empty
            pipe.zcard(key_layout.bulk_queue_name(model) if bulk_lane else key_layout.queue_name(model))
            pipe.xlen(key_layout.stream_lane_key(model, bulk_lane))
        live, card, loading, failure, zero, *lanes = await pipe.execute()
    depth, bulk = lanes[0] + lanes[1], lanes[2] + lanes[3]
    return ModelStatus(
        live_workers=int(live),
        info=ModelInfo.model_validate_json(card) if card and live else None,
        queue_depth=int(depth),
        loading_workers=int(loading),
        failure=Failure.model_validate_json(failure) if failure else None,
        may_scale_to_zero=bool(zero),
        bulk_depth=int(bulk),
    )


async def known_models(redis: Redis) -> set[str]:
    members = await cast(Awaitable[set[bytes]], redis.smembers(key_layout.MODELS_KEY))
    return {m.decode() if isinstance(m, bytes) else m for m in members}


async def live_workers(redis: Redis, model: str) -> list[WorkerInfo]:
    return await _infos(redis, await redis.zrangebyscore(key_layout.model_workers_key(model), time.time(), "+inf"))


async def _infos(redis: Redis, ids: Iterable[bytes | str]) -> list[WorkerInfo]:
    """The registry entries of these worker ids (an entry that lapsed meanwhile is left out)."""
    keys = sorted({key_layout.worker_info_key(i.decode() if isinstance(i, bytes) else i) for i in ids})
    if not keys:
        return []
    # One GET each, not MGET: each worker's info key is a slot of its own on a Redis Cluster, where an MGET across
    # slots is refused; a pipeline without a transaction sends each GET to its node, in one round trip on one Redis.
    async with redis.pipeline(transaction=False) as pipe:
        for key in keys:
            pipe.get(key)
        raw = await pipe.execute()
    return [WorkerInfo.model_validate_json(r) for r in raw if r]


async def all_workers(redis: Redis) -> list[WorkerInfo]:
    """Every worker with a fresh heartbeat, loading or serving, of every known model (what Prometheus scrapes)."""
    now = time.time()
    models = sorted(await known_models(redis))
    async with redis.pipeline(transaction=False) as pipe:
        for model in models:
            pipe.zrangebyscore(key_layout.model_workers_key(model), now, "+inf")
            pipe.zrangebyscore(key_layout.model_loading_key(model), now, "+inf")
        id_lists = await pipe.execute()
    return await _infos(redis, (i for found in id_lists for i in found))


async def gateway_heartbeat(redis: Redis, address: str, ttl: float) -> None:
    """A gateway's presence (its scrape address), good for ``ttl`` seconds."""
    now = time.time()
    async with redis.pipeline(transaction=False) as pipe:
        pipe.zadd(key_layout.GATEWAYS_KEY, {address: now + ttl})
        pipe.zremrangebyscore(key_layout.GATEWAYS_KEY, "-inf", now)
        await pipe.execute()


async def gateway_leave(redis: Redis, address: str) -> None:
    await redis.zrem(key_layout.GATEWAYS_KEY, address)


async def live_gateways(redis: Redis) -> list[str]:
    found = await redis.zrangebyscore(key_layout.GATEWAYS_KEY, time.time(), "+inf")
    return sorted(a.decode() if isinstance(a, bytes) else a for a in found)


async def forget_model(redis: Redis, model: str) -> None:
    """A model removed from the fleet: nobody knows it any more (404), and nothing of its registry is left.

    Two steps, because the model's keys (its hash tag) and the index of known models (the control plane's) are in
    different slots of a Redis Cluster, where no transaction spans them. The model's keys go first, in one DEL (they
    share a slot, so it is atomic); then its name leaves the index. A crash between the two leaves a known name with
    nothing behind it, what a model whose workers all stopped looks like: 503 instead of 404, and listed, until it is
    forgotten again (``conveyor up`` retries in its next round after an error here, and a new ``conveyor up`` forgets
    every known model outside its models file that has no live worker). The other order would leave the workers'
    sets behind, without an expiry, under a name nobody lists. A worker still beating re-adds both either way, as it
    did after the transaction."""
    await redis.delete(
        key_layout.model_card_key(model),
        key_layout.model_failure_key(model),
        key_layout.scale_to_zero_key(model),
        key_layout.model_workers_key(model),
        key_layout.model_loading_key(model),
    )
    await cast(Awaitable[int], redis.srem(key_layout.MODELS_KEY, model))
