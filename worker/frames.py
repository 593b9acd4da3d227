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

from worker.pipeliner import Grouped

#: For each frame, KEYS: lease key ('' for no check), stream channel ('' for none), progress list; ARGV: entry count,
#: lease holder, frame, expire-at ms, the progress list's length it follows, entries. A frame is neither published nor
#: recorded when another worker holds its job's lease now (a lease that lapsed with nobody taking it is still this
#: worker's, as for a renewal), or when the list is not as long as its sender thinks (another worker wrote to it: a
#: frame can neither repeat nor skip one). Returns 1 (done) or 0 (not) per frame.
SEND_SCRIPT = """
local out, a = {}, 1
for k = 1, #KEYS, 3 do
  local n = tonumber(ARGV[a])
  local ok = 1
  if KEYS[k] ~= '' then
    local holder = redis.call('GET', KEYS[k])
    if holder and holder ~= ARGV[a + 1] then ok = 0 end
  end
  if ok == 1 and redis.call('LLEN', KEYS[k + 2]) ~= tonumber(ARGV[a + 4]) then ok = 0 end
  if ok == 1 then
    if KEYS[k + 1] ~= '' then redis.call('PUBLISH', KEYS[k + 1], ARGV[a + 2]) end
    for i = a + 5, a + 4 + n do
      if redis.call('RPUSH', KEYS[k + 2], ARGV[i]) == 1 then redis.call('PEXPIREAT', KEYS[k + 2], ARGV[a + 3]) end
    end
  end
  out[#out + 1] = ok
  a = a + 5 + n
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

    def __init__(self, redis: Redis) -> None:
        super().__init__(self._send_group)
        self._script = redis.register_script(SEND_SCRIPT)

    async def _send_group(self, frames: list[Frame]) -> list[int]:
        keys: list[str] = []
        args: list[str | bytes | int] = []
        for frame in frames:
            keys += [frame.lease_key, frame.channel, frame.progress_key]
            args += [len(frame.entries), frame.holder, frame.frame, frame.expire_at_ms, frame.after, *frame.entries]
        return [int(ok) for ok in await self._script(keys=keys, args=args)]
