"""The worker's queue backend, as ``CONVEYOR_QUEUE_BACKEND`` chooses it (the worker and ``conveyor up``, which
answers the jobs of a model it removed)."""

from __future__ import annotations

from redis.asyncio import Redis

from conveyor.contract import QueueBackend
from worker.arq_source import ArqJobSource
from worker.job_source import JobSource
from worker.streams_source import StreamsJobSource


def open_source(backend: QueueBackend, redis: Redis, model: str, worker_id: str, lease_seconds: float) -> JobSource:
    sources: dict[QueueBackend, type[ArqJobSource | StreamsJobSource]] = {
        QueueBackend.ARQ: ArqJobSource,
        QueueBackend.STREAMS: StreamsJobSource,
    }
    return sources[backend](redis, model, worker_id, lease_seconds)
