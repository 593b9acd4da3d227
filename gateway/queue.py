"""What the gateway needs from a queue backend: submit (admit + enqueue), cancel, and a job's state.

The serving code talks only to this protocol; ``gateway.arq_queue`` implements it on arq's Redis layout and
``gateway.streams_queue`` on Redis Streams, both on ``gateway.redis_queue`` (``gateway.queue_backends`` picks one).
Answers come back outside the backend: non-streamed ones through this gateway's inbox (``gateway.inbox``), streams
over pub/sub.
Every Redis error that reaches a client passes through ``redis_errors`` and becomes a 503.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from enum import StrEnum
from typing import Protocol

from conveyor.contract import JobEnvelope
from conveyor.errors import BackendUnavailable
from conveyor.outage import REDIS_DOWN

log = logging.getLogger("conveyor.gateway")


class JobState(StrEnum):
    QUEUED = "queued"  # waiting for a worker (or for another one, after its worker was lost)
    RUNNING = "running"  # a live worker holds its lease
    GONE = "gone"  # finished, cancelled, or its data expired


class JobQueue(Protocol):
    async def submit(self, envelope: JobEnvelope) -> dict[str, str]:
        """Admit and enqueue in one atomic step, or raise why not: unknown model 404, no live worker 503, wrong
        capability 400, queue full 429; with an API key also its limits (429), revocation (401) and allowed models
        (404). Returns the key's rate-limit headers (none without a key)."""

    async def release(self, batch_id: str, envelopes: list[JobEnvelope], token_share: float, now: float) -> int:
        """Put a batch's next chunks (in order, one model) on its model's bulk lane, each once, as far as the batch's
        API key has tokens left in ``token_share`` of its tokens per minute (no other admission: a batch waits for
        workers). Returns how many went now; -1 when the key was revoked."""

    async def cancel(self, envelope: JobEnvelope) -> None:
        """Drop the job if no worker has started it, else ask the worker running it to stop. Never raises."""

    async def state(self, envelope: JobEnvelope) -> JobState: ...


@contextlib.contextmanager
def redis_errors() -> Iterator[None]:
    """Translate Redis' exceptions (and its timeouts) into the gateway's 503; the details go to the log only."""
    try:
        yield
    except REDIS_DOWN as exc:
        log.debug("Redis error: %s: %s", type(exc).__name__, exc)
        raise BackendUnavailable("The queue backend is unavailable; retry shortly.") from exc
