"""``conveyor up`` brings up Redis, workers and the gateway from a models file, and Ctrl-C leaves nothing behind."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
from pathlib import Path

import httpx

from conveyor.contract import QueueBackend
from launcher import processes, redis_server
from launcher.supervisor import DRAIN_SECONDS
from tests.conftest import alive, descendants, wait_for

MODELS = """
[[models]]
name = "up-chat"
engine = "fake"
task = "generate"
replicas = 2

[[models]]
name = "up-embed"
engine = "fake"
task = "embed"
"""


def test_up_serves_every_model_and_ctrl_c_stops_everything(queue_backend: QueueBackend, tmp_path: Path) -> None:
    models = tmp_path / "models.toml"
    models.write_text(MODELS)
    port = redis_server.free_port()
    env = {**os.environ, "CONVEYOR_DATA_DIR": str(tmp_path / "data")}
    env.pop("CONVEYOR_REDIS_URL", None)  # exercise the embedded redis-server
    up = subprocess.Popen(
        processes.conveyor_command("up", "--models-file", str(models), "--port", str(port), "--host", "127.0.0.1"),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(line.decode() for line in up.stdout or ()), daemon=True)
    reader.start()
    try:
        base = f"http://127.0.0.1:{port}"
        wait_for(lambda: "Conveyor is up" in "".join(lines), timeout=60, what="conveyor up to print its banner")
        assert _ready(base)
        with httpx.Client(base_url=base, timeout=10) as client:
            models_served = {m["id"]: m["live_workers"] for m in client.get("/v1/models").json()["data"]}
            assert models_served == {"up-chat": 2, "up-embed": 1}
            chat = client.post(
                "/v1/chat/completions",
                json={"model": "up-chat", "max_tokens": 3, "messages": [{"role": "user", "content": "hi"}]},
            )
            assert chat.status_code == 200
            assert client.post("/v1/embeddings", json={"model": "up-embed", "input": "hi"}).status_code == 200
        family = descendants(up.pid)
        assert len(family) >= 4  # redis, gateway, 3 workers
        up.send_signal(signal.SIGINT)
        up.wait(60)
    finally:
        if up.poll() is None:
            up.kill()
            up.wait()
        reader.join(10)
        if up.stdout:
            up.stdout.close()
    output = "".join(lines)
    assert up.returncode == 0, output
    assert "curl" in output and "stopped" in output
    assert [pid for pid in family if alive(pid)] == []


def _ready(base: str) -> bool:
    try:
        return httpx.get(f"{base}/ready", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def test_the_embedded_redis_keeps_keys_and_usage_across_a_restart(queue_backend: QueueBackend, tmp_path: Path) -> None:
    models = tmp_path / "models.toml"
    models.write_text(MODELS)
    env = {**os.environ, "CONVEYOR_DATA_DIR": str(tmp_path / "data")}
    env.pop("CONVEYOR_REDIS_URL", None)

    def run_up() -> tuple[subprocess.Popen[bytes], list[str]]:
        port = redis_server.free_port()
        command = processes.conveyor_command("up", "--models-file", str(models), "--port", str(port))
        up = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        lines: list[str] = []
        threading.Thread(target=lambda: lines.extend(line.decode() for line in up.stdout or ()), daemon=True).start()
        wait_for(lambda: "Conveyor is up" in "".join(lines), timeout=60, what="conveyor up's banner")
        return up, lines

    def keys(redis_url: str, *args: str) -> str:
        command = processes.conveyor_command("keys", "--redis-url", redis_url, *args)
        return subprocess.run(command, capture_output=True, text=True, check=True, timeout=60).stdout

    for attempt in range(2):
        up, lines = run_up()
        try:
            redis_url = "".join(lines).split("started the embedded redis-server at ")[1].split()[0]
            if attempt == 0:
                keys(redis_url, "create", "--name", "survivor")
            else:
                assert "survivor" in keys(redis_url, "list")
        finally:
            up.send_signal(signal.SIGINT)
            try:  # its workers drain, and are killed after DRAIN_SECONDS at the latest: that bound, and some
                up.wait(DRAIN_SECONDS + 30)
            except subprocess.TimeoutExpired:
                up.kill()
                up.wait(10)  # reaped here, not garbage-collected during a later test (a ResourceWarning failed one)
                raise AssertionError(f"conveyor up did not stop after Ctrl-C:\n{''.join(lines)[-3000:]}") from None
            if up.stdout:
                up.stdout.close()
