"""The session store seam: a small key/value interface that sees only opaque bytes.

Everything above it (``sessions.py``) encrypts before writing, so a store implementation never
handles a token. Two implementations pass one contract suite (``tests/unit/test_store.py``):

* :class:`~bff.store.memory.MemoryStore`: one process, the dev default.
* :class:`~bff.store.redis.RedisStore`: shared by every instance, on one Redis, a Sentinel-managed
  master or a Cluster (the URLs: ``bff.store.url``); the contract also runs against each of
  those for real (``tests/integration/test_redis_*.py``, ``test_store_tls.py``). Keys are laid
  out for Cluster (``bff:{<id>}:s`` and ``bff:{<id>}:lock`` share a hash slot).

Every operation touches one key, so each runs inside one Cluster hash slot.

Failures of the backend, and operations that outlive ``session.store_timeout``, surface as
:class:`bff.errors.StoreUnavailable` (a 503 with ``Retry-After``), never as a driver error.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from bff.config.settings import RedisSettings

__all__ = ["SessionStore", "open_store"]


class SessionStore(Protocol):
    async def get(self, key: str) -> bytes | None: ...

    async def set(self, key: str, value: bytes, ttl: float) -> None: ...

    async def add(self, key: str, value: bytes, ttl: float) -> bool:
        """Write only if the key does not exist (SET NX); True if written."""
        ...

    async def replace(self, key: str, expected: bytes, value: bytes, ttl: float) -> bool:
        """Compare-and-set: write only while the stored value is still ``expected``."""
        ...

    async def take(self, key: str) -> bytes | None:
        """Read and delete in one step (GETDEL): the basis of single-use values."""
        ...

    async def delete(self, *keys: str) -> int: ...

    async def expire(self, key: str, ttl: float) -> bool: ...

    async def ttl(self, key: str) -> float | None:
        """Seconds left, or None when the key does not exist."""
        ...

    async def acquire_lock(self, key: str, owner: str, lease: float) -> bool: ...

    async def renew_lock(self, key: str, owner: str, lease: float) -> bool:
        """Extend the lease only while ``owner`` still holds the lock."""
        ...

    async def release_lock(self, key: str, owner: str) -> None:
        """Delete the lock only while ``owner`` still holds it."""
        ...

    async def index_add(self, index: str, member: str, ttl: float) -> None:
        """Add ``member`` for ``ttl`` seconds; the index expires with its last member."""
        ...

    async def index_members(self, index: str) -> list[str]: ...

    async def index_remove(self, index: str, *members: str) -> None: ...

    async def take_token(self, key: str, rate: float, burst: int) -> tuple[bool, float]:
        """Take one token from the bucket at ``key`` in one atomic step (``bff.store.bucket``).

        The bucket starts full (``burst`` tokens), gains ``rate`` tokens a second and expires
        once it would be full again. Returns ``(allowed, retry_after_seconds)``; the clock is the
        store's own (Redis ``TIME``), so instances with drifting clocks still share one bucket.
        """
        ...

    async def ping(self) -> None: ...

    async def close(self) -> None: ...


def open_store(
    url: str, *, timeout: float = 0.5, redis: RedisSettings | None = None
) -> SessionStore:
    """The store a ``session.store`` URL names (``bff.store.url``): memory or Redis.

    ``timeout`` bounds each operation (``session.store_timeout``); ``redis`` holds the
    credentials and TLS files of ``session.redis``.
    """
    if url.startswith("memory://"):
        from bff.store.memory import MemoryStore

        return MemoryStore()
    from bff.store.redis import RedisStore

    return RedisStore.from_url(url, timeout=timeout, redis=redis)
