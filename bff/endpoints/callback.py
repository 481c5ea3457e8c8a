"""``GET /bff/callback``: finish the login; any failure leaves no session and answers 400.

The OP's redirect back here is a cross-site navigation, on which the browser does not send a
SameSite=Strict cookie, and would not send it on a 302 onwards either (still the same cross-site
redirect chain). So we answer with a tiny page that navigates to ``returnTo`` itself: that
navigation starts on our origin, and the new session cookie travels with it.
"""

from __future__ import annotations

import contextlib
import html
import logging
import re
import time

from aiohttp import web

from bff.errors import LoginFailed
from bff.keys import StoreKey
from bff.oidc import InvalidGrant, InvalidToken, OidcError, user_claims
from bff.services import SERVICES
from bff.sessions import SessionData

log = logging.getLogger(__name__)

_ERROR_CODE = re.compile(r"^[a-z_]{1,64}$")

_LANDING = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="refresh" content="0;url={url}">
<title>Signing in…</title></head>
<body><p>Signed in. <a href="{url}">Continue</a></p></body></html>
"""


async def handle(request: web.Request) -> web.Response:
    services = request.app[SERVICES]
    query = request.query
    browser = services.cookies.browser_secret(request)
    if "error" in query:
        # Consume the transaction too, so this state cannot be used again.
        if query.get("state"):
            with contextlib.suppress(LoginFailed):
                await services.sessions.finish_login(browser, query.get("state"))
        error = query["error"] if _ERROR_CODE.match(query["error"]) else "invalid_error"
        services.metrics.inc("bff_logins_total", outcome="op_error")
        raise LoginFailed(f"the OpenID Provider refused the login: {error}")
    tx = await services.sessions.finish_login(browser, query.get("state"))
    code = query.get("code")
    try:
        await services.oidc.check_response_issuer(query.get("iss"))
        if not code:
            raise LoginFailed("the authorization response has no code")
        tokens = await services.oidc.exchange_code(code, tx.code_verifier)
        if tokens.id_token is None:
            raise LoginFailed("the OP returned no ID token (is the openid scope requested?)")
        claims = await services.oidc.validate_id_token(tokens.id_token, nonce=tx.nonce)
    except InvalidGrant:
        services.metrics.inc("bff_logins_total", outcome="invalid_code")
        raise LoginFailed("the authorization code is invalid, expired or already used") from None
    except (InvalidToken, OidcError) as exc:
        services.metrics.inc("bff_logins_total", outcome="rejected")
        log.warning("login.rejected", extra={"event": "login.rejected", "reason": str(exc)})
        raise LoginFailed(str(exc)) from None
    profile = user_claims(claims)
    try:
        info = await services.oidc.userinfo(tokens.access_token)
        # Core 5.3.2: userinfo about another subject must not be merged.
        if info.get("sub") == claims["sub"]:
            profile = {**user_claims(info), **profile}
    except Exception:  # userinfo only enriches the profile; the login stands without it
        log.info("login.userinfo_unavailable", extra={"event": "login.userinfo_unavailable"})
    now = time.time()
    # A login always starts a brand-new session; the one this browser had ends (no fixation).
    if tx.previous:
        await services.sessions.end_ids(StoreKey(tx.previous))
    session = await services.sessions.create(
        SessionData(
            sub=claims["sub"],
            claims=profile,
            access_token=tokens.access_token,
            access_expires_at=tokens.expires_at,
            access_lifetime=tokens.lifetime,
            refresh_token=tokens.refresh_token,
            id_token=tokens.id_token,
            scopes=tokens.scope
            if tokens.scope is not None
            else tuple(services.settings.oidc.scopes),
            created_at=now,
            expires_at=now + services.settings.session.absolute_timeout,
            sid=claims.get("sid") if isinstance(claims.get("sid"), str) else None,
        )
    )
    services.refresher.note_lifetime(tokens.lifetime)
    services.metrics.inc("bff_logins_total", outcome="ok")
    url = html.escape(tx.return_to, quote=True)
    response = web.Response(
        text=_LANDING.format(url=url),
        content_type="text/html",
        headers={"Cache-Control": "no-store"},
    )
    services.cookies.set_session(response, session.secret)
    return response
