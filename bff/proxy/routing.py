"""What reaches which upstream: the configured routes, path normalisation and the pools.

A request reaches only a configured upstream, under its prefix once the path is normalised
(invariant 7). Everything a route needs per request is computed once in :class:`Route` when the
app is built, so matching is a few ``startswith`` calls: no regex, no per-request object graph.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable
from typing import Final
from urllib.parse import quote, unquote, unquote_to_bytes, urlsplit

import aiohttp
from aiohttp import web

from bff.config import Upstream
from bff.errors import NotFound, PathRejected
from bff.peers import Peers
from bff.proxy.deadlines import Deadlines
from bff.proxy.headers import REQUEST_DROP, WS_HANDSHAKE, header_key
from bff.proxy.overrides import drop_override_params
from bff.proxy.session_watch import SESSION_CHECK_INTERVAL
from bff.proxy.upstream import UpstreamPool

__all__ = ["Route", "UpstreamTable", "normalise_path"]

_HTTP_SCHEME: Final = {"ws": "http", "wss": "https"}
_WS_SCHEME: Final = {"http": "ws", "https": "wss"}
_PCHAR_SAFE: Final = "!$&'()*+,;=:@~"
_RESOLVED_MAX: Final = 4096  # raw targets whose route and upstream target are kept
_RESOLVED_KEY_MAX: Final = 512  # longer targets are worked out each time, never kept


class Route:
    """One ``upstreams:`` entry, with everything a request needs precomputed."""

    __slots__ = (
        "base_path",
        "client_scopes",
        "connect_timeout",
        "deadlines",
        "drop",
        "http",
        "methods",
        "mode",
        "origin",
        "pool",
        "prefix",
        "prefix_slash",
        "private",
        "scan_forms",
        "scopes",
        "set_headers",
        "timeout",
        "upstream",
        "websocket",
        "ws_drop",
        "ws_origin",
    )

    def __init__(self, upstream: Upstream) -> None:
        parts = urlsplit(upstream.url)
        scheme = parts.scheme.lower()
        self.upstream = upstream
        self.prefix = upstream.path
        self.prefix_slash = upstream.path + "/"
        self.origin = f"{_HTTP_SCHEME.get(scheme, scheme)}://{parts.netloc}"
        self.ws_origin = f"{_WS_SCHEME.get(scheme, scheme)}://{parts.netloc}"
        self.base_path = parts.path.rstrip("/")
        self.mode = upstream.token
        self.methods = frozenset(upstream.methods) if upstream.methods is not None else None
        self.scopes = frozenset(upstream.scopes)
        self.client_scopes = upstream.client_scopes
        self.set_headers = tuple(upstream.set_headers.items())
        self.drop = (
            REQUEST_DROP
            | {header_key(h) for h in upstream.remove_headers}
            | {header_key(h) for h in upstream.set_headers}
        )
        # A user_or_none route answers the same URL differently with and without a session, and
        # CDNs key on the URL alone (many ignore Vary: Cookie): its answers are private too.
        self.private = upstream.token in ("user", "user_or_none", "exchange")
        # Only a `methods:` list can be got around by an override in a form body.
        self.scan_forms = upstream.methods is not None
        self.ws_drop = self.drop | WS_HANDSHAKE
        self.timeout = upstream.timeout
        self.connect_timeout = upstream.connect_timeout
        self.websocket = upstream.websocket
        self.http: aiohttp.ClientSession | None = None  # for WebSockets, opened at start-up
        self.pool: UpstreamPool | None = None  # for HTTP exchanges, opened at start-up
        self.deadlines: Deadlines | None = None  # of its body-less exchanges, with the pool

    def __repr__(self) -> str:  # the upstream address stays out of reprs shown to anyone
        return f"Route({self.prefix!r}, mode={self.mode!r})"


def normalise_path(path: str) -> str:
    """The request path with empty segments folded; :class:`PathRejected` for any traversal.

    Percent-encoded segments are decoded, checked and re-encoded canonically, so what the
    upstream sees is exactly what was checked.
    """
    if not path.startswith("/"):
        raise PathRejected("the path must be absolute")
    # Fast path: nothing encoded, no backslash, no dot segment or empty segment possible.
    if "%" not in path and "\\" not in path and "/." not in path and "//" not in path:
        if "#" in path:
            raise PathRejected()
        return path
    segments = path.split("/")
    last = len(segments) - 1
    out: list[str] = []
    for i in range(1, len(segments)):
        segment = segments[i]
        if "\\" in segment or "#" in segment:
            raise PathRejected("backslashes are not allowed in the path")
        if "%" in segment:
            decoded = _decode_segment(segment)
            segment = quote(decoded, safe=_PCHAR_SAFE)
        else:
            decoded = segment
        # "..;x" too: Java servers (Tomcat, Jetty, Spring) drop ";params" and then see "..".
        if decoded.split(";", 1)[0] in (".", ".."):
            raise PathRejected("'.' and '..' segments are not allowed in the path")
        if decoded == "" and i != last:
            continue  # "//" folds to "/"; a trailing "/" is kept
        out.append(segment)
    return "/" + "/".join(out)


def _decode_segment(segment: str) -> str:
    if "%u" in segment or "%U" in segment:
        # IIS decodes %u002e as "."; no standard client sends it.
        raise PathRejected("%u escapes are not allowed in the path")
    try:
        decoded = unquote_to_bytes(segment).decode("utf-8")
    except UnicodeDecodeError:
        raise PathRejected("the path is not valid UTF-8") from None
    if "/" in decoded or "\\" in decoded or any(c < " " or c == "\x7f" for c in decoded):
        raise PathRejected("encoded slashes, backslashes and control characters are not allowed")
    if "%" in decoded:
        # Double encoding (%252e%252e): refuse what an upstream that decodes again would see.
        again = unquote(decoded)
        if again.split(";", 1)[0] in (".", "..") or "/" in again or "\\" in again:
            raise PathRejected("encoded traversal is not allowed in the path")
    return decoded


class UpstreamTable:
    """The configured routes, longest prefix first, and their connection pools."""

    def __init__(
        self,
        upstreams: Iterable[Upstream],
        *,
        public_url: str,
        peers: Peers | None = None,
        pool_size: int = 1000,
        session_check_interval: float = SESSION_CHECK_INTERVAL,
    ) -> None:
        # Longest path first, whatever order they were given in: the first match is the longest.
        ordered = sorted(upstreams, key=lambda u: (-len(u.path), u.path))
        self.routes = tuple(Route(u) for u in ordered)
        self.public_url = public_url.rstrip("/")
        # Who the client is and what the upstream is told about it (bff.peers).
        self.peers = peers if peers is not None else Peers((), self.public_url)
        self.pool_size = pool_size
        self.session_check_interval = session_check_interval
        # Raw target -> (route, upstream target): an SPA calls the same few URLs over and over.
        self._resolved: dict[str, tuple[Route, str]] = {}

    def match(self, path: str) -> Route | None:
        """The route whose prefix is the longest one of a normalised ``path``."""
        for route in self.routes:
            if path.startswith(route.prefix_slash) or path == route.prefix:
                return route
        return None

    def resolve(self, target: str) -> tuple[Route, str]:
        """The route and the upstream path (query kept as sent) of a raw request target.

        Method override parameters (``_method``) are dropped from the query. Raises
        :class:`PathRejected` (400) for a traversal and :class:`NotFound` when no route takes
        the path once normalised.
        """
        known = self._resolved.get(target)
        if known is not None:
            return known
        path, sep, query = target.partition("?")
        path = normalise_path(path)
        route = self.match(path)
        if route is None:
            raise NotFound()
        upstream_path = (route.base_path + path[len(route.prefix) :]) or "/"
        known = route, upstream_path + sep + drop_override_params(query)
        # Only what resolved is kept (a refusal is worked out again), bounded, oldest out first.
        if len(target) <= _RESOLVED_KEY_MAX:
            if len(self._resolved) >= _RESOLVED_MAX:
                self._resolved.pop(next(iter(self._resolved)))
            self._resolved[target] = known
        return known

    async def open(self) -> None:
        """One keep-alive pool per upstream; call once the event loop runs."""
        for route in self.routes:
            route.deadlines = Deadlines(route.timeout, asyncio.get_running_loop())
            route.pool = UpstreamPool(
                route.origin,
                connect_timeout=route.connect_timeout,
                limit=self.pool_size,
                keepalive_timeout=30,
            )
            route.http = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(
                    limit=self.pool_size, ttl_dns_cache=300, keepalive_timeout=30
                ),
                # Only new connections get a connect timer; the route's own timeout already
                # bounds each exchange (pool wait included), so no second timer per request.
                timeout=aiohttp.ClientTimeout(
                    total=None, connect=None, sock_connect=route.connect_timeout
                ),
                # Shared by every user: it must never remember a cookie an upstream sets.
                cookie_jar=aiohttp.DummyCookieJar(),
                # Bodies pass through as they are (Content-Encoding and all).
                auto_decompress=False,
                skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
                raise_for_status=False,
                trust_env=False,
            )

    async def close(self) -> None:
        for route in self.routes:
            if route.pool is not None:
                await route.pool.close()
                route.pool = None
            route.deadlines = None  # exchanges still running keep theirs to the end
            if route.http is not None:
                await route.http.close()
                route.http = None

    async def cleanup_ctx(self, app: web.Application) -> AsyncIterator[None]:
        """For ``app.cleanup_ctx``: pools open while the app serves."""
        await self.open()
        yield
        await self.close()
