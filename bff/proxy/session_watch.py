"""Ends a long-lived proxied exchange (a streamed response, a WebSocket) once its session ends.

A logout on any instance, or expiry, must not leave a ``user`` route's open stream running on
the old token; the watch re-reads the session from the store, bypassing the per-process cache.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Final

from bff.errors import StoreUnavailable
from bff.services import Services
from bff.sessions import Session

__all__ = ["SESSION_CHECK_INTERVAL", "SessionWatch"]

log = logging.getLogger("bff.proxy")  # one logger name for the whole proxy package

#: Seconds between store checks that a long-lived exchange's session still exists.
SESSION_CHECK_INTERVAL: Final = 2.0


class SessionWatch:
    """Calls ``on_end`` once ``session`` is gone from the store; :meth:`stop` when done.

    Starts checking only after ``interval`` seconds, so a short response costs one timer.
    """

    __slots__ = ("_handle", "_interval", "_on_end", "_services", "_session", "_task")

    def __init__(
        self,
        services: Services,
        session: Session,
        interval: float,
        on_end: Callable[[], Awaitable[None]],
    ) -> None:
        self._services = services
        self._session = session
        self._interval = interval
        self._on_end = on_end
        self._task: asyncio.Task[None] | None = None
        self._handle: asyncio.TimerHandle | None = asyncio.get_running_loop().call_later(
            interval, self._start
        )

    def _start(self) -> None:
        self._handle = None
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        sessions = self._services.sessions
        while True:
            try:
                alive = await sessions.load(self._session.secret, fresh=True) is not None
            except StoreUnavailable:
                alive = True  # a store outage is not a logout; check again later
            if not alive:
                log.info("proxy.session_ended", extra={"event": "proxy.session_ended"})
                await self._on_end()
                return
            await asyncio.sleep(self._interval)

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
        if self._task is not None and self._task is not asyncio.current_task():
            self._task.cancel()
