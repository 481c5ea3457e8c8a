"""bff on Redis Sentinel: a master, a replica and three sentinels, all behind ACL auth.

The store URL is ``redis+sentinel://bff:PASSWORD@s1,s2,s3/bffmaster/0`` (the data nodes' ACL
user in the URL) and ``session.redis`` holds the sentinels' own password: auth everywhere.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from ha_scenarios import Topology, failover_scenario, functional_scenario

from bff.errors import StoreUnavailable
from bff.store import open_store
from bff.store.redis import RedisStore
from tests.support.procs import OidcProvider
from tests.support.redis_procs import SentinelGroup, wait_until
from tests.unit.store_contract import Advance, StoreContract


@pytest.fixture(scope="module")
def group() -> Iterator[SentinelGroup]:
    with SentinelGroup() as sentinels:
        yield sentinels


def topology(group: SentinelGroup) -> Topology:
    return Topology(group.url, group.redis_config())


class TestSentinelStore(StoreContract):
    @pytest.fixture
    async def store(self, group: SentinelGroup) -> AsyncIterator[RedisStore]:
        with group.current_master().client() as r:
            r.flushall()
        store = open_store(group.url, timeout=2.0, redis=topology(group).settings())
        assert isinstance(store, RedisStore)
        yield store
        await store.close()

    @pytest.fixture
    def advance(self) -> Advance:
        return asyncio.sleep


async def test_without_the_sentinels_password_the_store_is_unavailable(
    group: SentinelGroup,
) -> None:
    store = open_store(group.url, timeout=2.0)
    try:
        with pytest.raises(StoreUnavailable):
            await store.ping()
    finally:
        await store.close()


async def test_a_burst_beyond_the_connection_pool_waits_instead_of_failing(
    group: SentinelGroup,
) -> None:
    settings = topology(group).settings()
    store = RedisStore.from_url(group.url, timeout=10.0, redis=settings, max_connections=4)
    try:
        await store.set("bff:{burst}:s", b"v", 10)
        values = await asyncio.gather(*(store.get("bff:{burst}:s") for _ in range(200)))
        assert values == [b"v"] * 200
    finally:
        await store.close()


async def test_login_proxy_refresh_cli_and_backchannel_logout_through_sentinel(
    group: SentinelGroup, oidc_op: OidcProvider, tmp_path: Path
) -> None:
    await functional_scenario(topology(group), oidc_op, tmp_path)


@pytest.fixture
def long_lived_op() -> Iterator[OidcProvider]:
    """An OP whose access tokens outlive the test: no refresh may race the failover."""
    with OidcProvider(access_ttl=600) as op:
        yield op


@pytest.mark.parametrize("fault", ["kill", "freeze"])
async def test_losing_the_master_under_load_gives_503_at_worst_and_loses_no_session(
    long_lived_op: OidcProvider, tmp_path: Path, fault: str
) -> None:
    """``kill``: SIGKILL (connections refused at once). ``freeze``: SIGSTOP, a hung master whose
    sockets stay open: calls to it must end at the store timeout, not hang."""
    with SentinelGroup() as fresh:  # its own group: this test loses a master
        old = fresh.current_master()

        def kill(_keys: list[str]) -> object:
            old.stop() if fault == "kill" else old.pause()
            return old

        def failover(dead: object) -> object:
            new = fresh.wait_failover(old)
            wait_until("the new master is writable", lambda: new.ping(), 30)
            return new

        await failover_scenario(
            topology(fresh),
            long_lived_op,
            tmp_path,
            users=6,
            wait_replicated=fresh.wait_replicated,
            kill_master=kill,
            wait_failover=failover,
            label=f"sentinel, master {fault}",
        )
