"""``GET /bff/callback``: finish the login; any failure leaves no session.

The OP's redirect back here is a cross-site navigation, on which the browser does not send a
SameSite=Strict cookie, and would not send it on a 302 onwards either (still the same cross-site
redirect chain). So we answer with a tiny page that navigates to ``returnTo`` itself: that
navigation starts on our origin, and the new session cookie travels with it.

A failed login is not a dead end. A browser navigation (``redirects.is_navigation``) is sent back
to the app with a 303: to the login's ``returnTo`` when the transaction is known, else ``/``, with
``?bff_error=<code>``, the code being one of ``OP_ERRORS`` or bff's own fixed error codes, never
the OP's free text. Anything else (a script, an API client) gets the JSON error as before.

**Several providers** (issue 12, point 5): the login transaction names the provider the login
went to; the code is exchanged there and nowhere else, and two mix-up defenses (RFC 9207) hold:
the callback must arrive on that provider's own redirect URI (``Settings.callback_path``), and
an ``iss`` parameter must be that provider's issuer (required when its OP advertises it).
"""

from __future__ import annotations

import contextlib
import html
import logging
import re
import time
from dataclasses import dataclass
from typing import Final

from aiohttp import web

from bff import dpop, tracing
from bff.errors import BffError, LoginFailed
from bff.keys import StoreKey
from bff.oidc import InvalidGrant, InvalidToken, OidcError, user_claims
from bff.ratelimit import enforce
from bff.redirects import is_navigation, with_error
from bff.services import SERVICES
from bff.sessions import LoginTooSlow, SessionData

__all__ = ["OP_ERRORS", "back_to_app", "handle", "log_failure"]

log = logging.getLogger(__name__)

_ERROR_CODE = re.compile(r"^[a-z_]{1,64}$")

# The authorization error codes of RFC 6749 4.1.2.1 and OpenID Connect Core 3.1.2.6: the only
# ones the SPA is told as they are; any other code the OP sends becomes ``login_failed``.
OP_ERRORS: Final = frozenset({
    "access_denied", "invalid_request", "unauthorized_client", "unsupported_response_type",
    "invalid_scope", "server_error", "temporarily_unavailable", "interaction_required",
    "login_required", "account_selection_required", "consent_required", "invalid_request_uri",
    "invalid_request_object", "request_not_supported", "request_uri_not_supported",
    "registration_not_supported",
})  # fmt: skip

_LANDING = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="refresh" content="0;url={url}">
<title>Signing in…</title></head>
<body><p>Signed in. <a href="{url}">Continue</a></p></body></html>
"""


@dataclass(slots=True)
class _Attempt:
    """What a failing callback knows so far, for the way back to the app."""

    return_to: str | None = None  # the login's returnTo, once its transaction is found
    op_error: str | None = None  # the OP's error code, when the OP refused


class OpRefused(LoginFailed):
    """The OP answered the authorization request with an error (``error=...``)."""


@tracing.traced("bff.callback")
async def handle(request: web.Request) -> web.Response:
    attempt = _Attempt()
    try:
        await enforce(request, "callback")
        return await _finish(request, attempt)
    except BffError as exc:
        log_failure("callback", exc)
        if not is_navigation(request.headers):
            raise
        if isinstance(exc, LoginTooSlow):
            attempt.return_to = exc.return_to
        return back_to_app(attempt.return_to, attempt.op_error or exc.error)
    except Exception:
        if not is_navigation(request.headers):
            raise
        log.exception("request.failed", extra={"event": "request.failed", "path": request.path})
        return back_to_app(attempt.return_to, "server_error")


def log_failure(step: str, exc: BffError) -> None:
    """A failed login or callback, with its reason (an error code and bff's own description)."""
    log.warning(
        "login.failed",
        extra={"event": "login.failed", "step": step, "status": exc.status,
               "reason": exc.error, "detail": exc.error_description},
    )  # fmt: skip


def back_to_app(return_to: str | None, code: str) -> web.Response:
    """A 303 to ``return_to`` (or ``/``) carrying ``bff_error=<code>`` for the SPA to show."""
    code = code if _ERROR_CODE.match(code) else "login_failed"
    return web.Response(
        status=303,
        headers={"Location": with_error(return_to, code), "Cache-Control": "no-store"},
    )


async def _finish(request: web.Request, attempt: _Attempt) -> web.Response:
    services = request.app[SERVICES]
    query = request.query
    browser = services.cookies.browser_secret(request)
    if "error" in query:
        # Consume the transaction too, so this state cannot be used again.
        if query.get("state"):
            with contextlib.suppress(LoginFailed):
                refused = await services.sessions.finish_login(browser, query.get("state"))
                attempt.return_to = refused.return_to
        error = query["error"] if _ERROR_CODE.match(query["error"]) else "invalid_error"
        attempt.op_error = error if error in OP_ERRORS else "login_failed"
        services.metrics.inc("bff_logins_total", outcome="op_error")
        raise OpRefused(f"the OpenID Provider refused the login: {error}")
    tx = await services.sessions.finish_login(browser, query.get("state"))
    attempt.return_to = tx.return_to
    code = query.get("code")
    oidc = services.providers.get(tx.idp or services.oidc.name)
    if oidc is None:
        raise LoginFailed("the login's provider is no longer configured")
    if request.path != services.settings.callback_path(oidc.settings):
        services.metrics.inc("bff_logins_total", outcome="rejected")
        raise LoginFailed("the authorization response came to another provider's redirect URI")
    try:
        await oidc.check_response_issuer(query.get("iss"))
        if not code:
            raise LoginFailed("the authorization response has no code")
        # A new key for each login (RFC 9449): the session's tokens are bound to it.
        key = dpop.generate(await oidc.dpop_alg()) if oidc.settings.dpop else None
        tokens = await oidc.exchange_code(code, tx.code_verifier, dpop_key=key)
        if tokens.id_token is None:
            raise LoginFailed("the OP returned no ID token (is the openid scope requested?)")
        claims = await oidc.validate_id_token(tokens.id_token, nonce=tx.nonce)
    except InvalidGrant:
        services.metrics.inc("bff_logins_total", outcome="invalid_code")
        raise LoginFailed("the authorization code is invalid, expired or already used") from None
    except (InvalidToken, OidcError) as exc:
        services.metrics.inc("bff_logins_total", outcome="rejected")
        log.warning("login.rejected", extra={"event": "login.rejected", "reason": str(exc)})
        raise LoginFailed(str(exc)) from None
    profile = user_claims(claims)
    try:
        info = await oidc.userinfo(tokens.access_token, dpop_key=key)
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
            scopes=tokens.scope if tokens.scope is not None else tuple(oidc.settings.scopes),
            created_at=now,
            expires_at=now + services.settings.session.absolute_timeout,
            sid=claims.get("sid") if isinstance(claims.get("sid"), str) else None,
            dpop_jwk=key.record() if key is not None else None,
            idp=oidc.name,
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
