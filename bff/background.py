"""Work that no caller's cancellation may stop: a refresh under the session's lock goes on (and
releases the lock, and stores the rotated token) when the request that started it goes away.

asyncio keeps only a weak reference to a task, so a task nobody awaits any more can vanish
mid-flight; :class:`Background` keeps each one referenced until it ends, and marks its exception
retrieved (its callers had their answer, or left), so nothing is logged as never retrieved.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

__all__ = ["Background"]

T = TypeVar("T")


class Background:
    """The running tasks of one owner (the refresher, the route-token manager)."""

    __slots__ = ("_tasks",)

    def __init__(self) -> None:
        self._tasks: set[asyncio.Future[Any]] = set()

    def spawn(self, work: Coroutine[Any, Any, T]) -> asyncio.Future[T]:
        """Run ``work`` as a task of its own, kept referenced until it ends."""
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def __len__(self) -> int:
        return len(self._tasks)

    def _done(self, task: asyncio.Future[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled():
            task.exception()  # retrieved: the callers already had their answer, or left
