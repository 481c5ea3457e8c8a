"""The services one app instance is made of, built once at start-up (see ``app.py``).

Handlers reach them as ``request.app[SERVICES]``; nothing here is built per request.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import aiohttp
from aiohttp import web

from bff.cookies import CookiePolicy
from bff.errors import BadRequest
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

__all__ = ["SERVICES", "Services", "UnknownProvider", "session_of"]


class UnknownProvider(BadRequest):
    error = "unknown_idp"
    description = "no such identity provider"


@dataclass(slots=True)
class Services:
    settings: Settings
    keyring: Keyring
    cookies: CookiePolicy
    store: SessionStore
    sessions: SessionManager
    oidc: OidcClient  # the default provider (the first configured)
    http: aiohttp.ClientSession  # to the OP only; upstreams have their own pools
    refresher: TokenRefresher
    metrics: Metrics = field(default_factory=Metrics)
    upstreams: UpstreamTable | None = None  # proxied routes and their pools (bff.proxy)
    client_tokens: ClientTokens | None = None  # client-credentials tokens (bff.client_tokens)
    rate_limiter: RateLimiter | None = None  # per-address limits (bff.ratelimit); None = off
    route_tokens: RouteTokens | None = None  # resource and exchanged tokens (bff.route_tokens)
    # Every provider by its config name, the default first; empty means just ``oidc``.
    providers: Mapping[str, OidcClient] = field(default_factory=dict)
    # A host name (as in ``Host``) -> the provider its logins go to (``hosts:``; login.py).
    host_providers: Mapping[str, str] = field(init=False)
    by_issuer: Mapping[str, OidcClient] = field(init=False)  # issuers are unique (config)

    def __post_init__(self) -> None:
        if not self.providers:
            self.providers = {self.oidc.name: self.oidc}
        self.by_issuer = {client.issuer: client for client in self.providers.values()}
        self.host_providers = {host: p.name for p in self.settings.providers for host in p.hosts}

    def provider(self, name: str | None) -> OidcClient:
        """The provider of that name (None: the default); ``UnknownProvider`` (400) else."""
        if name is None:
            return self.oidc
        client = self.providers.get(name)
        if client is None:
            raise UnknownProvider()
        return client

    def provider_for(self, session: Session) -> OidcClient:
        """The provider a session was logged in at: its refresh, revocation and logout go there
        and nowhere else. Records without ``idp`` belong to the default provider; one whose
        provider left the config never gets here (``SessionManager`` ends it when read)."""
        return self.providers.get(session.data.idp or self.oidc.name, self.oidc)


SERVICES = web.AppKey("bff_services", Services)


async def session_of(request: web.Request) -> Session | None:
    """The live session the request's cookie points to, or None (absent, tampered, ended)."""
    services = request.app[SERVICES]
    return await services.sessions.load(services.cookies.session_secret(request))
