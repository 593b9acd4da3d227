"""What one Redis call costs the calling process in CPU, by the way it is made: where the queue path's Redis time goes.

    uv run --frozen --extra cpu python -m bench.redis_call_cost [--calls 5000]

One process, uvloop, a real redis-server on loopback. Each row makes ``--calls`` calls one after the other (a `GET`, or
a one-line Lua script through ``conveyor.pipeliner`` in groups of 5, as admissions and finishes go) and prints the
process's own CPU time per call, the best of three rounds (Redis's CPU is not counted). The rows:

- a raw asyncio stream writing the packed command and reading the reply: the socket round trip's own cost;
- redis-py's client as it comes;
- redis-py with a read timeout (``socket_timeout``): an ``asyncio.timeout`` around every read;
- Conveyor's client (``redis_client.connect``: read and connect timeouts, health checks, commands packed in C);
- a Lua script call through Conveyor's pipeliner, per call in groups of 5 (one write and one read per group); this
  row includes the benchmark's own task per call (``asyncio.gather``), which a request's own task does not add.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import uvloop
from redis.asyncio import Redis

from bench.common import machine, table
from conveyor import redis_client
from conveyor.pipeliner import Pipeliner
from launcher import redis_server

ROUNDS = 3


async def cpu_per_call(call: Callable[[], Awaitable[object]], calls: int, per_round: int = 1) -> float:
    """Microseconds of this process's CPU per call: the best of ``ROUNDS`` rounds of ``calls`` (``per_round`` calls
    each time ``call`` is awaited)."""
    await call()
    best = float("inf")
    for _ in range(ROUNDS):
        started = time.process_time()
        for _ in range(calls // per_round):
            await call()
        best = min(best, (time.process_time() - started) / calls * 1e6)
    return best


async def measure(port: int, calls: int) -> list[tuple[str, float]]:
    url = f"redis://127.0.0.1:{port}/0"
    rows = []
    reader, writer = await asyncio.open_connection("127.0.0.1", port)

    async def raw_get() -> None:
        writer.write(b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n")
        await reader.readuntil(b"\r\n")

    rows.append(("raw asyncio stream, GET", await cpu_per_call(raw_get, calls)))
    writer.close()
    for name, client in [
        ("redis-py as it comes, GET", Redis.from_url(url)),
        ("redis-py with socket_timeout=5, GET", Redis.from_url(url, socket_timeout=5)),
        ("Conveyor's client, GET", redis_client.connect(url)),
    ]:
        rows.append((name, await cpu_per_call(lambda client=client: client.get("k"), calls)))
        await client.aclose()
    client = redis_client.connect(url)
    script = client.register_script("return 1")
    pipeliner = Pipeliner(client)

    async def five() -> None:
        await asyncio.gather(*(pipeliner.call(script, ["k"], []) for _ in range(5)))

    rows.append(("Conveyor's pipeliner, a script call, groups of 5", await cpu_per_call(five, calls, per_round=5)))
    await client.aclose()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=5000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        port = redis_server.free_port()
        server = redis_server.start(port, Path(tmp))
        try:
            rows = uvloop.run(measure(port, args.calls))
        finally:
            server.terminate()
            server.wait(10)
    print(f"CPU of the calling process per Redis call, {args.calls} calls one after the other; {machine()}\n")
    print(table(["call", "us of CPU per call"], [(name, f"{us:.1f}") for name, us in rows]))


if __name__ == "__main__":
    main()
