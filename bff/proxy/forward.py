"""The proxy: ``<route>/...`` from the config's ``upstreams`` to its upstream, bearer attached.

Invariant 7 of the design doc lives here: a request reaches only a configured upstream, under its
prefix once the path is normalised; the browser's ``Cookie`` and ``Authorization`` and every
hop-by-hop header stay behind; bodies stream both ways in bounded chunks; server-sent events and
WebSocket frames pass as they come.

The hot path (cookie -> cached session -> forward) does no store round trip and no decryption
while the session cache is warm, no regex and no per-request object graph: everything a route
needs is computed once in :class:`Route` when the app is built, and each upstream has one pooled,
keep-alive ``aiohttp.ClientSession`` opened at start-up.

Decisions worth knowing:

* Any ``.``/``..`` segment, in any spelling (``%2e``, double-encoded ``%252e``), and any encoded
  slash (``%2f``), backslash (raw or ``%5c``), NUL or control character in the path is refused with
  400 rather than resolved: no legitimate SPA call needs one, and refusing cannot be bypassed by a
  spelling an upstream decodes differently.
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

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Final
from urllib.parse import quote, unquote, unquote_to_bytes, urlsplit

import aiohttp
from aiohttp import WSMsgType, web
from multidict import CIMultiDict
from yarl import URL

from bff.config import Upstream
from bff.errors import (
    InsufficientScope,
    MethodNotAllowed,
    NoSession,
    NotFound,
    PathRejected,
    SessionExpired,
    StoreUnavailable,
    UpstreamFailed,
    UpstreamTimeout,
)
from bff.middlewares import check_anti_forgery
from bff.services import SERVICES, Services
from bff.sessions import Session

__all__ = [
    "SESSION_CHECK_INTERVAL",
    "WS_SESSION_ENDED",
    "Route",
    "UpstreamTable",
    "add_routes",
    "downstream_headers",
    "forward",
    "normalise_path",
    "upstream_headers",
]

log = logging.getLogger(__name__)

#: Seconds between store checks that a long-lived exchange's session still exists.
SESSION_CHECK_INTERVAL: Final = 2.0
#: WebSocket close code sent to the browser when its session ends (1008: policy violation).
WS_SESSION_ENDED: Final = 1008
#: Responses at most this long (with a Content-Length) are read whole and sent in one write.
SMALL_BODY: Final = 64 * 1024

# RFC 9110 7.6.1 hop-by-hop headers, plus the non-standard ones still seen in the wild.
HOP_BY_HOP: Final = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
    }
)
# To the upstream: also the browser's credentials, its Host (the upstream's comes from the URL),
# Expect (aiohttp answered it already) and any forwarding headers it made up (we set our own).
_REQUEST_DROP: Final = HOP_BY_HOP | {
    "cookie",
    "authorization",
    "host",
    "expect",
    "forwarded",
    "x-forwarded-for",
    "x-forwarded-host",
    "x-forwarded-proto",
    "x-forwarded-port",
    "x-real-ip",
}
# The browser's handshake headers; aiohttp makes the upstream handshake's own.
_WS_HANDSHAKE: Final = frozenset(
    {
        "sec-websocket-key",
        "sec-websocket-version",
        "sec-websocket-extensions",
        "sec-websocket-protocol",
        "sec-websocket-accept",
    }
)
_RESPONSE_DROP: Final = HOP_BY_HOP | {"set-cookie"}
_IDEMPOTENT: Final = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE"})
_PCHAR_SAFE: Final = "!$&'()*+,;=:@~"


class Route:
    """One ``upstreams:`` entry, with everything a request needs precomputed."""

    __slots__ = (
        "base_path",
        "client_scopes",
        "connect_timeout",
        "drop",
        "http",
        "methods",
        "mode",
        "origin",
        "prefix",
        "prefix_slash",
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
            _REQUEST_DROP
            | {h.lower() for h in upstream.remove_headers}
            | {h.lower() for h in upstream.set_headers}
        )
        self.ws_drop = self.drop | _WS_HANDSHAKE
        self.timeout = upstream.timeout
        self.connect_timeout = upstream.connect_timeout
        self.websocket = upstream.websocket
        self.http: aiohttp.ClientSession | None = None  # the pool, opened at start-up

    def __repr__(self) -> str:  # the upstream address stays out of reprs shown to anyone
        return f"Route({self.prefix!r}, mode={self.mode!r})"


_HTTP_SCHEME: Final = {"ws": "http", "wss": "https"}
_WS_SCHEME: Final = {"http": "ws", "https": "wss"}


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
        if decoded in (".", ".."):
            raise PathRejected("'.' and '..' segments are not allowed in the path")
        if decoded == "" and i != last:
            continue  # "//" folds to "/"; a trailing "/" is kept
        out.append(segment)
    return "/" + "/".join(out)


def _decode_segment(segment: str) -> str:
    try:
        decoded = unquote_to_bytes(segment).decode("utf-8")
    except UnicodeDecodeError:
        raise PathRejected("the path is not valid UTF-8") from None
    if "/" in decoded or "\\" in decoded or any(c < " " or c == "\x7f" for c in decoded):
        raise PathRejected("encoded slashes, backslashes and control characters are not allowed")
    if "%" in decoded:
        # Double encoding (%252e%252e): refuse what an upstream that decodes again would see.
        again = unquote(decoded)
        if again in (".", "..") or "/" in again or "\\" in again:
            raise PathRejected("encoded traversal is not allowed in the path")
    return decoded


class UpstreamTable:
    """The configured routes, longest prefix first, and their connection pools."""

    def __init__(
        self,
        upstreams: Iterable[Upstream],
        *,
        public_url: str,
        pool_size: int = 1000,
        session_check_interval: float = SESSION_CHECK_INTERVAL,
    ) -> None:
        # Longest path first, whatever order they were given in: the first match is the longest.
        ordered = sorted(upstreams, key=lambda u: (-len(u.path), u.path))
        self.routes = tuple(Route(u) for u in ordered)
        self.public_url = public_url.rstrip("/")
        parts = urlsplit(self.public_url)
        self._forwarded = (("X-Forwarded-Proto", parts.scheme), ("X-Forwarded-Host", parts.netloc))
        self.pool_size = pool_size
        self.session_check_interval = session_check_interval

    def match(self, path: str) -> Route | None:
        """The route whose prefix is the longest one of a normalised ``path``."""
        for route in self.routes:
            if path.startswith(route.prefix_slash) or path == route.prefix:
                return route
        return None

    def resolve(self, target: str) -> tuple[Route, str]:
        """The route and the upstream path (query kept as sent) of a raw request target.

        Raises :class:`PathRejected` (400) for a traversal and :class:`NotFound` when no route
        takes the path once normalised.
        """
        path, sep, query = target.partition("?")
        path = normalise_path(path)
        route = self.match(path)
        if route is None:
            raise NotFound()
        upstream_path = (route.base_path + path[len(route.prefix) :]) or "/"
        return route, upstream_path + sep + query

    async def open(self) -> None:
        """One keep-alive pool per upstream; call once the event loop runs."""
        for route in self.routes:
            route.http = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(
                    limit=self.pool_size, ttl_dns_cache=300, keepalive_timeout=30
                ),
                timeout=aiohttp.ClientTimeout(
                    total=None,
                    connect=route.connect_timeout,
                    sock_connect=route.connect_timeout,
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
            if route.http is not None:
                await route.http.close()
                route.http = None

    async def cleanup_ctx(self, app: web.Application) -> AsyncIterator[None]:
        """For ``app.cleanup_ctx``: pools open while the app serves."""
        await self.open()
        yield
        await self.close()

    def forwarded(self) -> tuple[tuple[str, str], ...]:
        """``X-Forwarded-Proto`` and ``-Host``: what the browser sees (``public_url``)."""
        return self._forwarded


def add_routes(app: web.Application, table: UpstreamTable) -> None:
    """Register every prefix; call before the SPA's catch-all route."""
    for route in table.routes:
        app.router.add_route("*", route.prefix, forward)
        app.router.add_route("*", route.prefix + "/{tail:.*}", forward)


