"""What a worker needs from a queue backend: claim, renew, finish, hand back, and wake-ups.

The worker's consumer loop (``worker.consumer``) talks only to this protocol; ``worker.arq_source`` implements it on
arq's Redis layout, ``worker.streams_source`` on Redis Streams (``worker.queue_backends`` picks one). A claim is a
lease: it lapses unless the worker renews it, and a lapsed job is claimed again by
another worker (at-least-once execution). ``finish`` delivers the answer only while the lease is still this
worker's, so the client gets exactly one answer.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from worker.key_usage import KeyUsage


@dataclass(frozen=True, slots=True)
class Fence:
    """How a script checks that a job's lease is still this worker's: the string at ``key`` is ``holder``."""

    key: str
    holder: str


@dataclass(frozen=True, slots=True)
class Claim:
    job_id: str
    #: the envelope as the gateway enqueued it (empty when it cannot be read; the runner refuses it then)
    envelope: dict[str, Any]
    #: 1 on the first run; more when a worker holding it was lost
    tries: int
    #: a batch chunk from the model's bulk lane
    bulk: bool = False
    #: the lease's fence: what a stream's frames are published under (``worker.migration``)
    fence: Fence | None = None
    #: whether the job had progress recorded when it was claimed (a generation cut on another worker: its cut is read
    #: before it goes on, ``worker.migration``); False: it starts afresh, with nothing to read. No other worker can
    #: record any once the claim holds the lease.
    progress: bool = True


def claims_of(
    flat: Sequence[Any], lease_prefix: str, worker_id: str, envelope: Callable[[bytes], dict[str, Any]]
) -> list[Claim]:
    """The claims in a claim script's reply (both backends'): id, data, try count, bulk (0/1), has progress (0/1) per
    job, flattened; each fenced by its lease key (``lease_prefix`` + id) holding ``worker_id``; ``envelope`` reads the
    backend's job data."""
    claims = []
    for i in range(0, len(flat), 5):
        job_id, raw, tries, bulk, progress = flat[i].decode(), flat[i + 1], flat[i + 2], flat[i + 3], flat[i + 4]
        fence = Fence(lease_prefix + job_id, worker_id)
        claims.append(Claim(job_id, envelope(raw), int(tries), bool(bulk), fence, bool(progress)))
    return claims


@dataclass(frozen=True, slots=True)
class Renewal:
    #: held jobs whose lease another worker holds now: stop them without answering
    lost: list[str] = field(default_factory=list)
    #: held jobs a client cancelled: stop them
    aborted: list[str] = field(default_factory=list)


#: an answer nobody reads (its gateway died) goes away with the inbox after this long
INBOX_TTL_SECONDS = 60.0


@dataclass(frozen=True, slots=True)
class Delivery:
    """An answer: ``payload`` pushed to the list ``inbox``, which expires ``ttl_seconds`` after the last push."""

    inbox: str
    payload: bytes
    ttl_seconds: float = INBOX_TTL_SECONDS


class JobSource(Protocol):
    #: how long a claim lives without renewal, seconds
    lease_seconds: float
    #: ``claim`` itself waits (briefly, inside Redis) for work: the consumer calls it again at once instead of
    #: waiting for a wake-up
    blocks: bool

    async def claim(self, limit: int, bulk_limit: int = 0) -> list[Claim]:
        """Lease up to ``limit`` due jobs that nobody holds; of those, up to ``bulk_limit`` from the bulk lane, taken
        only when no interactive job is left waiting."""

    async def renew(self, job_ids: Sequence[str]) -> Renewal:
        """Extend the leases of the jobs this worker runs; re-take a lease that lapsed while nobody took it."""

    async def finish(self, job_id: str, delivery: Delivery | None, usage: KeyUsage | None = None) -> bool:
        """Remove the job, deliver its answer and account its API key's ``usage``, unless another worker holds it
        now (then False, nothing done)."""

    async def hand_back(self, job_ids: Sequence[str], count_try: bool) -> None:
        """Give held jobs back to the queue at once. A shutdown does not count the try; an engine failure does (the
        job may be what killed the engine, and ``max_tries`` must stop it)."""

    async def listen(self, on_job: Callable[[], None], on_abort: Callable[[str], None]) -> None:
        """Call ``on_job`` when work may be waiting and ``on_abort(job_id)`` when a client cancels; runs until
        cancelled, raising on a lost connection (the caller retries)."""
