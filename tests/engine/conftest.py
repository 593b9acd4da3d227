"""The engine tier: the system as `make up` runs it, real vLLM workers on the CPU with the packaged models."""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import redis

from conveyor import key_layout
from conveyor.registry import WorkerInfo
from launcher import processes, redis_server
from tests.conftest import SESSION_FILES, scrape, wait_for

EMBED = "all-minilm-l6-v2"
CHAT = "smollm2-135m-instruct"
#: engines take ~30-60 s to start on two cores, plus a one-time model conversion on a fresh machine
START_TIMEOUT = 900.0


#: the admin key of the real stack's gateway (its /admin/models adds and removes real models)
ADMIN_KEY = "engine-tier-admin-key"


@dataclass
class RealStack:
    base_url: str
    redis_url: str
    log: Path
    #: the ``conveyor up`` process
    pid: int

    def worker(self, model: str) -> WorkerInfo:
        with redis.Redis.from_url(self.redis_url) as client:
            ids = client.zrange(key_layout.model_workers_key(model), 0, -1)
            raw = client.get(key_layout.worker_info_key(ids[0].decode()))
        assert raw is not None, f"no live worker for {model}"
        return WorkerInfo.model_validate_json(raw)

    def worker_metrics(self, model: str) -> dict[str, float]:
        return scrape(f"http://127.0.0.1:{self.worker(model).metrics_port}/metrics")


def _ready(base_url: str, up: subprocess.Popen[bytes], log: Path) -> bool:
    if up.poll() is not None:
        raise AssertionError(f"conveyor up exited with {up.returncode}:\n{log.read_text()[-4000:]}")
    try:
        return httpx.get(f"{base_url}/ready", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.fixture(scope="session")
def real_stack(redis_url: str, repo_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RealStack]:
    """`conveyor up` with the repository's models.toml, on the session's Redis."""
    port = redis_server.free_port()
    workdir = tmp_path_factory.mktemp("up")
    log = workdir / "conveyor-up.log"
    models = workdir / "models.toml"  # a copy: fleet changes are written back to it
    models.write_text((repo_root / "models.toml").read_text())
    with log.open("wb") as output:
        up = subprocess.Popen(
            processes.conveyor_command("up", "--models-file", str(models), "--port", str(port), "--host", "127.0.0.1"),
            env={
                **os.environ,
                "CONVEYOR_REDIS_URL": redis_url,
                "CONVEYOR_FILES_URL": str(SESSION_FILES),  # every gateway on the session's Redis may drive a batch
                "CONVEYOR_ADMIN_KEY": ADMIN_KEY,
            },
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    base_url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: _ready(base_url, up, log), timeout=START_TIMEOUT, what="conveyor up with real engines")
        yield RealStack(base_url, redis_url, log, up.pid)
    finally:
        up.send_signal(signal.SIGINT)
        try:
            up.wait(120)
        except subprocess.TimeoutExpired:
            up.kill()
            up.wait()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "/engine/" in str(item.fspath):
            item.add_marker(pytest.mark.engine)
