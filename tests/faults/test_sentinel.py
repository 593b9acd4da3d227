"""Redis Sentinel: every process reaches Redis through three sentinels (``CONVEYOR_REDIS_URL=redis+sentinel://...``).
The master is SIGKILLed under load (``tests.faults.failover``); the sentinels promote the replica, and the gateway and
workers follow by themselves, keeping the README's promise for a failover."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from conveyor.contract import QueueBackend
from tests.conftest import Processes
from tests.faults.failover import Models, fail_over_under_load
from tests.faults.sentinel import SentinelGroup

MODELS = Models(chat="sentinel-chat", embed="sentinel-embed")


@pytest.fixture
def sentinel(queue_backend: QueueBackend, tmp_path: Path) -> Iterator[SentinelGroup]:
    group = SentinelGroup(tmp_path / "redis")
    try:
        group.start()
        yield group
    finally:
        group.stop()


@pytest.fixture
def procs(sentinel: SentinelGroup, tmp_path: Path) -> Iterator[Processes]:
    spawned = Processes(sentinel.url, files_dir=tmp_path / "files")
    yield spawned
    spawned.stop_all()


def test_a_master_killed_under_load_fails_over_and_nothing_is_lost_beyond_the_promise(
    sentinel: SentinelGroup, procs: Processes, tmp_path: Path
) -> None:
    gateway_log = tmp_path / "gateway.log"  # shown with an unexpected outcome: the gateway's side of it
    gateway = procs.gateway(models=f"{MODELS.chat},{MODELS.embed}", log=gateway_log)
    workers = [
        procs.fake_worker(MODELS.chat, "--fake-token-delay", "0.02"),  # ~0.4 s a chat: jobs are in flight at the kill
        procs.fake_worker(MODELS.embed, embed=True),
    ]
    fail_over_under_load(
        gateway,
        workers,
        MODELS,
        kill=sentinel.kill_master,
        failed_over=lambda: sentinel.master_seen_by_sentinels() == {sentinel.replica_port},
        gateway_log=gateway_log,
    )
