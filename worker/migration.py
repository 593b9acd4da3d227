"""Request migration: a generation cut on one worker (killed, drained, its engine dead) goes on on the next one.

Every frame of a stream is published by one script that also appends what the frame added to the completion to the
job's progress list (``contract.StreamProgress``), and does both only while this worker holds the job's lease and
the list is exactly as long as the frame's sequence number (``worker.frames``): the list never says more or less than
the client was sent, and a worker that lost the job (stopped, then woken up after another took it over) cannot send
a frame twice or skip one. The next worker that claims the job reads the list, continues from
the prompt plus the tokens already sent, with ``max_tokens`` reduced by them, and numbers its frames on from there:
the gateway relays one unbroken stream.

A stream that cannot be continued exactly (``Engine.unresumable``), or one cut more than ``max_migrations`` times,
ends with a ``worker_lost`` error event where it was cut instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast

from redis.asyncio import Redis

from conveyor import key_layout
from conveyor.contract import StreamProgress
from conveyor.pipeliner import Pipeliner
from worker.consumer import LeaseLost
from worker.frames import Frame, FrameSender
from worker.job_source import Fence

#: Read a job's progress and, when there is some, count one more migration. KEYS: progress list, migrations counter.
#: ARGV: expire-at ms. Returns {entries, migrations so far (this one included; 0 without progress)}.
READ_SCRIPT = """
local entries = redis.call('LRANGE', KEYS[1], 0, -1)
if #entries == 0 then return {entries, 0} end
local n = redis.call('INCR', KEYS[2])
redis.call('PEXPIREAT', KEYS[2], ARGV[1])
return {entries, n}
"""

#: progress outlives the job's deadline by this much (a job is never run after its deadline)
KEEP_AFTER_DEADLINE_MS = 60_000


@dataclass(frozen=True, slots=True)
class Cut:
    """A job that was already sending when its worker was lost: what was sent, and how many times it moved."""

    progress: StreamProgress
    migrations: int


class Migration:
    def __init__(self, redis: Redis, model: str, enabled: bool = True, max_migrations: int = 3) -> None:
        self.model = model
        self.enabled = enabled
        self.max_migrations = max_migrations
        self._pipeliner = Pipeliner(redis)
        self._frames = FrameSender(redis, self._pipeliner)
        self._read = redis.register_script(READ_SCRIPT)

    async def cut(self, request_id: str, deadline: float) -> Cut | None:
        """What an earlier worker sent of this job, or None when this is its first start (nothing sent)."""
        keys = [key_layout.progress_key(self.model, request_id), key_layout.migrations_key(self.model, request_id)]
        args = [_expire_at_ms(deadline)]
        reply = await self._pipeliner.call(self._read, keys, args)
        entries, migrations = cast(tuple[list[bytes], int], reply)
        return Cut(StreamProgress.decode(entries), int(migrations)) if entries else None

    def refusal(self, cut: Cut) -> str | None:
        """Why ``cut`` is not continued here (it then ends with an error event), or None."""
        if cut.progress.unresumable:
            return f"it cannot be continued exactly ({cut.progress.unresumable})"
        if not self.enabled:
            return "request migration is off (CONVEYOR_WORKER_MIGRATE=false)"
        if cut.migrations > self.max_migrations:
            return f"it was already moved {self.max_migrations} times (CONVEYOR_WORKER_MAX_MIGRATIONS)"
        return None

    async def publish(
        self, fence: Fence | None, request_id: str, seq: int, frame: bytes, entry: bytes, deadline: float
    ) -> None:
        """Send frame ``seq`` of ``request_id``'s stream with its progress entry; raises ``LeaseLost`` when the job is
        another worker's now (nothing is sent then)."""
        await self._send(
            fence, request_id, key_layout.stream_channel(self.model, request_id), frame, [entry], seq, deadline
        )

    async def record(
        self, fence: Fence | None, request_id: str, entries: list[bytes], after: int, deadline: float
    ) -> None:
        """Append progress entries of a non-streamed generation (its client is sent nothing before its end) to the
        ``after`` entries its list holds."""
        if entries:
            await self._send(fence, request_id, "", b"", entries, after, deadline)

    async def _send(
        self,
        fence: Fence | None,
        request_id: str,
        channel: str,
        frame: bytes,
        entries: list[bytes],
        after: int,
        deadline: float,
    ) -> None:
        lease_key, holder = (fence.key, fence.holder) if fence else ("", "")
        progress = key_layout.progress_key(self.model, request_id)
        sent = Frame(lease_key, holder, channel, frame, progress, entries, _expire_at_ms(deadline), after)
        if not await self._frames.send(sent):
            raise LeaseLost(request_id)

    async def close(self) -> None:
        await self._pipeliner.close()
        await self._frames.close()


def continued_body(body: dict[str, Any], sent: int) -> dict[str, Any]:
    """The request a continuation runs: its token limit less what was already sent."""
    out = dict(body)
    for field in ("max_tokens", "max_completion_tokens"):
        if out.get(field):
            out[field] = max(int(out[field]) - sent, 0)  # 0: cut after its last token, before its finish
    return out


def _expire_at_ms(deadline: float) -> int:
    return int(deadline * 1000) + KEEP_AFTER_DEADLINE_MS
