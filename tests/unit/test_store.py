"""The store contract over MemoryStore and RedisStore-on-fakeredis (real Redis: integration)."""

from __future__ import annotations

import asyncio

import fakeredis
import pytest
from fakeredis import aioredis as fake_aioredis

from bff.errors import StoreUnavailable
from bff.store import open_store
from bff.store.memory import MemoryStore
from bff.store.redis import RedisStore
from tests.unit.fakes import FakeClock
from tests.unit.store_contract import Advance, StoreContract


class TestMemoryStore(StoreContract):
    @pytest.fixture
    def store(self, memory_store: MemoryStore) -> MemoryStore:
        return memory_store

    @pytest.fixture
    def advance(self, clock: FakeClock) -> Advance:
        async def advance(seconds: float) -> None:
            clock.advance(seconds)

        return advance


class TestFakeRedisStore(StoreContract):
    short = 0.05  # fakeredis runs in-process: no network delay between a write and its check

    @pytest.fixture
    def store(self, fake_redis_store: RedisStore) -> RedisStore:
        return fake_redis_store

    @pytest.fixture
    def advance(self) -> Advance:
        return asyncio.sleep


async def test_two_redis_clients_on_one_server_share_data_and_locks(
    fake_redis_server: fakeredis.FakeServer,
) -> None:
    a = RedisStore(fake_aioredis.FakeRedis(server=fake_redis_server))
    b = RedisStore(fake_aioredis.FakeRedis(server=fake_redis_server))
    await a.set("k", b"v", 10)
    assert await b.take("k") == b"v"
    assert await a.acquire_lock("l", "a", 10)
    assert not await b.acquire_lock("l", "b", 10)
    await a.close()
    await b.close()


async def test_redis_driver_errors_surface_as_store_unavailable() -> None:
    server = fakeredis.FakeServer()
    server.connected = False  # fakeredis' switch for "the server is down"
    store = RedisStore(fake_aioredis.FakeRedis(server=server))
    with pytest.raises(StoreUnavailable):
        await store.get("k")
    with pytest.raises(StoreUnavailable):
        await store.replace("k", b"a", b"b", 1)
    with pytest.raises(StoreUnavailable):
        await store.ping()
    server.connected = True
    await store.set("k", b"v", 10)
    assert await store.get("k") == b"v"
    await store.close()


def test_open_store_picks_the_implementation_from_the_url() -> None:
    assert isinstance(open_store("memory://"), MemoryStore)
    assert isinstance(open_store("redis://127.0.0.1:1/0"), RedisStore)
