"""Per-address rate limits on the endpoints anyone may call without a session.

``/bff/login`` writes a login transaction, ``/bff/callback`` spends a code at the OP and
``/bff/backchannel-logout`` verifies a signature: each costs bff (and the store, and the OP)
work that nobody has to authenticate for. One token bucket per client address and endpoint
(``bff.peers.client_address``, after ``trusted_proxies``) bounds that work; the buckets live in
the store (``SessionStore.take_token``, one atomic step), so N instances share one limit.

Store keys are ``bff:{rl:<hash>}:<endpoint>``: the address is hashed (no plain IP address in
the store), the hash tag spreads addresses over Redis Cluster slots, and a bucket expires as
soon as it would be full again, so an address that stops costs nothing. IPv6 addresses count
per /64, the block one subscriber gets: otherwise a single host could mint 2**64 buckets. The
number of live keys is bounded by (distinct addresses seen) x (time to refill), which TTL cleans.

A store failure here *fails open*, with a warning at most every ``_LOG_EVERY`` seconds. The
limiter guards against abuse; it must not turn a Redis blip into a lockout from login. Nothing
is lost by letting the request through: each of these endpoints needs the store itself, and
answers the design's clear 503 (``store_unavailable``) when the store is really down.
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
import time
from typing import Final, Literal

from aiohttp import web

from bff.config.settings import RateLimit, RateLimitSettings
from bff.errors import RateLimited, StoreUnavailable
from bff.metrics import Metrics
from bff.peers import client_address
from bff.services import SERVICES
from bff.store import SessionStore

__all__ = ["Endpoint", "RateLimiter", "bucket_key", "enforce"]

log = logging.getLogger(__name__)

Endpoint = Literal["login", "callback", "backchannel_logout"]

_LOG_EVERY: Final = 10.0  # seconds between two "failing open" warnings of one process


def bucket_key(address: str, endpoint: Endpoint) -> str | None:
    """The store key of an address's bucket, or None when there is no address to key on.

    IPv4 (also IPv4-mapped IPv6) counts per address, IPv6 per /64 network.
    """
    if not address:
        return None
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])  # no zone id (fe80::1%eth0)
    except ValueError:
        who = address  # not an IP (a unix socket peer name): its own bucket
    else:
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        if isinstance(ip, ipaddress.IPv6Address):
            who = str(ipaddress.IPv6Network((ip, 64), strict=False))
        else:
            who = str(ip)
    digest = hashlib.sha256(who.encode()).hexdigest()[:32]
    return f"bff:{{rl:{digest}}}:{endpoint}"


class RateLimiter:
    """The configured buckets over one store; ``check`` raises :class:`RateLimited`."""

    def __init__(
        self,
        store: SessionStore,
        settings: RateLimitSettings,
        metrics: Metrics | None = None,
    ) -> None:
        self._store = store
        self._limits: dict[Endpoint, RateLimit] = {
            "login": settings.login,
            "callback": settings.callback,
            "backchannel_logout": settings.backchannel_logout,
        }
        self._metrics = metrics or Metrics()
        self._last_warning = -_LOG_EVERY

    async def check(self, address: str, endpoint: Endpoint) -> None:
        """Take one token of ``address``'s bucket for ``endpoint``; 429 when there is none."""
        key = bucket_key(address, endpoint)
        if key is None:
            return
        limit = self._limits[endpoint]
        try:
            allowed, retry_after = await self._store.take_token(key, limit.per_second, limit.burst)
        except StoreUnavailable:
            self._metrics.inc("bff_rate_limit_total", endpoint=endpoint, outcome="store_down")
            now = time.monotonic()
            if now - self._last_warning >= _LOG_EVERY:
                self._last_warning = now
                log.warning(
                    "ratelimit.fail_open",
                    extra={"event": "ratelimit.fail_open", "endpoint": endpoint},
                )
            return
        if not allowed:
            self._metrics.inc("bff_rate_limit_total", endpoint=endpoint, outcome="limited")
            raise RateLimited(retry_after)


async def enforce(request: web.Request, endpoint: Endpoint) -> None:
    """Count ``request`` against its client address's bucket for ``endpoint`` (if limits are on)."""
    limiter = request.app[SERVICES].rate_limiter
    if limiter is not None:
        await limiter.check(client_address(request), endpoint)
