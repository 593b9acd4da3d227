"""Where Redis's own CPU per request goes: the queue path's three scripts, each run on its own, with the real classes.

    uv run --frozen --extra cpu python -m bench.redis_script_cost [--jobs 5000] [--group 5]

A real redis-server on loopback, a worker's registry entry and card as a serving worker beats them, and then, in
blocks of 20 (a lane's length at 16 clients), embedding jobs go the whole way:

- admitted by the gateway's ``ArqJobQueue.submit`` (the admission script, ``--group`` requests at a time through its
  pipeliner, as concurrent requests go);
- claimed by the worker's ``ArqJobSource.claim`` (the claim script, ``--group`` jobs a claim, as a batch is taken);
- finished by its ``finish`` with an answer (the finish script, pipelined in groups).

Around each step the redis-server's main thread's time on the CPU is read (``/proc/<pid>/schedstat``, in ns), and INFO
commandstats splits it into the commands the scripts ran inside (what Redis would spend executing them if a client
sent them one by one); "Lua and arguments", the script calls' time beyond those commands (the Lua machinery, KEYS and
ARGV, the replies); and the rest: the socket, parsing the requests, the event loop.

Two more rows give the price of the Lua machinery, sent as the admissions are: a script that runs no command, and the
same with 10 ``EXISTS`` (one ``redis.call`` costs a tenth of the difference). No worker subscribes to the wake-up
channel here, so the admission's PUBLISH reaches nobody; on a live stack it also writes to the worker's socket.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path

import uvloop
from redis.asyncio import Redis

from bench.common import machine, table
from conveyor import contract, key_layout, redis_client, registry
from conveyor.contract import JobEnvelope, JobKind
from conveyor.pipeliner import Pipeliner
from gateway.arq_queue import ArqJobQueue
from gateway.directory import ModelDirectory
from gateway.settings import GatewaySettings
from launcher import redis_server
from worker.arq_source import ArqJobSource
from worker.job_source import Delivery

MODEL = "bench-embed"
WORKER_ID = "bench-worker"
#: a fake engine's answer to one short text, about the size the fake worker delivers
#: jobs admitted, then claimed, then finished, at a time (a live lane holds a few dozen)
BLOCK = 20
ANSWER = contract.json_bytes({"object": "list", "data": [{"embedding": [0.1] * 32, "index": 0}], "model": MODEL})


#: what the measuring itself sends
IGNORED = {"cmdstat_config", "cmdstat_info"}


def on_cpu_ns(pid: int) -> int:
    """Nanoseconds a process's main thread has run (Redis runs its commands there)."""
    return int(Path(f"/proc/{pid}/schedstat").read_text().split()[0])


