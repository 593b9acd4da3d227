"""Shared benchmark plumbing: a throwaway Conveyor stack on this machine and latency statistics."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import platform
import statistics
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import redis

from conveyor.contract import QueueBackend
from conveyor.registry import WorkerInfo
from launcher import processes, redis_cluster, redis_server


@dataclass
class Stack:
    redis_url: str
    base_url: str
    children: list[subprocess.Popen[bytes]] = field(default_factory=list)
    redis_pid: int = 0
    #: the environment every process of the stack shares (the queue backend)
    env: dict[str, str] = field(default_factory=dict)
    #: every redis-server of the stack: one, or a cluster's masters (``redis_pid`` is the first)
    redis_ports: list[int] = field(default_factory=list)
    redis_pids: list[int] = field(default_factory=list)

    def worker(self, model: str, *args: str, timeout: float = 30, env: dict[str, str] | None = None) -> WorkerInfo:
        process, info = processes.start_worker(
            self.redis_url, model, args, env=self.env | (env or {}), output=subprocess.DEVNULL, timeout=timeout
        )
        self.children.append(process)
        return info

    def redis_commands(self) -> int:
        """Commands Redis has run so far, on every node (``INFO commandstats``; a script's own commands count apart
        from EVALSHA)."""
        return sum(self.node_commands())

    def node_commands(self) -> list[int]:
        counts = []
        for port in self.redis_ports:
            with redis.Redis(port=port) as client:
                counts.append(sum(int(stats["calls"]) for stats in client.info("commandstats").values()))
        return counts


@contextlib.contextmanager
def stack(
    models: Sequence[str] = (),
    gateway_env: dict[str, str] | None = None,
    backend: QueueBackend | None = None,
    shards: int = 0,
) -> Iterator[Stack]:
    """Redis (or a Redis Cluster of ``shards`` masters), and a gateway for ``models``, on ``backend`` (default: the
    gateway's default, or the environment's)."""
    with tempfile.TemporaryDirectory() as tmp:
        if shards:
            cluster = redis_cluster.start(Path(tmp), masters=shards)
            url, ports, servers = cluster.url, cluster.ports, list(cluster.processes)
        else:
            port = redis_server.free_port()
            url, ports, servers = f"redis://127.0.0.1:{port}/0", [port], [redis_server.start(port, Path(tmp))]
        gateway_port = redis_server.free_port()
        shared = {"CONVEYOR_QUEUE_BACKEND": backend.value} if backend else {}
        env = {"CONVEYOR_GATEWAY_MODELS": ",".join(models), **shared, **(gateway_env or {})}
        gateway = processes.start_gateway(url, gateway_port, env, output=subprocess.DEVNULL)
        pids = [server.pid for server in servers]
        result = Stack(url, f"http://127.0.0.1:{gateway_port}", [gateway], pids[0], shared, ports, pids)
        try:
            yield result
        finally:
            for child in reversed(result.children):
                processes.stop(child, grace=10)
            for server in servers:
                server.terminate()
                server.wait(10)


@dataclass
class Loaded:
    """What a closed-loop load saw: each answer's latency, and the stream chunks (SSE ``data:`` objects) received."""

    latencies: list[float]
    chunks: int


async def closed_loop(
    base_url: str,
    path: str,
    body: dict[str, Any],
    seconds: float,
    concurrency: int,
    headers: dict[str, str] | None = None,
    requests: int | None = None,
) -> Loaded:
    """``concurrency`` clients posting ``body`` to ``path`` back to back for ``seconds`` (or until ``requests`` were
    sent); a failed answer stops it."""
    latencies: list[float] = []
    chunks = 0
    sent = 0
    end = time.monotonic() + seconds
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(base_url=base_url, connector=connector, headers=headers) as session:

        async def client() -> None:
            nonlocal chunks, sent
            while time.monotonic() < end and (requests is None or sent < requests):
                sent += 1
                started = time.perf_counter()
                async with session.post(path, json=body) as response:
                    response.raise_for_status()
                    async for line in response.content:
                        chunks += line.startswith(b"data: {")
                latencies.append(time.perf_counter() - started)

        await asyncio.gather(*(client() for _ in range(concurrency)))
    return Loaded(latencies, chunks)


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) a process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pin(pid: int, cores: set[int]) -> None:
    """Bind every thread of a process (and so what it starts later) to ``cores``."""
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(ProcessLookupError):
            os.sched_setaffinity(int(task.name), cores)


def percentile(values: Sequence[float], q: float) -> float:
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f}"


def machine() -> str:
    return f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, loopback"


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A Markdown table, ready to paste into the README."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---:" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def add_worker_env(parser: argparse.ArgumentParser, example: str) -> None:
    """``--worker-env NAME=VALUE`` (repeatable): settings for Conveyor's workers; read them with ``worker_env``."""
    parser.add_argument(
        "--worker-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help=f"a setting of Conveyor's worker, e.g. {example} (repeatable)",
    )


def worker_env(args: argparse.Namespace) -> dict[str, str]:
    return dict(item.split("=", 1) for item in args.worker_env)
