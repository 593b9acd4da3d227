"""The worker's consumer loop: claim jobs from a ``JobSource``, run each in a task, keep their leases alive, finish
them, and ride out Redis outages.

- Jobs start on a wake-up from the gateway (published in the same script that enqueues them); a timer
  (``poll_delay``) covers lost wake-ups and jobs whose worker was lost.
- While a job runs its lease is renewed every ``renew_interval``; a job another worker took over (our lease lapsed)
  is stopped without answering, a job its client cancelled is stopped and removed.
- A Redis error never ends the loop: each loop backs off and retries, the outage is logged once, running jobs go on,
  and an answer that cannot be delivered is retried until Redis is back or its deadline passed.
- ``drain`` (SIGTERM) stops claiming, lets running jobs finish for a grace period and hands the rest back;
  ``fail`` (a dead engine) hands everything back at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from enum import Enum

from conveyor.outage import REDIS_DOWN, Outage
from worker.job_source import Claim, Delivery, JobSource
from worker.key_usage import KeyUsage

log = logging.getLogger("conveyor.worker")


@dataclass(frozen=True, slots=True)
class Done:
    """What running a job produced: the answer to deliver (non-streamed jobs), until when anyone waits for it, and
    what it used of its API key."""

    deadline: float
    delivery: Delivery | None = None
    usage: KeyUsage | None = None


class EngineDead(Exception):
    """The engine died under a job: the job is handed back, not answered, and the worker stops."""


class LeaseLost(Exception):
    """Another worker holds the job now (found while sending its stream): stop it here without answering."""


Handler = Callable[[Claim], Awaitable[Done]]
#: a drain waits this long for a claim on its way to come back (a blocking claim waits at most a second in Redis)
CLAIM_RETURN_SECONDS = 5.0


class _Stop(Enum):
    ABORTED = "aborted"  # the client cancelled: remove the job
    LOST = "lost"  # another worker holds it now: leave it alone
    HAND_BACK = "hand_back"  # shutdown or engine failure: give it back to the queue


class Consumer:
    def __init__(
        self,
        source: JobSource,
        handler: Handler,
        *,
        max_jobs: int,
        poll_delay: float,
        renew_interval: float,
        outage: Outage,
        bulk_jobs: int = 0,
    ) -> None:
        self.source = source
        self.handler = handler
        self.max_jobs = max_jobs
        #: batch chunks this worker runs at once, within ``max_jobs`` (0: it takes none)
        self.bulk_jobs = bulk_jobs
        self._bulk: set[str] = set()
        self.poll_delay = poll_delay
        self.renew_interval = renew_interval
        self.outage = outage
        self.tasks: dict[str, asyncio.Task[None]] = {}
        self._stops: dict[str, _Stop] = {}
        self._wake = asyncio.Event()
        self._claiming = True
        self._finished = asyncio.Event()
        self._polling: asyncio.Task[None] | None = None
        self.engine_dead = False

    @property
    def running(self) -> int:
        return len(self.tasks)

    def wake(self) -> None:
        self._wake.set()

    def abort(self, job_id: str) -> None:
        self._stop(job_id, _Stop.ABORTED)

    # --- the loops ------------------------------------------------------------------------------------------------

    async def run(self) -> None:
        """Serve until ``drain`` or ``fail`` has finished."""
        self._polling = asyncio.create_task(self._poll_forever(), name="poll")
        loops = [
            self._polling,
            asyncio.create_task(self._renew_forever(), name="renew"),
            asyncio.create_task(self._listen_forever(), name="wake-ups"),
        ]
        try:
            await self._finished.wait()
        finally:
            for loop in loops:
                loop.cancel()
            await asyncio.gather(*loops, return_exceptions=True)

    async def _poll_forever(self) -> None:
        while self._claiming:
            if not (self.source.blocks and len(self.tasks) < self.max_jobs):
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.poll_delay):
                        await self._wake.wait()
            self._wake.clear()  # before claiming: a wake-up during the claim triggers another one
            free = self.max_jobs - len(self.tasks)
            if free <= 0 or not self._claiming:
                continue
            try:
                claims = await self.source.claim(free, max(self.bulk_jobs - len(self._bulk), 0))
            except REDIS_DOWN as exc:
                await asyncio.sleep(self.outage.failed(exc))
                self._wake.set()
                continue
            self.outage.ok()
            if not self._claiming and claims:  # a drain began while the claim waited: these go straight back
                await self._give_back([c.job_id for c in claims], count_try=False)
                return
            for claim in claims:
                self._start(claim)
            if len(claims) == free:
                self._wake.set()  # more may be waiting for the next free slot

    async def _renew_forever(self) -> None:
        while True:
            await asyncio.sleep(self.renew_interval)
            if not self.tasks:
                continue
            try:
                renewal = await self.source.renew(list(self.tasks))
            except REDIS_DOWN as exc:
                self.outage.failed(exc)
                continue
            self.outage.ok()
            for job_id in renewal.lost:
                log.warning("job %s: lease lost to another worker; stopping it here", job_id)
                self._stop(job_id, _Stop.LOST)
            for job_id in renewal.aborted:
                self._stop(job_id, _Stop.ABORTED)

    async def _listen_forever(self) -> None:
        while True:
            try:
                await self.source.listen(self.wake, self.abort)
            except REDIS_DOWN as exc:
                await asyncio.sleep(self.outage.failed(exc))

    # --- one job ----------------------------------------------------------------------------------------------------

    def _start(self, claim: Claim) -> None:
        task = asyncio.create_task(self._run(claim), name=f"job-{claim.job_id}")
        self.tasks[claim.job_id] = task
        if claim.bulk:
            self._bulk.add(claim.job_id)
        task.add_done_callback(lambda _: self._done(claim.job_id))

    def _done(self, job_id: str) -> None:
        was_full = len(self.tasks) >= self.max_jobs or job_id in self._bulk
        self.tasks.pop(job_id, None)
        self._stops.pop(job_id, None)
        self._bulk.discard(job_id)
        if was_full:  # jobs may be waiting for this slot: look now, not at the next timer tick
            self._wake.set()

    def _stop(self, job_id: str, why: _Stop) -> None:
        task = self.tasks.get(job_id)
        if task is not None and not task.done() and job_id not in self._stops:
            self._stops[job_id] = why
            task.cancel()

    async def _run(self, claim: Claim) -> None:
        try:
            done = await self.handler(claim)
        except asyncio.CancelledError:
            if self._stops.get(claim.job_id) is _Stop.ABORTED:
                await self._finish(claim.job_id, Done(time.time() + self.source.lease_seconds))
            return  # LOST: not ours; HAND_BACK: given back in bulk by whoever stopped it
        except EngineDead:
            self._stops[claim.job_id] = _Stop.HAND_BACK
            self.fail()
            return
        except LeaseLost:
            log.warning("job %s: another worker holds it now; stopping it here", claim.job_id)
            return
        except Exception as exc:  # a stream whose frames could not be published: nobody can be told any more
            log.warning("job %s: could not be answered (%s: %s)", claim.job_id, type(exc).__name__, exc)
            done = Done(time.time() + self.source.lease_seconds)
        await self._finish(claim.job_id, done)

    async def _finish(self, job_id: str, done: Done) -> None:
        """Finish the job, retrying through a Redis outage until its answer is delivered or nobody waits for it."""
        while True:
            try:
                if not await self.source.finish(job_id, done.delivery, done.usage):
                    log.warning("job %s: another worker took it over; its answer counts, not this one", job_id)
                elif done.usage is not None:
                    done.usage.record_metrics()
                self.outage.ok()
                return
            except REDIS_DOWN as exc:
                delay = self.outage.failed(exc)
                if time.time() + delay > done.deadline:
                    log.warning("job %s: its answer could not be delivered before its deadline", job_id)
                    return
                await asyncio.sleep(delay)

    # --- stopping ---------------------------------------------------------------------------------------------------

    async def drain(self, grace: float) -> None:
        """Stop claiming, let running jobs finish for ``grace`` seconds, then hand the rest back."""
        self._claiming = False
        self._wake.set()
        if self._polling is not None:  # a claim on its way (one that waits inside Redis) comes back, or goes back
            await asyncio.wait([self._polling], timeout=CLAIM_RETURN_SECONDS)
        if self.tasks:
            log.info("draining: %d running jobs get %.0f s to finish", len(self.tasks), grace)
            await asyncio.wait(list(self.tasks.values()), timeout=grace)
        await self._hand_back_all()

    def fail(self) -> None:
        """The engine is dead: hand every held job back at once and stop."""
        if not self.engine_dead:
            self.engine_dead = True
            self._claiming = False
            asyncio.get_running_loop().create_task(self._hand_back_all())

    async def _hand_back_all(self) -> None:
        held = list(self.tasks)
        for job_id in held:
            self._stop(job_id, _Stop.HAND_BACK)
        if self.tasks:
            await asyncio.wait(list(self.tasks.values()))
        if held:  # jobs that finished meanwhile or were taken over hold no lease of ours: handing them back is a no-op
            await self._give_back(held, count_try=self.engine_dead)
        self._finished.set()

    async def _give_back(self, job_ids: list[str], count_try: bool) -> None:
        try:
            await self.source.hand_back(job_ids, count_try=count_try)
            log.info("handed %d jobs back to the queue", len(job_ids))
        except REDIS_DOWN:  # their leases lapse on their own and another worker takes them
            log.warning("could not hand %d jobs back (Redis unreachable); their leases will lapse", len(job_ids))
