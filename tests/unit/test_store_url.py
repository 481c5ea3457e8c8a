"""``bff.store.url``: the store URLs bff accepts, and the client each one opens."""

from __future__ import annotations

import pytest
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster

from bff.config import RedisSettings, Secret
from bff.store import open_store
from bff.store.memory import MemoryStore
from bff.store.redis import RedisStore
from bff.store.url import StoreUrl, StoreUrlError, parse_store_url


def test_a_sentinel_url_names_the_sentinels_the_master_and_the_db() -> None:
    url = parse_store_url("redis+sentinel://bff:p%40ss@s1:26380,s2,[::1]:26381/mymaster/3")
    assert url.kind == "sentinel" and not url.tls
    assert url.nodes == (("s1", 26380), ("s2", 26379), ("::1", 26381))
    assert (url.master, url.db) == ("mymaster", 3)
    assert (url.username, url.password) == ("bff", "p@ss")
    assert "p@ss" not in repr(url) and "p%40ss" not in repr(url)


def test_a_cluster_url_names_seed_nodes() -> None:
    url = parse_store_url("rediss+cluster://:pw@n1:7000,n2/")
    assert url.kind == "cluster" and url.tls
    assert url.nodes == (("n1", 7000), ("n2", 6379))
    assert (url.username, url.password, url.db) == (None, "pw", 0)


@pytest.mark.parametrize(
    ("given", "kind", "tls"),
    [
        ("memory://", "memory", False),
        ("redis://r:6379/0", "redis", False),
        ("rediss://u:pw@r/1", "redis", True),
        ("unix:///run/redis.sock?db=2", "redis", False),
        ("REDIS+CLUSTER://n1", "cluster", False),
    ],
)
def test_single_node_urls_are_left_to_redis_py(given: str, kind: str, tls: bool) -> None:
    url = parse_store_url(given)
    assert (url.kind, url.tls, url.url) == (kind, tls, given)


@pytest.mark.parametrize(
    "bad",
    [
        "redis+sentinel://u:secretpw@s1",  # no master
        "redis+sentinel://u:secretpw@s1/m/0/1",
        "redis+sentinel://u:secretpw@s1:99999/m",
        "redis+cluster://u:secretpw@n1,/",
        "redis+cluster://u:secretpw@n1/1",
        "redis+cluster://u:secretpw@n1#x",
        "redis+sentinel+tls://u:secretpw@s1/m",
        "redis://u:secretpw@r:port",
        "no scheme secretpw",
    ],
)
def test_bad_urls_are_refused_without_echoing_them(bad: str) -> None:
    with pytest.raises(StoreUrlError) as info:
        parse_store_url(bad)
    assert "secretpw" not in str(info.value)


def test_open_store_picks_the_client_for_each_topology() -> None:
    assert isinstance(open_store("memory://"), MemoryStore)
    single = open_store("redis://127.0.0.1:1/0", timeout=0.25)
    assert isinstance(single, RedisStore) and isinstance(single.client, Redis)
    assert single.timeout == 0.25
    sentinel = open_store(
        "redis+sentinel://127.0.0.1:1,127.0.0.1:2/m/4",
        redis=RedisSettings(password=Secret("pw"), sentinel_password=Secret("spw")),
    )
    assert isinstance(sentinel, RedisStore) and isinstance(sentinel.client, Redis)
    kwargs = sentinel.client.connection_pool.connection_kwargs
    assert (kwargs["db"], kwargs["password"], kwargs["socket_timeout"]) == (4, "pw", 0.4)
    cluster = open_store("redis+cluster://u:pw@127.0.0.1:1", timeout=0.3)
    assert isinstance(cluster, RedisStore) and isinstance(cluster.client, RedisCluster)
    assert cluster.timeout == 0.3


def test_the_url_type_is_immutable() -> None:
    url = parse_store_url("redis+cluster://n1")
    assert isinstance(url, StoreUrl)
    with pytest.raises(AttributeError):
        url.kind = "redis"  # type: ignore[misc]
