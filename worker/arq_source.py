"""The worker's side of the arq seam: ``JobSource`` on arq's Redis layout. The only worker module that knows arq.

arq's data stays as arq writes it (the queue sorted set, ``arq:job:<id>`` with arq's job serialisation,
``arq:in-progress:<id>``, ``arq:retry:<id>``), so arq's own tools can read a Conveyor queue. arq's ``Worker`` loop is
not used: it exits on a lost connection, holds a claim for ``job_timeout + 10 s`` (so a killed worker's job waited
ten minutes, then found its data expired), and scans the whole ``arq:abort`` set on every poll. Here:

- a claim is a lease: the in-progress key holds the worker's id and lives ``lease_seconds``, renewed while the job
  runs; a job whose lease lapsed is claimed again by the next sweep of any worker (each sweeps every third of a
  lease; a claim between sweeps walks only the waiting part of the queue);
- the try count is arq's retry key, expiring with the job; the job's data expires at its deadline, so a job is never
  run after it;
- a cancel is a per-job marker with an expiry (``key_layout.abort_key``) plus a wake-up naming the job, so nothing
  grows and no worker reads a list of other workers' aborts.

Every step is one Lua script (one round trip, atomic).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

from arq.constants import in_progress_key_prefix, job_key_prefix, retry_key_prefix
from arq.jobs import deserialize_job_raw
from redis.asyncio import Redis

from conveyor import contract, key_layout, redis_client
from conveyor.fair_share import FAIR_LUA, UNFAIR_SCORES
from conveyor.pipeliner import Pipeliner
from worker import wakeups
from worker.finish_tail import finish_script, tail_arguments
from worker.job_source import Claim, Delivery, Renewal, claims_of
from worker.key_usage import KeyUsage

#: Lease due jobs nobody holds, in fair order (``conveyor.fair_share``: the job taken at a tag is its key's most
#: urgent): interactive ones first, up to a limit; then, only when no interactive job is left waiting, bulk ones
#: (batch chunks) up to their own limit. A queue also lists running jobs (arq removes a job when it finishes). Every
#: waiting job's tag is at or after the lane's clock (the tag last taken) and every running one's at or before it, so
#: a claim walks from the clock, a page at a time. A sweep walks from the lane's start instead, where a job taken before
#: and given up waits (its lease lapsed: a lost worker; or handed back, which marks the lane ``behind`` for the next
#: claim). Jobs a gateway of a version before fair order queued (scored by enqueue time) go first, so a rolling
#: upgrade leaves none behind. A job whose data expired (deadline passed) is removed. KEYS: interactive queue, bulk
#: queue. ARGV: lease prefix, job prefix, retry prefix, now ms, lease ms, limit, worker id, bulk limit, 1 to sweep,
#: progress prefix. Returns id, job data, try count, bulk (0/1), has progress (0/1) for each claim, flattened.
CLAIM_SCRIPT = (
    FAIR_LUA
    + f"local UNFAIR_SCORES = '{UNFAIR_SCORES}'\n"
    + """
