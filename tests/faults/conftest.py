"""The fault tier: real processes, and faults injected into them: Redis stopped and restarted, workers SIGKILLed,
engines that die or hang on command. Each test gets its own redis-server, so stopping it disturbs nobody else."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis

from conveyor import redis_server
from tests.conftest import Processes


@dataclass
class RedisServer:
    """A redis-server this test may stop and start again on the same port."""

    port: int
    workdir: Path
    persist: bool
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.process = redis_server.start(self.port, self.workdir, persist=self.persist)

    def stop(self) -> None:
        if self.process is not None:
            self.process.kill()  # as a crash would: no final save beyond what the append-only file already has
            self.process.wait(10)
            self.process = None

    def keys(self) -> int:
        with redis.Redis.from_url(self.url) as client:
            return int(client.dbsize())


def own_redis(tmp_path: Path, persist: bool) -> Iterator[RedisServer]:
    server = RedisServer(redis_server.free_port(), tmp_path / "redis", persist)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def fault_redis(tmp_path: Path) -> Iterator[RedisServer]:
    yield from own_redis(tmp_path, persist=False)


@pytest.fixture
def procs(fault_redis: RedisServer) -> Iterator[Processes]:
    """Gateway and worker processes on this test's own Redis."""
    spawned = Processes(fault_redis.url)
    yield spawned
    spawned.stop_all()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "/faults/" in str(item.fspath):
            item.add_marker(pytest.mark.faults)
