"""The worker's side of the Redis Streams backend: ``JobSource`` on a stream per lane, read by the model's workers as
one consumer group (``key_layout.STREAM_GROUP``). The only worker module that knows this layout.

- A claim is one script that reads new entries (``XREADGROUP`` without blocking) and takes them up: one round trip
  while work waits. Only when it finds nothing does the worker wait with ``XREADGROUP ... BLOCK``: each entry reaches
  one worker, and a worker with nothing to do waits inside Redis for the next one, so an enqueue wakes one worker,
  not all of them, and nobody polls the queue; what that wait brings is taken up by the same script, with whatever
  else arrived meanwhile.
- Taking an entry up sets the job's lease (its id under ``key_layout.stream_lease_prefix``, expiring
  unless renewed: the fence frames and finishes check) and counts the try in the job's record.
- A worker that dies leaves its entries in the group's pending entries list: every third of a lease each worker
  sweeps it with ``XAUTOCLAIM`` for entries idle longer than a lease, and takes those up first.
- A renewal extends the lease and resets the entry's idle time (``XCLAIM ... JUSTID``); a hand-back drops the lease,
  marks the entry idle for ever, adds a nudge (an entry naming no job) and publishes a wake-up: the worker the nudge
  reaches (a blocked reader at once) and every worker the wake-up reaches sweep now, and one of them runs the job
  before new work.
- The order is fair (``conveyor.fair_share``): waiting jobs are also in their lane's ready set by fair tag, and an
  entry read goes to the fairest of them, which swaps entries with the job the entry named (that one gets a new
  entry at the lane's end). So a lane's length stays the count of its waiting and running jobs, and a job taken
  keeps one entry, which a sweep finds if its worker dies.
- A finish acknowledges and deletes the entry (so a lane's length counts waiting and running jobs), then delivers and
  accounts as ``worker.finish_tail`` does on both backends.

Every key of a model carries its hash tag, so each script touches one slot of a Redis Cluster.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import ResponseError

from conveyor import contract, key_layout
from conveyor.fair_share import FAIR_LUA
from conveyor.pipeliner import Pipeliner
from conveyor.redis_client import is_cluster, publish_lua
from worker import wakeups
from worker.finish_tail import ACCOUNT_LUA, deliver, finish_script, tail_arguments
from worker.job_source import Claim, Delivery, Renewal, claims_of
from worker.key_usage import KeyUsage

#: a claim waits in Redis at most this long for an entry (below ``redis_client.READ_TIMEOUT_SECONDS``), so a drain
#: or a lost connection is noticed within it
BLOCK_SECONDS = 1.0
#: the idle time a handed-back entry is given: longer than any lease, so the next sweep takes it
HANDED_BACK_IDLE_MS = 2**40
#: consumers (one per worker process ever started) with nothing pending that were idle this long leave the group
CONSUMER_IDLE_SECONDS = 600.0

#: Take up entries for this worker: when sweeping, entries idle longer than a lease (XAUTOCLAIM, from each lane's
#: cursor); lane entries a blocking read brought (named with their job id); and, when reading, new entries (XREADGROUP
#: without blocking: interactive ones, then bulk ones only if no interactive one is left). The entry of a waiting job
#: goes to the lane's fairest waiting job (``fairest``). An entry whose record is gone (deadline, cancel) or names
#: another entry (handed back, put back, or swapped) is dropped; one whose lease another worker
#: holds is left to it; one beyond this claim's room goes back to its lane's end; a nudge (no job id: a hand-back's) is
#: dropped and reported. KEYS: lane, bulk lane. ARGV: 1 group, 2 worker id, 3 record prefix, 4 lease prefix, 5 lease ms,
#: 6 room, 7 bulk room, 8 sweep min idle ms (0: no sweep), 9 and 10 the lanes' sweep cursors, 11 read new entries
#: (1/0), 12 progress prefix, then (lane 1|2, entry, job id) per entry read. Returns {the two next cursors, 1 if a
#: nudge was read (else 0), then id, data, tries, bulk (0/1), has progress (0/1) per job taken up}.
TAKE_SCRIPT = (
    FAIR_LUA
    + f"local READY, OWNERS = '{key_layout.STREAM_READY_SUFFIX}', '{key_layout.STREAM_OWNERS_SUFFIX}'\n"
    + """
