"""What a worker's app knows about the worker's life: draining, and the WebSockets to close.

``bff.worker`` sets :attr:`Lifecycle.draining` on SIGTERM so ``/readyz`` answers 503 while the
listener still accepts (a load balancer moves traffic away before anything is refused), and
closes every socket in :attr:`Lifecycle.websockets` with 1001 (going away) before the grace
period, so browsers reconnect to another worker instead of waiting for a cut.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final

from aiohttp import web

__all__ = ["GOING_AWAY", "LIFECYCLE", "Lifecycle"]

#: RFC 6455 close code for a server that goes away.
GOING_AWAY: Final = 1001


@dataclass(slots=True)
class Lifecycle:
    draining: bool = False  # set once on SIGTERM; /readyz is 503 from then on
    websockets: set[web.WebSocketResponse] = field(default_factory=set)  # open browser sockets


LIFECYCLE: Final = web.AppKey("bff_lifecycle", Lifecycle)
