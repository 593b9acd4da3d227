"""What both queue backends share on the gateway's side: admission and enqueue in one script (``admission.lua``), and
a batch's chunks released onto its model's bulk lane. A backend (``gateway.arq_queue``, ``gateway.streams_queue``)
supplies its lane's layout: the Lua functions ``depth_of``, ``enqueue`` and ``wake`` (prepended to both scripts), its
key names and job data, ``cancel`` and ``state``. Per-key limits and accounting stay here, above the seam.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from enum import IntEnum
from pathlib import Path
from typing import ClassVar

from redis.asyncio import Redis

from conveyor import contract
from conveyor.contract import CAPABILITY_FOR_KIND, JobEnvelope, QueueBackend
from conveyor.errors import InvalidRequest, NoLiveWorker, Overloaded
from gateway import rate_limits
from gateway.directory import ModelDirectory
from gateway.queue import JobState, redis_errors
from gateway.settings import GatewaySettings

ADMISSION_LUA = (Path(__file__).parent / "admission.lua").read_text()
#: Put a batch's chunks on its model's bulk lane, in order, each once (``released`` remembers which), charging each
#: chunk's estimated tokens to the batch's API key within ``share`` of the key's tokens per minute (the rest stays for
#: its interactive requests). Stops at the first chunk that does not fit; the driver offers it again next round. A
#: chunk larger than the share goes once nothing else is counted. KEYS: bulk lane, wake channel, released hash[, key
#: record, tokens window]. ARGV: job prefix, now, bucket second, share, released ttl ms, then per chunk: index, job
#: id, job data, expiry ms, score, tokens. Returns how many chunks this call put on the lane; -1 when the key is
#: revoked.
RELEASE_LUA = """
local now = tonumber(ARGV[2])
local limit
if #KEYS > 3 then
  local record = redis.call('HMGET', KEYS[4], 'name', 'revoked_at', 'tpm')
  if not record[1] or record[2] then return -1 end
  if record[3] then limit = math.max(math.floor(tonumber(record[3]) * tonumber(ARGV[4])), 1) end
end
local released = 0
for i = 6, #ARGV, 6 do
  if redis.call('HEXISTS', KEYS[3], ARGV[i]) == 0 then
    local cost = tonumber(ARGV[i + 5])
    if limit then
      local w = window(KEYS[5], limit, cost, now)
      if w[3] ~= 0 and w[2] > 0 then break end
      charge(KEYS[5], ARGV[3], cost)
    end
    local job = ARGV[1] .. ARGV[i + 1]
    if redis.call('EXISTS', job) == 0 then enqueue(KEYS[1], job, ARGV[i + 2], ARGV[i + 3], ARGV[i + 4], ARGV[i + 1]) end
    redis.call('HSET', KEYS[3], ARGV[i], 1)
    redis.call('PEXPIRE', KEYS[3], ARGV[5])
    released = released + 1
  end
end
if released > 0 then wake(KEYS[2]) end
return released
"""
#: a batch's record of released chunks outlives its last chunk's deadline by this long (it is deleted when the batch
#: ends, long before)
RELEASED_GRACE_SECONDS = 86_400.0


class Admission(IntEnum):
    """Result codes of ``admission.lua``."""

    NO_WORKER = 0
    ENQUEUED = 1
    QUEUE_FULL = 2
    INCAPABLE = 3
    DUPLICATE = 4
    #: codes 5 to 10 concern the job's API key (``gateway.rate_limits.refusal``)
    OTHER_BACKEND = 11


def _windows(limits: list[int]) -> dict[str, rate_limits.Window]:
    """The key's windows admission reported (none when the job has no key or its key sets no limit)."""
    found = {}
    for index, unit in enumerate(("requests", "tokens")):
        window = rate_limits.Window.parse(unit, limits[index * 4 : index * 4 + 4]) if limits else None
        if window is not None:
            found[unit] = window
    return found


def unencodable(exc: BaseException | None) -> InvalidRequest:
    """A body that cannot be encoded is the client's error."""
    if isinstance(exc, UnicodeEncodeError):
        return InvalidRequest(
            "The request contains text that is not valid Unicode (a lone surrogate).", code="invalid_unicode"
        )
    return InvalidRequest("The request could not be encoded.", code="invalid_request")


def admission_script(backend: QueueBackend, lane_lua: str) -> str:
    """``admission.lua`` on a backend's lane functions."""
    return f"local BACKEND = '{backend.value}'\n" + contract.RATE_WINDOW_LUA + lane_lua + ADMISSION_LUA