local group, me = ARGV[1], ARGV[2]
local room, bulk_room = tonumber(ARGV[6]), tonumber(ARGV[7])
local out = {ARGV[9], ARGV[10], 0}
local appended = 0  -- entries this script added to a lane for a job whose entry went to another (fairest)
local function drop(lane, entry)
  redis.call('XACK', lane, group, entry)
  redis.call('XDEL', lane, entry)
end
-- a waiting job's entry, read, goes to the lane's fairest waiting job (conveyor.fair_share), which swaps entries with
-- it: the job it named gets a new one at the lane's end, and the entry's owner is noted (its id names the other job)
-- for a sweep that finds it. Returns that job; nil when no waiting job is left.
local function fairest(lane, entry, id)
  local ready = lane .. READY
  while true do
    local lowest = redis.call('ZRANGE', ready, 0, 0, 'WITHSCORES')
    if not lowest[1] then return nil end
    local chosen = fair_take(ready, lowest[1], lowest[2])
    redis.call('ZREM', ready, chosen)
    local theirs = redis.call('HGET', ARGV[3] .. chosen, 'entry')
    if theirs then  -- else its deadline passed: its own entry is dropped when read
      if chosen ~= id then
        drop(lane, theirs)
        if redis.call('EXISTS', ARGV[3] .. id) == 1 then
          redis.call('HSET', ARGV[3] .. id, 'entry', redis.call('XADD', lane, '*', 'id', id))
          appended = appended + 1
        else
          fair_leave(ready, id)
          redis.call('ZREM', ready, id)
        end
        redis.call('HSET', ARGV[3] .. chosen, 'entry', entry, 'owned', 1)
        redis.call('HSET', lane .. OWNERS, entry, chosen)
      end
      return chosen
    end
  end
