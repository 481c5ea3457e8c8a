"""Edge mode: ``<prefix>/authz``, the auth service an edge proxy asks before each API call.

nginx ``auth_request``, ingress-nginx ``auth-url``, Traefik ``ForwardAuth`` and Caddy
``forward_auth`` send a subrequest here carrying the original request's headers (its ``Cookie``,
``X-CSRF``, ``Origin``, ``Sec-Fetch-Site``) plus where it was going. bff runs the very policy the
direct proxy runs (:func:`bff.proxy.forward.authorize`: route match with the same normalisation
and traversal refusal, methods, anti-forgery, token mode, scopes, refresh under the single
flight) and answers 200 with ``Authorization: Bearer <token>`` for the edge to attach, or the same
JSON error the direct proxy would give. Nothing is forwarded from here.

Decisions:

* Only a TCP peer in ``trusted_proxies`` is answered (else 403 ``untrusted_edge``): the
  answer holds a bearer token, and the original-request headers are input only when an edge wrote
  them. With the default empty ``trusted_proxies`` the endpoint refuses everyone.
* Where the request was going: ``X-Original-URI`` (nginx ``$request_uri``), ``X-Original-URL``
  (ingress-nginx, an absolute URL) or ``X-Forwarded-Uri`` (Traefik, Caddy); the method from
  ``X-Original-Method`` or ``X-Forwarded-Method``. Every one of them that came must say the same
  (ingress-nginx with ``auth-method`` sends both ``X-Original-URI`` and ``-URL``; many nginx
  snippets set ``X-Forwarded-Uri`` too): each edge overwrites the ones it sets but passes the
  browser's others through untouched, so believing any order of precedence would let a browser
  name a route other than the one it calls (its scopes, methods or token). None, two that
  disagree, or a malformed one: 400.
  ``X-Forwarded-Host``/``-Proto`` are not used for decisions: the origin is ``public_url``.
* An edge must never let a browser reach this path (the shipped configs answer 404 for it): a
  same-origin script could otherwise read its own session's token from the answer.
* nginx's ``auth_request`` passes on only 401 and 403 (anything else becomes its own 500) and
  never the answer's body, so the shipped nginx config asks again from an ``error_page`` location
  to give the browser bff's JSON error, marking that call ``X-Bff-Denied: 1``. Should that second
  look allow the call (a session refreshed or a store back in between), it answers 503 with
  ``Retry-After``, never an empty 200 the SPA would take for the API's answer.
* The direct proxy's retry after an upstream 401 has no counterpart here (bff does not see the
  upstream's answer); the token handed out is refreshed ``refresh_skew`` before it expires.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final, NamedTuple
from urllib.parse import urlsplit

from aiohttp import web
from yarl import URL

from bff import dpop
from bff.errors import BadRequest, BffError, NotFound, Unavailable, UntrustedEdge
from bff.proxy.forward import authorize, authorize_now
from bff.proxy.routing import Route, UpstreamTable
from bff.services import SERVICES, Services
from bff.sessions import Session

__all__ = ["AUTHZ_PATH", "authz", "authz_now", "original_request"]

#: Under the configured prefix (``/bff/authz`` by default).
AUTHZ_PATH: Final = "/authz"

_TCHAR: Final = frozenset(
    "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
)
_NO_ORIGINAL: Final = "the edge did not say which request to check"
_NO_BEARER: Final[tuple[tuple[str, str], ...]] = ()
_TARGET_HEADERS: Final = ("X-Original-URI", "X-Original-URL", "X-Forwarded-Uri")
_METHOD_HEADERS: Final = ("X-Original-Method", "X-Forwarded-Method")


def _target_of_url(url: str) -> str:
    """The path and query of an absolute ``X-Original-URL``."""
    try:
        parts = urlsplit(url)
    except ValueError:  # "http://[::1/x": a bad IPv6 literal
        raise BadRequest(_NO_ORIGINAL) from None
    if parts.scheme not in ("http", "https") or not parts.path:
        raise BadRequest(_NO_ORIGINAL)
    return parts.path + ("?" + parts.query if parts.query else "")


def _agreed(request: web.Request, names: tuple[str, ...]) -> str:
    """The one value every header of ``names`` that came agrees on; else :class:`BadRequest`."""
    found: str | None = None
    for name in names:
        for value in request.headers.getall(name, ()):
            if name == "X-Original-URL":
                value = _target_of_url(value)
            if found is not None and value != found:
                raise BadRequest(_NO_ORIGINAL)
            found = value
    if found is None:
        raise BadRequest(_NO_ORIGINAL)
    return found


def original_request(request: web.Request) -> tuple[str, str]:
    """The original request's method and raw target (path and query) as the edge reported them.

    :class:`BadRequest` when the edge sent none, ones that disagree, or no origin-form target.
    """
    method = _agreed(request, _METHOD_HEADERS)
    target = _agreed(request, _TARGET_HEADERS)
    if not method or not all(c in _TCHAR for c in method):
        raise BadRequest(_NO_ORIGINAL)
    if (
        not target.startswith("/")
        or not target.isascii()
        or not target.isprintable()
        or " " in target
    ):
        raise BadRequest(_NO_ORIGINAL)
    return method, target


class _Ask(NamedTuple):
    """What the edge asks about: the route, the upstream target, the original method."""

    services: Services
    table: UpstreamTable
    route: Route
    target: str
    method: str
    websocket: bool


def _ask(request: web.Request) -> _Ask:
    services = request.app[SERVICES]
    table = services.upstreams
    if table is None:
        raise NotFound()
    if not table.peers.peer_trusted(request):
        raise UntrustedEdge()
    method, target = original_request(request)
    route, upstream_target = table.resolve(target)  # 400 traversal, 404 no route: as the proxy
    websocket = (
        route.websocket
        and method == "GET"
        and request.headers.get("Upgrade", "").lower() == "websocket"
    )
    return _Ask(services, table, route, upstream_target, method, websocket)


def _answer(
    request: web.Request, ask: _Ask, session: Session | None, token: str | None
) -> web.Response:
    if request.headers.get("X-Bff-Denied") == "1":
        raise Unavailable("the decision changed while the edge asked; retry")
    headers = {"Cache-Control": "no-store"}
    key = dpop.session_key(session) if session is not None and token is not None else None
    if key is not None and token is not None:
        # A proof for the upstream URL bff would call; the edge passes both headers on.
        url = URL(ask.route.origin + ask.target, encoded=True)
        headers.update(dpop.upstream_auth(key, ask.method, url, ask.route.origin, token))
    elif token is not None:
        headers["Authorization"] = f"Bearer {token}"
    return web.Response(status=200, headers=headers)


async def authz(request: web.Request) -> web.Response:
    """Any method: 200 (with the bearer when the route has one) or the direct proxy's error."""
    ask = _ask(request)
    session, token, _ = await authorize(
        ask.services, ask.table, ask.route, request, ask.method, websocket=ask.websocket
    )
    return _answer(request, ask, session, token)


def authz_now(request: web.Request) -> Sequence[tuple[str, str]] | None:
    """:func:`authz`'s ``200`` when it needs no I/O (see
    :func:`~bff.proxy.forward.authorize_now`): its headers, or None when only :func:`authz` can
    answer (a store read, a refresh, a DPoP proof, or a refusal, which it then gives, counts
    and logs). The front door's fast lane answers most edge calls this way (issue 11, point 4)."""
    try:
        ask = _ask(request)
        decided = authorize_now(
            ask.services, ask.table, ask.route, request, ask.method, websocket=ask.websocket
        )
    except BffError:
        return None
    if decided is None or request.headers.get("X-Bff-Denied") == "1":
        return None
    session, token, _ = decided
    if token is None:
        return _NO_BEARER
    if session is not None and dpop.session_key(session) is not None:
        return None  # a proof to sign
    if not token.isascii() or not token.isprintable():
        return None  # a value aiohttp's own header checks refuse (a 500), never written here
    # Cache-Control: no-store comes with every answer under the prefix (SecurityHeaders.fixed).
    return (("Authorization", "Bearer " + token),)
