"""Batches and files as Redis keeps them, shared by every gateway replica.

A batch is one hash (``key_layout.batch_key``): its fixed fields as JSON (``record``), and one field per thing that
changes: ``status`` and each status' timestamp, the output and error file ids, ``errors``, the line counts, and the
chunk ``plan``. Status changes are compare-and-set scripts, so a cancel on one replica and the driver on another
never overwrite each other; line counts move only when a chunk's report is folded in, once per chunk.
"""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable
from typing import Any, cast

from pydantic import BaseModel
from redis.asyncio import Redis

from conveyor import key_layout
from conveyor.batch_lines import BatchErrors, BatchObject, BatchRequestCounts, BatchUsage, StoredFile
from conveyor.contract import ChunkRef
from conveyor.errors import NotFound
from gateway.queue import redis_errors

#: Move a batch from one of some statuses to another, stamping when. KEYS: batch hash. ARGV: allowed current
#: statuses (space-separated), new status, its timestamp field, now, then field/value pairs to set with it.
#: Returns 1 when moved, 0 when the batch was in another status.
TRANSITION_SCRIPT = """
local current = redis.call('HGET', KEYS[1], 'status')
if not current then return 0 end
local allowed = false
for status in string.gmatch(ARGV[1], '%S+') do
  if status == current then allowed = true end
end
if not allowed then return 0 end
redis.call('HSET', KEYS[1], 'status', ARGV[2], ARGV[3], ARGV[4])
for i = 5, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
return 1
"""

#: Fold the chunk reports workers left on the done list (``<index> <ok> <failed> <input tokens> <output tokens>``)
#: into the counts and the usage, each chunk once. KEYS: done list, chunk hash, batch hash. Returns how many reports
#: were read.
FOLD_SCRIPT = """
local read = 0
while true do
  local report = redis.call('LPOP', KEYS[1])
  if not report then break end
  read = read + 1
  local index, ok, failed, input, output = string.match(report, '^(%d+) (%d+) (%d+) ?(%d*) ?(%d*)')
  if index and redis.call('HSETNX', KEYS[2], index, ok .. ' ' .. failed) == 1 then
    redis.call('HINCRBY', KEYS[3], 'completed', ok)
    redis.call('HINCRBY', KEYS[3], 'failed', failed)
    if input ~= '' then redis.call('HINCRBY', KEYS[3], 'input_tokens', input) end
    if output ~= '' then redis.call('HINCRBY', KEYS[3], 'output_tokens', output) end
  end
end
return read
"""

#: Take or keep the lease of a batch's driver. KEYS: lease. ARGV: holder, ms, 1 to take/keep or 0 to drop it.
LEASE_SCRIPT = """
local holder = redis.call('GET', KEYS[1])
if ARGV[3] == '0' then
  if holder == ARGV[1] then redis.call('DEL', KEYS[1]) end
  return 0
end
if not holder or holder == ARGV[1] then
  redis.call('PSETEX', KEYS[1], ARGV[2], ARGV[1])
  return 1
end
return 0
"""

# Records and their indexes change together in scripts, not MULTI/EXEC (a Redis Cluster client refuses transactions):
# their keys are all the control plane's, one slot, so each script runs whole on one node.

#: A file's record, its place in the index and, when it expires, in the expiring files. KEYS: record, files index,
#: expiring files. ARGV: id, record, index score, expires_at ('' for never).
SAVE_FILE_SCRIPT = """
redis.call('SET', KEYS[1], ARGV[2])
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[1])
if ARGV[4] == '' then
  redis.call('ZREM', KEYS[3], ARGV[1])
else
  redis.call('ZADD', KEYS[3], ARGV[4], ARGV[1])
end
return 1
"""
#: KEYS: record, files index, expiring files. ARGV: id.
FORGET_FILE_SCRIPT = """
redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('ZREM', KEYS[3], ARGV[1])
return 1
"""
#: A new batch: its hash, its place in the index, and the set the drivers take batches from (a batch left out of it
#: would never be driven). KEYS: batch hash, batches index, active batches. ARGV: id, index score, then field/value
#: pairs of the hash.
CREATE_BATCH_SCRIPT = """
for i = 3, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1])
redis.call('SADD', KEYS[3], ARGV[1])
return 1
"""
#: A batch in a final state leaves the active set, and its chunk bookkeeping goes with it; it joins the finished
#: batches (once: retiring it again keeps the first time), whose records the sweeper purges after the retention.
#: KEYS: active batches, chunk hash, done list, released hash, batch hash, finished batches. ARGV: id, now.
RETIRE_SCRIPT = """
redis.call('SREM', KEYS[1], ARGV[1])
redis.call('DEL', KEYS[2], KEYS[3], KEYS[4])
redis.call('HDEL', KEYS[5], 'plan')
redis.call('ZADD', KEYS[6], 'NX', ARGV[2], ARGV[1])
return 1
"""
#: Everything Redis holds of a batch (its files are not touched: they follow their own expiry). KEYS: batch hash,
#: chunk hash, done list, released hash, driver lease, batches index, finished batches, active batches. ARGV: id.
PURGE_BATCH_SCRIPT = """
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5])
redis.call('ZREM', KEYS[6], ARGV[1])
redis.call('ZREM', KEYS[7], ARGV[1])
redis.call('SREM', KEYS[8], ARGV[1])
return 1
"""


