"""A :class:`SessionStore` wrapper with one client span per store operation (tracing on only).

It sits at the store seam, so every caller (sessions, refresh, locks, rate limits, client tokens)
is traced without knowing it, and a store without tracing is not wrapped at all. A span names the
operation and the backend, never a key (keys derive from session ids) or a value.
"""

from __future__ import annotations

from bff import tracing
from bff.store import SessionStore

__all__ = ["TracedStore"]


class TracedStore:
    __slots__ = ("_attrs", "_inner")

    def __init__(self, inner: SessionStore, system: str) -> None:
        self._inner = inner
        self._attrs = system

    def _span(self, op: str) -> tracing.SpanContext:
        return tracing.span(
            f"bff.store {op}",
            {"db.system.name": self._attrs, "db.operation.name": op},
            kind="client",
        )

    async def get(self, key: str) -> bytes | None:
        with self._span("get"):
            return await self._inner.get(key)

    async def set(self, key: str, value: bytes, ttl: float) -> None:
        with self._span("set"):
            await self._inner.set(key, value, ttl)

    async def add(self, key: str, value: bytes, ttl: float) -> bool:
        with self._span("add"):
            return await self._inner.add(key, value, ttl)

    async def replace(self, key: str, expected: bytes, value: bytes, ttl: float) -> bool:
        with self._span("replace"):
            return await self._inner.replace(key, expected, value, ttl)

    async def take(self, key: str) -> bytes | None:
        with self._span("take"):
            return await self._inner.take(key)

    async def delete(self, *keys: str) -> int:
        with self._span("delete"):
            return await self._inner.delete(*keys)

    async def expire(self, key: str, ttl: float) -> bool:
        with self._span("expire"):
            return await self._inner.expire(key, ttl)

    async def ttl(self, key: str) -> float | None:
        with self._span("ttl"):
            return await self._inner.ttl(key)

    async def acquire_lock(self, key: str, owner: str, lease: float) -> bool:
        with self._span("acquire_lock"):
            return await self._inner.acquire_lock(key, owner, lease)

    async def renew_lock(self, key: str, owner: str, lease: float) -> bool:
        with self._span("renew_lock"):
            return await self._inner.renew_lock(key, owner, lease)

    async def release_lock(self, key: str, owner: str) -> None:
        with self._span("release_lock"):
            await self._inner.release_lock(key, owner)

    async def index_add(self, index: str, member: str, ttl: float) -> None:
        with self._span("index_add"):
            await self._inner.index_add(index, member, ttl)

    async def index_members(self, index: str) -> list[str]:
        with self._span("index_members"):
            return await self._inner.index_members(index)

    async def index_remove(self, index: str, *members: str) -> None:
        with self._span("index_remove"):
            await self._inner.index_remove(index, *members)

    async def take_token(self, key: str, rate: float, burst: int) -> tuple[bool, float]:
        with self._span("take_token"):
            return await self._inner.take_token(key, rate, burst)

    async def ping(self) -> None:
        with self._span("ping"):
            await self._inner.ping()

    async def close(self) -> None:
        await self._inner.close()
