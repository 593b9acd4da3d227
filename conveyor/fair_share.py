"""Weighted fair order within a model's lane, across API keys (tenants), and priority then deadline within a key.

Start-time fair queueing: a job entering a lane gets a tag, ``max(clock, its tenant's last tag) + 1 / weight``, and
jobs are taken in tag order; the lane's clock is the tag of the last job taken. A key that floods the lane spends its
tags far ahead of the clock, so a key arriving later starts at the clock and its jobs interleave one for one (weight
2: two for one). Within a key, the job taken at a tag is the key's most urgent waiting one: the lowest ``priority``
(vLLM's meaning: lower runs earlier), then the earliest deadline; it swaps tags with the job the tag was given to.

It all runs inside the scripts that enqueue and take (Lua prepended to them: ``FAIR_LUA``), on the lane's slot, so the
order is exact however many gateways and workers there are. Per lane (``key_layout.FAIR_SUFFIX``): a hash of the clock
(field ``""``) and each waiting tenant's last tag, a hash of each waiting job's tenant, and per tenant a sorted set of
its waiting jobs by priority whose members start with the deadline (equal scores sort by member). A tenant's entries
leave when its last waiting job does, so the state is bounded by the jobs waiting.

A job taken once leaves the fair state: if its worker is lost, its tag, already behind the clock, puts it first
(on arq, at the next sweep: claims between sweeps start at the clock, ``worker.arq_source``).
"""

from __future__ import annotations

from conveyor import key_layout
from conveyor.contract import JobEnvelope

#: the tenant of requests without a managed API key (static keys, or none): one tenant together
SHARED_TENANT = "-"
#: Tags start at 0 and grow by about one per job; an arq lane score above this is an enqueue time in ms, given by a
#: gateway of a version before fair order (``worker.arq_source`` takes those first)
UNFAIR_SCORES = 10**11

#: Lua the enqueue and take scripts start with. ``ready`` is the sorted set of waiting jobs by tag (arq's lane itself).
FAIR_LUA = f"""
local function fair_key(ready, part) return ready .. '{key_layout.FAIR_SUFFIX}' .. part end
local function fair_split(info)
  local at = string.find(info, ' ', 1, true)
  return string.sub(info, 1, at - 1), string.sub(info, at + 1)
end
-- a job enters: returns its tag. tenant: no spaces; deadline: 13 digits of ms, so members sort by it
local function fair_enter(ready, id, tenant, weight, priority, deadline)
  local tags = fair_key(ready, 'tags')
  local known = redis.call('HMGET', tags, '', tenant)
  local tag = math.max(tonumber(known[1] or '0'), tonumber(known[2] or '0')) + 1 / tonumber(weight)
  redis.call('HSET', tags, tenant, tag)
  local member = deadline .. ':' .. id
  redis.call('ZADD', fair_key(ready, 'tenant:' .. tenant), priority, member)
  redis.call('HSET', fair_key(ready, 'jobs'), id, tenant .. ' ' .. member)
  return tag
end
-- a job leaves the waiting jobs (taken, cancelled, expired); a tenant with none left is forgotten. info: the job's
-- entry in the jobs hash, when the caller has read it; others: true when the tenant is known to have more waiting
local function fair_leave(ready, id, info, others)
  info = info or redis.call('HGET', fair_key(ready, 'jobs'), id)
  if not info then return end
  local tenant, member = fair_split(info)
  local waiting = fair_key(ready, 'tenant:' .. tenant)
  redis.call('HDEL', fair_key(ready, 'jobs'), id)
  redis.call('ZREM', waiting, member)
  if not others and redis.call('EXISTS', waiting) == 0 then redis.call('HDEL', fair_key(ready, 'tags'), tenant) end
end
-- the job to take at the lowest waiting tag, held by job id (tag: its score, when the caller has read it): its
-- tenant's most urgent waiting job, which swaps tags with it. It leaves the waiting jobs and the clock moves to the
-- tag (waiting jobs are taken in tag order, so the clock only moves on). A job without fair state (taken before: its
-- worker was lost) is taken as it is.
local function fair_take(ready, id, tag)
  local info = redis.call('HGET', fair_key(ready, 'jobs'), id)
  if not info then return id end
  tag = tag or redis.call('ZSCORE', ready, id)
  local tenant, member = fair_split(info)
  local firsts = redis.call('ZRANGE', fair_key(ready, 'tenant:' .. tenant), 0, 1)
  local others = #firsts > 1
  if firsts[1] and firsts[1] ~= member then
    local best = string.sub(firsts[1], string.find(firsts[1], ':', 1, true) + 1)
    local best_tag = redis.call('ZSCORE', ready, best)
    if best_tag then
      redis.call('ZADD', ready, tag, best)
      redis.call('ZADD', ready, best_tag, id)
      id, info, others = best, nil, true  -- the job the tag was given to still waits
    else
      fair_leave(ready, best)
      others = nil
    end
  end
  fair_leave(ready, id, info, others)
  redis.call('HSET', fair_key(ready, 'tags'), '', tag)
  return id
end
"""


def fair_args(envelope: JobEnvelope) -> list[str | int | float]:
    """A job's tenant, weight, priority and deadline, as ``fair_enter`` takes them."""
    tenant = envelope.tenant
    priority = envelope.body.get("priority", 0) if envelope.chunk is None else 0
    return [
        tenant.key_id if tenant else SHARED_TENANT,
        tenant.weight if tenant else 1.0,
        priority,
        f"{int(envelope.deadline * 1000):013d}",
    ]