end
local function take(l, entry, id, owned)  -- owned: id is the entry's noted owner, not its id field
  local lane = KEYS[l]
  if id == '' then
    out[3] = 1
    return drop(lane, entry)
  end
  if not owned and room > 0 and (l == 1 or bulk_room > 0) and redis.call('ZSCORE', lane .. READY, id) then
    id = fairest(lane, entry, id)
    if not id then return drop(lane, entry) end
  end
  local record = ARGV[3] .. id
  local job = redis.call('HMGET', record, 'data', 'entry')
  local function forget()
    if owned then redis.call('HDEL', lane .. OWNERS, entry) end
    drop(lane, entry)
  end
  if not job[1] or job[2] ~= entry then return forget() end
  local holder = redis.call('GET', ARGV[4] .. id)
  if holder and holder ~= me then return end
  if room <= 0 or (l == 2 and bulk_room <= 0) then
    forget()
    redis.call('HSET', record, 'entry', redis.call('XADD', lane, '*', 'id', id))
    return
  end
  room = room - 1
  if l == 2 then bulk_room = bulk_room - 1 end
  redis.call('PSETEX', ARGV[4] .. id, ARGV[5], me)
  out[#out + 1] = id
  out[#out + 1] = job[1]
  out[#out + 1] = redis.call('HINCRBY', record, 'tries', 1)
  out[#out + 1] = l - 1
  out[#out + 1] = redis.call('EXISTS', ARGV[12] .. id)
end
if tonumber(ARGV[8]) > 0 then
  for l = 1, 2 do
    local count = l == 1 and room or math.min(room, bulk_room)
    if count > 0 then
      local swept = redis.call('XAUTOCLAIM', KEYS[l], group, me, ARGV[8], ARGV[8 + l], 'COUNT', count, 'JUSTID')
      out[l] = swept[1]
      for _, entry in ipairs(swept[2]) do
        local owner = redis.call('HGET', KEYS[l] .. OWNERS, entry)
        if owner then
          take(l, entry, owner, true)
        else
          local found = redis.call('XRANGE', KEYS[l], entry, entry)
          if #found == 0 then redis.call('XACK', KEYS[l], group, entry) else take(l, entry, found[1][2][2]) end
        end
      end
    end
  end
end
for i = 13, #ARGV, 3 do take(tonumber(ARGV[i]), ARGV[i + 1], ARGV[i + 2]) end
local function read(l, count)  -- how many new entries there were
  if count <= 0 then return 0 end
  local got = redis.call('XREADGROUP', 'GROUP', group, me, 'COUNT', count, 'STREAMS', KEYS[l], '>')
  if not got then return 0 end
  for _, item in ipairs(got[1][2]) do take(l, item[1], item[2][2]) end
  return #got[1][2]
end
-- until the room is filled or the lane read dry: an entry read may go to a job that came later (fairest), and the
-- job it named then waits behind a new entry at the lane's end, which the next read brings
local function read_dry(l)
  while room > 0 and (l == 1 or bulk_room > 0) do
    local wanted = l == 1 and room or math.min(room, bulk_room)
    appended = 0
    if read(l, wanted) < wanted and appended == 0 then return end
  end
end
if ARGV[11] == '1' then
  read_dry(1)
  read_dry(2)
end
return out
"""
)

#: Renew held leases and reset their entries' idle time; a lease that lapsed with nobody taking it is taken back.
#: KEYS: lane, bulk lane. ARGV: group, worker id, record prefix, lease prefix, abort prefix, lease ms, job ids...
#: Returns {lost, aborted}.
RENEW_SCRIPT = """
local lost, aborted = {}, {}
for i = 7, #ARGV do
  local id = ARGV[i]
  local holder = redis.call('GET', ARGV[4] .. id)
  if holder == ARGV[2] or not holder then
    redis.call('PSETEX', ARGV[4] .. id, ARGV[6], ARGV[2])
    local job = redis.call('HMGET', ARGV[3] .. id, 'entry', 'lane')
    if job[1] then
      redis.call('XCLAIM', job[2] == KEYS[2] and KEYS[2] or KEYS[1], ARGV[1], ARGV[2], 0, job[1], 'JUSTID')
    end
    if redis.call('EXISTS', ARGV[5] .. id) == 1 then aborted[#aborted + 1] = id end
  else
    lost[#lost + 1] = id
  end
end
return {lost, aborted}
"""

#: The streams backend's finish head (``worker.finish_tail``). KEYS: lease, record, abort marker, progress,
#: migrations, lane, bulk lane, then the tail's. ARGV: worker id, job id, group, then the tail's.
FINISH_HEAD = (
    f"local OWNERS = '{key_layout.STREAM_OWNERS_SUFFIX}'\n"
    + """
local holder = redis.call('GET', KEYS[1])
if holder and holder ~= ARGV[1] then return 0 end
local job = redis.call('HMGET', KEYS[2], 'entry', 'lane', 'owned')
if job[1] then
  local lane = job[2] == KEYS[7] and KEYS[7] or KEYS[6]
  redis.call('XACK', lane, ARGV[3], job[1])
  redis.call('XDEL', lane, job[1])
  if job[3] then redis.call('HDEL', lane .. OWNERS, job[1]) end
end
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5])
local k, a, job_id = 8, 4, ARGV[2]
"""
)

#: Give held jobs back: drop this worker's lease, un-count the try unless told to keep it, mark the entry idle for
#: ever and wake the model's workers to sweep (a nudge on the lane for blocked readers, a wake-up for the others).
#: KEYS: lane, bulk lane, wake channel. ARGV: group, worker id, record prefix, lease prefix, 1 to keep the try counted,
#: idle ms, job ids...
HAND_BACK_SCRIPT = """
local handed = 0
for i = 7, #ARGV do
  local id = ARGV[i]
  if redis.call('GET', ARGV[4] .. id) == ARGV[2] then
    redis.call('DEL', ARGV[4] .. id)
    local job = redis.call('HMGET', ARGV[3] .. id, 'entry', 'lane')
    if job[1] then
      if ARGV[5] == '0' then redis.call('HINCRBY', ARGV[3] .. id, 'tries', -1) end
      local lane = job[2] == KEYS[2] and KEYS[2] or KEYS[1]
      redis.call('XCLAIM', lane, ARGV[1], ARGV[2], 0, job[1], 'IDLE', ARGV[6], 'JUSTID')
      handed = handed + 1
    end
  end
end
if handed > 0 then
  redis.call('XADD', KEYS[1], '*', 'id', '')  -- the nudge: a reader blocked on the lane wakes and sweeps
  publish(KEYS[3], 'job')  -- key_layout.WAKE_JOB
end
return handed
"""


class StreamsJobSource:
    #: a claim waits inside Redis for work (``BLOCK_SECONDS``): the consumer claims again at once
    blocks = True

    def __init__(self, redis: Redis, model: str, worker_id: str, lease_seconds: float) -> None:
        self.redis = redis
        self.model = model
        self.worker_id = worker_id
        self.lease_seconds = lease_seconds
        self.lanes = (key_layout.stream_lane_key(model), key_layout.stream_lane_key(model, bulk=True))
        self.records = key_layout.stream_job_prefix(model)
        self.leases = key_layout.stream_lease_prefix(model)
        self.progress_prefix = key_layout.progress_key(model, "")
        self._take = redis.register_script(TAKE_SCRIPT)
        self._renew = redis.register_script(RENEW_SCRIPT)
        self._finish = redis.register_script(finish_script(FINISH_HEAD))
        self._hand_back = redis.register_script(publish_lua(redis) + HAND_BACK_SCRIPT)
        self._account = redis.register_script(ACCOUNT_LUA)
        self._pipeliner = Pipeliner(redis)
        self.cluster = is_cluster(redis)
        self._cursors = ["0-0", "0-0"]
        self._next_sweep = 0.0
        self._next_tidy = 0.0

    @property
    def _lease_ms(self) -> int:
        return int(self.lease_seconds * 1000)

    async def claim(self, limit: int, bulk_limit: int = 0) -> list[Claim]:
        if limit <= 0:
            return []
        try:
            return await self._claim(limit, bulk_limit)
        except ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            await self._create_groups()  # a new model, or a Redis that came back empty
            return await self._claim(limit, bulk_limit)

    async def _claim(self, limit: int, bulk_limit: int) -> list[Claim]:
        now = time.monotonic()
        sweep = now >= self._next_sweep  # lapsed and handed-back jobs go before new ones
        if sweep:
            self._next_sweep = now + self.lease_seconds / 3
            if now >= self._next_tidy:
                self._next_tidy = now + CONSUMER_IDLE_SECONDS / 10
                await self._tidy_consumers()
        taken = await self._take_up(limit, bulk_limit, [], sweep=sweep, read_new=True)
        if taken or time.monotonic() >= self._next_sweep:  # a nudge read: sweep at the next claim, at once
            return taken
        read = await self._wait_for_entries(limit, bulk_limit)
        # what the wait brought, and what else arrived meanwhile (up to the claim's room): with many workers on one
        # lane, fewer claims per job (bench.scale_out: Redis CPU per request at 8 workers 265 -> 244 us)
        return await self._take_up(limit, bulk_limit, read, sweep=False, read_new=True) if read else []

    async def _take_up(
        self, limit: int, bulk_limit: int, read: list[tuple[int, bytes, bytes]], sweep: bool, read_new: bool
    ) -> list[Claim]:
        args: list[str | int | bytes] = [key_layout.STREAM_GROUP, self.worker_id, self.records, self.leases]
        args += [self._lease_ms, limit, bulk_limit, self._lease_ms if sweep else 0, *self._cursors, int(read_new)]
        args.append(self.progress_prefix)
        for lane, entry, job_id in read:
            args += [lane, entry, job_id]
        first, second, nudged, *flat = await self._take(keys=list(self.lanes), args=args)
        self._cursors = [_text(first), _text(second)]
        if nudged:  # a job was handed back: take it up before new work
            self._next_sweep = 0.0
        return claims_of(flat, self.leases, self.worker_id, _envelope)

    async def _wait_for_entries(self, limit: int, bulk_limit: int) -> list[tuple[int, bytes, bytes]]:
        """With nothing waiting: the first new entries to arrive (up to ``BLOCK_SECONDS``), interactive ones up to
        ``limit`` or, when this claim has room for bulk work, one of either lane."""
        interactive, bulk = self.lanes
        counts = {interactive: 1, bulk: 1} if bulk_limit else {interactive: limit}
        response = await self.redis.xreadgroup(
            key_layout.STREAM_GROUP,
            self.worker_id,
            {name: ">" for name in counts},
            count=max(counts.values()),
            block=int(BLOCK_SECONDS * 1000),
        )
        found: list[tuple[int, bytes, bytes]] = []
        for name, entries in response or []:
            lane = 1 + self.lanes.index(_text(name))
            for entry, fields in entries:
                found.append((lane, entry, fields.get(b"id", b"")))
        return found

    async def _create_groups(self) -> None:
        for lane in self.lanes:
            try:
                await self.redis.xgroup_create(lane, key_layout.STREAM_GROUP, id="0", mkstream=True)
            except ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise

    async def _tidy_consumers(self) -> None:
        """Consumers of workers long gone (nothing pending, idle long) leave the group; a live one that was only
        idle comes back with its next read."""
        for lane in self.lanes:
            for consumer in await self.redis.xinfo_consumers(lane, key_layout.STREAM_GROUP):
                if consumer["pending"] == 0 and consumer["idle"] > CONSUMER_IDLE_SECONDS * 1000:
                    await self.redis.xgroup_delconsumer(lane, key_layout.STREAM_GROUP, consumer["name"])

    async def renew(self, job_ids: Sequence[str]) -> Renewal:
        if not job_ids:
            return Renewal()
        args: list[str | int] = [
            key_layout.STREAM_GROUP,
            self.worker_id,
            self.records,
            self.leases,
            key_layout.abort_key(self.model, ""),
        ]
        lost, aborted = await self._renew(keys=list(self.lanes), args=[*args, self._lease_ms, *job_ids])
        return Renewal(lost=[i.decode() for i in lost], aborted=[i.decode() for i in aborted])

    async def finish(self, job_id: str, delivery: Delivery | None, usage: KeyUsage | None = None) -> bool:
        """Finish a job; jobs finishing together go to Redis in one pipeline (``conveyor.pipeliner``)."""
        if self.cluster:
            return await self._finish_apart(job_id, delivery, usage)
        return await self._finish_at_once(job_id, delivery, usage)

    async def _finish_apart(self, job_id: str, delivery: Delivery | None, usage: KeyUsage | None) -> bool:
        """On a Redis Cluster: the answer first (its gateway drops one it already has, so a stalled worker's repeat
        is harmless), then the fenced removal, then, only if this worker's removal finished the job, its API key's
        accounting. A worker that dies between the steps leaves a job that runs again (answered twice, one answer
        used) or, after the removal, a usage not counted: nothing a client waits for is lost."""
        if delivery is not None:
            await deliver(self.redis, delivery)
        if not await self._finish_at_once(job_id, None, None):
            return False
        if usage is not None:
            keys, args = tail_arguments(None, usage)
            await self._pipeliner.call(self._account, keys, [job_id, *args])
        return True

    async def _finish_at_once(self, job_id: str, delivery: Delivery | None, usage: KeyUsage | None) -> bool:
        tail_keys, tail_args = tail_arguments(delivery, usage)
        keys = [
            self.leases + job_id,
            self.records + job_id,
            key_layout.abort_key(self.model, job_id),
            key_layout.progress_key(self.model, job_id),
            key_layout.migrations_key(self.model, job_id),
            *self.lanes,
            *tail_keys,
        ]
        args = [self.worker_id, job_id, key_layout.STREAM_GROUP, *tail_args]
        return bool(await self._pipeliner.call(self._finish, keys, args))

    async def hand_back(self, job_ids: Sequence[str], count_try: bool) -> None:
        if job_ids:
            args: list[str | int] = [key_layout.STREAM_GROUP, self.worker_id, self.records, self.leases]
            args += [int(count_try), HANDED_BACK_IDLE_MS]
            args += job_ids
            await self._hand_back(keys=[*self.lanes, key_layout.wake_channel(self.model)], args=args)

    async def listen(self, on_job: Callable[[], None], on_abort: Callable[[str], None]) -> None:
        def handed_back() -> None:  # the next claim sweeps: handed-back jobs go before new ones
            self._next_sweep = 0.0
            on_job()

        await wakeups.listen(self.redis, self.model, handed_back, on_abort)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _envelope(raw: bytes) -> dict[str, Any]:
    """The envelope in a job's record; empty if it cannot be read."""
    try:
        envelope = contract.loads(raw)
    except ValueError:
        return {}
    return envelope if isinstance(envelope, dict) else {}