# --------------------------------------------------------------------------------------------
# Headers


def upstream_headers(
    request: web.Request,
    drop: frozenset[str],
    extra: Iterable[tuple[str, str]],
    forwarded: Iterable[tuple[str, str]],
    token: str | None,
) -> list[tuple[str, str]]:
    """The headers sent upstream: the browser's minus ``drop`` and those named in
    ``Connection``, then the route's own, the bearer and ``X-Forwarded-*``."""
    headers = request.headers
    connection = headers.get("Connection")
    if connection is not None:
        drop = drop | {t.strip().lower() for t in connection.split(",")}
    out = [(k, v) for k, v in headers.items() if k.lower() not in drop]
    out.extend(extra)
    if token is not None:
        out.append(("Authorization", "Bearer " + token))
    remote = request.remote
    if remote:
        out.append(("X-Forwarded-For", remote))
    out.extend(forwarded)
    return out


def downstream_headers(response: aiohttp.ClientResponse) -> CIMultiDict[str]:
    """The upstream's response headers minus hop-by-hop ones and ``Set-Cookie``."""
    headers = response.headers
    drop = _RESPONSE_DROP
    connection = headers.get("Connection")
    if connection is not None:
        drop = drop | {t.strip().lower() for t in connection.split(",")}
    out: CIMultiDict[str] = CIMultiDict()
    for k, v in headers.items():
        if k.lower() not in drop:
            out.add(k, v)
    return out


