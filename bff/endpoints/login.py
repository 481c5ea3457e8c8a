"""``GET /bff/login?returnTo=/path``: start the authorization code flow with PKCE.

When the login cannot start (too many logins from this address, the OP's metadata or the store
unavailable, a ``returnTo`` off this origin), a browser navigation goes back to the app with
``?bff_error=<code>`` like a failed callback does (``callback.back_to_app``); API clients get the
JSON error.
"""

from __future__ import annotations

import secrets
import time

from aiohttp import web

from bff import tracing
from bff.endpoints.callback import back_to_app, log_failure
from bff.errors import BffError, InvalidReturnTo
from bff.keys import new_secret, store_id
from bff.oidc import new_pkce_pair
from bff.ratelimit import enforce
from bff.redirects import is_local_path, is_navigation
from bff.services import SERVICES
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


async def _start(request: web.Request) -> web.Response:
    services = request.app[SERVICES]
    return_to = request.query.get("returnTo", "/")
    if not is_local_path(return_to):
        raise InvalidReturnTo()
    # Fails with 503 before anything is stored when the OP's metadata is not loaded yet.
    await services.oidc.metadata()
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
    )
    await services.sessions.begin_login(browser, tx)
    url = await services.oidc.authorization_url(
        state=tx.state, nonce=tx.nonce, code_challenge=challenge
    )
    response = web.Response(status=302, headers={"Location": url, "Cache-Control": "no-store"})
    services.cookies.set_browser(response, browser)
    return response
