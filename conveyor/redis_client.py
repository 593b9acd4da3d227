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
cluster has only database 0). Its client is redis-py's ``RedisCluster``, which has no pub/sub and no transactions,
and only the ``streams`` queue backend runs on a cluster (``check_queue_backend``).

Pub/sub is sharded on a cluster (Redis 7's ``SSUBSCRIBE``/``SPUBLISH``): a channel lives on the node that owns its
slot, so a stream's tokens stay on its model's shard instead of crossing the cluster bus to every node (classic
PUBLISH's broadcast). Every channel carries its model's hash tag, and the scripts that publish run on that slot.
``subscriber(redis, channel)`` gives the plain client of the node to subscribe through, ``pubsub(redis)`` the commands
and message types, ``publish_lua`` the publishing function the scripts call.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, cast
from urllib.parse import parse_qs, unquote, urlsplit

from pydantic import AfterValidator
from redis.asyncio import ConnectionPool, Redis, RedisCluster
from redis.asyncio.client import Pipeline, PubSub
from redis.asyncio.cluster import ClusterNode, ClusterPipeline
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
from redis.exceptions import ConnectionError as RedisConnectionError

from conveyor import redis_packing, redis_read_timeout, redis_reuse_check
from conveyor.contract import QueueBackend
from conveyor.outage import REDIS_DOWN

redis_packing.install()  # every client is built here: its commands are packed in C
redis_read_timeout.install()  # ... and its reads bounded in fewer steps
redis_reuse_check.install()  # ... and a pooled connection checked before reuse without a loop turn

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
#: the oldest server a cluster runs on: sharded pub/sub (``SSUBSCRIBE``, ``SPUBLISH``) came with Redis 7
CLUSTER_MIN_VERSION = (7, 0)
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
        return PlainClient(connection_pool=ConnectionPool.from_url(url, health_check_interval=30, **timeouts))
    sentinels = Sentinel(  # type: ignore[no-untyped-call]
        list(target.sentinels),
        sentinel_kwargs={"username": target.sentinel_username, "password": target.sentinel_password, **timeouts},
    )
    master: Redis = sentinels.master_for(
        target.service,
        redis_class=PlainClient,
        db=target.db,
        username=target.username,
        password=target.password,
        ssl=target.tls,
        health_check_interval=30,
        **timeouts,
    )
    return master


#: where redis-py's connection code lives (``connection_closed_in_use``)
_CONNECTION_MODULE = str(Path("redis", "asyncio", "connection.py"))


@contextlib.contextmanager
def connection_closed_in_use() -> Iterator[None]:
    """Raise a connection closed under a command as the ``ConnectionError`` it is.

    When a node fails, redis-py 5.3 closes connections that other tasks are using at that moment (a cluster client
    closes every node's; a connection pool's ``disconnect`` the ones in use too): their commands then fail inside its
    connection code with ``AttributeError`` (the writer is gone) or ``RuntimeError`` (the transport is closed). As a
    ``ConnectionError`` every caller's Redis-outage handling applies: a gateway's reply reader died of one during a
    cluster failover, and with it every non-streamed answer; requests got 500."""
    try:
        yield
    except (AttributeError, RuntimeError) as exc:
        if not _in_connection_code(exc):
            raise
        raise RedisConnectionError(f"connection closed under the command ({type(exc).__name__}: {exc})") from exc


def _in_connection_code(exc: BaseException) -> bool:
    tb = exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename.endswith(_CONNECTION_MODULE):
            return True
        tb = tb.tb_next
    return False


class PlainClient(Redis):
    """redis-py's client for one Redis (or a Sentinel's master): commands and pipelines under
    ``connection_closed_in_use``."""

    async def execute_command(self, *args: Any, **options: Any) -> Any:
        with connection_closed_in_use():
            return await super().execute_command(*args, **options)  # type: ignore[no-untyped-call]

    def pipeline(self, transaction: bool = True, shard_hint: str | None = None) -> Pipeline:
        return _Pipeline(self.connection_pool, self.response_callbacks, transaction, shard_hint)


class _Pipeline(Pipeline):
    async def execute(self, raise_on_error: bool = True) -> list[Any]:
        with connection_closed_in_use():
            return await super().execute(raise_on_error)


class ClusterClient(RedisCluster):
    """redis-py's cluster client (commands and pipelines under ``connection_closed_in_use``), holding a plain client
    per node for the channels that node owns (``subscriber``)."""

    subscribers: dict[str, Redis]
    node_options: dict[str, Any]

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        with connection_closed_in_use():
            return await super().execute_command(*args, **kwargs)

    async def initialize(self) -> RedisCluster:
        with connection_closed_in_use():
            return await super().initialize()

    def pipeline(self, transaction: Any | None = None, shard_hint: Any | None = None) -> ClusterPipeline:
        super().pipeline(transaction, shard_hint)  # what it refuses
        return _ClusterPipeline(self)  # type: ignore[abstract]


class _ClusterPipeline(ClusterPipeline):
    async def execute(self, raise_on_error: bool = True, allow_redirections: bool = True) -> list[Any]:
        with connection_closed_in_use():
            return await super().execute(raise_on_error, allow_redirections)


class _StartupNodes(dict[str, ClusterNode]):
    """redis-py 5.3's ``NodesManager.startup_nodes``, made safe for what happens to it during a failover.

    - ``values()`` is a copy: ``NodesManager.initialize`` iterates the dict across awaits while a command failing
      on a dead node pops that node from it, and the iteration raised ``RuntimeError: dictionary changed size``
      (a 500 for the request that was subscribing; redis-py #3565, fixed only in 6.x, which arq does not allow).
    - The URL's nodes are never popped: once every node had failed once (a whole-cluster restart), nothing would be
      left to read the slot map from, and the client would never find the cluster again (redis-py #2472)."""

    def __init__(self, nodes: dict[str, ClusterNode]) -> None:
        super().__init__(nodes)
        self.seeds = frozenset(nodes)

    def values(self) -> list[ClusterNode]:  # type: ignore[override]
        return list(super().values())

    def pop(self, name: str, *default: Any) -> Any:
        if name in self.seeds and name in self:
            return self[name]
        return super().pop(name, *default)


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
    cluster.nodes_manager.startup_nodes = _StartupNodes(cluster.nodes_manager.startup_nodes)
    cluster.subscribers = {}
    cluster.node_options = {"ssl": target.tls, **common}
    # RedisCluster is no subclass of Redis, but it answers the same key commands; every caller holds its client as a
    # Redis, so the cast keeps one type through the code base. What differs is pub/sub (``subscriber``), MULTI/EXEC
    # (refused: use one script on one slot) and a script's keys (one slot), and those are the callers' business.
    return cast(Redis, cluster)


class UnsupportedRedis(RuntimeError):
    """The Redis at ``CONVEYOR_REDIS_URL`` answers but cannot serve Conveyor's layout."""


async def check_server(url: str) -> None:
    """Raises ``UnsupportedRedis`` for a Redis Cluster with a master older than Redis 7 (no sharded pub/sub: its
    streams and cancels would fail one by one). A Redis that does not answer now is let be: every process waits for
    it (``conveyor.outage``)."""
    if not is_cluster_url(url):
        return
    redis = connect(url)
    try:
        with contextlib.suppress(*REDIS_DOWN):
            servers = await redis.info("server", target_nodes=RedisCluster.PRIMARIES)
            for node, server in servers.items():
                version = str(server.get("redis_version", "0"))
                if tuple(int(part) for part in version.split(".")[:2]) < CLUSTER_MIN_VERSION:
                    raise UnsupportedRedis(
                        f"Redis Cluster needs Redis {'.'.join(map(str, CLUSTER_MIN_VERSION))} or later for sharded "
                        f"pub/sub; the master at {node} runs {version}"
                    )
    finally:
        await close(redis)


def is_cluster(redis: Redis) -> bool:
    return isinstance(cast(object, redis), RedisCluster)


@dataclass(frozen=True, slots=True)
class PubSubCommands:
    """The commands and message types of classic or sharded pub/sub."""

    subscribe: str
    unsubscribe: str
    #: the type of a subscription's confirmation, of a message, and of an unsubscription (sharded: also sent unasked
    #: when the channel's slot moved to another node, whose subscribers get its messages from then on)
    subscribed: str
    message: str
    unsubscribed: str
    publish: str


CLASSIC = PubSubCommands("SUBSCRIBE", "UNSUBSCRIBE", "subscribe", "message", "unsubscribe", "PUBLISH")
SHARDED = PubSubCommands("SSUBSCRIBE", "SUNSUBSCRIBE", "ssubscribe", "smessage", "sunsubscribe", "SPUBLISH")


def pubsub(redis: Redis) -> PubSubCommands:
    """Sharded pub/sub on a cluster, classic elsewhere."""
    return SHARDED if is_cluster(redis) else CLASSIC


def publish_lua(redis: Redis) -> str:
    """The Lua function ``publish(channel, message)`` a script that publishes starts with: SPUBLISH on a cluster
    (the channel must hash to the script's slot: give it the model's tag), PUBLISH elsewhere."""
    command = pubsub(redis).publish
    return f"local function publish(channel, message) return redis.call('{command}', channel, message) end\n"


async def subscriber(redis: Redis, channel: str) -> Redis:
    """The client to subscribe to ``channel`` through: the client itself, or on a cluster a plain client to the node
    that owns the channel's slot now (one per node, closed by ``close(redis)``)."""
    client = cast(object, redis)
    if not isinstance(client, RedisCluster):
        return redis
    if not isinstance(client, ClusterClient):
        raise TypeError("a cluster client without subscribers: build it with redis_client.connect")
    await client.initialize()  # the slot map (a no-op once known)
    node = client.get_node_from_key(channel)
    if node is None:
        raise ConnectionError(f"no node of the cluster serves the slot of {channel!r}")
    plain: Redis | None = client.subscribers.get(node.name)
    if plain is None:
        plain = client.subscribers[node.name] = PlainClient(host=node.host, port=node.port, **client.node_options)
    return plain


async def send(pubsub: PubSub, *command: str) -> None:
    """A (S)SUBSCRIBE or (S)UNSUBSCRIBE, sent straight on the pub/sub connection (its replies arrive as messages).
    redis-py 5's ``PubSub`` knows no sharded pub/sub, and its bookkeeping would take a sharded channel for a
    classic one: its resubscription on reconnect, and its health check's PING (whose reply it reads inline, where a
    message may be waiting). A connection that fails is closed by its reader and never reused: one closed by it while
    this sends fails as a ``ConnectionError`` (``connection_closed_in_use``)."""
    with connection_closed_in_use():
        await pubsub.connect()  # type: ignore[no-untyped-call]
        connection = pubsub.connection
        if connection is None:
            raise ConnectionError("the pub/sub connection did not open")
        await connection.send_command(*command, check_health=False)


async def publish(redis: Redis, channel: str, message: bytes | str) -> None:
    """Publish outside a script (redis-py's ``RedisCluster`` has no ``publish``/``spublish``): SPUBLISH, routed to
    the channel's node, on a cluster."""
    await redis.execute_command(pubsub(redis).publish, channel, message)  # type: ignore[no-untyped-call]


async def forget_slots(redis: Redis) -> None:
    """After a subscriber's connection failed: on a cluster, read the slot map again (a node may have died or handed
    its slots over), so the next ``subscriber`` names the node that serves the channel now."""
    client = cast(object, redis)
    if isinstance(client, RedisCluster):
        with contextlib.suppress(Exception):  # the cluster is unreachable: the next attempt tries again
            await client.nodes_manager.initialize()


async def close(redis: Redis) -> None:
    client = cast(object, redis)
    if isinstance(client, RedisCluster):
        await client.aclose()
        if isinstance(client, ClusterClient):
            for plain in client.subscribers.values():
                await close(plain)
        return
    await redis.aclose()
    pool = redis.connection_pool
    await pool.disconnect()
    if isinstance(pool, SentinelConnectionPool):  # the sentinels' own clients
        for sentinel in pool.sentinel_manager.sentinels:
            await sentinel.aclose()
