"""``GET /bff/login?returnTo=/path&idp=NAME``: start the authorization code flow with PKCE.

When the login cannot start (too many logins from this address, the OP's metadata or the store
unavailable, a ``returnTo`` off this origin, an unknown ``idp``), a browser navigation goes back to
the app with ``?bff_error=<code>`` like a failed callback does (``callback.back_to_app``); API
clients get the JSON error (400 ``unknown_idp`` for a provider that is not configured).

**Which provider** (issue 12, point 5): the ``idp`` query parameter names one; without it, the
request's host picks the provider whose ``hosts:`` list it (else the default, the first). The host
believed is the ``Host`` header alone, never ``X-Forwarded-Host`` (which proxies pass through from
the browser, see ``bff.peers``), and only as one of the configured names: it chooses among
providers the operator listed, each a legitimate way in, so a client that forges it only picks
another configured provider for its own login, as ``idp=`` would. bff serves one origin
(``public_url``): a login that arrives on a mapped host that is not ``public_url``'s is sent on to
``public_url``'s login with that ``idp``, so the login's cookies and the session live on the
origin the SPA runs on.
"""

from __future__ import annotations

import secrets
import time
from urllib.parse import quote, urlencode, urlsplit

from aiohttp import web

from bff import tracing
from bff.endpoints.callback import back_to_app, log_failure
from bff.errors import BffError, InvalidReturnTo
from bff.keys import new_secret, store_id
from bff.oidc import OidcClient, new_pkce_pair
from bff.ratelimit import enforce
from bff.redirects import is_local_path, is_navigation
from bff.services import SERVICES, Services
from bff.sessions import LoginTransaction


@tracing.traced("bff.login")
async def handle(request: web.Request) -> web.Response:
    try:
        await enforce(request, "login")
        return await _start(request)
    except BffError as exc:
        log_failure("login", exc)
        if not is_navigation(request.headers):
            raise
        return back_to_app(request.query.get("returnTo"), exc.error)


def request_host(request: web.Request) -> str | None:
    """The ``Host`` header's host name, lower-case, without port or trailing dot; None if bad."""
    raw = request.headers.get("Host", "")
    try:
        host = urlsplit(f"//{raw}").hostname
    except ValueError:
        return None
    return host.rstrip(".") if host else None


def _choose(request: web.Request, services: Services) -> tuple[OidcClient, str | None]:
    """The provider of this login, and the mapped host it came by (None: no host mapping)."""
    if "idp" in request.query:
        return services.provider(request.query["idp"]), None
    host = request_host(request)
    name = services.host_providers.get(host) if host else None
    if name is None:
        return services.oidc, None
    return services.provider(name), host


async def _start(request: web.Request) -> web.Response:
    services = request.app[SERVICES]
    return_to = request.query.get("returnTo", "/")
    if not is_local_path(return_to):
        raise InvalidReturnTo()
    oidc, mapped_host = _choose(request, services)
    settings = services.settings
    if mapped_host is not None and mapped_host != urlsplit(settings.public_url).hostname:
        query = urlencode({"idp": oidc.name, "returnTo": return_to}, quote_via=quote)
        location = f"{settings.public_url}{settings.prefix}/login?{query}"
        return web.Response(status=302, headers={"Location": location, "Cache-Control": "no-store"})
    # Fails with 503 before anything is stored when the OP's metadata is not loaded yet.
    await oidc.metadata()
    # One browser-binding secret per browser, so logins in several tabs do not evict each other.
    browser = services.cookies.browser_secret(request) or new_secret()
    current = services.cookies.session_secret(request)  # ends once the new session begins
    verifier, challenge = new_pkce_pair()
    tx = LoginTransaction(
        state=secrets.token_urlsafe(32),
        nonce=secrets.token_urlsafe(32),
        code_verifier=verifier,
        return_to=return_to,
        created_at=time.time(),
        previous=store_id(current) if current is not None else None,
        idp=oidc.name,
    )
    await services.sessions.begin_login(browser, tx)
    url = await oidc.authorization_url(state=tx.state, nonce=tx.nonce, code_challenge=challenge)
    response = web.Response(status=302, headers={"Location": url, "Cache-Control": "no-store"})
    services.cookies.set_browser(response, browser)
    return response
