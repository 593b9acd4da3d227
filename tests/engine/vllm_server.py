"""vLLM's own OpenAI server as a subprocess, configured like Conveyor's ``VLLMEngine`` (parity tests, benchmarks).

    with vllm_server("/path/to/model", "smollm2") as server:
        httpx.post(f"{server.base_url}/v1/chat/completions", json=...)

The server runs in its own process group with the same CPU environment and ``vllm serve`` arguments as the
in-process engine; leaving the ``with`` block stops the whole group (API server, engine core, CPU workers).
"""

from __future__ import annotations

import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from launcher import processes
from launcher.redis_server import free_port
from worker.engines.vllm_engine import engine_environment, vllm_cli_args


@dataclass
class VLLMServer:
    port: int
    model: str
    log_path: Path
    start_seconds: float
    pid: int  # the API server's; its engine core is a child

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


@contextmanager
def vllm_server(
    weights: str,
    served_model_name: str,
    *,
    task: str = "auto",
    port: int | None = None,
    cpu_kvcache_space: int = 2,
    cpu_threads_bind: str = "auto",
    cpu: bool = True,
    extra_args: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    timeout: float = 300.0,
    log_dir: Path | None = None,
) -> Iterator[VLLMServer]:
    """Start ``python -m vllm.entrypoints.openai.api_server`` and yield once its /health answers 200."""
    port = port or free_port()
    log_dir = log_dir or Path(tempfile.mkdtemp(prefix="vllm-server-"))
    log_path = log_dir / f"vllm-server-{port}.log"
    argv = [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        *vllm_cli_args(served_model_name, weights, task, cpu),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        *extra_args,
    ]
    child_env = {**engine_environment(cpu_kvcache_space, cpu_threads_bind), **(env or {})}
    started = time.monotonic()
    with log_path.open("wb") as log:
        process = processes.spawn(argv, env=child_env, output=log)
        try:
            try:
                processes.wait_http_ok(f"http://127.0.0.1:{port}/health", process, timeout)
            except (RuntimeError, TimeoutError) as exc:
                tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-40:])
                raise RuntimeError(f"vLLM server did not start: {exc}\n--- {log_path} ---\n{tail}") from exc
            yield VLLMServer(port, served_model_name, log_path, time.monotonic() - started, process.pid)
        finally:
            processes.stop(process, grace=30)
