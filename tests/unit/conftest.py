"""Shared fixtures of the unit tests: a controllable clock and the two in-process stores.

Unit tests open no sockets: Redis is ``fakeredis`` (with Lua, so the store's scripts run), and time
moves only when a test says so, which keeps TTL and timeout tests exact and fast.
"""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from pathlib import Path

import fakeredis
import pytest
from fakeredis import aioredis as fake_aioredis

ROOT = Path(__file__).resolve().parent.parent.parent
# `tests.*` helpers (for example the store contract) are imported from the project root.
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bff.store.memory import MemoryStore  # noqa: E402
from bff.store.redis import RedisStore  # noqa: E402
from tests.unit.fakes import FakeClock  # noqa: E402


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def memory_store(clock: FakeClock) -> MemoryStore:
    return MemoryStore(clock=clock)


@pytest.fixture
def fake_redis_server() -> fakeredis.FakeServer:
    """One fake Redis server; every client made from it sees the same data (like N instances)."""
    return fakeredis.FakeServer()


@pytest.fixture
async def fake_redis_store(fake_redis_server: fakeredis.FakeServer) -> AsyncIterator[RedisStore]:
    store = RedisStore(fake_aioredis.FakeRedis(server=fake_redis_server))
    yield store
    await store.close()
