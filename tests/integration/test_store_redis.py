"""The store contract against a REAL redis-server, plus what only a real server can prove.

fakeredis must never be the only proof: here the Lua scripts, GETDEL, PEXPIRE NX/GT, cluster
hash slots and the behaviour of a server that dies and comes back are checked for real.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import cast

import pytest
from redis.crc import key_slot

from bff.errors import StoreUnavailable
from bff.keys import new_secret, store_id
from bff.oidc import OidcClient
from bff.refresh import TokenRefresher
from bff.sessions import SessionData, SessionManager, lock_key, session_key
from bff.store import open_store
from bff.store.redis import RedisStore
from tests.support.procs import RedisServer
from tests.unit.fakes import FakeOp
from tests.unit.store_contract import Advance, StoreContract


@pytest.fixture
async def real_store(redis_server: RedisServer) -> AsyncIterator[RedisStore]:
    redis_server.start()  # a previous fault-injecting test may have left it stopped
    store = RedisStore.from_url(redis_server.url)
    await store.client.flushdb()
    yield store
    await store.close()


class TestRealRedisStore(StoreContract):
    @pytest.fixture
    def store(self, real_store: RedisStore) -> RedisStore:
        return real_store

    @pytest.fixture
    def advance(self) -> Advance:
        return asyncio.sleep


def test_a_session_and_its_lock_share_one_cluster_hash_slot() -> None:
    for _ in range(50):
        sid = store_id(new_secret())
        assert key_slot(session_key(sid).encode()) == key_slot(lock_key(sid).encode())
    # ...and the hash tag really is the id: other sessions spread over other slots.
    slots = {key_slot(session_key(store_id(new_secret())).encode()) for _ in range(50)}
    assert len(slots) > 40


async def test_index_keys_carry_a_ttl_on_the_real_server(real_store: RedisStore) -> None:
    await real_store.index_add("i:1", "a", 5)
    await real_store.index_add("i:1", "b", 30)
    await real_store.index_add("i:1", "c", 1)
    # PEXPIRE NX then GT: the index lives as long as its longest-lived member.
    left = await real_store.ttl("i:1")
    assert left is not None and 29 < left <= 30


async def test_a_stopped_server_raises_store_unavailable_and_recovers_without_a_new_client(
    redis_server: RedisServer, real_store: RedisStore
) -> None:
    await real_store.set("k", b"v", 30)
    assert await real_store.replace("k", b"v", b"w", 30)  # loads the Lua script
    redis_server.stop()
    try:
        calls: list[Callable[[], Awaitable[object]]] = [
            lambda: real_store.get("k"),
            lambda: real_store.set("k", b"v", 30),
            lambda: real_store.replace("k", b"w", b"x", 30),
            lambda: real_store.take("k"),
            lambda: real_store.acquire_lock("l", "me", 5),
            lambda: real_store.index_members("i"),
            lambda: real_store.ping(),
        ]
        for call in calls:
            started = time.monotonic()
            with pytest.raises(StoreUnavailable):
                await call()
            assert time.monotonic() - started < 3.0, "a dead store must fail fast"
    finally:
        redis_server.restart()
    # Same client: the broken pooled connection is replaced, and the script cache of the new
    # (empty) server is refilled behind EVALSHA's NOSCRIPT.
    await real_store.ping()
    assert await real_store.get("k") is None
    await real_store.set("k", b"v", 30)
    assert await real_store.replace("k", b"v", b"w", 30)
    assert await real_store.get("k") == b"w"
    assert await real_store.acquire_lock("l", "me", 5)
    assert await real_store.renew_lock("l", "me", 5)
    await real_store.release_lock("l", "me")
    assert await real_store.acquire_lock("l", "you", 5)


async def test_two_instances_on_the_real_server_refresh_once(redis_server: RedisServer) -> None:
    """Invariant 8 with the real Lua lock scripts: 2 instances x 10 requests, one refresh."""
    redis_server.start()
    op = FakeOp(delay=0.2)
    instances = []
    for _ in range(2):
        store = RedisStore.from_url(redis_server.url)
        sessions = SessionManager(store, idle_timeout=600, absolute_timeout=3600)
        instances.append(
            (store, sessions, TokenRefresher(sessions, cast(OidcClient, op), lease=0.1))
        )
    now = time.time()
    data = SessionData(
        sub="alice", claims={}, access_token="AT-0", access_expires_at=now + 5,
        refresh_token="RT-0", id_token=None, scopes=(), created_at=now, expires_at=now + 60,
    )  # fmt: skip
    created = await instances[0][1].create(data)
    calls = []
    for _, sessions, refresher in instances:
        loaded = await sessions.load(created.secret, fresh=True)
        assert loaded is not None
        calls += [refresher.access_token(loaded) for _ in range(10)]
    results = await asyncio.gather(*calls)
    assert op.refreshes == 1  # the OP is slower than the lease: renewal kept the lock
    assert {token for _, token in results} == {"AT-1"}
    for store, _, _ in instances:
        await store.close()


async def test_a_burst_beyond_the_connection_pool_waits_instead_of_failing(
    redis_server: RedisServer,
) -> None:
    # A generous store timeout: 200 calls queue behind 4 connections on a loaded machine.
    store = RedisStore.from_url(redis_server.url, timeout=10.0, max_connections=4)
    try:
        await store.set("bff:{burst}:s", b"v", 10)
        # 200 concurrent reads through 4 connections: they queue, none is refused.
        values = await asyncio.gather(*(store.get("bff:{burst}:s") for _ in range(200)))
        assert values == [b"v"] * 200
    finally:
        await store.delete("bff:{burst}:s")
        await store.close()


@pytest.fixture
def redis_socket() -> Iterator[RedisServer]:
    """A real redis-server listening only on a Unix socket."""
    with RedisServer(unix_socket=True) as server:
        yield server


async def test_the_store_works_over_a_unix_socket(redis_socket: RedisServer) -> None:
    """``session.store: unix:///path/redis.sock`` reaches a real redis-server over its socket."""
    assert redis_socket.url.startswith("unix://")
    store = open_store(redis_socket.url)
    try:
        await store.ping()
        await store.set("bff:{unix}:s", b"over the socket", 10)
        assert await store.get("bff:{unix}:s") == b"over the socket"
        assert await store.take("bff:{unix}:s") == b"over the socket"
        assert await store.get("bff:{unix}:s") is None
    finally:
        await store.close()