local out, PAGE = {}, 256
local function walk(queue, left, bulk, low, high)
  local offset = 0
  while left > 0 do
    local page = redis.call('ZRANGEBYSCORE', queue, low, high, 'WITHSCORES', 'LIMIT', offset, PAGE)
    if #page == 0 then break end
    offset = offset + #page / 2
    -- the job taken at a tag may be another of its key's, later in the lane (fair_take): the two swap tags, so the
    -- page's entry for that job's tag now holds this one (taken there in its turn: tags are taken in order).
    -- moved: page entry -> the job now at its tag; at: job -> the page entry whose tag it holds
    local moved, at = {}, {}
    for i = 1, #page, 2 do
      if left == 0 then break end
      local entry, tag = page[i], page[i + 1]
      local id = moved[entry] or entry
      if redis.call('EXISTS', ARGV[1] .. id) == 0 then
        local taken = fair_take(queue, id, tag)
        if taken ~= id then
          local held = at[taken] or taken
          moved[held], at[id] = id, held
        end
        local job = redis.call('GET', ARGV[2] .. taken)
        if job then
          redis.call('PSETEX', ARGV[1] .. taken, ARGV[5], ARGV[7])
          local tries = redis.call('INCR', ARGV[3] .. taken)
          local ttl = redis.call('PTTL', ARGV[2] .. taken)
          if ttl > 0 then redis.call('PEXPIRE', ARGV[3] .. taken, ttl) end
          out[#out + 1] = taken
          out[#out + 1] = job
          out[#out + 1] = tries
          out[#out + 1] = bulk
          out[#out + 1] = redis.call('EXISTS', ARGV[10] .. taken)
          left = left - 1
        else
          redis.call('ZREM', queue, taken)
          redis.call('DEL', ARGV[3] .. taken)
          offset = offset - 1
        end
      end
    end
    if #page < 2 * PAGE then break end  -- the page held every entry left in the range
  end
  return left
end
local function claim_from(queue, left, bulk)  -- what a gateway before fair order queued (by enqueue ms) goes first
  left = walk(queue, left, bulk, '(' .. UNFAIR_SCORES, ARGV[4])
  local behind = fair_key(queue, 'behind')
  local sweep = ARGV[9] == '1' or redis.call('EXISTS', behind) == 1
  local low = not sweep and redis.call('HGET', fair_key(queue, 'tags'), '') or '-inf'
  left = walk(queue, left, bulk, low, UNFAIR_SCORES)
  if sweep and left > 0 then redis.call('DEL', behind) end  -- walked to the end: nothing given up is left behind
  return left
end
local left = math.min(claim_from(KEYS[1], tonumber(ARGV[6]), 0), tonumber(ARGV[8]))
if left > 0 and redis.call('EXISTS', KEYS[2]) == 1 then  -- bulk work, when there is any (an empty lane has no key)
  claim_from(KEYS[2], left, 1)
end
return out
"""
)

#: Renew the leases of held jobs. A lease that lapsed with nobody taking it (a long Redis outage; a Redis restarted
#: empty) is taken back. ARGV: lease prefix, abort prefix, lease ms, worker id, job ids... Returns {lost, aborted}.
RENEW_SCRIPT = """
local lost, aborted = {}, {}
for i = 5, #ARGV do
  local id = ARGV[i]
  local holder = redis.call('GET', ARGV[1] .. id)
  if holder == ARGV[4] or not holder then
    redis.call('PSETEX', ARGV[1] .. id, ARGV[3], ARGV[4])
    if redis.call('EXISTS', ARGV[2] .. id) == 1 then aborted[#aborted + 1] = id end
  else
    lost[#lost + 1] = id
  end
end
return {lost, aborted}
"""

#: Finish a job: unless another worker holds its lease now, remove it (with its stream progress), then deliver and
#: account (``worker.finish_tail``). KEYS: lease, job, retry, abort marker, progress, migrations, queue, bulk queue,
#: then the tail's. ARGV: worker id, job id, then the tail's. Returns 1 when finished here, 0 when another worker
#: holds it.
FINISH_HEAD = """
local holder = redis.call('GET', KEYS[1])
if holder and holder ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6])
redis.call('ZREM', KEYS[7], ARGV[2])
redis.call('ZREM', KEYS[8], ARGV[2])
local k, a, job_id = 9, 3, ARGV[2]
"""

#: Give held jobs back: drop this worker's lease, un-count the try unless told to keep it, mark both lanes ``behind``
#: (a job given back waits behind the clock: the next claim sweeps; the mark lapses with a lease, as every worker
#: sweeps that often) and wake the other workers. KEYS: queue, bulk queue, wake channel. ARGV: lease prefix, retry
#: prefix, worker id, 1 to keep the try counted, lease ms, job ids...
HAND_BACK_SCRIPT = """
local handed = 0
for i = 6, #ARGV do
  if redis.call('GET', ARGV[1] .. ARGV[i]) == ARGV[3] then
    redis.call('DEL', ARGV[1] .. ARGV[i])
    if ARGV[4] == '0' and redis.call('EXISTS', ARGV[2] .. ARGV[i]) == 1 then redis.call('DECR', ARGV[2] .. ARGV[i]) end
    handed = handed + 1
  end
end
if handed > 0 then
  redis.call('PSETEX', fair_key(KEYS[1], 'behind'), ARGV[5], 1)
  redis.call('PSETEX', fair_key(KEYS[2], 'behind'), ARGV[5], 1)
end
publish(KEYS[3], 'job')
return 0
"""


class ArqJobSource:
    #: a claim answers at once; the consumer claims again on a wake-up or its poll timer
    blocks = False

    def __init__(self, redis: Redis, model: str, worker_id: str, lease_seconds: float) -> None:
        self.redis = redis
        self.model = model
        self.worker_id = worker_id
        self.lease_seconds = lease_seconds
        self.queue = key_layout.queue_name(model)
        self.bulk_queue = key_layout.bulk_queue_name(model)
        self.progress_prefix = key_layout.progress_key(model, "")
        self._claim = redis.register_script(CLAIM_SCRIPT)
        self._renew = redis.register_script(RENEW_SCRIPT)
        self._finish = redis.register_script(finish_script(FINISH_HEAD))
        self._hand_back = redis.register_script(FAIR_LUA + redis_client.publish_lua(redis) + HAND_BACK_SCRIPT)
        self._pipeliner = Pipeliner(redis)
        self._next_sweep = 0.0  # the first claim sweeps

    @property
    def _lease_ms(self) -> int:
        return int(self.lease_seconds * 1000)

    async def claim(self, limit: int, bulk_limit: int = 0) -> list[Claim]:
        if limit <= 0:
            return []
        now_ms = int(time.time() * 1000)
        now = time.monotonic()
        sweep = now >= self._next_sweep  # every third of a lease: a lapsed lease is taken up soon after
        if sweep:
            self._next_sweep = now + self.lease_seconds / 3
        args: list[str | int] = [
            *(in_progress_key_prefix, job_key_prefix, retry_key_prefix),
            *(now_ms, self._lease_ms, limit, self.worker_id, bulk_limit, int(sweep)),
            self.progress_prefix,
        ]
        flat = await self._claim(keys=[self.queue, self.bulk_queue], args=args)
        return claims_of(flat, in_progress_key_prefix, self.worker_id, _envelope)

    async def renew(self, job_ids: Sequence[str]) -> Renewal:
        if not job_ids:
            return Renewal()
        args: list[str | int] = [
            in_progress_key_prefix,
            key_layout.abort_key(self.model, ""),
            self._lease_ms,
            self.worker_id,
            *job_ids,
        ]
        lost, aborted = await self._renew(args=args)
        return Renewal(lost=[i.decode() for i in lost], aborted=[i.decode() for i in aborted])

    async def finish(self, job_id: str, delivery: Delivery | None, usage: KeyUsage | None = None) -> bool:
        """Finish a job. Jobs finishing together go to Redis together, in one pipeline (``conveyor.pipeliner``), each
        with its own fenced result."""
        tail_keys, tail_args = tail_arguments(delivery, usage)
        keys = [
            in_progress_key_prefix + job_id,
            job_key_prefix + job_id,
            retry_key_prefix + job_id,
            key_layout.abort_key(self.model, job_id),
            key_layout.progress_key(self.model, job_id),
            key_layout.migrations_key(self.model, job_id),
            self.queue,
            self.bulk_queue,
            *tail_keys,
        ]
        args = [self.worker_id, job_id, *tail_args]
        return bool(await self._pipeliner.call(self._finish, keys, args))

    async def hand_back(self, job_ids: Sequence[str], count_try: bool) -> None:
        if job_ids:
            args: list[str | int] = [in_progress_key_prefix, retry_key_prefix, self.worker_id, int(count_try)]
            keys = [self.queue, self.bulk_queue, key_layout.wake_channel(self.model)]
            await self._hand_back(keys=keys, args=[*args, self._lease_ms, *job_ids])

    async def listen(self, on_job: Callable[[], None], on_abort: Callable[[str], None]) -> None:
        await wakeups.listen(self.redis, self.model, on_job, on_abort)


def _envelope(raw: bytes) -> dict[str, Any]:
    """The envelope inside arq's job data (the job function's one argument); empty if it cannot be read."""
    try:
        _function, args, _kwargs, _try, _enqueued = deserialize_job_raw(raw, deserializer=contract.loads)
    except Exception:  # arq raises its DeserializationError for anything unreadable
        return {}
    envelope = args[0] if args else None
    return envelope if isinstance(envelope, dict) else {}
