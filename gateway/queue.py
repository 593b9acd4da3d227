"""The gateway's side of the queue: admission, enqueue, waiting for replies, cancelling. Every Redis error that
reaches a client passes through ``redis_errors`` and becomes a 503."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from datetime import timedelta

from arq.connections import ArqRedis
from arq.constants import abort_jobs_ss
from redis.exceptions import RedisError

from conveyor import contract, registry
from conveyor.contract import CAPABILITY_FOR_KIND, JobEnvelope, JobKind, Reply
from conveyor.errors import (
    BackendUnavailable,
    DeadlineExceeded,
    InvalidRequest,
    ModelNotFound,
    NoLiveWorker,
    Overloaded,
)
from gateway.metrics import GatewayMetrics
from gateway.settings import GatewaySettings


@contextlib.contextmanager
def redis_errors() -> Iterator[None]:
    """Translate Redis' exceptions (and its timeouts) into the gateway's 503."""
    try:
        yield
    except (RedisError, OSError, TimeoutError) as exc:
        raise BackendUnavailable(f"the queue backend is unavailable: {type(exc).__name__}: {exc}") from exc


class JobQueue:
    def __init__(self, redis: ArqRedis, settings: GatewaySettings, metrics: GatewayMetrics) -> None:
        self.redis = redis
        self.settings = settings
        self.metrics = metrics

    async def admit(self, model: str, kind: JobKind) -> None:
        """Refuse before enqueueing: unknown model 404, no live worker 503, wrong capability 400, queue full 429."""
        with redis_errors():
            status = await registry.model_status(self.redis, model)
            if status.live_workers == 0 and model not in self.settings.models:
                if model not in await registry.known_models(self.redis):
                    raise ModelNotFound(f"The model `{model}` does not exist.", param="model")
        self.metrics.live_workers.labels(model).set(status.live_workers)
        self.metrics.queue_depth.labels(model).set(status.queue_depth)
        if status.live_workers == 0 or status.info is None:
            raise NoLiveWorker(f"No live worker serves `{model}` right now; try again when one has started.",
                               param="model")
        needed = CAPABILITY_FOR_KIND[kind]
        if needed not in status.info.capabilities:
            raise InvalidRequest(f"`{model}` does not support {kind.value} requests "
                                 f"(it serves: {', '.join(status.info.capabilities)}).", param="model",
                                 code="unsupported_model_capability")
        if status.queue_depth >= self.settings.max_queue_depth:
            raise Overloaded(f"`{model}` has {status.queue_depth} jobs queued (limit "
                             f"{self.settings.max_queue_depth}); retry later.",
                             headers={"Retry-After": str(self.settings.retry_after_seconds)})

    async def enqueue(self, envelope: JobEnvelope) -> None:
        with redis_errors():
            job = await self.redis.enqueue_job(
                contract.JOB_FUNCTION, envelope.model_dump(mode="json"), _job_id=envelope.request_id,
                _queue_name=contract.queue_name(envelope.model),
                _expires=timedelta(seconds=max(envelope.seconds_left(), 0.001)))
        if job is None:  # arq refuses a job id that already exists
            raise InvalidRequest(f"request id {envelope.request_id} is already queued", code="duplicate_request")

    async def wait_reply(self, envelope: JobEnvelope) -> Reply:
        """Block on the request's reply list until the worker pushes the answer or the deadline passes."""
        left = envelope.seconds_left()
        with redis_errors():
            popped = await self.redis.blpop([contract.reply_key(envelope.request_id)], timeout=max(left, 0.001))
        if popped is None:
            raise DeadlineExceeded(f"no answer within the request's deadline ({envelope.deadline - envelope.created:.1f} s)")
        return Reply.model_validate_json(popped[1])

    async def cancel(self, request_id: str) -> None:
        """Ask the worker to drop the job if not started, or abort it (in the engine) if running."""
        with contextlib.suppress(RedisError, OSError):
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.zadd(abort_jobs_ss, {request_id: int(time.time() * 1000)})
                pipe.delete(contract.reply_key(request_id))
                await pipe.execute()

    async def ping(self) -> bool:
        try:
            return bool(await self.redis.ping())
        except (RedisError, OSError):
            return False
