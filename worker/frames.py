"""Stream frames and progress entries of every running job, sent in groups: one script call for a group.

With many streams in flight the engine yields one chunk per stream per step, all at once. Each frame must be
published together with its progress entry and only while its job's lease is this worker's (``worker.migration``);
one script call per frame cost about half of the relay's throughput, so frames that arrive while a call is on its
way wait and go together in the next one, each with its own lease check and result. A caller awaits its own frame,
so a job's frames leave in order and a job cannot run ahead of Redis.
"""

from __future__ import annotations

from dataclasses import dataclass

from redis.asyncio import Redis

from conveyor import redis_client
from conveyor.pipeliner import Grouped, Pipeliner

#: For each frame, KEYS: progress list; ARGV: entry count, lease key ('' for no check), lease holder, stream channel
#: ('' for none), frame, expire-at ms, the progress list's length it follows, entries. Every key and the channel carry
#: the job's model's tag (one slot of a Redis Cluster); only the progress lists are declared, as a key named '' would
#: hash to another slot. A frame is neither published nor
#: recorded when another worker holds its job's lease now (a lease that lapsed with nobody taking it is still this
#: worker's, as for a renewal), or when the list is not as long as its sender thinks (another worker wrote to it: a
#: frame can neither repeat nor skip one). Returns 1 (done) or 0 (not) per frame.
SEND_SCRIPT = """
local out, a = {}, 1
for k = 1, #KEYS do
  local n = tonumber(ARGV[a])
  local ok = 1
  if ARGV[a + 1] ~= '' then
    local holder = redis.call('GET', ARGV[a + 1])
    if holder and holder ~= ARGV[a + 2] then ok = 0 end
  end
  if ok == 1 and redis.call('LLEN', KEYS[k]) ~= tonumber(ARGV[a + 6]) then ok = 0 end
  if ok == 1 then
    if ARGV[a + 3] ~= '' then publish(ARGV[a + 3], ARGV[a + 4]) end
    for i = a + 7, a + 6 + n do
      if redis.call('RPUSH', KEYS[k], ARGV[i]) == 1 then redis.call('PEXPIREAT', KEYS[k], ARGV[a + 5]) end
    end
  end
  out[#out + 1] = ok
  a = a + 7 + n
end
return out
"""


@dataclass(frozen=True, slots=True)
class Frame:
    lease_key: str
    holder: str
    channel: str
    frame: bytes
    progress_key: str
    entries: list[bytes]
    expire_at_ms: int
    #: how many entries the progress list holds before these (the frame's sequence number, for a stream)
    after: int


class FrameSender(Grouped[Frame, int]):
    """``send(frame)`` answers 1 once the frame is published and recorded, 0 when another worker holds its job."""

    def __init__(self, redis: Redis, pipeliner: Pipeliner) -> None:
        super().__init__(self._send_group)
        self._script = redis.register_script(redis_client.publish_lua(redis) + SEND_SCRIPT)
        self._pipeliner = pipeliner

    async def _send_group(self, frames: list[Frame]) -> list[int]:
        keys: list[str] = []
        args: list[str | bytes | int] = []
        for frame in frames:
            keys.append(frame.progress_key)
            args += [len(frame.entries), frame.lease_key, frame.holder, frame.channel, frame.frame]
            args += [frame.expire_at_ms, frame.after, *frame.entries]
        (done,) = await self._pipeliner.run([(self._script, keys, args)])
        return [int(ok) for ok in done]
