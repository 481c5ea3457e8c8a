"""``POST /bff/backchannel-logout``: OpenID Connect Back-Channel Logout 1.0.

The OP posts ``logout_token=<JWT>`` (``application/x-www-form-urlencoded``, 2.5) from its own
server, so this route has no cookie and no anti-forgery header; the token's signature is the
proof. ``OidcClient.validate_logout_token`` checks 2.6 (signature, ``iss``, ``aud``, ``iat``,
the back-channel ``events`` member, no ``nonce``, ``sid`` and/or ``sub``); here we add what needs
the shared store: a ``jti`` seen before is a replay, and the record of it lives as long as the
token could still be accepted, so a replay is refused on every instance.

Then (2.7) the sessions the token names end, in the shared store, so every instance stops
serving them (other instances' read caches see it within ``session.cache_ttl``): with ``sid``,
the sessions of that OP session (of that ``sub`` too when both are given); with ``sub`` alone,
all of the subject's sessions. Finding none is not an error: the user may have logged out here
first, and the OP still notifies us.

**Several providers** (issue 12, point 5): the token's (unverified) ``iss`` chooses which
provider judges it; that provider then checks the signature with its own keys and ``iss``,
``aud`` against itself, so a token of issuer B is judged by B's rules alone. The ``sid``/``sub``
indexes and the ``jti`` record are per issuer (``sessions.py``): B's logout token naming a ``sub``
or ``sid`` that also exists at A ends nothing at A. A token whose ``iss`` is no configured
provider's is judged by the default provider, which refuses it (another issuer).

Answers (2.8): 200 with ``Cache-Control: no-store``, or 400 with a JSON error. Bodies are read
with a small cap, so a huge or odd body is a 400, never a 500. Anyone can post here, so each
address is rate-limited (``rate_limits.backchannel_logout``, generous: the OP posts from few
addresses, sometimes many tokens at once); beyond it, 429 with ``Retry-After``.
"""

from __future__ import annotations

import logging
import time
from typing import Any
from urllib.parse import parse_qs

from aiohttp import web

from bff.errors import BadRequest
from bff.oidc import InvalidToken, unverified_issuer
from bff.ratelimit import enforce
from bff.services import SERVICES

__all__ = ["handle"]

log = logging.getLogger(__name__)

_MAX_BODY = 64 * 1024  # a logout token is a few hundred bytes; the OIDC client caps it at 16 KiB
# How long a logout token without (or with a far) ``exp`` is accepted after its ``iat``. Bounding
# it bounds the replay record too: a jti must be remembered only while the token could be used.
_MAX_AGE = 600.0


class InvalidLogoutToken(BadRequest):
    error = "invalid_request"
    description = "the logout token is invalid"


async def handle(request: web.Request) -> web.Response:
    services = request.app[SERVICES]
    await enforce(request, "backchannel_logout")
    token = await _logout_token(request)
    oidc = services.by_issuer.get(unverified_issuer(token) or "", services.oidc)
    try:
        claims = await oidc.validate_logout_token(token)
    except InvalidToken as exc:
        log.warning(
            "backchannel.rejected", extra={"event": "backchannel.rejected", "reason": str(exc)}
        )
        raise InvalidLogoutToken(str(exc)) from None
    ttl = _remaining_life(claims, time.time(), oidc.settings.clock_skew)
    if ttl <= 0:
        raise InvalidLogoutToken("the logout token is too old")
    if await services.sessions.jti_seen(claims["jti"], oidc.name):
        log.warning(
            "backchannel.replayed", extra={"event": "backchannel.rejected", "reason": "replay"}
        )
        raise InvalidLogoutToken("the logout token was already used (jti)")
    sid = claims.get("sid") if isinstance(claims.get("sid"), str) and claims["sid"] else None
    sub = claims.get("sub") if isinstance(claims.get("sub"), str) and claims["sub"] else None
    ended = await services.sessions.end_op_session(sid=sid, sub=sub, idp=oidc.name)
    # Recorded only once the sessions are gone: if ending them failed (503), the OP's retry of
    # the same token (Back-Channel Logout 1.0, 2.8) must still be accepted. Two deliveries
    # racing each other both end the same sessions, which is harmless.
    await services.sessions.record_jti(claims["jti"], ttl, oidc.name)
    services.metrics.inc("bff_logouts_total", ended, cause="backchannel")
    log.info(
        "backchannel.logout",
        extra={"event": "backchannel.logout", "ended": ended, "idp": oidc.name},
    )
    return web.Response(status=200, headers={"Cache-Control": "no-store"})


async def _logout_token(request: web.Request) -> str:
    """The ``logout_token`` form field, read without trusting the body's size or encoding."""
    if request.content_type != "application/x-www-form-urlencoded":
        raise InvalidLogoutToken("the body must be application/x-www-form-urlencoded")
    if request.content_length is not None and request.content_length > _MAX_BODY:
        raise InvalidLogoutToken("the body is too large")
    body = b""
    while len(body) <= _MAX_BODY:
        chunk = await request.content.read(_MAX_BODY + 1 - len(body))
        if not chunk:
            break
        body += chunk
    if len(body) > _MAX_BODY:
        raise InvalidLogoutToken("the body is too large")
    try:
        form = parse_qs(body.decode("ascii"), strict_parsing=False, max_num_fields=20)
    except (UnicodeDecodeError, ValueError):
        raise InvalidLogoutToken("the body is not a valid form") from None
    values = form.get("logout_token", [])
    if len(values) != 1 or not values[0]:
        raise InvalidLogoutToken("exactly one logout_token is required")
    return values[0]


def _remaining_life(claims: dict[str, Any], now: float, skew: float) -> float:
    """Seconds this token could still be accepted: until its ``exp``, at most ``_MAX_AGE``."""
    end = float(claims["iat"]) + _MAX_AGE
    exp = claims.get("exp")
    if isinstance(exp, int | float) and not isinstance(exp, bool):
        end = min(end, float(exp))
    return end + skew - now
