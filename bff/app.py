"""``create_app(settings)``: wire the services and routes of one bff instance.

Everything a request needs (store client, OP client, upstream pools, keys) is built here once, in
``cleanup_ctx``, and torn down in reverse; handlers only look things up.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web

from bff import endpoints, health, proxy, route_tokens, spa, tracing
from bff.access import access_middleware, request_id_header
from bff.client_tokens import ClientTokens
from bff.config import Settings
from bff.cookies import CookiePolicy
from bff.keys import Keyring
from bff.lifecycle import LIFECYCLE, Lifecycle
from bff.metrics import Metrics, flush_ctx, request_middleware
from bff.middlewares import error_middleware, security_headers
from bff.oidc import OidcClient
from bff.peers import PEERS, Peers
from bff.proxy.direct import DIRECT, DirectPath
from bff.ratelimit import RateLimiter
from bff.refresh import TokenRefresher
from bff.services import SERVICES, Services
from bff.sessions import SessionManager
from bff.store import SessionStore, open_store
from bff.store.instrumented import InstrumentedStore

__all__ = ["create_app"]


def create_app(settings: Settings, *, store: SessionStore | None = None) -> web.Application:
    api_prefixes = (settings.prefix, *(u.path for u in settings.upstreams))
    # /metrics is on its own listener unless configured public: here a JSON 404, never the SPA.
    private = () if settings.metrics.public else (health.METRICS_PATH,)
    app = web.Application(
        middlewares=[
            access_middleware(enabled=settings.log.access),  # request id; one line per request
            *tracing.middleware(settings.tracing),  # the server span sees every answer
            request_middleware(),
            error_middleware(api_prefixes=(*api_prefixes, *private)),
        ],
        client_max_size=1024**2,  # for bff's own endpoints; proxied bodies stream instead
        # A proxy passes request bodies on as they came: no decompression (and no zip bombs).
        handler_args={"auto_decompress": False},
    )
    keyring = Keyring([k.get() for k in settings.keys])
    peers = Peers(settings.trusted_proxies, settings.public_url)
    app[LIFECYCLE] = Lifecycle()  # draining flag and open WebSockets, for bff.worker
    app[PEERS] = peers  # bff.peers.client_address(request) for rate limits and logs
    upstreams = proxy.UpstreamTable(settings.upstreams, public_url=settings.public_url, peers=peers)

    async def services_ctx(app: web.Application) -> AsyncIterator[None]:
        tracing.start(settings.tracing)  # per worker, at start-up; a no-op unless enabled
        cfg = settings.session
        raw = (
            store
            if store is not None
            else open_store(cfg.store, timeout=cfg.store_timeout, redis=cfg.redis)
        )
        # A span per operation (itself unless tracing is on), inside latency and error metrics.
        session_store: SessionStore = InstrumentedStore(tracing.traced_store(raw))
        http = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=100, ttl_dns_cache=300),
            raise_for_status=False,
            # Server-to-server calls for every user: no cookie may carry over between them.
            cookie_jar=aiohttp.DummyCookieJar(),
        )
        # One client per provider, each with its own redirect URI; the first is the default.
        providers = {
            p.name: OidcClient(p, http, redirect_uri=settings.redirect_uri_for(p))
            for p in settings.providers
        }
        oidc = providers[settings.oidc.name]
        sessions = SessionManager(
            session_store,
            idle_timeout=cfg.idle_timeout,
            absolute_timeout=cfg.absolute_timeout,
            login_timeout=cfg.login_timeout,
            cache_ttl=cfg.cache_ttl,
            issuers={name: client.issuer for name, client in providers.items()},
        )
        metrics = Metrics()
        app[SERVICES] = Services(
            settings=settings,
            keyring=keyring,
            cookies=CookiePolicy(
                keyring,
                name=cfg.cookie.name,
                same_site=cfg.cookie.same_site,
                secure=cfg.cookie.secure,
                max_age=cfg.absolute_timeout,
                login_max_age=cfg.login_timeout,
            ),
            store=session_store,
            sessions=sessions,
            oidc=oidc,
            http=http,
            refresher=TokenRefresher(
                sessions,
                oidc,
                skew=settings.oidc.refresh_skew,
                metrics=metrics,
                providers=providers,
            ),
            metrics=metrics,
            upstreams=upstreams,
            client_tokens=ClientTokens(
                oidc,
                session_store,
                keyring,
                issuer=settings.oidc.issuer,
                client_id=settings.oidc.client_id,
            ),
            rate_limiter=RateLimiter(session_store, settings.rate_limits, metrics)
            if settings.rate_limits.enabled
            else None,
            providers=providers,
        )
        services = app[SERVICES]
        services.route_tokens = route_tokens.RouteTokens(
            sessions, oidc, services.refresher, skew=settings.oidc.refresh_skew, metrics=metrics
        )
        for client in providers.values():  # a session's route tokens come from its provider
            client.login_resources = route_tokens.login_resources(settings, client.settings)
            client.required_grants = route_tokens.required_grants(settings)
        # An OP that is down at start must not stop us from serving: discover in the background.
        discovery = [asyncio.create_task(c.discover_forever()) for c in providers.values()]
        yield
        for task in discovery:
            task.cancel()
        for task in discovery:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await http.close()
        await session_store.close()
        tracing.stop()

    app.cleanup_ctx.append(services_ctx)
    app.cleanup_ctx.append(flush_ctx)  # per-request metrics reach the shared files each second
    app.cleanup_ctx.append(upstreams.cleanup_ctx)  # one keep-alive pool per upstream
    endpoints.add_routes(app, settings.prefix)
    health.add_routes(app, metrics_public=settings.metrics.public)
    # Edge mode: the auth service an edge proxy asks (any method: edges differ).
    authz_path = settings.prefix + proxy.AUTHZ_PATH
    authz = app.router.add_route("*", authz_path, proxy.authz)
    own = [resource.canonical for resource in app.router.resources()]
    proxied = proxy.add_routes(app, upstreams)  # before the SPA's catch-all
    secure = security_headers(
        csp=settings.security.content_security_policy,
        hsts=settings.security.hsts and settings.public_url.startswith("https://"),
        no_store_prefixes=(settings.prefix,),
    )
    if not settings.tracing.enabled:  # the server span needs the middleware chain
        # Proxied requests and the edge's auth calls skip the router and the middlewares
        # (bff.proxy.direct, bff.server).
        app[DIRECT] = DirectPath(
            app,
            proxied,
            exact=[(authz_path, authz, proxy.authz_now)],
            reserved=own,
            access_log=settings.log.access,
            security=secure,
        )
    spa.add_routes(app, settings.static, reserved=(*api_prefixes, *private))
    app.on_response_prepare.append(request_id_header)
    app.on_response_prepare.append(secure)
    return app
