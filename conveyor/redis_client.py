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
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any
from urllib.parse import parse_qs, unquote, urlsplit

from pydantic import AfterValidator
from redis.asyncio import ConnectionPool, Redis
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool

#: where every process looks for Redis unless ``CONVEYOR_REDIS_URL`` (or ``--redis-url``) says otherwise
DEFAULT_REDIS_URL = "redis://localhost:6379/0"

#: a Redis that does not accept a connection within this long counts as down
CONNECT_TIMEOUT_SECONDS = 2.0
#: ... and one that does not answer a command within this long
READ_TIMEOUT_SECONDS = 5.0

SENTINEL_SCHEMES = {"redis+sentinel": False, "rediss+sentinel": True}  # scheme -> TLS
SENTINEL_PORT = 26379
SENTINEL_URL_FORM = "redis+sentinel://[[user]:password@]host[:port][,host[:port]...]/service-name[/db]"


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


def parse_sentinel(url: str) -> SentinelTarget | None:
    """The sentinels and service of a Sentinel URL; None for any other URL. Raises ValueError for a malformed one."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.lower() not in SENTINEL_SCHEMES:
        return None
    netloc, _, tail = rest.partition("/")
    path, _, query = tail.partition("?")
    credentials, at, hosts = netloc.rpartition("@")
    username = password = None
    if at:
        user, colon, secret = credentials.partition(":")
        username, password = (unquote(user) or None), (unquote(secret) if colon else None)
    sentinels = tuple(_host_port(part, url) for part in hosts.split(",") if part)
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


def _host_port(part: str, url: str) -> tuple[str, int]:
    parsed = urlsplit(f"//{part}")
    try:
        port = parsed.port or SENTINEL_PORT
    except ValueError:
        port = 0
    if not parsed.hostname or not port:
        raise ValueError(f"a Sentinel URL lists sentinels as host[:port], not {part!r} (in {_redacted(url)!r})")
    return parsed.hostname, port


def _redacted(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    credentials, at, tail = rest.rpartition("@")
    return f"{scheme}{sep}***@{tail}" if at and credentials else url


def check_url(url: str) -> str:
    """A settings validator: a Sentinel URL must be well-formed (other URLs are checked by redis-py on connect)."""
    parse_sentinel(url)
    return url


#: the type of every process's ``redis_url`` setting
RedisUrl = Annotated[str, AfterValidator(check_url)]


def first_address(url: str) -> tuple[str, int] | None:
    """A host and port the URL's Redis (or its first sentinel) answers at; None for a unix socket."""
    target = parse_sentinel(url)
    if target is not None:
        return target.sentinels[0]
    parts = urlsplit(url)
    if parts.scheme == "unix" or not parts.hostname:
        return None
    return parts.hostname, parts.port or 6379


def connect(url: str) -> Redis:
    timeouts: dict[str, Any] = {
        "socket_connect_timeout": CONNECT_TIMEOUT_SECONDS,
        "socket_timeout": READ_TIMEOUT_SECONDS,
    }
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


async def close(redis: Redis) -> None:
    await redis.aclose()
    pool = redis.connection_pool
    await pool.disconnect()
    if isinstance(pool, SentinelConnectionPool):  # the sentinels' own clients
        for sentinel in pool.sentinel_manager.sentinels:
            await sentinel.aclose()
