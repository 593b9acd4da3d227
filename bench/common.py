"""Shared benchmark plumbing: a throwaway Conveyor stack on this machine and latency statistics."""

from __future__ import annotations

import contextlib
import os
import platform
import statistics
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from conveyor.registry import WorkerInfo
from launcher import processes, redis_server


@dataclass
class Stack:
    redis_url: str
    base_url: str
    children: list[subprocess.Popen[bytes]] = field(default_factory=list)
    redis_pid: int = 0

    def worker(self, model: str, *args: str, timeout: float = 30, env: dict[str, str] | None = None) -> WorkerInfo:
        process, info = processes.start_worker(
            self.redis_url, model, args, env=env, output=subprocess.DEVNULL, timeout=timeout
        )
        self.children.append(process)
        return info


@contextlib.contextmanager
def stack(models: Sequence[str] = (), gateway_env: dict[str, str] | None = None) -> Iterator[Stack]:
    with tempfile.TemporaryDirectory() as tmp:
        port = redis_server.free_port()
        redis = redis_server.start(port, Path(tmp))
        url = f"redis://127.0.0.1:{port}/0"
        gateway_port = redis_server.free_port()
        env = {"CONVEYOR_GATEWAY_MODELS": ",".join(models), **(gateway_env or {})}
        gateway = processes.start_gateway(url, gateway_port, env, output=subprocess.DEVNULL)
        result = Stack(url, f"http://127.0.0.1:{gateway_port}", [gateway], redis.pid)
        try:
            yield result
        finally:
            for child in reversed(result.children):
                processes.stop(child, grace=10)
            redis.terminate()
            redis.wait(10)


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) a process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


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
