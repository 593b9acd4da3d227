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
from gateway import rate_limits
from gateway.directory import ModelDirectory
from gateway.queue import JobState, redis_errors
from gateway.settings import GatewaySettings

ADMISSION_SCRIPT = contract.RATE_WINDOW_LUA + (Path(__file__).parent / "admission.lua").read_text()
#: Put a batch's chunks on its model's bulk lane, in order, each once (``released`` remembers which), charging each
#: chunk's estimated tokens to the batch's API key within ``share`` of the key's tokens per minute (the rest stays for
#: its interactive requests). Stops at the first chunk that does not fit; the driver offers it again next round. A
#: chunk larger than the share goes once nothing else is counted. KEYS: bulk queue, wake channel, released hash[, key
#: record, tokens window]. ARGV: job prefix, now, bucket second, share, released ttl ms, then per chunk: index, job
#: id, job, expiry ms, score, tokens. Returns how many chunks this call put on the lane; -1 when the key is revoked.
RELEASE_SCRIPT = (
    contract.RATE_WINDOW_LUA
    + """
local now = tonumber(ARGV[2])
local limit
if #KEYS > 3 then
  local record = redis.call('HMGET', KEYS[4], 'name', 'revoked_at', 'tpm')
  if not record[1] or record[2] then return -1 end
  if record[3] then limit = math.max(math.floor(tonumber(record[3]) * tonumber(ARGV[4])), 1) end
end
local released = 0
for i = 6, #ARGV, 6 do
  if redis.call('HEXISTS', KEYS[3], ARGV[i]) == 0 then
    local cost = tonumber(ARGV[i + 5])
    if limit then
      local w = window(KEYS[5], limit, cost, now)
      if w[3] ~= 0 and w[2] > 0 then break end
      charge(KEYS[5], ARGV[3], cost)
    end
    if redis.call('SET', ARGV[1] .. ARGV[i + 1], ARGV[i + 2], 'PX', ARGV[i + 3], 'NX') then
      redis.call('ZADD', KEYS[1], 'NX', ARGV[i + 4], ARGV[i + 1])
    end
    redis.call('HSET', KEYS[3], ARGV[i], 1)
    redis.call('PEXPIRE', KEYS[3], ARGV[5])
    released = released + 1
  end
end
if released > 0 then redis.call('PUBLISH', KEYS[2], 'job') end  -- contract.WAKE_JOB
return released
"""
)
CANCEL_SCRIPT = (Path(__file__).parent / "cancel.lua").read_text()
#: a batch's record of released chunks outlives its last chunk's deadline by this long (it is deleted when the batch
#: ends, long before)
RELEASED_GRACE_SECONDS = 86_400.0


class Admission(IntEnum):
    """Result codes of ``admission.lua``."""

    NO_WORKER = 0
    ENQUEUED = 1
    QUEUE_FULL = 2
    INCAPABLE = 3
    DUPLICATE = 4
    #: codes 5 to 10 concern the job's API key (``gateway.rate_limits.refusal``)


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


def _windows(limits: list[int]) -> dict[str, rate_limits.Window]:
    """The key's windows admission reported (none when the job has no key or its key sets no limit)."""
    found = {}
    for index, unit in enumerate(("requests", "tokens")):
        window = rate_limits.Window.parse(unit, limits[index * 4 : index * 4 + 4]) if limits else None
        if window is not None:
            found[unit] = window
    return found


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
        self._release = redis.register_script(RELEASE_SCRIPT)

    async def submit(self, envelope: JobEnvelope) -> dict[str, str]:
        model = envelope.model
        enqueued_ms = int(envelope.created * 1000)
        job = _serialized(envelope, enqueued_ms)
        now = time.time()
        keys = [
            contract.model_workers_key(model),
            contract.model_card_key(model),
            contract.queue_name(model),
            job_key_prefix + envelope.request_id,
            contract.wake_channel(model),
            contract.scale_to_zero_key(model),
        ]
        args: list[str | int | bytes] = [
            repr(now),
            self.settings.max_queue_depth,
            CAPABILITY_FOR_KIND[envelope.kind],
            job,
            max(int(envelope.seconds_left() * 1000), 1),
            enqueued_ms,
            envelope.request_id,
        ]
        tenant = envelope.tenant
        if tenant is not None:
            keys += [
                contract.api_key_key(tenant.key_id),
                contract.rate_window_key(tenant.key_id, "requests"),
                contract.rate_window_key(tenant.key_id, "tokens"),
                contract.key_jobs_key(tenant.key_id),
            ]
            args += [model, tenant.reserved, tenant.second, repr(envelope.deadline)]
        with redis_errors():
            code, depth, *limits = await self._admit_and_enqueue(keys=keys, args=args)
        windows = _windows(limits)
        cost = {"requests": 1, "tokens": tenant.reserved if tenant else 0}
        if tenant is not None and code > Admission.DUPLICATE:
            raise rate_limits.refusal(code, tenant, model, windows, cost, self.settings.retry_after_seconds)
        admitted = code == Admission.ENQUEUED
        rate_headers = rate_limits.headers(list(windows.values()), cost, admitted, now, tenant.second) if tenant else {}
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
                headers={"Retry-After": str(self.settings.retry_after_seconds)} | rate_headers,
            )
        if code == Admission.DUPLICATE:
            raise InvalidRequest(f"request id {envelope.request_id} is already queued", code="duplicate_request")
        return rate_headers

    async def release(self, batch_id: str, envelopes: list[JobEnvelope], token_share: float, now: float) -> int:
        if not envelopes:
            return 0
        first = envelopes[0]
        model, tenant = first.model, first.tenant
        keys = [contract.bulk_queue_name(model), contract.wake_channel(model), contract.batch_released_key(batch_id)]
        if tenant is not None:
            keys += [contract.api_key_key(tenant.key_id), contract.rate_window_key(tenant.key_id, "tokens")]
        last_deadline = max(e.deadline for e in envelopes)
        released_ttl = int((last_deadline - now + RELEASED_GRACE_SECONDS) * 1000)
        args: list[str | int | float | bytes] = [job_key_prefix, repr(now), int(now), token_share, released_ttl]
        for envelope in envelopes:
            assert envelope.chunk is not None
            score = int(envelope.created * 1000)
            ttl = max(int(envelope.seconds_left(now) * 1000), 1)
            job = _serialized(envelope, score)
            args += [envelope.chunk.index, envelope.request_id, job, ttl, score, envelope.chunk.tokens]
        with redis_errors():
            return int(await self._release(keys=keys, args=args))

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
        if envelope.tenant is not None:
            keys.append(contract.key_jobs_key(envelope.tenant.key_id))
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
