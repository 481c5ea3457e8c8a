"""A store that times every call and counts failures (``bff_store_*`` metrics), at the seam.

It wraps whichever store ``session.store`` names, so every backend is measured the same way and
no backend carries metrics code. Labels are the operation names, a fixed set.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable
from typing import Any, TypeVar

from bff.errors import StoreUnavailable
from bff.metrics import COUNTERS, STORE_SECONDS
from bff.store import SessionStore

__all__ = ["InstrumentedStore"]

T = TypeVar("T")

_OPS = (
    "get", "set", "add", "replace", "take", "delete", "expire", "ttl", "acquire_lock",
    "renew_lock", "release_lock", "index_add", "index_members", "index_remove", "take_token",
    "ping",
)  # fmt: skip


class InstrumentedStore:
    """``SessionStore`` in front of ``inner``: same answers, plus latency and error metrics."""

    def __init__(self, inner: SessionStore) -> None:
        self.inner = inner
        # Labelled children looked up once, not per call.
        self._timers: dict[str, Any] = {op: STORE_SECONDS.labels(op) for op in _OPS}
        errors = COUNTERS["bff_store_errors_total"]
        self._errors: dict[str, Any] = {op: errors.labels(op) for op in _OPS}

    async def _timed(self, op: str, call: Awaitable[T]) -> T:
        started = time.perf_counter()
        try:
            return await call
        except StoreUnavailable:
            self._errors[op].inc()
            raise
        finally:
            self._timers[op].observe(time.perf_counter() - started)

    async def get(self, key: str) -> bytes | None:
        return await self._timed("get", self.inner.get(key))

    async def set(self, key: str, value: bytes, ttl: float) -> None:
        await self._timed("set", self.inner.set(key, value, ttl))

    async def add(self, key: str, value: bytes, ttl: float) -> bool:
        return await self._timed("add", self.inner.add(key, value, ttl))

    async def replace(self, key: str, expected: bytes, value: bytes, ttl: float) -> bool:
        return await self._timed("replace", self.inner.replace(key, expected, value, ttl))

    async def take(self, key: str) -> bytes | None:
        return await self._timed("take", self.inner.take(key))

    async def delete(self, *keys: str) -> int:
        return await self._timed("delete", self.inner.delete(*keys))

    async def expire(self, key: str, ttl: float) -> bool:
        return await self._timed("expire", self.inner.expire(key, ttl))

    async def ttl(self, key: str) -> float | None:
        return await self._timed("ttl", self.inner.ttl(key))

    async def acquire_lock(self, key: str, owner: str, lease: float) -> bool:
        return await self._timed("acquire_lock", self.inner.acquire_lock(key, owner, lease))

    async def renew_lock(self, key: str, owner: str, lease: float) -> bool:
        return await self._timed("renew_lock", self.inner.renew_lock(key, owner, lease))

    async def release_lock(self, key: str, owner: str) -> None:
        await self._timed("release_lock", self.inner.release_lock(key, owner))

    async def index_add(self, index: str, member: str, ttl: float) -> None:
        await self._timed("index_add", self.inner.index_add(index, member, ttl))

    async def index_members(self, index: str) -> list[str]:
        return await self._timed("index_members", self.inner.index_members(index))

    async def index_remove(self, index: str, *members: str) -> None:
        await self._timed("index_remove", self.inner.index_remove(index, *members))

    async def take_token(self, key: str, rate: float, burst: int) -> tuple[bool, float]:
        return await self._timed("take_token", self.inner.take_token(key, rate, burst))

    async def ping(self) -> None:
        await self._timed("ping", self.inner.ping())

    async def close(self) -> None:
        await self.inner.close()
