"""The minimal Redis ACL user that docs/operations.md prescribes really is enough, and no more.

The rules are read from the doc itself (its ``user bff on ...`` lines), so the doc and this proof
cannot drift apart. Each is given to a second ACL user on real ``redis-server`` processes (the
``bff`` user of ``tests/support/redis_procs.py`` keeps ``+@all`` for the test's own checks), and
then: the store contract suite runs as that user, on one node and on a Cluster; real ``bff run``
processes log in, proxy, refresh, list and revoke sessions and take back-channel logouts as that
user (``ha_scenarios.functional_scenario``), on one node, through Sentinel and on a Cluster; and
the user is refused keys outside ``bff:*`` and commands bff never sends.

The contract suite uses short keys (``k:1``); :class:`Prefixed` puts ``bff:`` in front of each, as
every key bff itself writes starts with it (``bff/sessions.py``, ``bff/ratelimit.py``,
``bff/client_tokens.py``).
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import redis
from ha_scenarios import Topology, functional_scenario

from bff.config import RedisSettings, Secret
from bff.errors import StoreUnavailable
from bff.store.redis import RedisStore
from tests.support.bff_procs import base_config, write_config
from tests.support.procs import HOST, OidcProvider
from tests.support.redis_procs import (
    MASTER_NAME,
    SENTINEL_PASSWORD,
    RedisClusterGroup,
    RedisNode,
    SentinelGroup,
)
from tests.unit.store_contract import Advance, StoreContract

ROOT = Path(__file__).resolve().parent.parent.parent
DOC = ROOT / "docs" / "operations.md"
MIN_USER = "bff-min"
MIN_PASSWORD = "bff-min-password"  # a throw-away test server's password
PREFIX = "bff:"


def documented_rules(*, cluster: bool) -> list[str]:
    """The ACL rules of the doc's ``user bff on ...`` line for this topology, the password
    placeholder replaced by the test's."""
    lines = re.findall(r"^user bff on (.+)$", DOC.read_text(), flags=re.MULTILINE)
    assert len(lines) == 2, "docs/operations.md should hold two `user bff on` lines"
    line = next(rule for rule in lines if ("+cluster|slots" in rule) == cluster)
    rules = line.split()
    assert rules.count(">CHANGE-ME") == 1, rules
    return [f">{MIN_PASSWORD}" if rule == ">CHANGE-ME" else rule for rule in rules]


def add_min_user(node: RedisNode, rules: list[str]) -> None:
    with node.client() as r:
        r.execute_command("ACL", "SETUSER", MIN_USER, "reset", "on", *rules)


def min_settings() -> RedisSettings:
    return RedisSettings(username=MIN_USER, password=Secret(MIN_PASSWORD))


def min_topology(url: str, **more: str) -> Topology:
    return Topology(url, {"username": MIN_USER, "password": MIN_PASSWORD, **more})


class Prefixed:
    """A ``SessionStore`` that puts ``bff:`` in front of every key, as bff's own keys have it."""

    def __init__(self, inner: RedisStore) -> None:
        self.inner = inner

    async def get(self, key: str) -> bytes | None:
        return await self.inner.get(PREFIX + key)

    async def set(self, key: str, value: bytes, ttl: float) -> None:
        await self.inner.set(PREFIX + key, value, ttl)

    async def add(self, key: str, value: bytes, ttl: float) -> bool:
        return await self.inner.add(PREFIX + key, value, ttl)

    async def replace(self, key: str, expected: bytes, value: bytes, ttl: float) -> bool:
        return await self.inner.replace(PREFIX + key, expected, value, ttl)

    async def take(self, key: str) -> bytes | None:
        return await self.inner.take(PREFIX + key)

    async def delete(self, *keys: str) -> int:
        return await self.inner.delete(*(PREFIX + k for k in keys))

    async def expire(self, key: str, ttl: float) -> bool:
        return await self.inner.expire(PREFIX + key, ttl)

    async def ttl(self, key: str) -> float | None:
        return await self.inner.ttl(PREFIX + key)

    async def acquire_lock(self, key: str, owner: str, lease: float) -> bool:
        return await self.inner.acquire_lock(PREFIX + key, owner, lease)

    async def renew_lock(self, key: str, owner: str, lease: float) -> bool:
        return await self.inner.renew_lock(PREFIX + key, owner, lease)

    async def release_lock(self, key: str, owner: str) -> None:
        await self.inner.release_lock(PREFIX + key, owner)

    async def index_add(self, index: str, member: str, ttl: float) -> None:
        await self.inner.index_add(PREFIX + index, member, ttl)

    async def index_members(self, index: str) -> list[str]:
        return await self.inner.index_members(PREFIX + index)

    async def index_remove(self, index: str, *members: str) -> None:
        await self.inner.index_remove(PREFIX + index, *members)

    async def take_token(self, key: str, rate: float, burst: int) -> tuple[bool, float]:
        return await self.inner.take_token(PREFIX + key, rate, burst)

    async def ping(self) -> None:
        await self.inner.ping()

    async def close(self) -> None:
        await self.inner.close()


