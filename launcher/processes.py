"""Starting and stopping Conveyor's processes from Python: used by ``conveyor up``, the tests and the benchmarks.

Each ``start_*`` returns only when the process is really serving (the gateway answers /health, the worker has
registered in Redis), or raises with the reason it is not.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from typing import IO

from conveyor import redis_client, registry

Progress = Callable[[str], None]
PR_SET_PDEATHSIG = 1


def conveyor_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "launcher.cli", *args]


def spawn(
    args: Sequence[str], env: Mapping[str, str] | None = None, output: IO[bytes] | int | None = None
) -> subprocess.Popen[bytes]:
    """Start a child in its own process group, so stopping it also stops whatever it started (vLLM's helpers)."""
    return subprocess.Popen(
        list(args),
        env={**os.environ, **(env or {})},
        stdout=output,
        stderr=subprocess.STDOUT if output is not None else None,
        start_new_session=True,
        preexec_fn=_die_with_parent,
    )


def _die_with_parent() -> None:
    """In the child, before exec: ask Linux to SIGTERM it when its parent dies, so a killed ``conveyor up`` or
    test run leaves no orphans."""
    if sys.platform == "linux":
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def stop(process: subprocess.Popen[bytes], grace: float = 30.0) -> int:
    """SIGTERM the process group, wait up to ``grace`` seconds, then SIGKILL it. Returns the exit code."""
    if process.poll() is None:
        with no_such_process():
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(grace)
        except subprocess.TimeoutExpired:
            with no_such_process():
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    with no_such_process():  # children that outlived their parent
        os.killpg(process.pid, signal.SIGKILL)
    return process.returncode


def no_such_process() -> contextlib.suppress:
    """Ignore signalling a process (group) that has already gone."""
    return contextlib.suppress(ProcessLookupError, PermissionError)


def wait_http_ok(url: str, process: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{url}: the process exited with code {process.returncode} before it answered")
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.05)
    raise TimeoutError(f"{url} did not answer 200 within {timeout:.0f} s")


def wait_registered(
    redis_url: str, model: str, process: subprocess.Popen[bytes], timeout: float, progress: Progress | None = None
) -> registry.WorkerInfo:
    """Wait until the worker process ``process`` appears among the live workers of ``model``."""

    async def poll() -> registry.WorkerInfo:
        redis = redis_client.connect(redis_url)
        started = time.monotonic()
        last_report = started
        try:
            while time.monotonic() - started < timeout:
                if process.poll() is not None:
                    raise RuntimeError(f"worker for {model} exited with code {process.returncode} while loading")
                for info in await registry.live_workers(redis, model):
                    if info.pid == process.pid:
                        return info
                if progress and time.monotonic() - last_report >= 5:
                    last_report = time.monotonic()
                    progress(f"still loading {model} ({last_report - started:.0f} s)")
                await asyncio.sleep(0.05)
        finally:
            await redis_client.close(redis)
        raise TimeoutError(f"worker for {model} did not register within {timeout:.0f} s")

    return asyncio.run(poll())


def start_gateway(
    redis_url: str,
    port: int,
    env: Mapping[str, str] | None = None,
    host: str = "127.0.0.1",
    output: IO[bytes] | int | None = None,
    timeout: float = 30.0,
) -> subprocess.Popen[bytes]:
    process = spawn(
        conveyor_command("gateway", "--host", host, "--port", str(port)),
        {"CONVEYOR_REDIS_URL": redis_url, **(env or {})},
        output,
    )
    try:
        wait_http_ok(f"http://{host}:{port}/health", process, timeout)
    except BaseException:
        stop(process)
        raise
    return process


def start_worker(
    redis_url: str,
    model: str,
    args: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    output: IO[bytes] | int | None = None,
    timeout: float = 30.0,
    progress: Progress | None = None,
) -> tuple[subprocess.Popen[bytes], registry.WorkerInfo]:
    process = spawn(
        conveyor_command("worker", "--model", model, *args), {"CONVEYOR_REDIS_URL": redis_url, **(env or {})}, output
    )
    try:
        info = wait_registered(redis_url, model, process, timeout, progress)
    except BaseException:
        stop(process)
        raise
    return process, info