class Phase:
    """One step's Redis CPU and commandstats, added up over the blocks of jobs."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.cpu_ns = 0
        self.calls: Counter[str] = Counter()
        self.usec: Counter[str] = Counter()

    async def measure(self, redis: Redis, pid: int, work: Callable[[], Awaitable[object]]) -> None:
        await redis.config_resetstat()
        before = on_cpu_ns(pid)
        await work()
        self.cpu_ns += on_cpu_ns(pid) - before
        for name, stat in (await redis.info("commandstats")).items():
            if name not in IGNORED:
                self.calls[name] += stat["calls"]
                self.usec[name] += stat["usec"]

    def row(self, jobs: int) -> tuple[str, ...]:
        cpu = self.cpu_ns / 1000 / jobs
        script = self.usec["cmdstat_evalsha"] / jobs
        inner = (self.usec.total() - self.usec["cmdstat_evalsha"]) / jobs
        inner_calls = (self.calls.total() - self.calls["cmdstat_evalsha"]) / jobs
        return (
            self.name,
            f"{cpu:.1f}",
            f"{self.calls['cmdstat_evalsha'] / jobs:.2f}",
            f"{inner_calls:.1f}",
            f"{inner:.1f}",
            f"{script - inner:.1f}",
            f"{cpu - script:.1f}",
        )


async def in_groups(calls: list[Callable[[], Awaitable[object]]], group: int) -> None:
    for start in range(0, len(calls), group):
        await asyncio.gather(*(call() for call in calls[start : start + group]))


def envelopes(jobs: int) -> list[JobEnvelope]:
    return [
        JobEnvelope(
            request_id=uuid.uuid4().hex,
            reply_to="bench-gateway",
            model=MODEL,
            kind=JobKind.EMBEDDING,
            body={"model": MODEL, "input": "a sentence to embed"},
            deadline=time.time() + 600,
        )
        for _ in range(jobs)
    ]


async def measure(url: str, pid: int, jobs: int, group: int) -> list[tuple[str, ...]]:
    redis = redis_client.connect(url)
    worker = registry.WorkerInfo(
        worker_id=WORKER_ID,
        model=MODEL,
        capabilities=[contract.CAPABILITY_FOR_KIND[JobKind.EMBEDDING]],
        max_jobs=group,
        host="bench",
        pid=0,
        started=time.time(),
    )
    await registry.heartbeat(redis, worker, ttl=3600)
    settings = GatewaySettings()
    queue = ArqJobQueue(redis, settings, ModelDirectory(redis, settings))
    source = ArqJobSource(redis, MODEL, WORKER_ID, lease_seconds=30)
    inbox = key_layout.inbox_key("bench-gateway")
    admit, claim, finish = (
        Phase("admission (gateway)"),
        Phase(f"claim, {group} a claim (worker)"),
        Phase("finish with the answer (worker)"),
    )
    for block in range(-1, jobs // BLOCK):  # block -1: a warm-up, not counted
        admissions = [lambda e=e: queue.submit(e) for e in envelopes(BLOCK)]
        ids: list[str] = []

        async def claim_block(ids: list[str] = ids) -> None:
            while len(ids) < BLOCK:
                ids.extend(taken.job_id for taken in await source.claim(group))

        phases = (admit, claim, finish) if block >= 0 else (Phase(""), Phase(""), Phase(""))
        await phases[0].measure(redis, pid, lambda admissions=admissions: in_groups(admissions, group))
        await phases[1].measure(redis, pid, claim_block)
        finishes = [lambda i=i: source.finish(i, Delivery(inbox, ANSWER)) for i in ids]
        await phases[2].measure(redis, pid, lambda finishes=finishes: in_groups(finishes, group))
        await redis.delete(inbox)
    counted = jobs // BLOCK * BLOCK
    rows = [phase.row(counted) for phase in (admit, claim, finish)]
    empty = redis.register_script("return 0")
    tenfold = redis.register_script("for i = 1, 10 do redis.call('EXISTS', KEYS[1]) end return 0")
    keys, args, pipeliner = [f"k{i}" for i in range(6)], list(range(10)), Pipeliner(redis)
    for name, script in (("a script with no command (6 keys)", empty), ("the same with 10 EXISTS", tenfold)):
        calls = [lambda script=script: pipeliner.call(script, keys, args)] * counted
        phase = Phase(name)
        await phase.measure(redis, pid, lambda calls=calls: in_groups(calls, group))
        rows.append(phase.row(counted))
    await redis_client.close(redis)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=5000)
    parser.add_argument("--group", type=int, default=5, help="requests admitted together; jobs a claim takes")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        port = redis_server.free_port()
        server = redis_server.start(port, Path(tmp))
        try:
            rows = uvloop.run(measure(f"redis://127.0.0.1:{port}/0", server.pid, args.jobs, args.group))
        finally:
            server.terminate()
            server.wait(10)
    print(f"Redis's own CPU per job (per call in the last two rows), {args.jobs} jobs; {machine()}\n")
    headers = [
        "step",
        "Redis CPU, us",
        "scripts",
        "commands inside",
        "their CPU, us",
        "Lua and arguments, us",
        "socket and the rest, us",
    ]
    print(table(headers, rows))
    total = sum(float(row[1]) for row in rows[:3])
    print(f"\nadmission + claim + finish: {total:.1f} us of Redis CPU per job")


if __name__ == "__main__":
    main()
