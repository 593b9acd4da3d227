"""The tenancy tier: managed API keys against two real gateway processes sharing one real Redis, with fake-engine
workers. The tier has its own redis-server: once a managed key exists every gateway on that Redis demands a key, which
must not reach the other tiers' gateways."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from conveyor.contract import QueueBackend
from launcher import redis_cluster, redis_server
from launcher.redis_cluster import RedisClusterServer
from launcher.redis_server import RedisServer
from tests.conftest import Gateway, Processes, RedisSetup, Worker

ADMIN_KEY = "admin-key-for-tests"
STATIC_KEY = "static-key-for-tests"
CHAT = "tenant-chat"
EMBED = "tenant-embed"
SLOW = "tenant-slow"  # a chat model whose tokens take a while, to hold jobs open


@dataclass
class Fleet:
    redis_url: str
    gateways: list[Gateway]
    workers: dict[str, Worker]

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        """``conveyor keys ...`` against the fleet's Redis."""
        env = os.environ | {"CONVEYOR_REDIS_URL": self.redis_url}
        return subprocess.run(
            [sys.executable, "-m", "launcher.cli", "keys", *args], env=env, capture_output=True, text=True, timeout=60
        )

    def cli_json(self, *args: str) -> Any:
        done = self.cli(*args, "--json")
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    def admin(self, gateway: int = 0) -> httpx.Client:
        headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
        return httpx.Client(base_url=self.gateways[gateway].base_url, headers=headers, timeout=30)


@pytest.fixture(scope="module")
def tenancy_redis(
    redis_setup: RedisSetup, queue_backend: QueueBackend, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RedisServer | RedisClusterServer]:
    """The tier's own Redis: a redis-server, or on the ``cluster`` setup a 3-master Redis Cluster of its own."""
    server: RedisServer | RedisClusterServer
    if redis_setup.cluster:
        server = redis_cluster.start(tmp_path_factory.mktemp("tenancy-cluster"))
    else:
        server = RedisServer(redis_server.free_port(), tmp_path_factory.mktemp("tenancy-redis"))
        server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def fleet(tenancy_redis: RedisServer | RedisClusterServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    files: Path = tmp_path_factory.mktemp("tenancy-files")
    procs = Processes(tenancy_redis.url, files_dir=files, env={"CONVEYOR_ADMIN_KEY": ADMIN_KEY})
    settings = {"models": f"{CHAT},{EMBED},{SLOW}", "api_keys": STATIC_KEY, "batch_chunk_lines": "4"}
    gateways = [procs.gateway(**settings), procs.gateway(**settings)]
    workers = {
        CHAT: procs.fake_worker(CHAT),
        EMBED: procs.fake_worker(EMBED, "--task", "embed", embed=True),
        SLOW: procs.fake_worker(SLOW, "--fake-token-delay", "0.2"),
    }
    yield Fleet(tenancy_redis.url, gateways, workers)
    procs.stop_all()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "/tenancy/" in str(item.fspath):
            item.add_marker(pytest.mark.integration)
