"""Several models on one Redis against the same models on a Redis Cluster of three shards (Redis Streams backend).

    uv run --frozen --extra cpu python -m bench.shards [--models 6] [--shards 3] [--seconds 8] [--concurrency 64]
        [--rounds 3] [--pin]

Each row is a fresh stack: Redis (one server, or ``--shards`` masters), one gateway, one worker per model with a
fake engine that costs nothing (a free engine: the queue path's own ceiling), and ``--concurrency`` closed-loop
clients sending single-text embeddings, spread evenly over the models. The two layouts take turns, round after
round (the median round's rate is shown), so a machine whose speed drifts favours neither.

"Redis CPU" adds up every redis-server; "busiest shard" is the largest share of that CPU one server used: on one
Redis it is all of it, on a cluster whose models spread evenly it would be 1/shards. "requests/s per Redis core" is
what the busiest server's CPU per request allows (the rate at which it would be the wall), which is how a cluster's
ceiling grows with its shards. With ``--pin`` every redis-server runs on core 1 and the rest on core 0.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
from dataclasses import dataclass

import redis
from redis.crc import key_slot

from bench.common import Stack, closed_loop, cpu_seconds, machine, ms, percentile, pin, stack, table
from conveyor import key_layout
from conveyor.contract import QueueBackend

TEXT = "a sentence to embed for the shards benchmark, thirty-two tokens long or thereabouts in all"


@dataclass
class Row:
    shards: int
    models: int
    models_per_shard: list[int]
    requests: int
    rate: float
    p50: float
    p95: float
    gateway_cpu: float  # cores
    redis_cpu: list[float]  # cores, per server
    commands: list[int]  # per server


async def load(base_url: str, models: list[str], seconds: float, concurrency: int) -> list[float]:
    per_model = max(concurrency // len(models), 1)
    runs = [closed_loop(base_url, "/v1/embeddings", {"model": m, "input": TEXT}, seconds, per_model) for m in models]
    return [latency for loaded in await asyncio.gather(*runs) for latency in loaded.latencies]


def placement(running: Stack, models: list[str]) -> list[int]:
    """How many of the models each server holds (the server that owns the model's hash tag's slot)."""
    if len(running.redis_ports) == 1:
        return [len(models)]
    counts = dict.fromkeys(running.redis_ports, 0)
    with redis.Redis(port=running.redis_ports[0]) as client:
        slots = client.execute_command("CLUSTER SLOTS")
    for model in models:
        slot = key_slot(key_layout.model_card_key(model).encode())
        owner = next(int(m[1]) for start, end, m, *_ in slots if int(start) <= slot <= int(end))
        counts[owner] += 1
    return list(counts.values())


def measure(shards: int, models: list[str], seconds: float, concurrency: int, pinned: bool) -> Row:
    with stack(models, backend=QueueBackend.STREAMS, shards=shards) as running:
        workers = [running.worker(model, "--engine", "fake", "--task", "embed") for model in models]
        if pinned:
            for pid in (os.getpid(), running.children[0].pid, *(w.pid for w in workers)):
                pin(pid, {0})
            for pid in running.redis_pids:
                pin(pid, {1})
        asyncio.run(load(running.base_url, models, 2, concurrency))  # warm-up
        gateway = running.children[0].pid
        cpu_before = [cpu_seconds(p) for p in (gateway, *running.redis_pids)]
        commands_before = running.node_commands()
        started = time.monotonic()
        latencies = asyncio.run(load(running.base_url, models, seconds, concurrency))
        elapsed = time.monotonic() - started
        cpu = [(cpu_seconds(p) - b) / elapsed for p, b in zip((gateway, *running.redis_pids), cpu_before, strict=True)]
        commands = [a - b for a, b in zip(running.node_commands(), commands_before, strict=True)]
        return Row(
            shards or 1,
            len(models),
            placement(running, models),
            len(latencies),
            len(latencies) / elapsed,
            percentile(latencies, 50),
            percentile(latencies, 95),
            cpu[0],
            cpu[1:],
            commands,
        )


def report(rows: list[Row], concurrency: int) -> str:
    cells = []
    for row in rows:
        redis_cpu = sum(row.redis_cpu)
        busiest = max(row.redis_cpu)
        cells.append(
            [
                "one Redis" if row.shards == 1 else f"cluster, {row.shards} shards",
                " / ".join(str(n) for n in row.models_per_shard),
                f"{row.rate:.0f}",
                ms(row.p50),
                ms(row.p95),
                f"{100 * row.gateway_cpu:.0f}%",
                f"{100 * redis_cpu:.0f}%",
                f"{100 * busiest / redis_cpu:.0f}%",
                f"{sum(row.commands) / row.requests:.1f}",
                f"{redis_cpu / row.rate * 1e6:.0f}",
                f"{row.rate / busiest:,.0f}",
            ]
        )
    headers = ["Redis", "models per shard", "requests/s", "p50 ms", "p95 ms", "gateway CPU", "Redis CPU (all)"]
    headers += ["busiest shard's share", "Redis commands/request", "Redis CPU us/request", "requests/s at the wall"]
    title = (
        f"Shards, {rows[0].models} models with one free-engine worker each, {concurrency} clients, single-text "
        f"embeddings, Redis Streams; {machine()}; CPU in % of one core"
    )
    return f"{title}\n\n{table(headers, cells)}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=int, default=6)
    parser.add_argument("--shards", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=8)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3, help="rounds per row, the median rate's is shown")
    parser.add_argument("--pin", action="store_true", help="every redis-server on core 1, the rest on core 0")
    args = parser.parse_args()
    models = [f"shard-embed-{i}" for i in range(args.models)]
    runs: dict[int, list[Row]] = {}
    for _ in range(args.rounds):
        for shards in (0, args.shards):
            runs.setdefault(shards, []).append(measure(shards, models, args.seconds, args.concurrency, args.pin))
    rows = [sorted(runs[s], key=lambda r: r.rate)[args.rounds // 2] for s in (0, args.shards)]
    print(report(rows, args.concurrency))


if __name__ == "__main__":
    main()