class BatchOwner(BaseModel):
    """The managed API key that created a batch."""

    key_id: str
    name: str


FIXED_FIELDS = ("id", "endpoint", "input_file_id", "completion_window", "created_at", "expires_at", "metadata", "model")


class BatchStore:
    """``clock`` is the time that decides whether a file has expired (tests pass their own)."""

    def __init__(self, redis: Redis, clock: Callable[[], float] = time.time) -> None:
        self.redis = redis
        self.clock = clock
        self._transition = redis.register_script(TRANSITION_SCRIPT)
        self._fold = redis.register_script(FOLD_SCRIPT)
        self._lease = redis.register_script(LEASE_SCRIPT)
        self._save_file = redis.register_script(SAVE_FILE_SCRIPT)
        self._forget_file = redis.register_script(FORGET_FILE_SCRIPT)
        self._create_batch = redis.register_script(CREATE_BATCH_SCRIPT)
        self._retire = redis.register_script(RETIRE_SCRIPT)
        self._purge_batch = redis.register_script(PURGE_BATCH_SCRIPT)

    # --- files --------------------------------------------------------------------------------------------------

    async def save_file(self, stored: StoredFile) -> None:
        keys = [key_layout.file_key(stored.file.id), key_layout.FILES_INDEX, key_layout.FILES_EXPIRING]
        expires_at = stored.file.expires_at
        # scored by the clock, finer than created_at: keeps the order of files created in one second
        args: list[str | float] = [
            stored.file.id,
            stored.model_dump_json(),
            self.clock(),
            "" if expires_at is None else expires_at,
        ]
        with redis_errors():
            await self._save_file(keys=keys, args=args)

    async def stored(self, file_id: str) -> StoredFile | None:
        """A file's record as it is, expired or not (None: there is none)."""
        with redis_errors():
            raw = await self.redis.get(key_layout.file_key(file_id))
        return StoredFile.model_validate_json(raw) if raw is not None else None

    async def file(self, file_id: str, viewer: str | None = None) -> StoredFile:
        """A file's record; 404 when there is none, when it has expired (at once, whether or not the sweeper has
        removed it yet), or when ``viewer`` (a managed API key's id) may not see it."""
        stored = await self.stored(file_id)
        if stored is None or stored.expired(self.clock()) or not stored.visible_to(viewer):
            raise NotFound(f"No such File object: {file_id}", param="file_id", code="file_not_found")
        return stored

    async def forget_file(self, file_id: str) -> None:
        keys = [key_layout.file_key(file_id), key_layout.FILES_INDEX, key_layout.FILES_EXPIRING]
        with redis_errors():
            await self._forget_file(keys=keys, args=[file_id])

    async def expired_files(self, now: float, skip: int, count: int) -> list[str]:
        """Ids of files expired by ``now``, soonest expired first, leaving out the first ``skip``."""
        with redis_errors():
            found = await self.redis.zrangebyscore(key_layout.FILES_EXPIRING, "-inf", now, start=skip, num=count)
        return [i.decode() for i in found]

    async def page(
        self, index: str, after: str | None, limit: int, newest_first: bool = True
    ) -> tuple[list[str], bool]:
        """Ids of an index (by creation), after the id ``after``; and whether more follow."""
        with redis_errors():
            start = 0
            if after is not None:
                rank = await (self.redis.zrevrank if newest_first else self.redis.zrank)(index, after)
                if rank is None:
                    raise NotFound(f"No such object: {after}", param="after")
                start = rank + 1
            fetch = self.redis.zrevrange if newest_first else self.redis.zrange
            ids = [i.decode() for i in await fetch(index, start, start + limit)]
        return ids[:limit], len(ids) > limit

    # --- batches ------------------------------------------------------------------------------------------------

    async def create_batch(
        self, batch: BatchObject, owner: BatchOwner | None = None, output_expiry: int | None = None
    ) -> None:
        """A new batch; ``owner`` is the managed API key that created it (its lines count against that key);
        ``output_expiry``: seconds its output and error files live after they are written (None: until deleted)."""
        fixed = batch.model_dump(mode="json", include=set(FIXED_FIELDS))
        fields: dict[str, str | int] = {
            "record": json.dumps(fixed),
            "status": batch.status,
            "completed": 0,
            "failed": 0,
        }
        if owner is not None:
            fields["owner"] = owner.model_dump_json()
        if output_expiry is not None:
            fields["output_expiry"] = output_expiry
        keys = [key_layout.batch_key(batch.id), key_layout.BATCHES_INDEX, key_layout.ACTIVE_BATCHES]
        pairs = [item for pair in fields.items() for item in pair]
        with redis_errors():
            await self._create_batch(keys=keys, args=[batch.id, time.time(), *pairs])

    async def batch(self, batch_id: str, viewer: str | None = None) -> BatchObject:
        """A batch; 404 when there is none, or when ``viewer`` (a managed API key's id) may not see it: a managed key
        sees the batches it created, a static key (or none) every batch."""
        with redis_errors():
            fields = await cast(Awaitable[dict[bytes, bytes]], self.redis.hgetall(key_layout.batch_key(batch_id)))
        values = {k.decode(): v.decode() for k, v in fields.items()}
        owner = values.pop("owner", None)
        visible = viewer is None or (owner is not None and BatchOwner.model_validate_json(owner).key_id == viewer)
        if not values or not visible:
            raise NotFound(f"No such Batch object: {batch_id}", param="batch_id", code="batch_not_found")
        data: dict[str, Any] = json.loads(values.pop("record"))
        counts = BatchRequestCounts(
            total=int(values.pop("total", 0)), completed=int(values.pop("completed")), failed=int(values.pop("failed"))
        )
        input_tokens, output_tokens = int(values.pop("input_tokens", 0)), int(values.pop("output_tokens", 0))
        usage = BatchUsage(
            input_tokens=input_tokens, output_tokens=output_tokens, total_tokens=input_tokens + output_tokens
        )
        errors = values.pop("errors", None)
        values.pop("plan", None)
        values.pop("output_expiry", None)
        for name, value in values.items():
            data[name] = int(value) if name.endswith("_at") else value
        return BatchObject.model_validate(
            data
            | {"request_counts": counts, "usage": usage}
            | {"errors": BatchErrors.model_validate_json(errors) if errors else None}
        )

    async def move(self, batch_id: str, allowed: tuple[str, ...], status: str, **fields: str | int) -> bool:
        """Compare-and-set the status (stamping ``<status>_at``), with ``fields`` set in the same step."""
        args: list[str | int] = [" ".join(allowed), status, f"{status}_at", int(self.clock())]
        for name, value in fields.items():
            args += [name, value]
        with redis_errors():
            return bool(await self._transition(keys=[key_layout.batch_key(batch_id)], args=args))

    async def set_plan(self, batch_id: str, chunks: list[ChunkRef], total: int) -> None:
        plan = json.dumps([c.model_dump(mode="json") for c in chunks])
        with redis_errors():
            await cast(
                Awaitable[int], self.redis.hset(key_layout.batch_key(batch_id), mapping={"plan": plan, "total": total})
            )

    async def plan(self, batch_id: str) -> list[ChunkRef]:
        with redis_errors():
            raw = await cast(Awaitable[bytes | None], self.redis.hget(key_layout.batch_key(batch_id), "plan"))
        return [ChunkRef.model_validate(c) for c in json.loads(raw)] if raw else []

    async def output_expiry(self, batch_id: str) -> int | None:
        """Seconds the batch's output and error files live (its ``output_expires_after``), or None."""
        with redis_errors():
            raw = await cast(Awaitable[bytes | None], self.redis.hget(key_layout.batch_key(batch_id), "output_expiry"))
        return int(raw) if raw else None

    async def owner(self, batch_id: str) -> BatchOwner | None:
        with redis_errors():
            raw = await cast(Awaitable[bytes | None], self.redis.hget(key_layout.batch_key(batch_id), "owner"))
        return BatchOwner.model_validate_json(raw) if raw else None

    async def released(self, batch_id: str) -> int:
        """How many of the batch's chunks were put on the bulk lane (always its first ones)."""
        with redis_errors():
            return int(await cast(Awaitable[int], self.redis.hlen(key_layout.batch_released_key(batch_id))))

    async def fold_reports(self, batch_id: str) -> set[int]:
        """Count the chunks workers reported since the last fold; returns the indices of every chunk done so far."""
        keys = [
            key_layout.batch_done_key(batch_id),
            key_layout.batch_chunks_key(batch_id),
            key_layout.batch_key(batch_id),
        ]
        with redis_errors():
            await self._fold(keys=keys)
            done = await cast(Awaitable[list[bytes]], self.redis.hkeys(key_layout.batch_chunks_key(batch_id)))
        return {int(i) for i in done}

    async def active(self) -> list[str]:
        with redis_errors():
            members = await cast(Awaitable[set[bytes]], self.redis.smembers(key_layout.ACTIVE_BATCHES))
        return [i.decode() for i in members]

    async def progress(self) -> dict[str, dict[str, int]]:
        """Lines of the batches not yet finished, per model: pending, completed, failed."""
        ids = await self.active()
        with redis_errors():
            async with self.redis.pipeline(transaction=False) as pipe:
                for batch_id in ids:
                    pipe.hmget(key_layout.batch_key(batch_id), ["record", "total", "completed", "failed"])
                rows = await pipe.execute()
        found: dict[str, dict[str, int]] = {}
        for record, total, completed, failed in rows:
            if record is None:
                continue
            model = json.loads(record).get("model") or ""
            counts = found.setdefault(model, {"pending": 0, "completed": 0, "failed": 0})
            done, bad = int(completed or 0), int(failed or 0)
            counts["completed"] += done
            counts["failed"] += bad
            counts["pending"] += max(int(total or 0) - done - bad, 0)
        return found

    async def retire(self, batch_id: str) -> None:
        """A batch in a final state: nothing drives it any more; its chunk bookkeeping goes."""
        keys = [
            key_layout.ACTIVE_BATCHES,
            key_layout.batch_chunks_key(batch_id),
            key_layout.batch_done_key(batch_id),
            key_layout.batch_released_key(batch_id),
            key_layout.batch_key(batch_id),
            key_layout.FINISHED_BATCHES,
        ]
        with redis_errors():
            await self._retire(keys=keys, args=[batch_id, self.clock()])

    async def finished_before(self, cutoff: float, count: int) -> list[str]:
        """Ids of batches that reached a final status before ``cutoff``, oldest first."""
        with redis_errors():
            found = await self.redis.zrangebyscore(key_layout.FINISHED_BATCHES, "-inf", cutoff, start=0, num=count)
        return [i.decode() for i in found]

    async def purge_batch(self, batch_id: str) -> None:
        """Forget a batch: its record, its bookkeeping and its index entries (not its files)."""
        keys = [
            key_layout.batch_key(batch_id),
            key_layout.batch_chunks_key(batch_id),
            key_layout.batch_done_key(batch_id),
            key_layout.batch_released_key(batch_id),
            key_layout.batch_driver_key(batch_id),
            key_layout.BATCHES_INDEX,
            key_layout.FINISHED_BATCHES,
            key_layout.ACTIVE_BATCHES,
        ]
        with redis_errors():
            await self._purge_batch(keys=keys, args=[batch_id])

    async def take_lease(self, batch_id: str, holder: str, seconds: float) -> bool:
        """Hold (or keep holding) the right to drive ``batch_id`` for ``seconds``."""
        return await self.hold(key_layout.batch_driver_key(batch_id), holder, seconds)

    async def drop_lease(self, batch_id: str, holder: str) -> None:
        await self.release(key_layout.batch_driver_key(batch_id), holder)

    async def hold(self, lease: str, holder: str, seconds: float) -> bool:
        """Take or keep the lease ``lease`` (a key) for ``seconds``; False while another holder has it."""
        with redis_errors():
            args: list[str | int] = [holder, int(seconds * 1000), 1]
            return bool(await self._lease(keys=[lease], args=args))

    async def release(self, lease: str, holder: str) -> None:
        """Drop the lease ``lease`` if ``holder`` has it."""
        with redis_errors():
            await self._lease(keys=[lease], args=[holder, 0, 0])
