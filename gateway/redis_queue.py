"""What both queue backends share on the gateway's side: admission and enqueue in one script on the model's slot
(``admission.lua``) after an API key's reservation on its own (``gateway.key_admission``), cancels, and a batch's
chunks released onto its model's bulk lane. A backend (``gateway.arq_queue``, ``gateway.streams_queue``) supplies its
lane's layout: the Lua functions ``depth_of``, ``enqueue`` and ``wake`` (prepended to the scripts that enqueue), its
key names and job data, ``cancel_job`` and ``state``. Per-key limits and accounting stay above the seam.
"""

from __future__ import annotations

import contextlib
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path
from typing import ClassVar

from redis.asyncio import Redis

from conveyor import key_layout, redis_client
from conveyor.contract import CAPABILITY_FOR_KIND, JobEnvelope, QueueBackend
from conveyor.errors import InvalidRequest, NoLiveWorker, Overloaded
from conveyor.fair_share import fair_args
from conveyor.outage import REDIS_DOWN
from conveyor.pipeliner import Grouped, Pipeliner, ScriptCall
from gateway import rate_limits
from gateway.directory import ModelDirectory
from gateway.key_admission import KeyAdmission, KeyLimits
from gateway.queue import JobState, redis_errors
from gateway.settings import GatewaySettings

ADMISSION_LUA = (Path(__file__).parent / "admission.lua").read_text()
#: A batch's chunks go onto its model's bulk lane in three steps, as their keys live in two slots: ``CHARGE_LUA`` on
#: the control plane's picks the next chunks not released yet, in order, charging each chunk's estimated tokens to the
#: batch's API key within ``share`` of the key's tokens per minute (the rest stays for its interactive requests), and
#: stops at the first that does not fit (the driver offers it again next round; a chunk larger than the share goes
#: once nothing else is counted); ``ENQUEUE_LUA`` on the model's puts those on the lane unless their job is there;
#: then each is marked released. A gateway that dies between the steps leaves a charge that leaves the window within a
#: minute, and chunks that are offered again (a chunk already on the lane is not added twice; one that finished
#: meanwhile runs again, and its results, written whole, replace the same ones).
#: CHARGE_LUA KEYS: released hash[, key record, tokens window]. ARGV: now, bucket second, share, then per chunk: index,
#: tokens. Returns the indexes to release, or -1 when the key is revoked.
CHARGE_LUA = """
local now = tonumber(ARGV[1])
local limit
if #KEYS > 1 then
  local record = redis.call('HMGET', KEYS[2], 'name', 'revoked_at', 'tpm')
  if not record[1] or record[2] then return -1 end
  if record[3] then limit = math.max(math.floor(tonumber(record[3]) * tonumber(ARGV[3])), 1) end
end
local picked = {}
for i = 4, #ARGV, 2 do
  if redis.call('HEXISTS', KEYS[1], ARGV[i]) == 0 then
    local cost = tonumber(ARGV[i + 1])
    if limit then
      local w = window(KEYS[3], limit, cost, now)
      if w[3] ~= 0 and w[2] > 0 then break end
      charge(KEYS[3], ARGV[2], cost)
    end
    picked[#picked + 1] = ARGV[i]
  end
end
return picked
"""
#: KEYS: bulk lane, wake channel. ARGV: job prefix, then per chunk: job id, job data, expiry ms, and its tenant, weight,
#: priority and deadline (``fair_args``).
ENQUEUE_LUA = """
for i = 2, #ARGV, 7 do
  local job = ARGV[1] .. ARGV[i]
  if redis.call('EXISTS', job) == 0 then
    enqueue(KEYS[1], job, ARGV[i + 1], ARGV[i + 2], ARGV[i], ARGV[i + 3], ARGV[i + 4], ARGV[i + 5], ARGV[i + 6])
  end
end
wake(KEYS[2])
return 1
"""
#: a batch's record of released chunks outlives its last chunk's deadline by this long (it is deleted when the batch
#: ends, long before)
RELEASED_GRACE_SECONDS = 86_400.0


@dataclass(frozen=True, slots=True)
class Admit:
    """One job's part of its model's admission call: its key, and its arguments (``admission.lua``, per job)."""

    model: str
    job_key: str
    args: list[str | int | float | bytes]


