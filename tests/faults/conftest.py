"""The fault tier: real processes, and faults injected into them: Redis stopped and restarted, workers SIGKILLed,
engines that die or hang on command. Each test gets its own redis-server, so stopping it disturbs nobody else."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from launcher.redis_server import RedisServer
from tests.conftest import Processes


@pytest.fixture
def procs(own_redis: RedisServer, tmp_path: Path) -> Iterator[Processes]:
    """Gateway and worker processes on this test's own Redis and file store."""
    spawned = Processes(own_redis.url, files_dir=tmp_path / "files")
    yield spawned
    spawned.stop_all()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "/faults/" in str(item.fspath):
            item.add_marker(pytest.mark.faults)
