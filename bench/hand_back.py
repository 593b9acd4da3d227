"""How long a handed-back job (a drain, a dead engine) waits before another worker takes it up, on each backend.

    uv run --frozen --extra cpu python -m bench.hand_back [--jobs 20]

A real redis-server and the two backends' own sources in this process: worker A claims a job and hands it back while
worker B is already waiting in its claim loop (on arq, claiming on each wake-up; on Redis Streams, blocked in
``XREADGROUP``); printed is the time from the hand-back to B's claim returning the job.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

from bench.common import machine, ms, table
from conveyor import redis_client, registry
from conveyor.contract import JobEnvelope, JobKind, QueueBackend
from gateway.directory import ModelDirectory
from gateway.queue_backends import BACKENDS
from gateway.settings import GatewaySettings
from launcher import redis_server
from worker.job_source import JobSource
from worker.queue_backends import open_source

MODEL = "hand-back"
LEASE_SECONDS = 6.0
#: B is waiting in its claim by then
SETTLE_SECONDS = 0.3


async def claimed(source: JobSource) -> float:
    """Claim until a job comes (a blocking source waits in Redis; arq's claims as a woken worker would)."""
    while not await source.claim(1):
        if not source.blocks:
            await asyncio.sleep(0.001)
    return time.perf_counter()


async def waits(backend: QueueBackend, url: str, jobs: int) -> list[float]:
    redis = redis_client.connect(url)
    try:
        settings = GatewaySettings(models=[MODEL])
        worker = registry.WorkerInfo(worker_id="w", model=MODEL, capabilities=["generate"], max_jobs=8, host="h",
                                     pid=1, started=time.time(), queue_backend=backend)  # fmt: skip
        await registry.heartbeat(redis, worker, ttl=600)
        queue = BACKENDS[backend](redis, settings, ModelDirectory(redis, settings))
        a, b = (open_source(backend, redis, MODEL, name, LEASE_SECONDS) for name in ("A", "B"))
        found = []
        for i in range(jobs):
            body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
            envelope = JobEnvelope(request_id=f"job{i}", reply_to="gw", model=MODEL, kind=JobKind.CHAT, body=body,
                                   deadline=time.time() + 60)  # fmt: skip
            await queue.submit(envelope)
            assert await a.claim(1), "A claimed nothing"
            waiting = asyncio.create_task(claimed(b))
            await asyncio.sleep(SETTLE_SECONDS)
            handed = time.perf_counter()
            await a.hand_back([envelope.request_id], count_try=False)
            found.append(await waiting - handed)
            await b.finish(envelope.request_id, None)
        return found
    finally:
        await redis_client.close(redis)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=20)
    args = parser.parse_args()
    rows = []
    for backend in QueueBackend:
        with tempfile.TemporaryDirectory() as tmp:
            port = redis_server.free_port()
            server = redis_server.start(port, Path(tmp))
            try:
                found = asyncio.run(waits(backend, f"redis://127.0.0.1:{port}/0", args.jobs))
            finally:
                server.terminate()
                server.wait(10)
        rows.append([backend.value, args.jobs, ms(statistics.median(found)), ms(max(found))])
    print(f"From a hand-back to another worker's claim; {machine()}\n")
    print(table(["backend", "jobs", "median ms", "max ms"], rows))


if __name__ == "__main__":
    main()
