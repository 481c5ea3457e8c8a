"""The proxy: ``<route>/...`` from the config's ``upstreams`` to its upstream, bearer attached.

Invariant 7 of the design doc lives here: a request reaches only a configured upstream, under its
prefix once the path is normalised; the browser's ``Cookie`` and ``Authorization`` and every
hop-by-hop header stay behind; bodies stream both ways in bounded chunks; server-sent events and
WebSocket frames pass as they come.

The hot path (cookie -> cached session -> forward) does no store round trip and no decryption
while the session cache is warm, no regex and no per-request object graph: everything a route
needs is computed once in :class:`Route` when the app is built, and each upstream has one pool of
keep-alive connections opened at start-up (:mod:`~bff.proxy.upstream`; WebSockets use an
``aiohttp.ClientSession``).

The modules:

* :mod:`~bff.proxy.direct` -- proxied requests from the front door to ``forward`` without the
  application's router and middleware chain (same labels, request id, metrics, errors, log line).
* :mod:`~bff.proxy.routing` -- what reaches which upstream: :class:`Route`,
  :class:`UpstreamTable` (matching and the pools), :func:`normalise_path`.
* :mod:`~bff.proxy.headers` -- the header policy both ways, names compared by meaning.
* :mod:`~bff.proxy.overrides` -- ``_method`` in query strings (dropped) and form bodies (refused
  on routes with a ``methods:`` list).
* :mod:`~bff.proxy.forward` -- the HTTP handler: credentials, the exchange under its deadline,
  the 401 retry, streaming.
* :mod:`~bff.proxy.upstream` -- the upstream HTTP client: keep-alive pools on aiohttp's own
  connection protocol, response parser and header serialiser.
* :mod:`~bff.proxy.websocket` -- the WebSocket proxy.
* :mod:`~bff.proxy.edge` -- edge mode: the auth endpoint an edge proxy asks, same policy.
* :mod:`~bff.proxy.session_watch` -- ends a long-lived exchange once its session ends.

Decisions worth knowing:

* Any ``.``/``..`` segment, in any spelling (``%2e``, double-encoded ``%252e``), and any encoded
  slash (``%2f``), backslash (raw or ``%5c``), NUL or control character in the path is refused with
  400 rather than resolved: no legitimate SPA call needs one, and refusing cannot be bypassed by a
  spelling an upstream decodes differently.
* What the upstream hears about the client (``X-Forwarded-*``, ``Forwarded``) comes from
  :mod:`bff.peers` only; the browser's own forwarding, client-address and override headers are
  dropped in every spelling. Answers on ``user`` and ``user_or_none`` routes are
  ``Cache-Control: private`` (or the upstream's ``no-store``), without shared-cache directives.
* An upstream's ``Set-Cookie`` never reaches the browser: bff owns the origin's cookies, and the
  browser's cookies are never sent upstream anyway, so such a cookie could only collide with ours.
* ``timeout`` bounds the wait for the upstream's response headers, counted from the last request
  body chunk (so a long upload is not cut off while it makes progress); a response body streams
  for as long as it flows. A ``user`` route's long-lived response or WebSocket is closed within
  about :data:`SESSION_CHECK_INTERVAL` seconds once its session ends on any instance.
* An upstream 401 to a token that was not just refreshed makes one forced refresh and one retry,
  only for an idempotent method without a request body (a streamed body cannot be replayed).
"""

from __future__ import annotations

from bff.proxy.edge import AUTHZ_PATH, authz, authz_now
from bff.proxy.forward import SMALL_BODY, add_routes, authorize, forward
from bff.proxy.headers import HOP_BY_HOP, downstream_headers, upstream_headers
from bff.proxy.routing import Route, UpstreamTable, normalise_path
from bff.proxy.session_watch import SESSION_CHECK_INTERVAL
from bff.proxy.websocket import WS_SESSION_ENDED

__all__ = [
    "AUTHZ_PATH",
    "HOP_BY_HOP",
    "SESSION_CHECK_INTERVAL",
    "SMALL_BODY",
    "WS_SESSION_ENDED",
    "Route",
    "UpstreamTable",
    "add_routes",
    "authorize",
    "authz",
    "authz_now",
    "downstream_headers",
    "forward",
    "normalise_path",
    "upstream_headers",
]
