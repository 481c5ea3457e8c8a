"""bff on Redis Cluster: three masters with a replica each, ACL auth from ``session.redis``.

The store URL names two seed nodes (``redis+cluster://a,b``); the client learns the slot map and
follows MOVED after a failover. Every key bff writes is one key per command or script, and keys
that must live together (a session and its lock) share a ``{hash tag}``: the contract suite
passes here only because of that.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from ha_scenarios import Topology, failover_scenario, functional_scenario
from redis.crc import key_slot

from bff.errors import StoreUnavailable
from bff.store import open_store
from bff.store.redis import RedisStore
from tests.support.procs import OidcProvider
from tests.support.redis_procs import RedisClusterGroup, RedisNode
from tests.unit.store_contract import Advance, StoreContract


@pytest.fixture(scope="module")
def group() -> Iterator[RedisClusterGroup]:
    with RedisClusterGroup() as cluster:
        yield cluster


def topology(group: RedisClusterGroup) -> Topology:
    return Topology(group.url, group.redis_config())


class TestClusterStore(StoreContract):
    @pytest.fixture
    async def store(self, group: RedisClusterGroup) -> AsyncIterator[RedisStore]:
        group.flush()
        store = open_store(group.url, timeout=2.0, redis=topology(group).settings())
        assert isinstance(store, RedisStore)
        # redis-py 8's cluster client spends ~150 ms discovering the cluster on its first
        # command, longer than the contract's short TTLs: connect before the clock matters.
        await store.ping()
        yield store
        await store.close()

    @pytest.fixture
    def advance(self) -> Advance:
        return asyncio.sleep


async def test_the_contract_keys_really_span_several_shards(group: RedisClusterGroup) -> None:
    """Otherwise the suite above would prove nothing about cross-slot commands."""
    keys = ["k:1", "k:2", "k:short", "k:long", "l", "i:1", "a", "b"]
    assert len({group.master_of(k).port for k in keys}) > 1
    assert len({key_slot(k.encode()) for k in keys}) == len(keys)


async def test_without_the_acl_password_the_cluster_store_is_unavailable(
    group: RedisClusterGroup,
) -> None:
    store = open_store(group.url, timeout=2.0)
    try:
        with pytest.raises(StoreUnavailable):
            await store.set("bff:{x}:s", b"v", 10)
    finally:
        await store.close()


async def test_a_burst_beyond_the_connection_limit_waits_instead_of_failing(
    group: RedisClusterGroup,
) -> None:
    settings = topology(group).settings()
    store = RedisStore.from_url(group.url, timeout=10.0, redis=settings, max_connections=4)
    try:
        await store.set("bff:{burst}:s", b"v", 10)
        values = await asyncio.gather(*(store.get("bff:{burst}:s") for _ in range(200)))
        assert values == [b"v"] * 200
    finally:
        await store.close()


async def test_login_proxy_refresh_cli_and_backchannel_logout_through_cluster(
    group: RedisClusterGroup, oidc_op: OidcProvider, tmp_path: Path
) -> None:
    await functional_scenario(topology(group), oidc_op, tmp_path)


@pytest.fixture
def long_lived_op() -> Iterator[OidcProvider]:
    """An OP whose access tokens outlive the test: no refresh may race the failover."""
    with OidcProvider(access_ttl=600) as op:
        yield op


@pytest.mark.parametrize("fault", ["kill", "freeze"])
async def test_losing_a_cluster_master_under_load_gives_503_at_worst_and_loses_no_session(
    long_lived_op: OidcProvider, tmp_path: Path, fault: str
) -> None:
    """``kill``: SIGKILL. ``freeze``: SIGSTOP, a hung master whose sockets stay open."""
    with RedisClusterGroup() as fresh:  # its own cluster: this test loses a master

        def kill(session_keys: list[str]) -> object:
            victim = fresh.master_of(session_keys[0])  # at least one user's shard
            victim.stop() if fault == "kill" else victim.pause()
            return victim

        def failover(dead: object) -> object:
            assert isinstance(dead, RedisNode)
            return fresh.wait_failover(dead)

        await failover_scenario(
            topology(fresh),
            long_lived_op,
            tmp_path,
            users=6,
            wait_replicated=fresh.wait_replicated,
            kill_master=kill,
            wait_failover=failover,
            label=f"cluster, master {fault}",
        )
