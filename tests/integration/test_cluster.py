"""A real 3-master Redis Cluster (``launcher.redis_cluster``) under the client every process builds: keys across
slots, pub/sub through ``redis_client.subscriber``, and arq refused before a process touches Redis."""

from __future__ import annotations

import asyncio
import os
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import redis
from redis.asyncio import Redis

from conveyor import contract, redis_client
from gateway.pubsub import CONNECTION_LOST, PubSubMultiplexer
from launcher import processes, redis_cluster
from launcher.redis_cluster import RedisClusterServer
from tests.conftest import Processes

#: enough keys that each of the three masters owns some
KEYS = [f"conveyor:test:{i}" for i in range(30)]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisClusterServer]:
    server = redis_cluster.start(tmp_path_factory.mktemp("cluster"))
    yield server
    server.stop()


@pytest.fixture
async def client(cluster: RedisClusterServer) -> AsyncIterator[Redis]:
    redis = redis_client.connect(cluster.url)
    yield redis
    await redis_client.close(redis)


def test_the_launcher_starts_three_masters_sharing_the_slots(cluster: RedisClusterServer) -> None:
    assert len(cluster.ports) == 3
    assert cluster.url == "redis+cluster://" + ",".join(f"127.0.0.1:{port}" for port in cluster.ports)
    assert {cluster.node_of(key) for key in KEYS} == set(cluster.ports)
    assert cluster.node_of("{conveyor}:a") == cluster.node_of("{conveyor}:b")  # one hash tag, one master


async def test_the_cluster_url_sets_and_gets_keys_on_every_master(cluster: RedisClusterServer, client: Redis) -> None:
    assert redis_client.is_cluster(client)
    for i, key in enumerate(KEYS):
        await client.set(key, i, ex=60)
    assert [await client.get(key) for key in KEYS] == [str(i).encode() for i in range(len(KEYS))]


async def test_a_publish_on_any_master_reaches_a_subscriber(cluster: RedisClusterServer, client: Redis) -> None:
    pubsub = redis_client.subscriber(client).pubsub()
    try:
        await pubsub.subscribe("conveyor:test:channel")
        assert (await pubsub.get_message(timeout=5))["type"] == "subscribe"
        await redis_client.publish(client, "conveyor:test:channel", b"plain")
        assert (await pubsub.get_message(timeout=5))["data"] == b"plain"
        one_per_master = {cluster.node_of(key): key for key in KEYS}
        for key in one_per_master.values():  # the serving path publishes from scripts, on the master of their keys
            await client.eval("redis.call('PUBLISH', ARGV[1], ARGV[2])", 1, key, "conveyor:test:channel", key)  # type: ignore[misc]
        received = [await pubsub.get_message(timeout=5) for _ in one_per_master]
        # (in no set order: another master's PUBLISH comes over the cluster bus)
        assert sorted(m["data"] for m in received if m) == sorted(k.encode() for k in one_per_master.values())
    finally:
        await pubsub.aclose()  # type: ignore[no-untyped-call]


async def test_the_gateway_subscriber_moves_to_another_master_when_its_own_dies(tmp_path: Path) -> None:
    cluster = redis_cluster.start(tmp_path / "cluster")  # its own: a master is killed
    client = redis_client.connect(cluster.url)
    mux = PubSubMultiplexer(client)
    try:
        await mux.start()
        queue = await mux.subscribe("conveyor:test:before")
        node = subscribed_node(cluster)
        cluster.kill(node)
        assert await asyncio.wait_for(queue.get(), 10) is CONNECTION_LOST  # open streams fail at once
        queue = await asyncio.wait_for(_subscribe_again(mux, "conveyor:test:after"), 10)
        assert subscribed_node(cluster) != node
        alive = next(port for port in cluster.ports if port != node)
        publisher = Redis(port=alive)
        await publisher.publish("conveyor:test:after", b"still here")
        await publisher.aclose()
        assert await asyncio.wait_for(queue.get(), 5) == b"still here"
    finally:
        await mux.stop()
        await redis_client.close(client)
        cluster.stop()


async def _subscribe_again(mux: PubSubMultiplexer, channel: str) -> asyncio.Queue[object]:
    """The multiplexer reconnects on its own; a subscribe made before it has fails, as a new request's would."""
    while True:
        try:
            return await mux.subscribe(channel)
        except (redis.ConnectionError, redis.TimeoutError, TimeoutError):
            await asyncio.sleep(0.1)


def subscribed_node(cluster: RedisClusterServer) -> int:
    """The port of the one master holding a connection with subscriptions."""
    holders = []
    for port in cluster.ports:
        try:
            with redis.Redis(port=port, socket_timeout=2) as node:
                if any(int(c.get("sub", 0)) > 0 for c in node.client_list()):
                    holders.append(port)
        except redis.ConnectionError:
            continue
    assert len(holders) == 1, holders
    return holders[0]


@pytest.mark.parametrize("command", [["gateway"], ["worker", "--model", "m", "--engine", "fake"]])
def test_arq_on_a_cluster_url_refuses_to_start_in_one_line(cluster: RedisClusterServer, command: list[str]) -> None:
    env = os.environ | {"CONVEYOR_REDIS_URL": cluster.url, "CONVEYOR_QUEUE_BACKEND": "arq"}
    done = subprocess.run(processes.conveyor_command(*command), env=env, capture_output=True, timeout=60, check=False)
    lines = done.stderr.decode().strip().splitlines()
    assert done.returncode == 1
    assert lines[-1].startswith(f"conveyor {command[0]}: ")
    assert "Redis Cluster needs CONVEYOR_QUEUE_BACKEND=streams" in lines[-1]


def test_models_on_every_shard_serve_through_one_gateway(
    session_cluster: RedisClusterServer | None, spawn: Processes
) -> None:
    """Each model's lanes, jobs and registry keys live on the master of its own hash tag: with one model on each of
    the three masters (and the control plane on one of them), one gateway serves chat, streamed chat and embeddings,
    and each model's work went through its own master."""
    if session_cluster is None:
        pytest.skip("the cluster setup's test")
    by_node: dict[int, str] = {}
    for i in range(200):
        name = f"spread-{i}"
        by_node.setdefault(session_cluster.node_of(contract.model_card_key(name)), name)
    assert len(by_node) == 3
    chat, streamed, embed = by_node.values()
    gateway = spawn.gateway(models=f"{chat},{streamed},{embed}")
    spawn.fake_worker(chat)
    spawn.fake_worker(streamed)
    spawn.fake_worker(embed, "--task", "embed", embed=True)
    client = gateway.client()
    answer = client.chat.completions.create(model=chat, messages=[{"role": "user", "content": "hi"}], max_tokens=3)
    assert answer.choices[0].message.content and answer.usage and answer.usage.completion_tokens == 3
    stream = client.chat.completions.create(
        model=streamed, messages=[{"role": "user", "content": "hi"}], max_tokens=4, stream=True
    )
    assert len([c for c in stream if c.choices and c.choices[0].delta.content]) == 4
    vectors = client.embeddings.create(model=embed, input=["a", "b"])
    assert len(vectors.data) == 2 and vectors.data[0].embedding
    for node, model in by_node.items():  # asked of that master alone: another would answer MOVED
        with redis.Redis(port=node, socket_timeout=5) as own:
            groups = own.xinfo_groups(contract.stream_lane_key(model))
            assert [g["name"] for g in groups] == [contract.STREAM_GROUP.encode()]
            assert own.exists(contract.model_card_key(model), contract.model_workers_key(model)) == 2
