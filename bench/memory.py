"""Memory of the serving processes under a long run: RSS at idle and after every 10,000 requests.

    uv run --frozen --extra cpu python -m bench.memory [--requests 100000] [--step 10000] [--concurrency 16]

The stack: a redis-server, one gateway, a fake embedding worker and a fake chat worker (free engines, so the run is
all queue path). Each step sends ``--step`` requests from ``--concurrency`` clients, a third each of single-text
embeddings, chat answered at once and streamed chat (20 tokens), then waits until nothing is in flight and reads
every process's RSS (``VmRSS``). Prints one row per step, and each process's growth per 10,000 requests fitted over
the steps after the first (the first holds one-off allocations: imports on first use, pools, caches filling).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from pathlib import Path
from typing import Any

from bench.common import closed_loop, machine, stack, table
from conveyor.contract import QueueBackend

EMBED, CHAT = "memory-embed", "memory-chat"
MESSAGES = [{"role": "user", "content": "count to twenty"}]
#: (path, body) of each kind of request a step sends, in equal shares
CHAT_BODY: dict[str, Any] = {"model": CHAT, "messages": MESSAGES, "max_tokens": 20, "ignore_eos": True}
TRAFFIC: list[tuple[str, dict[str, Any]]] = [
    ("/v1/embeddings", {"model": EMBED, "input": "a sentence to embed", "encoding_format": "float"}),
    ("/v1/chat/completions", CHAT_BODY),
    ("/v1/chat/completions", {**CHAT_BODY, "stream": True}),
]


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise LookupError(f"no VmRSS for pid {pid}")


async def step(base_url: str, requests: int, concurrency: int) -> int:
    """``requests`` requests, a share of each kind of ``TRAFFIC`` at once; returns how many were answered."""
    kinds = len(TRAFFIC)
    loads = [
        closed_loop(base_url, path, body, float("inf"), max(1, concurrency // kinds), requests=share)
        for share, (path, body) in zip(shares(requests, kinds), TRAFFIC, strict=True)
    ]
    return sum(len(loaded.latencies) for loaded in await asyncio.gather(*loads))


def shares(total: int, parts: int) -> list[int]:
    return [total // parts + (i < total % parts) for i in range(parts)]


def slope_per_10k(counts: list[int], values: list[float]) -> float:
    """MiB per 10,000 requests: the least-squares slope of ``values`` over ``counts``."""
    return statistics.linear_regression(counts, values).slope * 10_000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=100_000)
    parser.add_argument("--step", type=int, default=10_000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--backend", type=QueueBackend, choices=list(QueueBackend), default=None)
    args = parser.parse_args()
    with stack([EMBED, CHAT], backend=args.backend) as running:
        embed = running.worker(EMBED, "--engine", "fake", "--task", "embed")
        chat = running.worker(CHAT, "--engine", "fake", "--task", "generate")
        pids = {"gateway": running.children[0].pid, "embedding worker": embed.pid, "chat worker": chat.pid}
        pids["redis"] = running.redis_pid
        counts = [0]
        samples = {name: [rss_mib(pid)] for name, pid in pids.items()}
        started = time.monotonic()
        while counts[-1] < args.requests:
            counts.append(counts[-1] + asyncio.run(step(running.base_url, args.step, args.concurrency)))
            for name, pid in pids.items():
                samples[name].append(rss_mib(pid))
            print(f"{counts[-1]:,} requests, {time.monotonic() - started:.0f} s", flush=True)
    backend = args.backend.value if args.backend else "the default queue backend"
    print(f"\nRSS in MiB, {backend}, {machine()}; step 0 is at idle, before the first request")
    rows = [[f"{count:,}", *(f"{samples[name][i]:.1f}" for name in pids)] for i, count in enumerate(counts)]
    print(table(["requests", *pids], rows))
    growth = [f"{slope_per_10k(counts[1:], samples[name][1:]):+.2f}" for name in pids]
    print("\nGrowth per 10,000 requests after the first step, MiB (least squares):")
    print(table(list(pids), [growth]))


if __name__ == "__main__":
    main()
