"""Scale-out: 1, 2, 4 and 8 workers on one model's queue, on each queue backend, and what Redis does per request.

    uv run --frozen --extra cpu python -m bench.scale_out [--seconds 10] [--concurrency 64] [--workers 1 2 4 8]
        [--backend arq streams] [--cpu-per-input 0.004] [--real] [--pin [workers|redis]] [--rounds 3]

Each row is a fresh stack (Redis, one gateway, N workers of one model) under ``--concurrency`` closed-loop clients
sending single-text embeddings. Rows, for each backend:

- a fake engine that costs nothing (a free engine): the queue path's own ceiling (gateway, Redis, claims). More
  workers cannot add anything here; the question is whether they take anything away (on arq every enqueue wakes
  every worker of the model and each runs a claim; on Redis Streams one blocked ``XREADGROUP`` gets each entry);
- with ``--cpu-per-input`` above 0, a compute-bound fake engine (each input burns that much CPU in the worker, as
  an engine's step would): how throughput grows with workers on this machine's two cores;
- with ``--real``: all-MiniLM-L6-v2 on vLLM, one worker on both cores against two workers on one core each.

With ``--pin`` (free and compute-bound fakes only) the gateway, Redis and this load generator are bound to core 0 and
every worker to core 1, as workers on hosts of their own would be: then the workers' own CPU does not come out of
the gateway's, and a loss with more workers is the queue's, not the cores'. With ``--pin redis`` Redis has core 1 to
itself and everything else shares core 0, as a Redis on a host (or core) of its own would be: then what more workers
cost Redis does not come out of the gateway's core, and a loss is what they cost the gateway and each other.

"workers CPU" is the worker processes' own (claims, vLLM's front end); a real engine's compute runs in vLLM's
engine processes and is not in it. "Redis commands" counts every command Redis ran (``INFO commandstats``: a
script's own commands count beside its EVALSHA) per answered request, and "Redis CPU" is the redis-server process's
CPU per request; one Redis core then serves at most ``1 / Redis CPU`` requests a second.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
from dataclasses import dataclass

from bench.common import closed_loop, cpu_seconds, machine, ms, percentile, pin, stack, table
from conveyor.contract import QueueBackend
from worker.model_prep import MINILM

FAKE = "scale-embed"
TEXT = "a sentence to embed for the scale-out benchmark, thirty-two tokens long or thereabouts in all"


@dataclass
class Row:
    backend: QueueBackend
    engine: str
    workers: int
    requests: int
    rate: float
    p50: float
    p95: float
    cpu: dict[str, float]  # part -> cores used on average
    redis_commands: int


async def load(base_url: str, model: str, seconds: float, concurrency: int) -> list[float]:
    body = {"model": model, "input": TEXT, "encoding_format": "float"}
    return (await closed_loop(base_url, "/v1/embeddings", body, seconds, concurrency)).latencies


def measure(
    backend: QueueBackend,
    label: str,
    model: str,
    worker_args: list[list[str]],
    envs: list[dict[str, str]],
    seconds: float,
    concurrency: int,
    pinned: str | None = None,
) -> Row:
    with stack([model], backend=backend) as running:
        workers = [
            running.worker(model, *args, env=env, timeout=900) for args, env in zip(worker_args, envs, strict=True)
        ]
        if pinned:
            apart = [running.redis_pid] if pinned == "redis" else [w.pid for w in workers]
            for pid in [os.getpid(), running.children[0].pid, running.redis_pid, *(w.pid for w in workers)]:
                pin(pid, {1} if pid in apart else {0})
        asyncio.run(load(running.base_url, model, 2, concurrency))  # warm-up
        pids = {"gateway": [running.children[0].pid], "Redis": [running.redis_pid], "workers": [w.pid for w in workers]}
        before = {part: sum(cpu_seconds(p) for p in group) for part, group in pids.items()}
        commands = running.redis_commands()
        started = time.monotonic()
        latencies = asyncio.run(load(running.base_url, model, seconds, concurrency))
        elapsed = time.monotonic() - started
        used = {part: (sum(cpu_seconds(p) for p in group) - before[part]) / elapsed for part, group in pids.items()}
        commands = running.redis_commands() - commands
    return Row(
        backend,
        label,
        len(workers),
        len(latencies),
        len(latencies) / elapsed,
        percentile(latencies, 50),
        percentile(latencies, 95),
        used,
        commands,
    )


def fake_rows(
    backends: list[QueueBackend],
    cpu_per_input: float,
    counts: list[int],
    seconds: float,
    concurrency: int,
    pinned: str | None,
    rounds: int,
) -> list[Row]:
    """Per backend and worker count, the round with the median rate. The backends take turns at each count, round
    after round, so a machine whose speed drifts (shared hosts do) favours neither."""
    label = f"fake, {cpu_per_input * 1000:g} ms CPU per input" if cpu_per_input else "fake, free engine"
    label += f", {'Redis' if pinned == 'redis' else 'workers'} on core 1, the rest on core 0" if pinned else ""
    args = ["--engine", "fake", "--task", "embed"]
    env = {"CONVEYOR_WORKER_FAKE_CPU_PER_INPUT": str(cpu_per_input)}
    runs: dict[tuple[QueueBackend, int], list[Row]] = {}
    for _ in range(rounds):
        for n in counts:
            for backend in backends:
                row = measure(backend, label, FAKE, [args] * n, [env] * n, seconds, concurrency, pinned)
                runs.setdefault((backend, n), []).append(row)
    return [sorted(runs[b, n], key=lambda r: r.rate)[rounds // 2] for b in backends for n in counts]


def real_rows(backend: QueueBackend, seconds: float, concurrency: int) -> list[Row]:
    """One worker whose engine binds both cores, then two whose engines bind one core each."""
    args, label = ["--task", "embed"], "vLLM MiniLM, the 2 cores split among the workers"
    one = measure(backend, label, MINILM, [args], [_bind("0-1")], seconds, concurrency)
    two = measure(backend, label, MINILM, [args, args], [_bind("0"), _bind("1")], seconds, concurrency)
    return [one, two]


def _bind(cores: str) -> dict[str, str]:
    return {"CONVEYOR_WORKER_CPU_THREADS_BIND": cores}


def report(rows: list[Row], concurrency: int) -> str:
    base = {(row.backend, row.engine): row.rate for row in rows if row.workers == 1}
    cells = []
    for row in rows:
        one = base.get((row.backend, row.engine))
        redis_cpu = row.cpu["Redis"] / row.rate  # seconds of Redis CPU per request
        cells.append(
            [
                row.backend.value,
                row.engine,
                row.workers,
                f"{row.rate:.0f}",
                f"{row.rate / one:.2f}x" if one else "-",
                ms(row.p50),
                ms(row.p95),
                *(f"{100 * row.cpu[part]:.0f}%" for part in ("gateway", "Redis", "workers")),
                f"{row.redis_commands / row.requests:.1f}",
                f"{redis_cpu * 1e6:.0f}",
                f"{1 / redis_cpu:,.0f}",
            ]
        )
    headers = ["backend", "engine", "workers", "requests/s", "vs 1 worker", "p50 ms", "p95 ms", "gateway CPU"]
    headers += ["Redis CPU", "workers CPU", "Redis commands/request", "Redis CPU us/request"]
    headers.append("requests/s per Redis core")
    title = f"Scale-out, {concurrency} clients, single-text embeddings; {machine()}; CPU in % of one core"
    return f"{title}\n\n{table(headers, cells)}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4, 8], help="worker counts, one row each")
    parser.add_argument("--backend", nargs="+", choices=[b.value for b in QueueBackend], default=list(QueueBackend))
    parser.add_argument("--cpu-per-input", type=float, default=0.0, help="also a compute-bound fake: CPU s per input")
    parser.add_argument("--real", action="store_true", help="also the real engine: 1 worker on 2 cores vs 2 on 1 each")
    parser.add_argument(
        "--pin",
        nargs="?",
        const="workers",
        choices=["workers", "redis"],
        help="fakes: workers (or Redis) on core 1, everything else on core 0",
    )
    parser.add_argument("--rounds", type=int, default=1, help="fakes: rounds per row, the median rate's is shown")
    args = parser.parse_args()
    backends = [QueueBackend(b) for b in args.backend]
    shape = (args.workers, args.seconds, args.concurrency, args.pin, args.rounds)
    rows = fake_rows(backends, 0.0, *shape)
    if args.cpu_per_input:
        rows += fake_rows(backends, args.cpu_per_input, *shape)
    for backend in backends if args.real else []:
        rows += real_rows(backend, args.seconds, args.concurrency)
    print(report(rows, args.concurrency))


if __name__ == "__main__":
    main()
