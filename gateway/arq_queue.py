"""The gateway's side of the arq seam: ``JobQueue`` on arq's Redis layout. The only gateway module that knows arq.

A job is written as arq writes one (``arq:job:<id>`` with arq's job serialisation, expiring at the request's
deadline, and the model's queue sorted set), so ``worker.arq_source`` and arq's own tools read it. Admission,
enqueue and the workers' wake-up are one Lua script (``admission.lua``); so is a cancel (``cancel.lua``).
"""

from __future__ import annotations

import contextlib
import time
from enum import IntEnum
from pathlib import Path

from arq.constants import in_progress_key_prefix, job_key_prefix, retry_key_prefix
from arq.jobs import SerializationError, serialize_job
from redis.asyncio import Redis

from conveyor import contract
from conveyor.contract import CAPABILITY_FOR_KIND, JobEnvelope
from conveyor.errors import InvalidRequest, Overloaded
from conveyor.outage import REDIS_DOWN
from gateway.directory import ModelDirectory
from gateway.queue import JobState, redis_errors
from gateway.settings import GatewaySettings

ADMISSION_SCRIPT = (Path(__file__).parent / "admission.lua").read_text()
#: Put batch chunks on a bulk lane: each job written and queued unless it is there already, then one wake-up.
#: KEYS: bulk queue, wake channel. ARGV: job prefix, then per chunk: job id, serialised job, expiry ms, score.
BULK_SCRIPT = """
for i = 2, #ARGV, 4 do
  if redis.call('SET', ARGV[1] .. ARGV[i], ARGV[i + 1], 'PX', ARGV[i + 2], 'NX') then
    redis.call('ZADD', KEYS[1], 'NX', ARGV[i + 3], ARGV[i])
  end
end
redis.call('PUBLISH', KEYS[2], 'job')  -- contract.WAKE_JOB
return 0
"""
CANCEL_SCRIPT = (Path(__file__).parent / "cancel.lua").read_text()


class Admission(IntEnum):
    """Result codes of ``admission.lua``."""

    NO_WORKER = 0
    ENQUEUED = 1
    QUEUE_FULL = 2
    INCAPABLE = 3
    DUPLICATE = 4


def _serialized(envelope: JobEnvelope, enqueued_ms: int) -> bytes:
    """The job as arq stores it; a body that cannot be encoded is the client's error."""
    try:
        return serialize_job(
            contract.JOB_FUNCTION, (envelope.model_dump(mode="json"),), {}, None, enqueued_ms, serializer=contract.dumps
        )
    except SerializationError as exc:
        if isinstance(exc.__cause__, UnicodeEncodeError):
            raise InvalidRequest(
                "The request contains text that is not valid Unicode (a lone surrogate).", code="invalid_unicode"
            ) from None
        raise InvalidRequest("The request could not be encoded.", code="invalid_request") from None


def _queue_of(envelope: JobEnvelope) -> str:
    """The lane a job waits on: a batch chunk on its model's bulk lane, anything else on the model's queue."""
    return contract.bulk_queue_name(envelope.model) if envelope.chunk else contract.queue_name(envelope.model)


class ArqJobQueue:
    def __init__(self, redis: Redis, settings: GatewaySettings, directory: ModelDirectory) -> None:
        self.redis = redis
        self.settings = settings
        self.directory = directory
        self._admit_and_enqueue = redis.register_script(ADMISSION_SCRIPT)
        self._cancel = redis.register_script(CANCEL_SCRIPT)
        self._bulk = redis.register_script(BULK_SCRIPT)

    async def submit(self, envelope: JobEnvelope) -> None:
        model = envelope.model
        enqueued_ms = int(envelope.created * 1000)
        job = _serialized(envelope, enqueued_ms)
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
            code, depth = await self._admit_and_enqueue(keys=keys, args=args)
        if code == Admission.NO_WORKER:
            raise await self.directory.unavailable(model)
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

    async def submit_bulk(self, envelopes: list[JobEnvelope]) -> None:
        for model in {e.model for e in envelopes}:
            args: list[str | int | bytes] = [job_key_prefix]
            for envelope in (e for e in envelopes if e.model == model):
                score = int(envelope.created * 1000)
                ttl = max(int(envelope.seconds_left() * 1000), 1)
                args += [envelope.request_id, _serialized(envelope, score), ttl, score]
            with redis_errors():
                await self._bulk(keys=[contract.bulk_queue_name(model), contract.wake_channel(model)], args=args)

    async def cancel(self, envelope: JobEnvelope) -> None:
        job_id = envelope.request_id
        keys = [
            _queue_of(envelope),
            job_key_prefix + job_id,
            retry_key_prefix + job_id,
            in_progress_key_prefix + job_id,
            contract.abort_key(job_id),
            contract.wake_channel(envelope.model),
        ]
        marker_ms = max(int(envelope.seconds_left() * 1000), 1000)
        # on a Redis error: the job's data expires at its deadline; a worker answering it finds nobody waiting
        with contextlib.suppress(*REDIS_DOWN):
            await self._cancel(keys=keys, args=[job_id, marker_ms])

    async def state(self, envelope: JobEnvelope) -> JobState:
        with redis_errors():
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.exists(in_progress_key_prefix + envelope.request_id)
                pipe.zscore(_queue_of(envelope), envelope.request_id)
                running, score = await pipe.execute()
        if running:
            return JobState.RUNNING
        return JobState.QUEUED if score is not None else JobState.GONE