# --------------------------------------------------------------------------------------------
# The handler


async def forward(request: web.Request) -> web.StreamResponse:
    """Proxy one request (or WebSocket) to the upstream of the longest matching prefix."""
    services = request.app[SERVICES]
    table = services.upstreams
    if table is None:
        raise NotFound()
    target = request.raw_path
    if not target.startswith("/"):  # absolute-form request target
        target = request.rel_url.raw_path_qs
    route, upstream_target = table.resolve(target)
    if route.methods is not None and request.method not in route.methods:
        raise MethodNotAllowed()
    websocket = route.websocket and request.headers.get("Upgrade", "").lower() == "websocket"
    check_anti_forgery(request, table.public_url, websocket=websocket)
    session, token, fresh = await _credentials(services, route, request)
    if websocket:
        return await _websocket(request, services, table, route, upstream_target, session, token)
    return await _http(request, services, table, route, upstream_target, session, token, fresh)


async def _credentials(
    services: Services, route: Route, request: web.Request
) -> tuple[Session | None, str | None, bool]:
    """The session (if any), the bearer to attach, and whether it was just obtained."""
    mode = route.mode
    if mode == "none":
        return None, None, False
    if mode == "client":
        tokens = services.client_tokens
        if tokens is None:
            raise UpstreamFailed("client credentials are not configured")
        return None, await tokens.token(route.client_scopes), False
    secret = services.cookies.session_secret(request)
    session = await services.sessions.load(secret) if secret is not None else None
    if session is None:
        if mode == "user":
            raise NoSession() if secret is None else SessionExpired()
        return None, None, False
    if route.scopes and not route.scopes.issubset(session.data.scopes):
        raise InsufficientScope()
    version = session.data.version
    session, token = await services.refresher.access_token(session)
    return session, token, session.data.version != version


class _Deadline:
    """``route.timeout`` until response headers, pushed back by each request body chunk."""

    __slots__ = ("active", "timeout")

    def __init__(self, timeout: asyncio.Timeout) -> None:
        self.timeout = timeout
        self.active = True

    def push(self, seconds: float) -> None:
        if self.active:
            self.timeout.reschedule(asyncio.get_running_loop().time() + seconds)


async def _body(request: web.Request, deadline: _Deadline, idle: float) -> AsyncIterator[bytes]:
    async for chunk in request.content.iter_any():
        deadline.push(idle)
        yield chunk


