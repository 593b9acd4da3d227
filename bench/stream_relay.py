"""Stream relay throughput: many concurrent streams of many tokens, relayed worker -> Redis pub/sub -> gateway -> SSE.

    uv run --frozen --extra cpu python -m bench.stream_relay [--streams 50] [--tokens 1000] [--backend arq|streams]

The fake engine produces tokens as fast as it can, so the relay path (publisher, Redis, gateway, SSE) is the limit.
Every stream is checked: all tokens, in order, ending with [DONE]. Also printed: what Redis spent per relayed token
(its CPU, and the commands it ran: ``INFO commandstats``, a script's own commands counted beside its EVALSHA).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

import aiohttp

from bench.common import cpu_seconds, machine, stack, table
from conveyor.contract import QueueBackend
from worker.engines.fake import fake_tokens

MODEL = "bench-stream"


async def one_stream(client: aiohttp.ClientSession, index: int, tokens: int) -> int:
    content = f"stream {index}"
    body = {"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": tokens, "stream": True}
    received: list[str] = []
    done = False
    async with client.post("/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        async for raw in response.content:
            line = raw.decode().rstrip("\n")
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                break
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(f"stream {index}: {chunk['error']}")
            received += [c["delta"].get("content") or "" for c in chunk["choices"]]
    if not done or "".join(received) != "".join(fake_tokens(f"user: {content}", tokens)):
        raise RuntimeError(f"stream {index} lost, reordered or truncated tokens")
    return tokens


async def run(streams: int, tokens: int, base_url: str) -> tuple[int, float]:
    connector = aiohttp.TCPConnector(limit=streams + 8)
    async with aiohttp.ClientSession(base_url=base_url, connector=connector) as client:
        await one_stream(client, -1, 10)
        started = time.perf_counter()
        counts = await asyncio.gather(*(one_stream(client, i, tokens) for i in range(streams)))
        return sum(counts), time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--streams", type=int, default=50)
    parser.add_argument("--tokens", type=int, default=1000)
    parser.add_argument("--backend", choices=[b.value for b in QueueBackend], default=QueueBackend.ARQ.value)
    args = parser.parse_args()
    with stack([MODEL], backend=QueueBackend(args.backend)) as conveyor:
        conveyor.worker(MODEL, "--engine", "fake", "--max-jobs", str(args.streams))
        redis_cpu, commands = cpu_seconds(conveyor.redis_pid), conveyor.redis_commands()
        total, elapsed = asyncio.run(run(args.streams, args.tokens, conveyor.base_url))
        redis_cpu, commands = cpu_seconds(conveyor.redis_pid) - redis_cpu, conveyor.redis_commands() - commands
    print(
        f"Stream relay, fake engine, {args.backend} backend, {machine()}; client, gateway, worker and Redis share the "
        "cores.\n"
    )
    headers = ["streams", "tokens each", "tokens relayed", "seconds", "tokens/s", "lost or reordered"]
    headers += ["Redis CPU us/token", "Redis commands/token"]
    row = [args.streams, args.tokens, total, f"{elapsed:.2f}", f"{total / elapsed:,.0f}", 0]
    row += [f"{redis_cpu / total * 1e6:.1f}", f"{commands / total:.2f}"]
    print(table(headers, [row]))


if __name__ == "__main__":
    main()
