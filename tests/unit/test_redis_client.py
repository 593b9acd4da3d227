"""``CONVEYOR_REDIS_URL``: plain Redis URLs, Sentinel URLs and Redis Cluster URLs, read into the client every process
builds."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, cast

import pytest
from pydantic import ValidationError
from redis.asyncio import Connection, RedisCluster
from redis.asyncio.cluster import ClusterNode
from redis.asyncio.sentinel import SentinelConnectionPool
from redis.exceptions import ConnectionError as RedisConnectionError

from conveyor import redis_client
from conveyor.contract import QueueBackend
from conveyor.netaddr import address_towards
from conveyor.redis_client import ClusterTarget, SentinelTarget, first_address, parse_cluster, parse_sentinel
from conveyor.redis_settings import RedisSettings
from gateway.settings import GatewaySettings
from launcher import cli
from launcher.supervisor import UpSettings
from worker.settings import WorkerSettings


def test_a_sentinel_url_names_its_sentinels_service_database_and_credentials() -> None:
    url = "redis+sentinel://:s3cret@10.0.0.1:26380,sentinel-b,[::1]:5000/conveyor/2?sentinel_password=sp"
    assert parse_sentinel(url) == SentinelTarget(
        sentinels=(("10.0.0.1", 26380), ("sentinel-b", 26379), ("::1", 5000)),
        service="conveyor",
        db=2,
        password="s3cret",
        sentinel_password="sp",
    )
    tls = parse_sentinel("rediss+sentinel://user:pw@h/svc")
    assert tls == SentinelTarget(sentinels=(("h", 26379),), service="svc", username="user", password="pw", tls=True)


@pytest.mark.parametrize("url", ["redis://localhost:6379/0", "rediss://h:1/0", "unix:///tmp/redis.sock"])
def test_other_urls_are_not_sentinel_urls(url: str) -> None:
    assert parse_sentinel(url) is None


@pytest.mark.parametrize(
    "url",
    [
        "redis+sentinel://h1:26379",  # no service
        "redis+sentinel:///conveyor",  # no sentinel
        "redis+sentinel://h1:notaport/conveyor",
        "redis+sentinel://h1/conveyor/zero",
        "redis+sentinel://h1/conveyor/0/extra",
    ],
)
def test_a_malformed_sentinel_url_is_refused(url: str) -> None:
    with pytest.raises(ValueError, match="Sentinel URL"):
        parse_sentinel(url)


def test_a_malformed_sentinel_url_is_one_line_naming_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONVEYOR_REDIS_URL", "redis+sentinel://:hunter2@h1:26379")
    with pytest.raises(SystemExit) as exited:
        cli.main(["gateway"])
    message = str(exited.value.code)
    assert "\n" not in message and "(set CONVEYOR_REDIS_URL," in message and "service-name" in message
    assert "hunter2" not in message  # the password is not echoed


def test_the_first_sentinel_is_where_the_advertised_address_is_found() -> None:
    assert first_address("redis+sentinel://127.0.0.2:26380,10.9.9.9/conveyor") == ("127.0.0.2", 26380)
    assert first_address("redis://127.0.0.3/0") == ("127.0.0.3", 6379)
    assert first_address("unix:///tmp/redis.sock") is None
    assert address_towards("redis+sentinel://127.0.0.1:26380/conveyor") == "127.0.0.1"


async def test_a_sentinel_url_builds_a_client_that_asks_the_sentinels_for_the_master() -> None:
    client = redis_client.connect("redis+sentinel://:pw@127.0.0.1:1,127.0.0.1:2/conveyor/3")
    try:
        pool = client.connection_pool
        assert isinstance(pool, SentinelConnectionPool)
        assert pool.service_name == "conveyor" and pool.is_master
        assert pool.connection_kwargs["db"] == 3 and pool.connection_kwargs["password"] == "pw"
        assert pool.connection_kwargs["socket_timeout"] == redis_client.READ_TIMEOUT_SECONDS
        sentinels = [s.connection_pool.connection_kwargs for s in pool.sentinel_manager.sentinels]
        assert [(s["host"], s["port"]) for s in sentinels] == [("127.0.0.1", 1), ("127.0.0.1", 2)]
        assert all(s["socket_connect_timeout"] == redis_client.CONNECT_TIMEOUT_SECONDS for s in sentinels)
    finally:
        await redis_client.close(client)


def test_a_cluster_url_names_its_nodes_credentials_and_tls_options() -> None:
    url = "redis+cluster://:s3cret@10.0.0.1:7000,node-b,[::1]:7002"
    assert parse_cluster(url) == ClusterTarget(
        nodes=(("10.0.0.1", 7000), ("node-b", 6379), ("::1", 7002)), password="s3cret"
    )
    tls = parse_cluster("rediss+cluster://user:p%40w@h/0?ssl_cert_reqs=none&ssl_ca_certs=/ca.pem")
    assert tls == ClusterTarget(
        nodes=(("h", 6379),),
        username="user",
        password="p@w",
        tls=True,
        options=(("ssl_cert_reqs", "none"), ("ssl_ca_certs", "/ca.pem")),
    )
    assert parse_cluster("redis+cluster://h1:1,h2:2/") == ClusterTarget(nodes=(("h1", 1), ("h2", 2)))
    assert parse_cluster("redis+cluster://h1?") == ClusterTarget(nodes=(("h1", 6379),))


@pytest.mark.parametrize(
    "url", ["redis://localhost:6379/0", "unix:///tmp/redis.sock", "redis+sentinel://h/conveyor", "cluster://h"]
)
def test_other_urls_are_not_cluster_urls(url: str) -> None:
    assert parse_cluster(url) is None
    assert not redis_client.is_cluster_url(url)


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("redis+cluster://", "has the form"),  # no node
        ("redis+cluster://:pw@/0", "has the form"),
        ("redis+cluster://h1:notaport", "lists nodes as host[:port]"),
        ("redis+cluster://h1,:7000", "lists nodes as host[:port]"),
        ("redis+cluster://h1/1", "only database 0"),
        ("redis+cluster://h1/0/x", "only database 0"),
        ("redis+cluster://h1?read_from_replicas=yes", "takes only ssl_ca_certs, ssl_cert_reqs"),
        ("rediss+cluster://h1?ssl_cert_reqs=maybe", "one of none, optional, required"),
        ("redis+cluster://h1?ssl_cert_reqs=none", "goes with TLS"),
    ],
)
def test_a_malformed_cluster_url_is_refused(url: str, says: str) -> None:
    with pytest.raises(ValueError, match=re.escape(says)):
        parse_cluster(url)


def test_a_malformed_cluster_url_is_one_line_naming_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONVEYOR_REDIS_URL", "redis+cluster://:hunter2@h1:7000/2")
    with pytest.raises(SystemExit) as exited:
        cli.main(["gateway"])
    message = str(exited.value.code)
    assert "\n" not in message and "(set CONVEYOR_REDIS_URL," in message and "database 0" in message
    assert "hunter2" not in message


CLUSTER = "redis+cluster://:hunter2@127.0.0.1:7000,127.0.0.1:7001"


@pytest.mark.parametrize("command", ["gateway", "worker"])
def test_arq_on_a_cluster_is_refused_in_one_line(monkeypatch: pytest.MonkeyPatch, command: str) -> None:
    monkeypatch.setenv("CONVEYOR_REDIS_URL", CLUSTER)  # arq by default
    with pytest.raises(SystemExit) as exited:
        cli.main([command, "--model", "m"] if command == "worker" else [command])
    message = str(exited.value.code)
    assert "\n" not in message and "Redis Cluster needs CONVEYOR_QUEUE_BACKEND=streams" in message
    assert "(set CONVEYOR_QUEUE_BACKEND," in message and "hunter2" not in message


def test_every_process_refuses_arq_on_a_cluster_and_takes_streams(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONVEYOR_REDIS_URL", CLUSTER)
    builders: list[Callable[[], RedisSettings]] = [GatewaySettings, lambda: WorkerSettings(model="m"), UpSettings]
    for build in builders:
        monkeypatch.setenv("CONVEYOR_QUEUE_BACKEND", "arq")
        with pytest.raises(ValidationError, match="Redis Cluster needs CONVEYOR_QUEUE_BACKEND=streams"):
            build()
        monkeypatch.setenv("CONVEYOR_QUEUE_BACKEND", "streams")
        assert build().queue_backend is QueueBackend.STREAMS
    monkeypatch.delenv("CONVEYOR_REDIS_URL")  # conveyor up's embedded Redis, and a single Redis, take either
    monkeypatch.setenv("CONVEYOR_QUEUE_BACKEND", "arq")
    assert UpSettings().redis_url is None and UpSettings().queue_backend is QueueBackend.ARQ
    monkeypatch.setenv("CONVEYOR_REDIS_URL", "redis://h:1/0")
    assert GatewaySettings().queue_backend is QueueBackend.ARQ


def test_the_first_listed_node_is_where_the_advertised_address_is_found() -> None:
    assert first_address("redis+cluster://127.0.0.2:7001,10.9.9.9") == ("127.0.0.2", 7001)
    assert first_address("rediss+cluster://u:p@node-a") == ("node-a", 6379)
    assert address_towards("redis+cluster://127.0.0.1:7000") == "127.0.0.1"


async def test_a_cluster_url_builds_a_cluster_client_whose_node_subscribers_get_the_same_timeouts() -> None:
    client = redis_client.connect("redis+cluster://u:pw@127.0.0.1:1,127.0.0.1:2")
    try:
        assert redis_client.is_cluster(client)
        cluster = cast(RedisCluster, client)
        startup = cluster.nodes_manager.startup_nodes
        assert sorted(startup) == ["127.0.0.1:1", "127.0.0.1:2"]
        for node in startup.values():
            kwargs = node.connection_kwargs
            assert (kwargs["username"], kwargs["password"]) == ("u", "pw")
            assert kwargs["socket_timeout"] == redis_client.READ_TIMEOUT_SECONDS
            assert kwargs["socket_connect_timeout"] == redis_client.CONNECT_TIMEOUT_SECONDS
        options = cast(redis_client.ClusterClient, client).node_options  # a node's subscriber is built with these
        assert (options["username"], options["password"], options["ssl"]) == ("u", "pw", False)
        assert options["socket_timeout"] == redis_client.READ_TIMEOUT_SECONDS
        assert options["socket_connect_timeout"] == redis_client.CONNECT_TIMEOUT_SECONDS
        assert redis_client.pubsub(client) is redis_client.SHARDED
        assert "redis.call('SPUBLISH', channel, message)" in redis_client.publish_lua(client)
    finally:
        await redis_client.close(client)


async def test_a_single_redis_subscribes_through_itself_with_classic_pubsub() -> None:
    client = redis_client.connect("redis://127.0.0.1:1/0")
    try:
        assert not redis_client.is_cluster(client) and await redis_client.subscriber(client, "c") is client
        assert redis_client.pubsub(client) is redis_client.CLASSIC
        assert "redis.call('PUBLISH', channel, message)" in redis_client.publish_lua(client)
    finally:
        await redis_client.close(client)


async def test_a_connection_closed_under_a_command_fails_as_a_connection_error() -> None:
    """redis-py closes connections other tasks are using when a node fails; the command using one then fails in its
    connection code with AttributeError (the writer is gone), which every caller must see as Redis being down."""
    closed = Connection()  # as one is after ``disconnect()``: no writer
    with pytest.raises(RedisConnectionError) as caught, redis_client.connection_closed_in_use():
        await closed._send_packed_command([b"PING\r\n"])
    assert isinstance(caught.value.__cause__, AttributeError)
    assert isinstance(redis_client.connect("redis://127.0.0.1:1/0"), redis_client.PlainClient)


def test_an_error_of_conveyors_own_code_is_left_as_it_is() -> None:
    with pytest.raises(AttributeError), redis_client.connection_closed_in_use():
        cast(Any, None).writelines([])


async def test_a_cluster_clients_startup_nodes_survive_a_failing_node_popped_during_initialize() -> None:
    """redis-py 5.3 iterates the startup nodes across awaits while a failing command pops a node from them
    (redis-py #3565); and a node the URL names stays, so the slot map can always be read again (#2472)."""
    client = redis_client.connect("redis+cluster://127.0.0.1:7000,127.0.0.1:7001")
    nodes = cast(RedisCluster, client).nodes_manager.startup_nodes
    nodes["127.0.0.1:7002"] = ClusterNode("127.0.0.1", 7002)  # one found in the slot map
    for node in nodes.values():  # a snapshot: popping while iterating is safe
        nodes.pop(node.name, None)
    assert sorted(nodes) == ["127.0.0.1:7000", "127.0.0.1:7001"]
    await redis_client.close(client)