class RedisJobQueue(ABC):
    BACKEND: ClassVar[QueueBackend]
    #: Lua functions the shared scripts call: ``depth_of(lane)`` (jobs waiting or running), ``enqueue(lane, job key,
    #: data, expiry ms, score, id)`` and ``wake(channel)``
    LANE_LUA: ClassVar[str]
    #: the backend's cancel script, registered as ``self._cancel``
    CANCEL_LUA: ClassVar[str]

    def __init__(self, redis: Redis, settings: GatewaySettings, directory: ModelDirectory) -> None:
        self.redis = redis
        self.settings = settings
        self.directory = directory
        self._admit_and_enqueue = redis.register_script(admission_script(self.BACKEND, self.LANE_LUA))
        self._release = redis.register_script(contract.RATE_WINDOW_LUA + self.LANE_LUA + RELEASE_LUA)
        self._cancel = redis.register_script(self.CANCEL_LUA)

    # --- the backend's layout -----------------------------------------------------------------------------------

    @abstractmethod
    def lane(self, model: str, bulk: bool = False) -> str:
        """The key of a model's interactive lane (or bulk lane)."""

    @abstractmethod
    def job_prefix(self, model: str) -> str:
        """Prefix of a job's data key (the job id follows)."""

    @abstractmethod
    def job_data(self, envelope: JobEnvelope, enqueued_ms: int) -> bytes:
        """The job as the backend stores it; raises ``InvalidRequest`` for a body that cannot be encoded."""

    @abstractmethod
    async def cancel(self, envelope: JobEnvelope) -> None: ...

    @abstractmethod
    async def state(self, envelope: JobEnvelope) -> JobState: ...

    def lane_of(self, envelope: JobEnvelope) -> str:
        """The lane a job waits on: a batch chunk on its model's bulk lane, anything else on the model's queue."""
        return self.lane(envelope.model, bulk=envelope.chunk is not None)

    # --- shared: admission, release ------------------------------------------------------------------------------

    async def submit(self, envelope: JobEnvelope) -> dict[str, str]:
        model = envelope.model
        enqueued_ms = int(envelope.created * 1000)
        job = self.job_data(envelope, enqueued_ms)
        now = time.time()
        keys = [
            contract.model_workers_key(model),
            contract.model_card_key(model),
            self.lane(model),
            self.job_prefix(model) + envelope.request_id,
            contract.wake_channel(model),
            contract.scale_to_zero_key(model),
        ]
        args: list[str | int | bytes] = [
            repr(now),
            self.settings.max_queue_depth,
            CAPABILITY_FOR_KIND[envelope.kind],
            job,
            max(int(envelope.seconds_left() * 1000), 1),
            enqueued_ms,
            envelope.request_id,
        ]
        tenant = envelope.tenant
        if tenant is not None:
            keys += [
                contract.api_key_key(tenant.key_id),
                contract.rate_window_key(tenant.key_id, "requests"),
                contract.rate_window_key(tenant.key_id, "tokens"),
                contract.key_jobs_key(tenant.key_id),
            ]
            args += [model, tenant.reserved, tenant.second, repr(envelope.deadline)]
        with redis_errors():
            code, depth, *limits = await self._admit_and_enqueue(keys=keys, args=args)
        if code == Admission.OTHER_BACKEND:
            raise NoLiveWorker(
                f"The workers of `{model}` take jobs from another queue backend than this gateway's "
                f"({self.BACKEND.value}): set CONVEYOR_QUEUE_BACKEND to the same value on every gateway and worker.",
                param="model",
                code="queue_backend_mismatch",
            )
        windows = _windows(limits)
        cost = {"requests": 1, "tokens": tenant.reserved if tenant else 0}
        if tenant is not None and code > Admission.DUPLICATE:
            raise rate_limits.refusal(code, tenant, model, windows, cost, self.settings.retry_after_seconds)
        admitted = code == Admission.ENQUEUED
        rate_headers = rate_limits.headers(list(windows.values()), cost, admitted, now, tenant.second) if tenant else {}
        if code == Admission.NO_WORKER:
            raise await self.directory.unavailable(model)
        if code == Admission.INCAPABLE:
            raise InvalidRequest(
                f"`{model}` does not support {envelope.kind.value} requests.",
                param="model",
                code="unsupported_model_capability",
            )
        if code == Admission.QUEUE_FULL:
            raise Overloaded(
                f"`{model}` has {depth} jobs queued or running (limit {self.settings.max_queue_depth}); retry later.",
                headers={"Retry-After": str(self.settings.retry_after_seconds)} | rate_headers,
            )
        if code == Admission.DUPLICATE:
            raise InvalidRequest(f"request id {envelope.request_id} is already queued", code="duplicate_request")
        return rate_headers

    async def release(self, batch_id: str, envelopes: list[JobEnvelope], token_share: float, now: float) -> int:
        if not envelopes:
            return 0
        first = envelopes[0]
        model, tenant = first.model, first.tenant
        keys = [self.lane(model, bulk=True), contract.wake_channel(model), contract.batch_released_key(batch_id)]
        if tenant is not None:
            keys += [contract.api_key_key(tenant.key_id), contract.rate_window_key(tenant.key_id, "tokens")]
        last_deadline = max(e.deadline for e in envelopes)
        released_ttl = int((last_deadline - now + RELEASED_GRACE_SECONDS) * 1000)
        args: list[str | int | float | bytes] = [self.job_prefix(model), repr(now), int(now), token_share, released_ttl]
        for envelope in envelopes:
            assert envelope.chunk is not None
            score = int(envelope.created * 1000)
            ttl = max(int(envelope.seconds_left(now) * 1000), 1)
            args += [envelope.chunk.index, envelope.request_id, self.job_data(envelope, score), ttl, score]
            args.append(envelope.chunk.tokens)
        with redis_errors():
            return int(await self._release(keys=keys, args=args))