# -- one node ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def node() -> Iterator[RedisNode]:
    with RedisNode() as server:
        add_min_user(server, documented_rules(cluster=False))
        yield server


def node_url(node: RedisNode) -> str:
    return "redis://{}:{}/0".format(*node.address)


class TestMinimalAclStore(StoreContract):
    @pytest.fixture
    async def store(self, node: RedisNode) -> AsyncIterator[Prefixed]:
        with node.client() as r:
            r.flushall()
        store = Prefixed(RedisStore.from_url(node_url(node), timeout=2.0, redis=min_settings()))
        yield store
        await store.close()

    @pytest.fixture
    def advance(self) -> Advance:
        return asyncio.sleep


async def test_the_minimal_user_is_refused_keys_outside_bff(node: RedisNode) -> None:
    store = RedisStore.from_url(node_url(node), timeout=2.0, redis=min_settings())
    try:
        await store.set("bff:{x}:s", b"v", 30)  # the same call on a bff: key works
        with pytest.raises(StoreUnavailable):
            await store.set("other:{x}:s", b"v", 30)
        with pytest.raises(StoreUnavailable):
            await store.get("other")
    finally:
        await store.close()


@pytest.mark.parametrize(
    "command",
    [("FLUSHALL",), ("CONFIG", "GET", "maxmemory"), ("KEYS", "*"), ("EVAL", "return 1", "0")],
)
def test_the_minimal_user_is_refused_commands_bff_never_sends(
    node: RedisNode, command: tuple[str, ...]
) -> None:
    with (
        redis.Redis(
            host=node.address[0],
            port=node.address[1],
            username=MIN_USER,
            password=MIN_PASSWORD,
            socket_timeout=5,
        ) as r,
        pytest.raises(redis.exceptions.NoPermissionError),
    ):
        r.execute_command(*command)


async def test_bff_runs_end_to_end_as_the_minimal_user(
    node: RedisNode, oidc_op: OidcProvider, tmp_path: Path
) -> None:
    with node.client() as r:
        r.flushall()
    await functional_scenario(min_topology(node_url(node)), oidc_op, tmp_path)


def test_check_config_passes_as_the_minimal_user_named_in_session_redis(
    node: RedisNode, oidc_op: OidcProvider, tmp_path: Path
) -> None:
    """The credentials in ``session.redis`` (not in the URL) reach the preflight's store check,
    and the minimal user may run INFO, so the Redis version is known."""
    config = base_config(
        public_url="http://127.0.0.1:8080",
        issuer=oidc_op.issuer,
        client={"client_id": "c", "client_secret": "s"},
        store=node_url(node),
        keys=["k" * 43],
        static=tmp_path / "static",
    )
    config["session"]["redis"] = {"username": MIN_USER, "password": MIN_PASSWORD}
    path = write_config(tmp_path, config)
    result = subprocess.run(
        [sys.executable, "-m", "bff", "check-config", str(path)],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    out = result.stdout + result.stderr
    assert result.returncode == 0, out
    assert f"session.store {node_url(node)}: Redis 7." in out
    assert "refuses INFO" not in out and MIN_PASSWORD not in out


# -- Sentinel ---------------------------------------------------------------------------------


async def test_bff_runs_end_to_end_through_sentinel_as_the_minimal_user(
    oidc_op: OidcProvider, tmp_path: Path
) -> None:
    """The data nodes (master and replica) have the one-node rules; the sentinels their own auth."""
    with SentinelGroup() as group:
        for member in group.nodes:
            add_min_user(member, documented_rules(cluster=False))
        hosts = ",".join(f"{HOST}:{s.port}" for s in group.sentinels)
        url = f"redis+sentinel://{hosts}/{MASTER_NAME}/0"
        topology = min_topology(
            url, sentinel_username="default", sentinel_password=SENTINEL_PASSWORD
        )
        await functional_scenario(topology, oidc_op, tmp_path)


# -- Cluster ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster() -> Iterator[RedisClusterGroup]:
    with RedisClusterGroup() as group:
        for member in group.nodes:  # ACL users are per node: every node needs its own
            add_min_user(member, documented_rules(cluster=True))
        yield group


class TestMinimalAclClusterStore(StoreContract):
    @pytest.fixture
    async def store(self, cluster: RedisClusterGroup) -> AsyncIterator[Prefixed]:
        cluster.flush()
        inner = RedisStore.from_url(cluster.url, timeout=2.0, redis=min_settings())
        # redis-py 8's cluster client spends ~150 ms discovering the cluster on its first
        # command, longer than the contract's short TTLs: connect before the clock matters.
        await inner.ping()
        yield Prefixed(inner)
        await inner.close()

    @pytest.fixture
    def advance(self) -> Advance:
        return asyncio.sleep


async def test_bff_runs_end_to_end_on_a_cluster_as_the_minimal_user(
    cluster: RedisClusterGroup, oidc_op: OidcProvider, tmp_path: Path
) -> None:
    cluster.flush()
    await functional_scenario(min_topology(cluster.url), oidc_op, tmp_path)
