"""The gateway's side of the arq backend: ``JobQueue`` on arq's Redis layout. The only gateway module that knows arq.

A job is written as arq writes one (``arq:job:<id>`` with arq's job serialisation, expiring at the request's
deadline, and the model's queue sorted set), so ``worker.arq_source`` and arq's own tools read it. Admission and
enqueue are ``gateway.redis_queue``'s; enqueueing publishes a wake-up to the model's workers. A cancel is one script
(``cancel.lua``).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from arq.constants import in_progress_key_prefix, job_key_prefix, retry_key_prefix
from arq.jobs import SerializationError, serialize_job

from conveyor import contract, key_layout
from conveyor.contract import JobEnvelope, QueueBackend
from conveyor.fair_share import FAIR_LUA
from conveyor.outage import REDIS_DOWN
from gateway.queue import JobState, redis_errors
from gateway.redis_queue import RedisJobQueue, unencodable

#: the lane is a sorted set of job ids by fair tag (``conveyor.fair_share``: jobs are taken in that order), listing
#: running jobs too (arq removes one when it finishes). The wake-up is published only when no job waited before this
#: script's first: a job that waits was announced, and every worker claims all it has room for (a worker that had
#: none looks again when a job of its ends), so the later ones are claimed with it or after it.
LANE_LUA = (
    FAIR_LUA
    + """
local function depth_of(lane) return redis.call('ZCARD', lane) end
local waited
local function enqueue(lane, job, data, expiry_ms, id, tenant, weight, priority, deadline)
  waited = waited or redis.call('HLEN', fair_key(lane, 'jobs'))
  redis.call('PSETEX', job, expiry_ms, data)
  redis.call('ZADD', lane, fair_enter(lane, id, tenant, weight, priority, deadline), id)
end
local function wake(channel) if not waited or waited == 0 then publish(channel, 'job') end end  -- WAKE_JOB
"""
)


class ArqJobQueue(RedisJobQueue):
    BACKEND = QueueBackend.ARQ
    LANE_LUA = LANE_LUA
    CANCEL_LUA = FAIR_LUA + (Path(__file__).parent / "cancel.lua").read_text()

    def lane(self, model: str, bulk: bool = False) -> str:
        return key_layout.bulk_queue_name(model) if bulk else key_layout.queue_name(model)

    def job_prefix(self, model: str) -> str:
        return job_key_prefix

    def job_data(self, envelope: JobEnvelope, enqueued_ms: int) -> bytes:
        try:
            return serialize_job(
                contract.JOB_FUNCTION,
                (envelope.model_dump(mode="json"),),
                {},
                None,
                enqueued_ms,
                serializer=contract.dumps_finite,
            )
        except SerializationError as exc:
            raise unencodable(exc.__cause__) from None

    async def cancel_job(self, envelope: JobEnvelope) -> None:
        job_id = envelope.request_id
        keys = [
            self.lane_of(envelope),
            job_key_prefix + job_id,
            retry_key_prefix + job_id,
            in_progress_key_prefix + job_id,
            key_layout.abort_key(envelope.model, job_id),
            key_layout.wake_channel(envelope.model),
        ]
        marker_ms = max(int(envelope.seconds_left() * 1000), 1000)
        # on a Redis error: the job's data expires at its deadline; a worker answering it finds nobody waiting
        with contextlib.suppress(*REDIS_DOWN):
            await self._cancel(keys=keys, args=[job_id, marker_ms])

    async def state(self, envelope: JobEnvelope) -> JobState:
        with redis_errors():
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.exists(in_progress_key_prefix + envelope.request_id)
                pipe.zscore(self.lane_of(envelope), envelope.request_id)
                running, score = await pipe.execute()
        if running:
            return JobState.RUNNING
        return JobState.QUEUED if score is not None else JobState.GONE
