"""The services one app instance is made of, built once at start-up (see ``app.py``).

Handlers reach them as ``request.app[SERVICES]``; nothing here is built per request.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import aiohttp
from aiohttp import web

from bff.cookies import CookiePolicy
from bff.keys import Keyring
from bff.metrics import Metrics
from bff.oidc import OidcClient
from bff.refresh import TokenRefresher
from bff.sessions import Session, SessionManager
from bff.store import SessionStore

if TYPE_CHECKING:
    from bff.client_tokens import ClientTokens
    from bff.config import Settings
    from bff.proxy import UpstreamTable
    from bff.ratelimit import RateLimiter
    from bff.route_tokens import RouteTokens

__all__ = ["SERVICES", "Services", "session_of"]


@dataclass(slots=True)
class Services:
    settings: Settings
    keyring: Keyring
    cookies: CookiePolicy
    store: SessionStore
    sessions: SessionManager
    oidc: OidcClient
    http: aiohttp.ClientSession  # to the OP only; upstreams have their own pools
    refresher: TokenRefresher
    metrics: Metrics = field(default_factory=Metrics)
    upstreams: UpstreamTable | None = None  # proxied routes and their pools (bff.proxy)
    client_tokens: ClientTokens | None = None  # client-credentials tokens (bff.client_tokens)
    rate_limiter: RateLimiter | None = None  # per-address limits (bff.ratelimit); None = off
    route_tokens: RouteTokens | None = None  # resource and exchanged tokens (bff.route_tokens)


SERVICES = web.AppKey("bff_services", Services)


async def session_of(request: web.Request) -> Session | None:
    """The live session the request's cookie points to, or None (absent, tampered, ended)."""
    services = request.app[SERVICES]
    return await services.sessions.load(services.cookies.session_secret(request))
