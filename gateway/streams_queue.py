"""The gateway's side of the Redis Streams backend: ``JobQueue`` on one stream per lane
(``key_layout.stream_lane_key``).

A job is a record (a hash: the envelope as JSON, its lane and entry, its tries; expiring at the request's deadline)
plus an entry on its lane;
the model's workers read the lane as one consumer group, so each entry reaches one worker (``worker.streams_source``)
and enqueueing wakes nobody else: no wake-up is published. Admission and enqueue are ``gateway.redis_queue``'s.
Every key of a model carries its hash tag.
"""

from __future__ import annotations

import contextlib

from conveyor import contract, key_layout
from conveyor.contract import JobEnvelope, QueueBackend
from conveyor.fair_share import FAIR_LUA
from conveyor.outage import REDIS_DOWN
from gateway.queue import JobState, redis_errors
from gateway.redis_queue import RedisJobQueue, unencodable

#: the lane is a stream of entries naming a job (``id``); an entry stays until its job is finished or cancelled, so
#: its length counts waiting and running jobs, as arq's sorted set does. Waiting jobs are also in the lane's ready set
#: by fair tag (``conveyor.fair_share``): an entry read is a token that goes to the fairest of them
#: (``worker.streams_source``).
LANE_LUA = (
    FAIR_LUA
    + f"""
local function depth_of(lane) return redis.call('XLEN', lane) end
local function enqueue(lane, job, data, expiry_ms, id, tenant, weight, priority, deadline)
  local entry = redis.call('XADD', lane, '*', 'id', id)
  redis.call('HSET', job, 'data', data, 'entry', entry, 'lane', lane, 'tries', 0)
  redis.call('PEXPIRE', job, expiry_ms)
  local ready = lane .. '{key_layout.STREAM_READY_SUFFIX}'
  redis.call('ZADD', ready, fair_enter(ready, id, tenant, weight, priority, deadline), id)
end
local function wake(channel) end
"""
)
#: Cancel one job. Not running (no lease): remove its entry, record and place in the ready set, so no worker ever
#: starts it. Running: leave a marker that expires with the job and wake the model's workers naming it, so the one
#: holding it stops it now. KEYS: 1 lane, 2 record, 3 lease, 4 abort marker, 5 the model's wake-up channel, 6 the
#: lane's ready set. ARGV: 1 job id, 2 marker expiry ms, 3 group. Returns 0 removed (or gone), 1 running: asked to
#: stop.
CANCEL_LUA = (
    FAIR_LUA
    + f"local OWNERS = '{key_layout.STREAM_OWNERS_SUFFIX}'\n"
    + """
if redis.call('EXISTS', KEYS[3]) == 0 then
  local job = redis.call('HMGET', KEYS[2], 'entry', 'owned')
  local entry = job[1]
  if entry then
    redis.pcall('XACK', KEYS[1], ARGV[3], entry)  -- delivered but not yet taken up (no group yet: nothing to ack)
    redis.call('XDEL', KEYS[1], entry)
    if job[2] then redis.call('HDEL', KEYS[1] .. OWNERS, entry) end  -- handed back after a fair pick gave it this entry
  end
  redis.call('DEL', KEYS[2])
  fair_leave(KEYS[6], ARGV[1])
  redis.call('ZREM', KEYS[6], ARGV[1])
  return 0
end
redis.call('PSETEX', KEYS[4], ARGV[2], '1')
publish(KEYS[5], 'abort:' .. ARGV[1])  -- key_layout.WAKE_ABORT
return 1
"""
)


class StreamsJobQueue(RedisJobQueue):
    BACKEND = QueueBackend.STREAMS
    LANE_LUA = LANE_LUA
    CANCEL_LUA = CANCEL_LUA

    def lane(self, model: str, bulk: bool = False) -> str:
        return key_layout.stream_lane_key(model, bulk)

    def job_prefix(self, model: str) -> str:
        return key_layout.stream_job_prefix(model)

    def job_data(self, envelope: JobEnvelope, enqueued_ms: int) -> bytes:
        try:
            return contract.dumps_finite(envelope.model_dump(mode="json"))
        except UnicodeEncodeError as exc:
            raise unencodable(exc) from None

    async def cancel_job(self, envelope: JobEnvelope) -> None:
        model, job_id = envelope.model, envelope.request_id
        keys = [
            self.lane_of(envelope),
            key_layout.stream_job_prefix(model) + job_id,
            key_layout.stream_lease_prefix(model) + job_id,
            key_layout.abort_key(model, job_id),
            key_layout.wake_channel(model),
            key_layout.stream_ready_key(self.lane_of(envelope)),
        ]
        marker_ms = max(int(envelope.seconds_left() * 1000), 1000)
        with contextlib.suppress(*REDIS_DOWN):  # the record expires at the job's deadline; nobody waits for it then
            await self._cancel(keys=keys, args=[job_id, marker_ms, key_layout.STREAM_GROUP])

    async def state(self, envelope: JobEnvelope) -> JobState:
        model, job_id = envelope.model, envelope.request_id
        with redis_errors():
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.exists(key_layout.stream_lease_prefix(model) + job_id)
                pipe.exists(key_layout.stream_job_prefix(model) + job_id)
                running, queued = await pipe.execute()
        if running:
            return JobState.RUNNING
        return JobState.QUEUED if queued else JobState.GONE