async def _exchange(
    request: web.Request,
    services: Services,
    route: Route,
    url: URL,
    headers: list[tuple[str, str]],
    has_body: bool,
) -> tuple[aiohttp.ClientResponse, bytes | None]:
    """Send the request; the response, and its body when it is small enough to buffer."""
    http = route.http
    if http is None:
        raise UpstreamFailed("the upstream pool is not open")
    try:
        async with asyncio.timeout(route.timeout) as timeout:
            deadline = _Deadline(timeout)
            try:
                resp = await http.request(
                    request.method,
                    url,
                    headers=headers,
                    data=_body(request, deadline, route.timeout) if has_body else None,
                    allow_redirects=False,
                )
                length = resp.content_length
                if (
                    length is not None
                    and length <= SMALL_BODY
                    and request.method != "HEAD"
                    and resp.status not in (204, 304)
                ):
                    try:
                        return resp, await resp.read()
                    finally:
                        resp.release()
                return resp, None
            finally:
                deadline.active = False
    except TimeoutError:
        services.metrics.inc("bff_upstream_errors_total", kind="timeout")
        log.warning(
            "proxy.upstream_timeout",
            extra={"event": "proxy.upstream_timeout", "route": route.prefix},
        )
        raise UpstreamTimeout() from None
    except aiohttp.ClientError as exc:
        services.metrics.inc("bff_upstream_errors_total", kind="failed")
        log.warning(
            "proxy.upstream_failed",
            extra={
                "event": "proxy.upstream_failed",
                "route": route.prefix,
                "error": type(exc).__name__,
            },
        )
        raise UpstreamFailed() from None


async def _http(
    request: web.Request,
    services: Services,
    table: UpstreamTable,
    route: Route,
    target: str,
    session: Session | None,
    token: str | None,
    fresh: bool,
) -> web.StreamResponse:
    url = URL(route.origin + target, encoded=True)
    has_body = request.body_exists
    headers = upstream_headers(request, route.drop, route.set_headers, table.forwarded(), token)
    resp, body = await _exchange(request, services, route, url, headers, has_body)
    if (
        resp.status == 401
        and token is not None
        and not fresh
        and not has_body
        and request.method in _IDEMPOTENT
    ):
        new_token = await _renew_token(services, route, session, token)
        if new_token is not None:
            resp.close()
            headers = upstream_headers(
                request, route.drop, route.set_headers, table.forwarded(), new_token
            )
            resp, body = await _exchange(request, services, route, url, headers, False)
    if body is not None:
        out_headers = downstream_headers(resp)
        out_headers.popall("Content-Length", None)
        return web.Response(status=resp.status, reason=resp.reason, headers=out_headers, body=body)
    return await _stream(request, services, table, resp, session)


async def _renew_token(
    services: Services, route: Route, session: Session | None, token: str
) -> str | None:
    """A new token after the upstream refused ``token``, or None to pass the 401 on."""
    if route.mode == "client":
        tokens = services.client_tokens
        return await tokens.token(route.client_scopes, reject=token) if tokens else None
    if session is None:
        return None
    session = await services.refresher.refresh(session, force=True)
    new = session.data.access_token
    return new if new != token else None


async def _stream(
    request: web.Request,
    services: Services,
    table: UpstreamTable,
    resp: aiohttp.ClientResponse,
    session: Session | None,
) -> web.StreamResponse:
    """Copy the upstream's response to the browser chunk by chunk, as the chunks arrive."""
    out = web.StreamResponse(
        status=resp.status, reason=resp.reason, headers=downstream_headers(resp)
    )
    ended = False

    async def end() -> None:
        nonlocal ended
        ended = True
        resp.close()  # wakes the copy loop below

    watch = _SessionWatch(services, session, table.session_check_interval, end) if session else None
    broken = False
    try:
        try:
            await out.prepare(request)
        except ConnectionError:
            return out  # the browser left before the headers went out
        while True:
            try:
                chunk = await resp.content.readany()
            except (aiohttp.ClientError, OSError):
                broken = True
                break
            if not chunk:
                break
            try:
                await out.write(chunk)
            except ConnectionError:
                return out  # the browser left; finally closes the upstream connection
    finally:
        if watch is not None:
            watch.stop()
        if broken or ended or not resp.content.at_eof():
            resp.close()  # an unfinished body cannot go back to the pool
        else:
            resp.release()
    if broken or ended:
        # Headers are out, so no error status is possible: cut the connection so the browser
        # sees a truncated body, never one that looks complete.
        if broken and not ended:
            services.metrics.inc("bff_upstream_errors_total", kind="reset")
            log.warning("proxy.upstream_reset", extra={"event": "proxy.upstream_reset"})
        out.force_close()
        if request.transport is not None:
            request.transport.abort()
        return out
    await out.write_eof()
    return out


