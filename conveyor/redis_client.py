"""The one way every process builds its Redis client: bounded connect and read timeouts, so a Redis that hangs is
noticed instead of hanging its caller. Nothing blocks on Redis longer than a second by design (the reply inbox and
the pub/sub readers wait in bounded slices), so a read that takes longer than ``READ_TIMEOUT_SECONDS`` means Redis
is not answering.

``CONVEYOR_REDIS_URL`` is a plain Redis URL (``redis://``, ``rediss://``, ``unix://``) or a Sentinel URL::

    redis+sentinel://[[username]:password@]host[:port][,host[:port]...]/service-name[/db][?sentinel_password=...]

(``rediss+sentinel://`` for TLS; a sentinel's port defaults to 26379). With a Sentinel URL the client asks the
sentinels for the service's master before each new connection (redis-py's ``SentinelConnectionPool``); a connection
to a master that died or was demoted fails, and the caller's outage handling (``conveyor.outage``) retries until the
sentinels name the new master. The username and password are the master's; ``sentinel_password`` (and
``sentinel_username``) the sentinels' own, when they require one.

A Redis Cluster URL lists some of the cluster's nodes (the client discovers the rest and follows the slot map)::

    redis+cluster://[[username]:password@]host[:port][,host[:port]...][/[0]][?ssl_ca_certs=...&ssl_cert_reqs=...]

(``rediss+cluster://`` for TLS, the only form the ``ssl_*`` parameters go with; a node's port defaults to 6379; a
cluster has only database 0). Its client is redis-py's ``RedisCluster``, which has no pub/sub and no transactions:
``subscriber`` gives the plain client SUBSCRIBE goes through (a PUBLISH on any node reaches every node's
subscribers), and only the ``streams`` queue backend runs on a cluster (``check_queue_backend``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, cast
from urllib.parse import parse_qs, unquote, urlsplit

from pydantic import AfterValidator
from redis.asyncio import ConnectionPool, Redis, RedisCluster
from redis.asyncio.cluster import ClusterNode
from redis.asyncio.connection import Connection, SSLConnection
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool

from conveyor.contract import QueueBackend

#: where every process looks for Redis unless ``CONVEYOR_REDIS_URL`` (or ``--redis-url``) says otherwise
DEFAULT_REDIS_URL = "redis://localhost:6379/0"

#: a Redis that does not accept a connection within this long counts as down
CONNECT_TIMEOUT_SECONDS = 2.0
#: ... and one that does not answer a command within this long
READ_TIMEOUT_SECONDS = 5.0

SENTINEL_SCHEMES = {"redis+sentinel": False, "rediss+sentinel": True}  # scheme -> TLS
SENTINEL_PORT = 26379
SENTINEL_URL_FORM = "redis+sentinel://[[user]:password@]host[:port][,host[:port]...]/service-name[/db]"

CLUSTER_SCHEMES = {"redis+cluster": False, "rediss+cluster": True}  # scheme -> TLS
CLUSTER_PORT = 6379
CLUSTER_URL_FORM = "redis+cluster://[[user]:password@]host[:port][,host[:port]...][/?query]"
#: the query parameters a cluster URL may carry, and the values each takes (None: any); TLS only
CLUSTER_OPTIONS: dict[str, tuple[str, ...] | None] = {
    "ssl_ca_certs": None,
    "ssl_cert_reqs": ("none", "optional", "required"),
}


@dataclass(frozen=True)
class SentinelTarget:
    """What a Sentinel URL names: the sentinels to ask, the service (master group) and the database."""

    sentinels: tuple[tuple[str, int], ...]
    service: str
    db: int = 0
    username: str | None = None
    password: str | None = None
    sentinel_username: str | None = None
    sentinel_password: str | None = None
    tls: bool = False


@dataclass(frozen=True)
class ClusterTarget:
    """What a Redis Cluster URL names: nodes to discover the cluster from, credentials, TLS and its options."""

    nodes: tuple[tuple[str, int], ...]
    username: str | None = None
    password: str | None = None
    tls: bool = False
    #: ``CLUSTER_OPTIONS`` the URL sets, as (name, value) pairs
    options: tuple[tuple[str, str], ...] = ()


def parse_sentinel(url: str) -> SentinelTarget | None:
    """The sentinels and service of a Sentinel URL; None for any other URL. Raises ValueError for a malformed one."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.lower() not in SENTINEL_SCHEMES:
        return None
    netloc, _, tail = rest.partition("/")
    path, _, query = tail.partition("?")
    username, password, hosts = _credentials(netloc)
    sentinels = tuple(_host_port(part, url, "Sentinel", SENTINEL_PORT) for part in hosts.split(",") if part)
    parts = [p for p in path.split("/") if p]
    if not sentinels or not parts or len(parts) > 2 or (len(parts) == 2 and not parts[1].isdigit()):
        raise ValueError(f"a Sentinel URL has the form {SENTINEL_URL_FORM}, not {_redacted(url)!r}")
    params = {k: v[-1] for k, v in parse_qs(query).items()}
    return SentinelTarget(
        sentinels=sentinels,
        service=unquote(parts[0]),
        db=int(parts[1]) if len(parts) == 2 else 0,
        username=username,
        password=password,
        sentinel_username=params.get("sentinel_username"),
        sentinel_password=params.get("sentinel_password"),
        tls=SENTINEL_SCHEMES[scheme.lower()],
    )


