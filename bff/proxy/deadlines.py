"""One timer for a route's body-less exchanges instead of one per exchange (issue 11, point 4).

``asyncio.timeout(route.timeout)`` arms a timer for every proxied call and cancels it when the
answer is in: a timer handle made, scheduled and dropped per request, a measurable share of a
proxied GET's CPU time. Every body-less exchange on a route has the same length of deadline, so
their deadlines fall due in the order the exchanges began: :class:`Deadlines` keeps them in that
order and arms one timer, for the soonest. The deadline itself is still aiohttp's own
``asyncio.Timeout`` (entered with no timer of its own): when one falls due, its ``reschedule``
expires it exactly as its own timer would have (the task is cancelled, ``TimeoutError`` comes
out of the ``async with``). A request with a body keeps its own ``asyncio.timeout``: each body
chunk pushes its deadline back, out of order.
"""

from __future__ import annotations

import asyncio

__all__ = ["Deadlines"]


class Deadlines:
    """The running deadlines of one length on one event loop, soonest first."""

    __slots__ = ("_armed_for", "_handle", "_live", "_loop", "_seconds")

    def __init__(self, seconds: float, loop: asyncio.AbstractEventLoop) -> None:
        self._seconds = seconds
        self._loop = loop
        # Insertion order is deadline order: one length, taken from a clock that never goes back.
        self._live: dict[asyncio.Timeout, float] = {}
        self._handle: asyncio.TimerHandle | None = None
        self._armed_for = 0.0

    def start(self, timeout: asyncio.Timeout) -> None:
        """Give the entered ``timeout`` (made without a deadline) this route's, from now."""
        when = self._loop.time() + self._seconds
        self._live[timeout] = when
        if self._handle is None:
            self._arm(when)

    def stop(self, timeout: asyncio.Timeout) -> None:
        """The exchange is over (or its deadline came): ``timeout`` is not watched any more."""
        self._live.pop(timeout, None)

    def __len__(self) -> int:
        return len(self._live)

    def _arm(self, when: float) -> None:
        self._armed_for = when
        self._handle = self._loop.call_at(when, self._due)

    def _due(self) -> None:
        """The timer for the soonest deadline fired: expire every deadline up to it, as their own
        timers would have, and arm the timer for the next one."""
        self._handle = None
        live = self._live
        while live:
            timeout, when = next(iter(live.items()))
            if when > self._armed_for:
                self._arm(when)
                return
            del live[timeout]
            # The Timeout's own rule: due now, it cancels its task on the loop's next turn
            # (an exchange that ends first keeps its answer); early, its own timer waits.
            timeout.reschedule(when)
