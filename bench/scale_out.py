"""Scale-out: 1, 2 and 4 workers on one model's queue, and where the queue itself becomes the ceiling.

    uv run --frozen --extra cpu python -m bench.scale_out [--seconds 10] [--concurrency 64] [--real]

Each row is a fresh stack (Redis, one gateway, N workers of one model) under ``--concurrency`` closed-loop clients
sending single-text embeddings. Rows:

- a compute-bound fake engine (``CONVEYOR_WORKER_FAKE_CPU_PER_INPUT``: each input burns that much CPU in the worker,
  as an engine's step would), 1/2/4 workers: how throughput grows with workers, on this machine's two cores;
- a fake engine that costs nothing, 1/2/4 workers: the queue path's own ceiling (gateway, Redis, claims), since
  more workers cannot add anything there;
- with ``--real``: all-MiniLM-L6-v2 on vLLM, one worker on both cores against two workers on one core each.

"workers CPU" is the worker processes' own (claims, vLLM's front end); a real engine's compute runs in vLLM's
engine processes and is not in it.

Per row: requests/s, speed-up over one worker, latency, and the CPU each part used (share of one core), which says
what the ceiling is.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from dataclasses import dataclass

from bench.common import closed_loop, cpu_seconds, machine, ms, percentile, stack, table
from worker.model_prep import MINILM

FAKE = "scale-embed"
TEXT = "a sentence to embed for the scale-out benchmark, thirty-two tokens long or thereabouts in all"


@dataclass
class Row:
    engine: str
    workers: int
    rate: float
    p50: float
    p95: float
    cpu: dict[str, float]  # part -> cores used on average


async def load(base_url: str, model: str, seconds: float, concurrency: int) -> list[float]:
    body = {"model": model, "input": TEXT, "encoding_format": "float"}
    return (await closed_loop(base_url, "/v1/embeddings", body, seconds, concurrency)).latencies


def measure(
    label: str, model: str, worker_args: list[list[str]], envs: list[dict[str, str]], seconds: float, concurrency: int
) -> Row:
    with stack([model]) as running:
        workers = [
            running.worker(model, *args, env=env, timeout=900) for args, env in zip(worker_args, envs, strict=True)
        ]
        asyncio.run(load(running.base_url, model, 2, concurrency))  # warm-up
        pids = {"gateway": [running.children[0].pid], "Redis": [running.redis_pid], "workers": [w.pid for w in workers]}
        before = {part: sum(cpu_seconds(p) for p in group) for part, group in pids.items()}
        started = time.monotonic()
        latencies = asyncio.run(load(running.base_url, model, seconds, concurrency))
        elapsed = time.monotonic() - started
        used = {part: (sum(cpu_seconds(p) for p in group) - before[part]) / elapsed for part, group in pids.items()}
    return Row(
        label, len(workers), len(latencies) / elapsed, percentile(latencies, 50), percentile(latencies, 95), used
    )


def fake_rows(cpu_per_input: float, seconds: float, concurrency: int) -> list[Row]:
    label = f"fake, {cpu_per_input * 1000:g} ms CPU per input" if cpu_per_input else "fake, no engine cost"
    args = ["--engine", "fake", "--task", "embed"]
    env = {"CONVEYOR_WORKER_FAKE_CPU_PER_INPUT": str(cpu_per_input)}
    return [measure(label, FAKE, [args] * n, [env] * n, seconds, concurrency) for n in (1, 2, 4)]


def real_rows(seconds: float, concurrency: int) -> list[Row]:
    """One worker whose engine binds both cores, then two whose engines bind one core each."""
    args, label = ["--task", "embed"], "vLLM MiniLM, the 2 cores split among the workers"
    one = measure(label, MINILM, [args], [_bind("0-1")], seconds, concurrency)
    two = measure(label, MINILM, [args, args], [_bind("0"), _bind("1")], seconds, concurrency)
    return [one, two]


def _bind(cores: str) -> dict[str, str]:
    return {"CONVEYOR_WORKER_CPU_THREADS_BIND": cores}


def report(rows: list[Row], concurrency: int) -> str:
    base = {row.engine: row.rate for row in rows if row.workers == 1}
    cells = [
        [
            row.engine,
            row.workers,
            f"{row.rate:.0f}",
            f"{row.rate / base[row.engine]:.2f}x" if row.engine in base else "-",
            ms(row.p50),
            ms(row.p95),
            *(f"{100 * row.cpu[part]:.0f}%" for part in ("gateway", "Redis", "workers")),
        ]
        for row in rows
    ]
    headers = ["engine", "workers", "requests/s", "vs 1 worker", "p50 ms", "p95 ms", "gateway CPU", "Redis CPU"]
    headers.append("workers CPU")
    title = f"Scale-out, {concurrency} clients, single-text embeddings; {machine()}; CPU in % of one core"
    return f"{title}\n\n{table(headers, cells)}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--cpu-per-input", type=float, default=0.004, help="the compute-bound fake's CPU s per input")
    parser.add_argument("--real", action="store_true", help="also the real engine: 1 worker on 2 cores vs 2 on 1 each")
    args = parser.parse_args()
    rows = fake_rows(args.cpu_per_input, args.seconds, args.concurrency)
    rows += fake_rows(0.0, args.seconds, args.concurrency)
    if args.real:
        rows += real_rows(args.seconds, args.concurrency)
    print(report(rows, args.concurrency))


if __name__ == "__main__":
    main()