def parse_cluster(url: str) -> ClusterTarget | None:
    """The nodes and options of a Redis Cluster URL; None for any other URL. Raises ValueError for a malformed one."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.lower() not in CLUSTER_SCHEMES:
        return None
    tls = CLUSTER_SCHEMES[scheme.lower()]
    rest, _, query = rest.partition("?")
    netloc, _, path = rest.partition("/")
    username, password, hosts = _credentials(netloc)
    nodes = tuple(_host_port(part, url, "Redis Cluster", CLUSTER_PORT) for part in hosts.split(",") if part)
    if not nodes:
        raise ValueError(f"a Redis Cluster URL has the form {CLUSTER_URL_FORM}, not {_redacted(url)!r}")
    if path.strip("/") not in ("", "0"):
        raise ValueError(f"a Redis Cluster has only database 0; drop {'/' + path!r} from {_redacted(url)!r}")
    options = []
    for name, values in parse_qs(query, keep_blank_values=True).items():
        if name not in CLUSTER_OPTIONS:
            known = ", ".join(CLUSTER_OPTIONS)
            raise ValueError(f"a Redis Cluster URL takes only {known} in its query, not {name!r}")
        allowed = CLUSTER_OPTIONS[name]
        if allowed is not None and values[-1] not in allowed:
            raise ValueError(f"{name} in a Redis Cluster URL is one of {', '.join(allowed)}, not {values[-1]!r}")
        if not tls:
            raise ValueError(f"{name} goes with TLS: the URL's scheme is rediss+cluster://, not {scheme}://")
        options.append((name, values[-1]))
    return ClusterTarget(nodes=nodes, username=username, password=password, tls=tls, options=tuple(options))


def _credentials(netloc: str) -> tuple[str | None, str | None, str]:
    """A URL's username and password (None where absent) and what follows them (its hosts)."""
    credentials, at, hosts = netloc.rpartition("@")
    if not at:
        return None, None, hosts
    user, colon, secret = credentials.partition(":")
    return (unquote(user) or None), (unquote(secret) if colon else None), hosts


def _host_port(part: str, url: str, kind: str, default_port: int) -> tuple[str, int]:
    parsed = urlsplit(f"//{part}")
    try:
        port = parsed.port or default_port
    except ValueError:
        port = 0
    if not parsed.hostname or not port:
        what = "sentinels" if kind == "Sentinel" else "nodes"
        raise ValueError(f"a {kind} URL lists {what} as host[:port], not {part!r} (in {_redacted(url)!r})")
    return parsed.hostname, port


