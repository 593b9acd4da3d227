"""An API key's side of admission, on the key's slot: its limits checked and charged before its job is enqueued on its
model's slot (``admission.lua``), and charged back when the model refuses the job.

A key's record, windows and unfinished jobs share the control plane's hash tag; a model's lane has the model's. On a
Redis Cluster no script may join them, so a keyed job is admitted in two steps: reserve here, then enqueue there,
then refund here if the enqueue was refused. A key's limits are never exceeded; meanwhile a reservation that will be
refunded counts (a refusal a moment early), and a gateway that dies between the steps leaves a charge that leaves the
window within its minute and a job entry that leaves at its deadline.
"""

from __future__ import annotations

import contextlib
from enum import IntEnum

from redis.asyncio import Redis

from conveyor import key_layout
from conveyor.contract import JobEnvelope, TenantRef
from conveyor.outage import REDIS_DOWN
from conveyor.pipeliner import Pipeliner
from gateway import rate_limits
from gateway.queue import redis_errors

#: KEYS: 1 the key's record, 2 its requests window, 3 its tokens window, 4 its unfinished jobs. ARGV: 1 now (unix s),
#: 2 model, 3 tokens charged, 4 bucket second, 5 deadline (unix s), 6 job id. Returns {code, then for requests and for
#: tokens each limit, used, retry ms, reset ms (all -1 when the key sets no such limit)}, used before this job. Codes:
#: ``KeyAdmission``.
RESERVE_LUA = """
local now = tonumber(ARGV[1])
local none = {-1, -1, -1, -1}
local requests, tokens = none, none
local function result(code)
  local out = {code}
  for _, v in ipairs(requests) do out[#out + 1] = v end
  for _, v in ipairs(tokens) do out[#out + 1] = v end
  return out
end
local record = redis.call('HMGET', KEYS[1], 'name', 'revoked_at', 'rpm', 'tpm', 'max_queued', 'models')
if not record[1] or record[2] then return result(5) end
if record[6] then
  local allowed = false
  for _, model in ipairs(cjson.decode(record[6])) do
    if model == ARGV[2] then allowed = true end
  end
  if not allowed then return result(6) end
end
if record[3] then requests = window(KEYS[2], tonumber(record[3]), 1, now) end
if record[4] then tokens = window(KEYS[3], tonumber(record[4]), tonumber(ARGV[3]), now) end
if requests[3] ~= 0 and requests ~= none then return result(7) end
if tokens[3] == -1 and tokens ~= none then return result(9) end
if tokens[3] ~= 0 and tokens ~= none then return result(8) end
if record[5] then
  redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', now)
  if redis.call('ZCARD', KEYS[4]) >= tonumber(record[5]) then return result(10) end
end
if requests ~= none then charge(KEYS[2], ARGV[4], 1) end
if tokens ~= none then charge(KEYS[3], ARGV[4], ARGV[3]) end
if record[5] then
  redis.call('ZADD', KEYS[4], ARGV[5], ARGV[6])
  local ttl = math.ceil(tonumber(ARGV[5]) - now) + 1
  if redis.call('TTL', KEYS[4]) < ttl then redis.call('EXPIRE', KEYS[4], ttl) end
end
return result(1)
"""

#: Give back what ``RESERVE_LUA`` charged. KEYS: requests window, tokens window, unfinished jobs. ARGV: bucket second,
#: requests charged, tokens charged, job id.
REFUND_LUA = """
if ARGV[2] ~= '0' then recharge(KEYS[1], ARGV[1], -tonumber(ARGV[2])) end
if ARGV[3] ~= '0' then recharge(KEYS[2], ARGV[1], -tonumber(ARGV[3])) end
redis.call('ZREM', KEYS[3], ARGV[4])
return 1
"""


class KeyAdmission(IntEnum):
    """Result codes of ``RESERVE_LUA``."""

    RESERVED = 1
    REVOKED = 5
    MODEL_NOT_ALLOWED = 6
    OVER_REQUESTS = 7
    OVER_TOKENS = 8
    LARGER_THAN_TOKENS = 9
    OVER_QUEUED = 10


def _windows(limits: list[int]) -> dict[str, rate_limits.Window]:
    """The key's windows the reservation reported (none for a limit the key does not set)."""
    found = {}
    for index, unit in enumerate(("requests", "tokens")):
        window = rate_limits.Window.parse(unit, limits[index * 4 : index * 4 + 4])
        if window is not None:
            found[unit] = window
    return found


class KeyLimits:
    def __init__(self, redis: Redis) -> None:
        self._reserve = redis.register_script(key_layout.RATE_WINDOW_LUA + RESERVE_LUA)
        self._refund = redis.register_script(key_layout.RATE_WINDOW_LUA + REFUND_LUA)
        #: reservations of requests arriving together go to Redis in one pipeline (as their admissions do)
        self._reservations = Pipeliner(redis)

    async def reserve(
        self, tenant: TenantRef, envelope: JobEnvelope, now: float
    ) -> tuple[int, dict[str, rate_limits.Window]]:
        """The reservation's code and the key's windows as it found them (before this job)."""
        key_id = tenant.key_id
        keys = [
            key_layout.api_key_key(key_id),
            key_layout.rate_window_key(key_id, "requests"),
            key_layout.rate_window_key(key_id, "tokens"),
            key_layout.key_jobs_key(key_id),
        ]
        args: list[str | int] = [
            repr(now),
            envelope.model,
            tenant.reserved,
            tenant.second,
            repr(envelope.deadline),
            envelope.request_id,
        ]
        with redis_errors():
            code, *limits = await self._reservations.call(self._reserve, keys, args)
        return int(code), _windows([int(v) for v in limits])

    async def refund(self, tenant: TenantRef, windows: dict[str, rate_limits.Window], request_id: str) -> None:
        """Charge back a reservation whose job was not enqueued. On a Redis error the charge stays until it leaves
        the window (a minute) and the job's entry until its deadline: limits are never exceeded by it."""
        key_id = tenant.key_id
        keys = [
            key_layout.rate_window_key(key_id, "requests"),
            key_layout.rate_window_key(key_id, "tokens"),
            key_layout.key_jobs_key(key_id),
        ]
        args: list[str | int] = [tenant.second, int("requests" in windows)]
        args += [tenant.reserved if "tokens" in windows else 0, request_id]
        with contextlib.suppress(*REDIS_DOWN):
            await self._refund(keys=keys, args=args)
