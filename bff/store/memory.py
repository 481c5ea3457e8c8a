"""An in-process store for one dev process; same contract as Redis, including TTLs and locks."""

from __future__ import annotations

import time
from collections.abc import Callable

from bff.store import bucket

__all__ = ["MemoryStore"]


class MemoryStore:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._data: dict[str, tuple[bytes, float]] = {}
        self._indexes: dict[str, dict[str, float]] = {}

    def _live(self, key: str) -> bytes | None:
        item = self._data.get(key)
        if item is None:
            return None
        if item[1] <= self._clock():
            del self._data[key]
            return None
        return item[0]

    async def get(self, key: str) -> bytes | None:
        return self._live(key)

    async def set(self, key: str, value: bytes, ttl: float) -> None:
        self._data[key] = (bytes(value), self._clock() + ttl)

    async def add(self, key: str, value: bytes, ttl: float) -> bool:
        if self._live(key) is not None:
            return False
        await self.set(key, value, ttl)
        return True

    async def replace(self, key: str, expected: bytes, value: bytes, ttl: float) -> bool:
        if self._live(key) != expected:
            return False
        await self.set(key, value, ttl)
        return True

    async def take(self, key: str) -> bytes | None:
        value = self._live(key)
        self._data.pop(key, None)
        return value

    async def delete(self, *keys: str) -> int:
        found = 0
        for key in keys:
            if self._live(key) is not None:
                found += 1
            self._data.pop(key, None)
        return found

    async def expire(self, key: str, ttl: float) -> bool:
        value = self._live(key)
        if value is None:
            return False
        self._data[key] = (value, self._clock() + ttl)
        return True

    async def ttl(self, key: str) -> float | None:
        if self._live(key) is None:
            return None
        return self._data[key][1] - self._clock()

    async def acquire_lock(self, key: str, owner: str, lease: float) -> bool:
        return await self.add(key, owner.encode(), lease)

    async def renew_lock(self, key: str, owner: str, lease: float) -> bool:
        if self._live(key) != owner.encode():
            return False
        return await self.expire(key, lease)

    async def release_lock(self, key: str, owner: str) -> None:
        if self._live(key) == owner.encode():
            del self._data[key]

    async def index_add(self, index: str, member: str, ttl: float) -> None:
        self._indexes.setdefault(index, {})[member] = self._clock() + ttl

    async def index_members(self, index: str) -> list[str]:
        now = self._clock()
        members = self._indexes.get(index, {})
        for member in [m for m, exp in members.items() if exp <= now]:
            del members[member]
        return sorted(members)

    async def index_remove(self, index: str, *members: str) -> None:
        entries = self._indexes.get(index, {})
        for member in members:
            entries.pop(member, None)

    async def take_token(self, key: str, rate: float, burst: int) -> tuple[bool, float]:
        now = self._clock()
        tokens, stamp = bucket.decode(self._live(key))
        result = bucket.take(tokens, stamp, now, rate, burst)
        self._data[key] = (bucket.encode(result.tokens, now), now + result.ttl)
        return result.allowed, result.retry_after

    async def ping(self) -> None:
        return None

    async def close(self) -> None:
        return None