def _redacted(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    credentials, at, tail = rest.rpartition("@")
    return f"{scheme}{sep}***@{tail}" if at and credentials else url


def is_cluster_url(url: str) -> bool:
    scheme, sep, _ = url.partition("://")
    return bool(sep) and scheme.lower() in CLUSTER_SCHEMES


def check_url(url: str) -> str:
    """A settings validator: a Sentinel or Cluster URL must be well-formed (other URLs are checked by redis-py on
    connect)."""
    parse_sentinel(url)
    parse_cluster(url)
    return url


def check_queue_backend(url: str, backend: QueueBackend) -> None:
    """Raises ValueError for a queue backend that cannot run on the URL's Redis: arq's layout needs MULTI/EXEC and
    scripts across keys of many slots, which a Redis Cluster refuses."""
    if backend is not QueueBackend.STREAMS and is_cluster_url(url):
        raise ValueError(
            f"Redis Cluster needs CONVEYOR_QUEUE_BACKEND=streams, not {backend.value!r} "
            f"(CONVEYOR_REDIS_URL is {_redacted(url)!r})"
        )


#: the type of every process's ``redis_url`` setting
RedisUrl = Annotated[str, AfterValidator(check_url)]


def first_address(url: str) -> tuple[str, int] | None:
    """A host and port the URL's Redis (or its first sentinel, or first listed cluster node) answers at; None for a
    unix socket."""
    target = parse_sentinel(url)
    if target is not None:
        return target.sentinels[0]
    cluster = parse_cluster(url)
    if cluster is not None:
        return cluster.nodes[0]
    parts = urlsplit(url)
    if parts.scheme == "unix" or not parts.hostname:
        return None
    return parts.hostname, parts.port or 6379


def _timeouts() -> dict[str, Any]:
    return {"socket_connect_timeout": CONNECT_TIMEOUT_SECONDS, "socket_timeout": READ_TIMEOUT_SECONDS}


def connect(url: str) -> Redis:
    timeouts = _timeouts()
    cluster = parse_cluster(url)
    if cluster is not None:
        return _connect_cluster(cluster)
    target = parse_sentinel(url)
    if target is None:
        return Redis(connection_pool=ConnectionPool.from_url(url, health_check_interval=30, **timeouts))
    sentinels = Sentinel(  # type: ignore[no-untyped-call]
        list(target.sentinels),
        sentinel_kwargs={"username": target.sentinel_username, "password": target.sentinel_password, **timeouts},
    )
    master: Redis = sentinels.master_for(
        target.service,
        db=target.db,
        username=target.username,
        password=target.password,
        ssl=target.tls,
        health_check_interval=30,
        **timeouts,
    )
    return master


class ClusterClient(RedisCluster):
    """redis-py's cluster client, holding the plain client its subscriptions go through (``subscriber``)."""

    subscriber: Redis


def _connect_cluster(target: ClusterTarget) -> Redis:
    common: dict[str, Any] = {
        "username": target.username,
        "password": target.password,
        "health_check_interval": 30,
        **_timeouts(),
        **dict(target.options),
    }
    nodes = [ClusterNode(host, port) for host, port in target.nodes]
    cluster = ClusterClient(startup_nodes=nodes, ssl=target.tls, **common)
    connection = _AnyNodeSSLConnection if target.tls else _AnyNodeConnection
    pool = ConnectionPool(connection_class=connection, nodes=lambda: _node_addresses(cluster), **common)
    cluster.subscriber = Redis(connection_pool=pool)
    # RedisCluster is no subclass of Redis, but it answers the same key commands; every caller holds its client as a
    # Redis, so the cast keeps one type through the code base. What differs is pub/sub (``subscriber``), MULTI/EXEC
    # (refused: use one script on one slot) and a script's keys (one slot), and those are the callers' business.
    return cast(Redis, cluster)


def _node_addresses(cluster: RedisCluster) -> list[tuple[str, int]]:
    """Where a subscriber may connect: the cluster's primaries as last discovered, then the URL's nodes."""
    known = [(node.host, int(node.port)) for node in cluster.get_primaries()]
    listed = [(node.host, int(node.port)) for node in cluster.nodes_manager.startup_nodes.values()]
    return list(dict.fromkeys(known + listed))


class _AnyNodeConnection(Connection):
    """A connection to the first node of ``nodes()`` that accepts one: a PUBLISH on any node of a cluster reaches
    the subscribers of every node, so a subscriber whose node died reconnects to another."""

    def __init__(self, *, nodes: Callable[[], list[tuple[str, int]]], **kwargs: Any) -> None:
        self._nodes = nodes
        super().__init__(**kwargs)

    async def _connect(self) -> None:
        failure: OSError | None = None
        for host, port in self._nodes():
            self.host, self.port = host, port
            try:
                await super()._connect()  # type: ignore[no-untyped-call]
                return
            except OSError as exc:  # refused, unreachable or timed out (TimeoutError is an OSError)
                failure = exc
        raise failure or OSError("the cluster has no node to connect to")


class _AnyNodeSSLConnection(_AnyNodeConnection, SSLConnection):
    pass


def is_cluster(redis: Redis) -> bool:
    return isinstance(cast(object, redis), RedisCluster)


def subscriber(redis: Redis) -> Redis:
    """The client to SUBSCRIBE through: the client itself, or for a cluster a plain client to one of its nodes
    (``RedisCluster`` has no pub/sub). It belongs to ``redis``: ``close(redis)`` closes it."""
    client = cast(object, redis)
    if isinstance(client, ClusterClient):
        plain: Redis = client.subscriber  # (mypy sees redis-py 5.3's RedisCluster as Any)
        return plain
    if isinstance(client, RedisCluster):
        raise TypeError("a cluster client without a subscriber: build it with redis_client.connect")
    return redis


async def publish(redis: Redis, channel: str, message: bytes | str) -> None:
    """PUBLISH outside a script, on a single Redis or a cluster (redis-py's ``RedisCluster`` has no ``publish``;
    the command itself reaches every node's subscribers, but its count is only of the node it ran on, so none is
    returned)."""
    await redis.execute_command("PUBLISH", channel, message)  # type: ignore[no-untyped-call]


async def close(redis: Redis) -> None:
    client = cast(object, redis)
    if isinstance(client, RedisCluster):
        await client.aclose()
        if isinstance(client, ClusterClient):
            await close(client.subscriber)
        return
    await redis.aclose()
    pool = redis.connection_pool
    await pool.disconnect()
    if isinstance(pool, SentinelConnectionPool):  # the sentinels' own clients
        for sentinel in pool.sentinel_manager.sentinels:
            await sentinel.aclose()
