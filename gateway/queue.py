"""The gateway's side of the queue: admission, enqueue, waiting for replies, cancelling. Every Redis error that
reaches a client passes through ``redis_errors`` and becomes a 503."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Awaitable, Iterator
from enum import IntEnum
from pathlib import Path
from typing import Any, cast

from arq.connections import ArqRedis
from arq.constants import abort_jobs_ss, job_key_prefix
from arq.jobs import serialize_job
from redis.exceptions import RedisError

from conveyor import contract, registry
from conveyor.contract import CAPABILITY_FOR_KIND, JobEnvelope, Reply
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

ADMISSION_SCRIPT = (Path(__file__).parent / "admission.lua").read_text()


class Admission(IntEnum):
    """Result codes of ``admission.lua``."""

    NO_WORKER = 0
    ENQUEUED = 1
    QUEUE_FULL = 2
    INCAPABLE = 3
    DUPLICATE = 4


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
        self._admit_and_enqueue = redis.register_script(ADMISSION_SCRIPT)

    async def submit(self, envelope: JobEnvelope) -> None:
        """Admit and enqueue in one atomic step (``admission.lua``). Refusals, in order: unknown model 404, no live
        worker 503, wrong capability 400, queue full 429."""
        model = envelope.model
        enqueued_ms = int(envelope.created * 1000)
        job = serialize_job(
            contract.JOB_FUNCTION, (envelope.model_dump(mode="json"),), {}, None, enqueued_ms, serializer=contract.dumps
        )
        keys = [
            contract.model_workers_key(model),
            contract.model_card_key(model),
            contract.queue_name(model),
            job_key_prefix + envelope.request_id,
            contract.wake_channel(model),
        ]
        args: list[str | int | bytes] = [
            repr(time.time()),
            self.settings.max_queue_depth,
            CAPABILITY_FOR_KIND[envelope.kind],
            job,
            max(int(envelope.seconds_left() * 1000), 1),
            enqueued_ms,
            envelope.request_id,
        ]
        with redis_errors():
            code, live, depth = await self._admit_and_enqueue(keys=keys, args=args)
            if code == Admission.NO_WORKER and not await self.is_known(model):
                raise ModelNotFound(f"The model `{model}` does not exist.", param="model")
        self.metrics.live_workers.labels(model).set(live)
        self.metrics.queue_depth.labels(model).set(depth)
        if code == Admission.NO_WORKER:
            raise NoLiveWorker(
                f"No live worker serves `{model}` right now; try again when one has started.", param="model"
            )
        if code == Admission.INCAPABLE:
            raise InvalidRequest(
                f"`{model}` does not support {envelope.kind.value} requests.",
                param="model",
                code="unsupported_model_capability",
            )
        if code == Admission.QUEUE_FULL:
            raise Overloaded(
                f"`{model}` has {depth} jobs queued or running (limit {self.settings.max_queue_depth}); retry later.",
                headers={"Retry-After": str(self.settings.retry_after_seconds)},
            )
        if code == Admission.DUPLICATE:
            raise InvalidRequest(f"request id {envelope.request_id} is already queued", code="duplicate_request")

    async def model_names(self) -> set[str]:
        """Every model this deployment knows: configured, or served by a worker at some time."""
        return await registry.known_models(self.redis) | set(self.settings.models)

    async def is_known(self, model: str) -> bool:
        """A known model without a live worker is 503; anything else is 404."""
        return model in self.settings.models or model in await registry.known_models(self.redis)

    async def wait_reply(self, envelope: JobEnvelope) -> Reply:
        """Block on the request's reply list until the worker pushes the answer or the deadline passes."""
        left = envelope.seconds_left()
        with redis_errors():
            # Redis >= 6 takes a fractional timeout; redis-py's stubs say int
            timeout: Any = max(left, 0.001)
            popped = await cast(
                Awaitable[list[bytes] | None],
                self.redis.blpop([contract.reply_key(envelope.request_id)], timeout=timeout),
            )
        if popped is None:
            budget = envelope.deadline - envelope.created
            raise DeadlineExceeded(f"no answer within the request's deadline ({budget:.1f} s)")
        return Reply.decode(popped[1])

    async def cancel(self, envelope: JobEnvelope) -> None:
        """Ask the worker to drop the job if not started, or abort it (in the engine) if running."""
        with contextlib.suppress(RedisError, OSError):
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.zadd(abort_jobs_ss, {envelope.request_id: int(time.time() * 1000)})
                pipe.delete(contract.reply_key(envelope.request_id))
                pipe.publish(contract.wake_channel(envelope.model), contract.WAKE_ABORT)
                await pipe.execute()

    async def ping(self) -> bool:
        try:
            return bool(await self.redis.ping())
        except (RedisError, OSError):
            return False