class _SessionWatch:
    """Ends a long-lived exchange once its session is gone (logout on any instance, expiry).

    Starts checking only after ``interval`` seconds, so a short response costs one timer.
    """

    __slots__ = ("_handle", "_interval", "_on_end", "_services", "_session", "_task")

    def __init__(
        self,
        services: Services,
        session: Session,
        interval: float,
        on_end: Callable[[], Awaitable[None]],
    ) -> None:
        self._services = services
        self._session = session
        self._interval = interval
        self._on_end = on_end
        self._task: asyncio.Task[None] | None = None
        self._handle: asyncio.TimerHandle | None = asyncio.get_running_loop().call_later(
            interval, self._start
        )

    def _start(self) -> None:
        self._handle = None
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        sessions = self._services.sessions
        while True:
            try:
                alive = await sessions.load(self._session.secret, fresh=True) is not None
            except StoreUnavailable:
                alive = True  # a store outage is not a logout; check again later
            if not alive:
                log.info("proxy.session_ended", extra={"event": "proxy.session_ended"})
                await self._on_end()
                return
            await asyncio.sleep(self._interval)

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
        if self._task is not None and self._task is not asyncio.current_task():
            self._task.cancel()


# --------------------------------------------------------------------------------------------
# WebSocket


async def _websocket(
    request: web.Request,
    services: Services,
    table: UpstreamTable,
    route: Route,
    target: str,
    session: Session | None,
    token: str | None,
) -> web.StreamResponse:
    http = route.http
    if http is None:
        raise UpstreamFailed("the upstream pool is not open")
    offered = request.headers.get("Sec-WebSocket-Protocol", "")
    protocols = tuple(p.strip() for p in offered.split(",") if p.strip())
    headers = upstream_headers(request, route.ws_drop, route.set_headers, table.forwarded(), token)
    try:
        async with asyncio.timeout(route.timeout):
            upstream = await http.ws_connect(
                URL(route.ws_origin + target, encoded=True),
                headers=headers,
                protocols=protocols,
                compress=0,
                autoping=True,
                autoclose=True,
            )
    except TimeoutError:
        services.metrics.inc("bff_upstream_errors_total", kind="timeout")
        raise UpstreamTimeout() from None
    except aiohttp.ClientError as exc:
        services.metrics.inc("bff_upstream_errors_total", kind="failed")
        log.warning(
            "proxy.ws_failed",
            extra={"event": "proxy.ws_failed", "route": route.prefix, "error": type(exc).__name__},
        )
        raise UpstreamFailed() from None
    browser = web.WebSocketResponse(
        protocols=(upstream.protocol,) if upstream.protocol else (), autoping=True
    )

    async def end() -> None:
        await browser.close(code=WS_SESSION_ENDED, message=b"session ended")

    watch = _SessionWatch(services, session, table.session_check_interval, end) if session else None
    try:
        await browser.prepare(request)
        to_upstream = asyncio.create_task(_pump(browser, upstream))
        to_browser = asyncio.create_task(_pump(upstream, browser))
        done, pending = await asyncio.wait(
            (to_upstream, to_browser), return_when=asyncio.FIRST_COMPLETED
        )
        for task in pending:
            task.cancel()
        for task in pending:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if to_upstream in done:
            await upstream.close(code=browser.close_code or 1000)
        else:
            await browser.close(code=upstream.close_code or 1000)
    finally:
        if watch is not None:
            watch.stop()
        if not upstream.closed:
            await upstream.close()
    return browser


async def _pump(
    source: web.WebSocketResponse | aiohttp.ClientWebSocketResponse,
    sink: web.WebSocketResponse | aiohttp.ClientWebSocketResponse,
) -> None:
    async for msg in source:
        if sink.closed:
            return
        if msg.type is WSMsgType.TEXT:
            await sink.send_str(msg.data)
        elif msg.type is WSMsgType.BINARY:
            await sink.send_bytes(msg.data)
        elif msg.type is WSMsgType.ERROR:
            return
