"""Redis Cluster with a replica per master (``launcher.redis_cluster``, Valkey 9): the master holding the chat model's
slots is SIGKILLed under load (``tests.faults.failover``). The cluster promotes its replica after the node timeout,
and the gateway and workers follow the new slot map by themselves, keeping the README's promise for a failover.

A cluster failover takes longer than a worker's registration lasts (the node timeout, 5 s here and 15 s by default,
against 3 heartbeats of 2 s), so for a moment after it the model's workers are not registered: its requests are
refused 503 ``no_live_worker`` until they are (the README says so). It runs once, on the Streams backend (the only one
a cluster takes), with a cluster of its own. ``bench.cluster_failover`` prints the outcomes second by second."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from conveyor import key_layout
from conveyor.contract import QueueBackend
from launcher import redis_cluster
from launcher.redis_cluster import RedisClusterServer
from tests.conftest import BACKEND_VARIABLE, Processes
from tests.faults.failover import Models, fail_over_under_load

MODELS = Models(chat="cluster-failover-chat", embed="cluster-failover-embed")
#: after the failover, how long requests may find the model's workers not registered again yet: a worker retries
#: Redis within ~1 s of backoff and beats at once; this leaves room for a busy machine
REREGISTERING_SECONDS = 10.0


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[RedisClusterServer]:
    server = redis_cluster.start(tmp_path / "cluster", replicas=1)
    yield server
    server.stop()


@pytest.fixture
def procs(cluster: RedisClusterServer, tmp_path: Path) -> Iterator[Processes]:
    spawned = Processes(cluster.url, files_dir=tmp_path / "files", env={BACKEND_VARIABLE: QueueBackend.STREAMS.value})
    yield spawned
    spawned.stop_all()


def test_a_master_killed_under_load_fails_over_to_its_replica_and_nothing_is_lost_beyond_the_promise(
    cluster: RedisClusterServer, procs: Processes, tmp_path: Path
) -> None:
    masters = cluster.masters()
    assert len(masters) == 3 and len(cluster.ports) == 6  # a replica for each master
    gateway_log = tmp_path / "gateway.log"
    gateway = procs.gateway(models=f"{MODELS.chat},{MODELS.embed}", log=gateway_log)
    workers = [
        procs.fake_worker(MODELS.chat, "--fake-token-delay", "0.02"),  # ~0.4 s a chat: jobs are in flight at the kill
        procs.fake_worker(MODELS.embed, embed=True),
    ]
    dead = cluster.node_of(key_layout.model_card_key(MODELS.chat))

    def promoted() -> bool:
        now = cluster.masters()
        return dead not in now and len(now) == len(masters)

    fail_over_under_load(
        gateway,
        workers,
        MODELS,
        kill=lambda: cluster.kill(dead),
        failed_over=promoted,
        gateway_log=gateway_log,
        reregistering=REREGISTERING_SECONDS,
    )
    assert cluster.node_of(key_layout.model_card_key(MODELS.chat)) != dead
