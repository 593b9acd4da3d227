"""The worker's consumer loop against a scripted job source: outages, aborts, drains."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

from conveyor.outage import Outage
from worker.consumer import Consumer, Done
from worker.job_source import Claim, Delivery, Renewal
from worker.key_usage import KeyUsage


class ScriptedSource:
    """A job source holding a list of jobs; ``failures`` calls of each kind raise a lost connection first."""

    lease_seconds = 1.0
    blocks = False

    def __init__(self, jobs: list[str], failures: int = 0) -> None:
        self.waiting = list(jobs)
        self.failures = failures
        self.finished: list[str] = []
        self.handed_back: list[str] = []
        self.aborted: set[str] = set()

    def _maybe_fail(self) -> None:
        if self.failures > 0:
            self.failures -= 1
            raise RedisConnectionError("connection refused")

    async def claim(self, limit: int, bulk_limit: int = 0) -> list[Claim]:
        self._maybe_fail()
        taken, self.waiting = self.waiting[:limit], self.waiting[limit:]
        return [Claim(job_id, {}, 1) for job_id in taken]

    async def renew(self, job_ids: Sequence[str]) -> Renewal:
        return Renewal(aborted=[j for j in job_ids if j in self.aborted])

    async def finish(self, job_id: str, delivery: Delivery | None, usage: KeyUsage | None = None) -> bool:
        self._maybe_fail()
        self.finished.append(job_id)
        return True

    async def hand_back(self, job_ids: Sequence[str], count_try: bool) -> None:
        self.handed_back += job_ids

    async def listen(self, on_job: Callable[[], None], on_abort: Callable[[str], None]) -> None:
        await asyncio.Event().wait()


def consumer(source: ScriptedSource, handler: Callable[[Claim], object], outage: Outage | None = None) -> Consumer:
    return Consumer(
        source,
        handler,  # type: ignore[arg-type]
        max_jobs=4,
        poll_delay=0.01,
        renew_interval=0.02,
        outage=outage or Outage(logging.getLogger("test"), "test"),
    )


async def until(condition: Callable[[], bool]) -> None:
    async with asyncio.timeout(5):
        while not condition():  # noqa: ASYNC110 - a bounded poll of state the loop under test owns
            await asyncio.sleep(0.005)


async def test_jobs_are_run_and_finished_through_an_outage(caplog: pytest.LogCaptureFixture) -> None:
    source = ScriptedSource(["a", "b", "c"], failures=5)
    outage = Outage(logging.getLogger("conveyor.test"), "worker")

    async def handler(claim: Claim) -> Done:
        return Done(time.time() + 30)

    loop = consumer(source, handler, outage)
    running = asyncio.create_task(loop.run())
    with caplog.at_level(logging.WARNING):
        await until(lambda: sorted(source.finished) == ["a", "b", "c"])
    assert outage.outages == 1 and not outage.down
    assert [r.message for r in caplog.records].count(
        "worker: Redis unreachable (ConnectionError); retrying until it is back"
    ) == 1
    await loop.drain(1)
    await running


async def test_an_aborted_job_is_stopped_and_removed() -> None:
    source = ScriptedSource(["slow"])
    started = asyncio.Event()

    async def handler(claim: Claim) -> Done:
        started.set()
        await asyncio.sleep(30)
        return Done(time.time() + 30)

    loop = consumer(source, handler)
    running = asyncio.create_task(loop.run())
    await started.wait()
    source.aborted.add("slow")  # seen by the next renewal, as a marker whose wake-up was lost would be
    await until(lambda: source.finished == ["slow"])
    assert loop.running == 0
    await loop.drain(1)
    await running


async def test_drain_lets_short_jobs_finish_and_hands_long_ones_back() -> None:
    source = ScriptedSource(["short", "long"])

    async def handler(claim: Claim) -> Done:
        await asyncio.sleep(0.05 if claim.job_id == "short" else 30)
        return Done(time.time() + 30)

    loop = consumer(source, handler)
    running = asyncio.create_task(loop.run())
    await until(lambda: loop.running == 2)
    await loop.drain(grace=0.5)
    await running
    assert source.finished == ["short"]
    assert "long" in source.handed_back


class BlockingSource(ScriptedSource):
    """A source whose claim waits for work (as Redis Streams' ``XREADGROUP BLOCK`` does) until ``arrive`` is set."""

    blocks = True

    def __init__(self) -> None:
        super().__init__([])
        self.arrive = asyncio.Event()
        self.claims = 0

    async def claim(self, limit: int, bulk_limit: int = 0) -> list[Claim]:
        self.claims += 1
        await self.arrive.wait()
        self.arrive.clear()
        return await super().claim(limit, bulk_limit)


async def test_a_blocking_source_is_claimed_from_again_at_once_and_a_claim_ending_in_a_drain_goes_back() -> None:
    source = BlockingSource()
    worker = consumer(source, lambda claim: asyncio.sleep(0, Done(time.time() + 5)))
    worker.poll_delay = 3600.0  # a wake-up timer would never fire within this test: the claims cannot wait on it
    run = asyncio.create_task(worker.run())
    source.waiting = ["a"]
    source.arrive.set()
    await until(lambda: source.finished == ["a"] and source.claims == 2)
    drained = asyncio.create_task(worker.drain(grace=1))
    await until(lambda: not worker._claiming)
    source.waiting = ["late"]  # claimed while the drain began: nobody may run it here
    source.arrive.set()
    await drained
    await run
    assert source.handed_back == ["late"] and source.finished == ["a"]