class Admission(IntEnum):
    """Result codes of ``admission.lua``."""

    NO_WORKER = 0
    ENQUEUED = 1
    QUEUE_FULL = 2
    INCAPABLE = 3
    DUPLICATE = 4
    OTHER_BACKEND = 11


def unencodable(exc: BaseException | None) -> InvalidRequest:
    """A body that cannot be encoded is the client's error."""
    if isinstance(exc, UnicodeEncodeError):
        return InvalidRequest(
            "The request contains text that is not valid Unicode (a lone surrogate).", code="invalid_unicode"
        )
    return InvalidRequest("The request could not be encoded.", code="invalid_request")


def admission_script(backend: QueueBackend, lane_lua: str) -> str:
    """``admission.lua`` on a backend's lane functions."""
    return f"local BACKEND = '{backend.value}'\n" + lane_lua + ADMISSION_LUA


class RedisJobQueue(ABC):
    BACKEND: ClassVar[QueueBackend]
    #: Lua functions the shared scripts call: ``depth_of(lane)`` (jobs waiting or running), ``enqueue(lane, job key,
    #: data, expiry ms, id, tenant, weight, priority, deadline)`` (the last four: ``fair_args``) and ``wake(channel)``
    LANE_LUA: ClassVar[str]
    #: the backend's cancel script, registered as ``self._cancel``
    CANCEL_LUA: ClassVar[str]

    def __init__(self, redis: Redis, settings: GatewaySettings, directory: ModelDirectory) -> None:
        self.redis = redis
        self.settings = settings
        self.directory = directory
        self.key_limits = KeyLimits(redis)
        publish = redis_client.publish_lua(redis)  # the wake-ups' and aborts' publish(channel, message)
        self._admit_and_enqueue = redis.register_script(admission_script(self.BACKEND, publish + self.LANE_LUA))
        self._charge = redis.register_script(key_layout.RATE_WINDOW_LUA + CHARGE_LUA)
        self._enqueue_chunks = redis.register_script(publish + self.LANE_LUA + ENQUEUE_LUA)
        self._cancel = redis.register_script(publish + self.CANCEL_LUA)
        #: admissions of requests arriving together go to Redis together: one script call per model for them all, in
        #: one round trip
        self._admissions: Grouped[Admit, tuple[int, int]] = Grouped(self._admit_group)
        self._pipeliner = Pipeliner(redis)

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
    async def cancel_job(self, envelope: JobEnvelope) -> None:
        """Withdraw a waiting job, or ask the worker running it to stop (on a Redis error: nothing; the job expires at
        its deadline, and a worker answering it then finds nobody waiting)."""

    @abstractmethod
    async def state(self, envelope: JobEnvelope) -> JobState: ...

    def lane_of(self, envelope: JobEnvelope) -> str:
        """The lane a job waits on: a batch chunk on its model's bulk lane, anything else on the model's queue."""
        return self.lane(envelope.model, bulk=envelope.chunk is not None)

    # --- shared: admission, cancel, release -------------------------------------------------------------------------

    async def submit(self, envelope: JobEnvelope) -> dict[str, str]:
        model, tenant = envelope.model, envelope.tenant
        enqueued_ms = int(envelope.created * 1000)
        job = self.job_data(envelope, enqueued_ms)
        now = time.time()
        windows: dict[str, rate_limits.Window] = {}
        cost = {"requests": 1, "tokens": tenant.reserved if tenant else 0}
        if tenant is not None:
            reserved, windows = await self.key_limits.reserve(tenant, envelope, now)
            if reserved != KeyAdmission.RESERVED:
                raise rate_limits.refusal(reserved, tenant, model, windows, cost, self.settings.retry_after_seconds)
        args: list[str | int | float | bytes] = [
            CAPABILITY_FOR_KIND[envelope.kind],
            job,
            max(int(envelope.seconds_left() * 1000), 1),
            envelope.request_id,
            *fair_args(envelope),
        ]
        admit = Admit(model, self.job_prefix(model) + envelope.request_id, args)
        with redis_errors():  # a failed call may have enqueued the job: its key keeps the charge
            code, depth = await self._admissions.send(admit)
        if code != Admission.ENQUEUED and tenant is not None:
            await self.key_limits.refund(tenant, windows, envelope.request_id)
        admitted = code == Admission.ENQUEUED
        rate_headers = rate_limits.headers(list(windows.values()), cost, admitted, now, tenant.second) if tenant else {}
        if code == Admission.OTHER_BACKEND:
            raise NoLiveWorker(
                f"The workers of `{model}` take jobs from another queue backend than this gateway's "
                f"({self.BACKEND.value}): set CONVEYOR_QUEUE_BACKEND to the same value on every gateway and worker.",
                param="model",
                code="queue_backend_mismatch",
            )
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

    async def _admit_group(self, group: list[Admit]) -> list[tuple[int, int]]:
        """Admit a group: one ``admission.lua`` call per model, in one round trip; (code, depth before) per item."""
        by_model: dict[str, list[int]] = {}
        for i, admit in enumerate(group):
            by_model.setdefault(admit.model, []).append(i)
        now = repr(time.time())
        calls: list[ScriptCall] = []
        for model, items in by_model.items():
            keys = [
                key_layout.model_workers_key(model),
                key_layout.model_card_key(model),
                self.lane(model),
                key_layout.wake_channel(model),
                key_layout.scale_to_zero_key(model),
                *(group[i].job_key for i in items),
            ]
            args = [now, self.settings.max_queue_depth, *(arg for i in items for arg in group[i].args)]
            calls.append((self._admit_and_enqueue, keys, args))
        results: list[tuple[int, int]] = [(0, 0)] * len(group)
        for items, replies in zip(by_model.values(), await self._pipeliner.run(calls), strict=True):
            for n, i in enumerate(items):
                results[i] = (int(replies[2 * n]), int(replies[2 * n + 1]))
        return results

    async def cancel(self, envelope: JobEnvelope) -> None:
        """Cancel a job; it no longer counts against its API key's queued jobs (on the key's slot, apart)."""
        if envelope.tenant is not None:
            with contextlib.suppress(*REDIS_DOWN):  # else the entry leaves at the job's deadline
                await self.redis.zrem(key_layout.key_jobs_key(envelope.tenant.key_id), envelope.request_id)
        await self.cancel_job(envelope)

    async def release(self, batch_id: str, envelopes: list[JobEnvelope], token_share: float, now: float) -> int:
        """Put the next of these chunks on their model's bulk lane (``CHARGE_LUA``); returns how many went, or -1 when
        the batch's API key is revoked."""
        if not envelopes:
            return 0
        first = envelopes[0]
        model, tenant = first.model, first.tenant
        released_key = key_layout.batch_released_key(batch_id)
        keys = [released_key]
        if tenant is not None:
            keys += [key_layout.api_key_key(tenant.key_id), key_layout.rate_window_key(tenant.key_id, "tokens")]
        args: list[str | int | float | bytes] = [repr(now), int(now), token_share]
        by_index = {}
        for envelope in envelopes:
            assert envelope.chunk is not None
            by_index[envelope.chunk.index] = envelope
            args += [envelope.chunk.index, envelope.chunk.tokens]
        with redis_errors():
            picked = await self._charge(keys=keys, args=args)
            if picked == -1:
                return -1
            chosen = [by_index[int(index)] for index in picked]
            if not chosen:
                return 0
            enqueued: list[str | int | float | bytes] = [self.job_prefix(model)]
            for envelope in chosen:
                ttl = max(int(envelope.seconds_left(now) * 1000), 1)
                job = self.job_data(envelope, int(envelope.created * 1000))
                enqueued += [envelope.request_id, job, ttl, *fair_args(envelope)]
            await self._enqueue_chunks(
                keys=[self.lane(model, bulk=True), key_layout.wake_channel(model)], args=enqueued
            )
            last_deadline = max(e.deadline for e in envelopes)
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.hset(released_key, mapping={str(e.chunk.index): 1 for e in chosen if e.chunk is not None})
                pipe.pexpire(released_key, int((last_deadline - now + RELEASED_GRACE_SECONDS) * 1000))
                await pipe.execute()
        return len(chosen)
