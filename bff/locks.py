"""A lock in the shared store, held by one owner across every instance: the basis of single flight.

``SET NX`` with an owner token and a lease; the holder renews the lease while it works, so a
holder that is only slow (an OP taking seconds) keeps the lock, and one that crashed stops
renewing and blocks the others for at most one lease. Renew and release act only while the
owner token still matches (compare-and-delete in the store), so a holder whose lease lapsed can
never release someone else's lock.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Iterator
from types import TracebackType

from bff.errors import StoreUnavailable
from bff.store import SessionStore

__all__ = ["StoreLock", "poll_delays"]

log = logging.getLogger(__name__)


class StoreLock:
    def __init__(self, store: SessionStore, key: str, lease: float) -> None:
        self._store = store
        self.key = key
        self.lease = lease
        self.owner = uuid.uuid4().hex
        self._renewer: asyncio.Task[None] | None = None

    async def acquire(self) -> bool:
        """Try once; when it is ours, keep renewing the lease until ``release``."""
        if not await self._store.acquire_lock(self.key, self.owner, self.lease):
            return False
        self._renewer = asyncio.create_task(self._renew())
        return True

    async def release(self) -> None:
        if self._renewer is not None:
            self._renewer.cancel()
            self._renewer = None
        with contextlib.suppress(StoreUnavailable):  # the lease lapses by itself
            await self._store.release_lock(self.key, self.owner)

    async def __aenter__(self) -> StoreLock:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.release()

    async def _renew(self) -> None:
        while True:
            await asyncio.sleep(self.lease / 3)
            try:
                if not await self._store.renew_lock(self.key, self.owner, self.lease):
                    log.warning("lock.lost", extra={"event": "lock.lost", "lock": self.key})
                    return
            except StoreUnavailable:
                continue


def poll_delays(first: float = 0.02, most: float = 0.2) -> Iterator[float]:
    """How long a waiter sleeps between looks at the holder's result: short, then capped."""
    delay = first
    while True:
        yield delay
        delay = min(most, delay * 2)
