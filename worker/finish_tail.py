"""The part of finishing a job both queue backends share: deliver its answer and account its API key's usage.

A backend's finish script is ``RATE_WINDOW_LUA`` + its own head (the lease check and the job's removal, ending with
``local k, a, job_id`` = the first key and argument of this tail and the job's id) + ``FINISH_TAIL_LUA``, so the
fenced removal, the answer and the accounting are one atomic step on both. On a Redis Cluster their keys live in
three slots: ``deliver`` and ``ACCOUNT_LUA`` then run apart (``worker.streams_source``).
"""

from __future__ import annotations

from redis.asyncio import Redis

from conveyor import key_layout
from conveyor.keys import USAGE_RETENTION_SECONDS
from worker.job_source import Delivery
from worker.key_usage import KeyUsage

#: KEYS from k: [inbox][, the key's unfinished jobs, its tokens window, its usage of the day]. ARGV from a: 1 with an
#: answer, the answer, inbox ttl ms[, 1 with usage, the bucket second admission charged, the tokens to add to it,
#: usage ttl s, then usage field/increment pairs]. Returns 1: finished here.
FINISH_TAIL_LUA = """
if ARGV[a] == '1' then
  redis.call('RPUSH', KEYS[k], ARGV[a + 1])
  redis.call('PEXPIRE', KEYS[k], ARGV[a + 2])
  k = k + 1
end
if ARGV[a + 3] == '1' then
  redis.call('ZREM', KEYS[k], job_id)
  recharge(KEYS[k + 1], ARGV[a + 4], ARGV[a + 5])
  for i = a + 7, #ARGV, 2 do redis.call('HINCRBY', KEYS[k + 2], ARGV[i], ARGV[i + 1]) end
  if #ARGV >= a + 7 then redis.call('EXPIRE', KEYS[k + 2], ARGV[a + 6]) end
end
return 1
"""


#: The tail's accounting on its own, for a Redis Cluster, where the job's keys (its model's slot), the inbox and the
#: API key's usage (the control plane's) cannot be joined in one script. ARGV: job id, then the tail's (no answer).
ACCOUNT_LUA = key_layout.RATE_WINDOW_LUA + "local k, a, job_id = 1, 2, ARGV[1]\n" + FINISH_TAIL_LUA


def finish_script(head: str) -> str:
    return key_layout.RATE_WINDOW_LUA + head + FINISH_TAIL_LUA


async def deliver(redis: Redis, delivery: Delivery) -> None:
    """Push an answer on its own (what the tail does first), in one round trip."""
    async with redis.pipeline(transaction=False) as pipe:
        pipe.rpush(delivery.inbox, delivery.payload)
        pipe.pexpire(delivery.inbox, int(delivery.ttl_seconds * 1000))
        await pipe.execute()


def tail_arguments(delivery: Delivery | None, usage: KeyUsage | None) -> tuple[list[str], list[str | bytes | int]]:
    """The tail's keys and arguments for this answer and usage."""
    keys: list[str] = []
    args: list[str | bytes | int] = []
    if delivery is not None:
        keys.append(delivery.inbox)
        args += [1, delivery.payload, int(delivery.ttl_seconds * 1000)]
    else:
        args += [0, b"", 0]
    if usage is not None:
        key_id = usage.tenant.key_id
        keys += [key_layout.key_jobs_key(key_id), key_layout.rate_window_key(key_id, "tokens"), usage.day_key]
        args += [1, usage.tenant.second, usage.token_delta, USAGE_RETENTION_SECONDS]
        args += [item for pair in usage.counters().items() for item in pair]
    return keys, args
