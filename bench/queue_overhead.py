"""What the queue path adds: the same fake engine called in-process versus through gateway -> Redis -> worker.

    uv run --frozen --extra cpu python -m bench.queue_overhead [--requests 400] [--backend arq|streams]

Prints p50/p95/p99 per concurrency for chat (sync), chat (stream: time to first token) and embeddings, the added
p50/p95 (Conveyor minus in-process, same concurrency), and the request rate reached.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Awaitable, Callable

import aiohttp

from bench.common import add_worker_env, machine, ms, percentile, stack, table, worker_env
from conveyor.contract import JobKind, QueueBackend
from worker.engines.fake import FakeEngine

CHAT = {"model": "bench-chat", "messages": [{"role": "user", "content": "Say something."}], "max_tokens": 16}
EMBED = {"model": "bench-embed", "input": "a sentence to embed", "encoding_format": "float"}
CONCURRENCY = (1, 16, 64)


async def measure(call: Callable[[], Awaitable[float]], concurrency: int, total: int) -> tuple[list[float], float]:
    """Run ``total`` calls, ``concurrency`` at a time; returns latencies and the achieved requests/s."""
    latencies: list[float] = []
    remaining = total

    async def loop() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            latencies.append(await call())

    started = time.perf_counter()
    await asyncio.gather(*(loop() for _ in range(concurrency)))
    return latencies, total / (time.perf_counter() - started)


def in_process_calls() -> dict[str, Callable[[], Awaitable[float]]]:
    chat, embed = FakeEngine("bench-chat"), FakeEngine("bench-embed", embed=True)

    async def chat_sync() -> float:
        t = time.perf_counter()
        await chat.run(JobKind.CHAT, CHAT, "r")
        return time.perf_counter() - t

    async def chat_ttft() -> float:
        t = time.perf_counter()
        stream = chat.stream(JobKind.CHAT, CHAT | {"stream": True}, "r")
        await anext(stream)
        elapsed = time.perf_counter() - t
        async for _ in stream:
            pass
        return elapsed

    async def embeddings() -> float:
        t = time.perf_counter()
        await embed.run(JobKind.EMBEDDING, EMBED, "r")
        return time.perf_counter() - t

    return {"chat (sync)": chat_sync, "chat (stream TTFT)": chat_ttft, "embeddings": embeddings}


def conveyor_calls(client: aiohttp.ClientSession) -> dict[str, Callable[[], Awaitable[float]]]:
    async def post(path: str, body: dict[str, object]) -> float:
        t = time.perf_counter()
        async with client.post(path, json=body) as response:
            response.raise_for_status()
            await response.read()
        return time.perf_counter() - t

    async def chat_sync() -> float:
        return await post("/v1/chat/completions", CHAT)

    async def chat_ttft() -> float:
        t = time.perf_counter()
        async with client.post("/v1/chat/completions", json=CHAT | {"stream": True}) as response:
            response.raise_for_status()
            elapsed = 0.0
            async for line in response.content:
                if line.startswith(b"data:") and not elapsed:
                    elapsed = time.perf_counter() - t
        return elapsed

    async def embeddings() -> float:
        return await post("/v1/embeddings", EMBED)

    return {"chat (sync)": chat_sync, "chat (stream TTFT)": chat_ttft, "embeddings": embeddings}


async def run(total: int, base_url: str) -> list[list[object]]:
    rows: list[list[object]] = []
    async with aiohttp.ClientSession(base_url=base_url, connector=aiohttp.TCPConnector(limit=256)) as client:
        local, remote = in_process_calls(), conveyor_calls(client)
        for name in remote:
            await measure(remote[name], 4, 20)  # warm up connections and the worker
            for concurrency in CONCURRENCY:
                base, _ = await measure(local[name], concurrency, total)
                lat, rate = await measure(remote[name], concurrency, total)
                rows.append(
                    [
                        name,
                        concurrency,
                        ms(percentile(lat, 50)),
                        ms(percentile(lat, 95)),
                        ms(percentile(lat, 99)),
                        ms(percentile(lat, 50) - percentile(base, 50)),
                        ms(percentile(lat, 95) - percentile(base, 95)),
                        f"{rate:.0f}",
                    ]
                )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=400, help="requests per cell")
    parser.add_argument("--poll-delay", default="0.5", help="workers' fallback poll delay (jobs start on wake-ups)")
    parser.add_argument("--backend", choices=[b.value for b in QueueBackend], default=QueueBackend.ARQ.value)
    add_worker_env(parser, "CONVEYOR_WORKER_MIGRATE=false")
    args = parser.parse_args()
    env = worker_env(args)
    with stack(["bench-chat", "bench-embed"], backend=QueueBackend(args.backend)) as conveyor:
        conveyor.worker("bench-chat", "--engine", "fake", "--poll-delay", args.poll_delay, env=env)
        conveyor.worker("bench-embed", "--engine", "fake", "--task", "embed", "--poll-delay", args.poll_delay, env=env)
        rows = asyncio.run(run(args.requests, conveyor.base_url))
    print(
        f"Queue-path overhead, fake engine, {args.requests} requests per row, {args.backend} backend (arq: workers "
        f"woken on enqueue, fallback poll {args.poll_delay} s{''.join(f', {item}' for item in args.worker_env)}); "
        f"{machine()}; client, gateway, worker and Redis share "
        "the cores.\n"
    )
    print(
        table(
            ["workload", "concurrency", "p50 ms", "p95 ms", "p99 ms", "added p50 ms", "added p95 ms", "requests/s"],
            rows,
        )
    )


if __name__ == "__main__":
    main()
