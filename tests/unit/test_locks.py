"""bff.locks: one holder at a time, a lease kept while held, never someone else's lock released."""

from __future__ import annotations

import asyncio

from fakeredis import aioredis as fake_aioredis

from bff.locks import StoreLock, poll_delays
from bff.store.redis import RedisStore


def _store() -> RedisStore:
    return RedisStore(fake_aioredis.FakeRedis())


async def test_only_one_holder_at_a_time_and_release_frees_it() -> None:
    store = _store()
    first, second = StoreLock(store, "bff:{x}:lock", 1.0), StoreLock(store, "bff:{x}:lock", 1.0)
    assert await first.acquire()
    assert not await second.acquire()
    await first.release()
    assert await second.acquire()
    await second.release()


async def test_the_lease_is_renewed_while_the_holder_works() -> None:
    store = _store()
    async with StoreLock(store, "bff:{x}:lock", 0.3) as held:
        assert await held.acquire()
        await asyncio.sleep(0.9)  # three leases: only renewal keeps it
        assert not await StoreLock(store, "bff:{x}:lock", 0.3).acquire()
    assert await StoreLock(store, "bff:{x}:lock", 0.3).acquire()


async def test_a_holder_whose_lease_lapsed_cannot_release_the_next_holders_lock() -> None:
    store = _store()
    stale = StoreLock(store, "bff:{x}:lock", 0.2)
    assert await store.acquire_lock(stale.key, stale.owner, 0.2)  # taken, but never renewed
    await asyncio.sleep(0.3)
    current = StoreLock(store, "bff:{x}:lock", 5.0)
    assert await current.acquire()
    await stale.release()
    assert not await StoreLock(store, "bff:{x}:lock", 5.0).acquire()
    await current.release()


def test_waiters_poll_quickly_at_first_then_at_a_capped_pace() -> None:
    delays = poll_delays(0.02, 0.2)
    seen = [next(delays) for _ in range(8)]
    assert seen[0] == 0.02
    assert seen == sorted(seen)
    assert max(seen) == 0.2
