"""``CONVEYOR_REDIS_URL``: plain Redis URLs and Sentinel URLs, read into the client every process builds."""

from __future__ import annotations

import pytest
from redis.asyncio.sentinel import SentinelConnectionPool

from conveyor import redis_client
from conveyor.netaddr import address_towards
from conveyor.redis_client import SentinelTarget, first_address, parse_sentinel
from launcher import cli


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
