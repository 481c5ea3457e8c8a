"""``GET /bff/logout?sid=...``: end the session here and at the OP (RP-Initiated Logout 1.0).

Logout is a top-level navigation, so it cannot carry ``X-CSRF``; the ``sid`` query parameter is
the anti-forgery proof instead: it is the session's public handle, which only the SPA learns (from
``/bff/user``, behind the anti-forgery header). A cross-site link without it, or with another
session's, gets 400 and changes nothing: the session lives on and the cookie stays.

With a valid ``sid`` we end the session first (so nothing can use it while the OP is slow), revoke
its refresh and access tokens at the OP (RFC 7009, best effort), clear the cookie, and send the
browser to the OP's ``end_session_endpoint`` with ``client_id``, ``post_logout_redirect_uri`` and
``logout_hint``. RP-Initiated Logout 1.0 leaves ``logout_hint``'s meaning to the OP and names "a
session identifier pertaining to the RP's session with the OP" as one choice: we send the OP's
``sid`` when the ID token had one, else the ``sub``. (oidc-provider v8 accepts and ignores it;
without ``id_token_hint`` it asks the user to confirm the logout, as the spec says it should.)

``id_token_hint`` is off by default. Turning on ``oidc.logout_id_token_hint`` puts the ID token
(the user's claims, signed) in a URL: the browser keeps it in its history, the OP's and any
proxy's access logs may record it, and an extension or a shared computer can read it. Turn it on
only for an OP that refuses logout without it.

A refresh that was in flight at the OP when the session ended here finds its session gone when
it answers, and revokes the tokens it got (``refresh.py``): no token outlives the logout. An OP
with no revocation endpoint at all (discovery, RFC 8414 metadata, ``oidc.revocation_endpoint``)
is reported at start-up and by ``bff check-config``; logout can then only forget the tokens.

With several providers (issue 12, point 5), all of this happens at the provider the session was
logged in at (``Services.provider_for``): its revocation endpoint, its ``end_session_endpoint``,
its ``client_id`` and its ``post_logout_redirect``.

An OP without an ``end_session_endpoint`` (or whose metadata is not loaded) cannot end its own
session; the browser then lands on ``oidc.post_logout_redirect`` directly. A request with no live
session also lands there: a stale cookie is cleared; with no cookie nothing is cleared, since a
cross-site link never carries the Strict cookie and must not be able to delete it.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from urllib.parse import quote, urlencode

from aiohttp import web

from bff.errors import BadRequest, ProviderUnavailable
from bff.oidc import OidcClient, ProviderMetadata
from bff.services import SERVICES, Services
from bff.sessions import Session

__all__ = ["handle"]

log = logging.getLogger(__name__)


class LogoutRefused(BadRequest):
    error = "invalid_request"
    description = "the sid parameter does not match this session"


async def handle(request: web.Request) -> web.Response:
    services = request.app[SERVICES]
    secret = services.cookies.session_secret(request)
    session = await services.sessions.load(secret, fresh=True)
    if session is None:
        landing = services.settings.oidc.post_logout_redirect
        # A stale cookie is cleared. No cookie at all may just mean a cross-site link (a Strict
        # cookie stays home): clearing then would let any site log the user out.
        return _redirect(services, landing, clear=secret is not None)
    sid = request.query.get("sid", "")
    if not hmac.compare_digest(sid.encode(), session.handle.encode()):
        services.metrics.inc("bff_logouts_total", cause="refused")
        raise LogoutRefused()
    await services.sessions.end(session)
    services.metrics.inc("bff_logouts_total", cause="user")
    oidc = services.provider_for(session)
    landing = oidc.settings.post_logout_redirect
    log.info(
        "session.logout",
        extra={"event": "session.logout", "session": session.id[:8], "idp": oidc.name},
    )
    try:
        meta = await oidc.metadata()
    except ProviderUnavailable:
        log.warning("logout.op_unavailable", extra={"event": "logout.op_unavailable"})
        return _redirect(services, landing)
    await _revoke_tokens(oidc, session)
    if not meta.end_session_endpoint:
        return _redirect(services, landing)
    return _redirect(services, _end_session_url(services, oidc, meta, session))


async def _revoke_tokens(oidc: OidcClient, session: Session) -> None:
    """RFC 7009: refresh token first (many OPs then drop the grant's access tokens too)."""
    data = session.data
    pending = []
    if data.refresh_token:
        pending.append(oidc.revoke(data.refresh_token, "refresh_token"))
    if data.access_token:
        pending.append(oidc.revoke(data.access_token, "access_token"))
    # revoke() never raises for an OP that fails; the session is already gone either way.
    await asyncio.gather(*pending)


def _end_session_url(
    services: Services, oidc: OidcClient, meta: ProviderMetadata, session: Session
) -> str:
    provider = oidc.settings
    params = {
        "client_id": provider.client_id,
        "post_logout_redirect_uri": services.settings.public_url + provider.post_logout_redirect,
        "logout_hint": session.data.sid or session.data.sub,
    }
    if provider.logout_id_token_hint and session.data.id_token:
        params["id_token_hint"] = session.data.id_token
    endpoint = meta.end_session_endpoint or ""
    sep = "&" if "?" in endpoint else "?"
    return f"{endpoint}{sep}{urlencode(params, quote_via=quote)}"


def _redirect(services: Services, location: str, *, clear: bool = True) -> web.Response:
    response = web.Response(status=302, headers={"Location": location, "Cache-Control": "no-store"})
    if clear:
        services.cookies.clear_session(response)
    return response
