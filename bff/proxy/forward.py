"""The HTTP handler: credentials, the exchange under its deadline, one 401 retry, streaming.

``forward`` is registered for every configured prefix; it resolves the route, runs
:func:`authorize` (methods, anti-forgery, credentials: the policy the edge's auth endpoint shares),
attaches the bearer, and hands a WebSocket upgrade to :mod:`bff.proxy.websocket`.
A small response (:data:`SMALL_BODY`) is read whole and sent in one write; anything else streams
chunk by chunk as it arrives, watched by :class:`SessionWatch` on a session-bound route.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import Final

import aiohttp
from aiohttp import web

from bff import dpop, metrics, tracing
from bff.access import UPSTREAM
from bff.errors import (
    BffError,
    InsufficientScope,
    MethodNotAllowed,
    NoSession,
    NotFound,
    SessionExpired,
    UpstreamFailed,
    UpstreamTimeout,
)
from bff.middlewares import check_anti_forgery
from bff.proxy.headers import answer_fields, downstream_headers, upstream_headers
from bff.proxy.overrides import body_scanner
from bff.proxy.routing import Route, UpstreamTable
from bff.proxy.session_watch import SessionWatch
from bff.proxy.upstream import UpstreamResponse
from bff.proxy.websocket import check_handshake, forward_websocket
from bff.services import SERVICES, Services
from bff.sessions import Session

__all__ = ["SMALL_BODY", "Decision", "add_routes", "authorize", "authorize_now", "forward"]

log = logging.getLogger("bff.proxy")  # one logger name for the whole proxy package

#: Responses at most this long (with a Content-Length) are read whole and sent in one write.
SMALL_BODY: Final = 64 * 1024
_IDEMPOTENT: Final = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE"})


def add_routes(
    app: web.Application, table: UpstreamTable
) -> list[tuple[str, web.AbstractRoute, web.AbstractRoute]]:
    """Register every prefix; call before the SPA's catch-all route. Returns, longest prefix
    first, each prefix with its two routes (the prefix itself, and below it)."""
    added = []
    for route in table.routes:
        exact = app.router.add_route("*", route.prefix, forward)
        below = app.router.add_route("*", route.prefix + "/{tail:.*}", forward)
        added.append((route.prefix, exact, below))
    return added


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
    websocket = route.websocket and request.headers.get("Upgrade", "").lower() == "websocket"
    if websocket:
        check_handshake(request)  # before the session is read and any upstream socket opened
    session, token, fresh = await authorize(
        services, table, route, request, request.method, websocket=websocket
    )
    if websocket:
        return await forward_websocket(
            request, services, table, route, upstream_target, session, token
        )
    return await _http(request, services, table, route, upstream_target, session, token, fresh)


Decision = tuple[Session | None, str | None, bool]


async def authorize(
    services: Services,
    table: UpstreamTable,
    route: Route,
    request: web.Request,
    method: str,
    *,
    websocket: bool,
) -> Decision:
    """The one policy of a call to ``route``: the direct proxy and the edge's auth endpoint
    (:mod:`bff.proxy.edge`) both run it, so the two modes cannot drift apart.

    ``method`` is the original request's (for the edge, what it says it was); ``request``'s
    headers are the original request's (an edge passes them on to its auth call). Raises 405 for
    a method not in ``methods:``, 403 for a forgery or a missing scope, 401 without a live session
    on a ``user`` or ``exchange`` route, 403 when the OP refuses a route's own token
    (:mod:`bff.route_tokens`), 503 when the store or the OP is down; else returns the session (if
    any), the bearer to attach, and whether it was just obtained (under the single flight).
    """
    decided = authorize_now(services, table, route, request, method, websocket=websocket)
    if decided is not None:
        return decided
    mode = route.mode
    if mode == "client":
        tokens = services.client_tokens
        if tokens is None:
            raise UpstreamFailed("client credentials are not configured")
        return None, await tokens.token(route.client_scopes), False
    secret = services.cookies.session_secret(request)
    session = await services.sessions.load(secret) if secret is not None else None
    if session is None:
        if mode in ("user", "exchange"):
            raise NoSession() if secret is None else SessionExpired()
        return None, None, False
    _check_scopes(route, session)
    plan = services.route_tokens.plan(route.upstream) if services.route_tokens else None
    if plan is not None and services.route_tokens is not None:
        # Issue 12: this route's own token (resource or exchange), never the session's main one.
        return await services.route_tokens.token(session, plan)
    version = session.data.version
    session, token = await services.refresher.access_token(session)
    return session, token, session.data.version != version


def authorize_now(
    services: Services,
    table: UpstreamTable,
    route: Route,
    request: web.Request,
    method: str,
    *,
    websocket: bool,
) -> Decision | None:
    """:func:`authorize` as far as it goes without I/O: the same refusals, and the decision
    when it needs nothing but this process's session cache and a token that is not due for a
    refresh; None when only :func:`authorize` can finish (a store read, a refresh, a route's
    own token, a client-credentials token). Both modes go through here first."""
    if route.methods is not None and method not in route.methods:
        raise MethodNotAllowed()
    check_anti_forgery(request, table.public_url, websocket=websocket)
    mode = route.mode
    if mode == "none":
        return None, None, False
    if mode == "client":
        return None
    secret = services.cookies.session_secret(request)
    if secret is None:
        if mode in ("user", "exchange"):
            raise NoSession()
        return None, None, False
    session = services.sessions.cached(secret)
    if session is None:
        return None
    _check_scopes(route, session)
    if services.route_tokens is not None and services.route_tokens.plan(route.upstream):
        return None
    if services.refresher.needs_refresh(session):
        return None
    return session, session.data.access_token, False


def _check_scopes(route: Route, session: Session) -> None:
    if route.scopes and not route.scopes.issubset(session.data.scopes):
        raise InsufficientScope()


class _Deadline:
    """``route.timeout`` until response headers, pushed back by each request body chunk; and
    the refusal, if the body scan raised one (aiohttp reports it as a connection error)."""

    __slots__ = ("active", "refused", "timeout")

    def __init__(self, timeout: asyncio.Timeout) -> None:
        self.timeout = timeout
        self.active = True
        self.refused: BffError | None = None

    def push(self, seconds: float) -> None:
        if self.active:
            self.timeout.reschedule(asyncio.get_running_loop().time() + seconds)


async def _body(
    chunks: AsyncIterator[bytes], deadline: _Deadline, idle: float
) -> AsyncIterator[bytes]:
    try:
        async for chunk in chunks:
            deadline.push(idle)
            yield chunk
    except BffError as exc:
        deadline.refused = exc
        raise


async def _exchange(
    request: web.Request,
    services: Services,
    route: Route,
    target: str,
    headers: list[tuple[str, str]],
    body: AsyncIterator[bytes] | None,
) -> tuple[UpstreamResponse, bytes | None]:
    """Send the request; the response, and its body when it is small enough to buffer."""
    pool = route.pool
    if pool is None:
        raise UpstreamFailed("the upstream pool is not open")
    method = request.method
    deadline: _Deadline | None = None
    # A body-less exchange's deadline is watched with the route's others (bff.proxy.deadlines).
    shared = route.deadlines if body is None else None
    started = time.perf_counter()  # for bff_upstream_duration_seconds
    try:
        async with (
            asyncio.timeout(route.timeout) if shared is None else asyncio.Timeout(None)
        ) as timeout:
            if shared is not None:
                shared.start(timeout)
            elif body is not None:  # each chunk of the browser's body pushes the deadline back
                deadline = _Deadline(timeout)
                body = _body(body, deadline, route.timeout)
            try:
                with tracing.upstream_span(method, route.prefix, route.origin) as span:
                    # traceparent of this client span
                    resp = await pool.request(method, target, tracing.inject(headers), body)
                    request[UPSTREAM] = (resp.status, time.perf_counter() - started)
                    if span is not None:
                        span.set_attribute("http.response.status_code", resp.status)
                metrics.observe_upstream(route.prefix, started)
                length = resp.content_length
                if (
                    length is not None
                    and length <= SMALL_BODY
                    and method != "HEAD"
                    and resp.status not in (204, 304)
                ):
                    try:
                        return resp, await resp.read()
                    finally:
                        resp.release()
                return resp, None
            finally:
                if shared is not None:
                    shared.stop(timeout)
                elif deadline is not None:
                    deadline.active = False
    except TimeoutError:
        services.metrics.inc("bff_upstream_errors_total", kind="timeout")
        log.warning(
            "proxy.upstream_timeout",
            extra={"event": "proxy.upstream_timeout", "route": route.prefix},
        )
        raise UpstreamTimeout() from None
    except aiohttp.ClientError as exc:
        if deadline is not None and deadline.refused is not None:  # the body scan refused it
            raise deadline.refused from None
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
    has_body = request.body_exists
    chunks: AsyncIterator[bytes] | None = None
    if has_body:
        chunks = request.content.iter_any()
        if route.scan_forms:
            chunks = body_scanner(request, chunks)
    forwarded = table.peers.forwarding(request)
    # A DPoP-bound session token goes with a fresh proof for this very request (bff/dpop.py).
    key = dpop.session_key(session) if session is not None and token is not None else None

    def outgoing(token: str | None) -> list[tuple[str, str]]:
        if key is None or token is None:
            return upstream_headers(request, route.drop, route.set_headers, forwarded, token)
        auth = dpop.upstream_auth(key, request.method, route.origin + target, route.origin, token)
        return upstream_headers(request, route.drop, (*route.set_headers, *auth), forwarded, None)

    headers = outgoing(token)
    resp, body = await _exchange(request, services, route, target, headers, chunks)
    if key is not None:
        dpop.UPSTREAM_NONCES.note(route.origin, resp.headers)
        # RFC 9449 9: the upstream wants its (new) nonce in the proof. It refused the request
        # unseen, so one without a body is sent again, once; a body was streamed and is gone, so
        # that 401 goes back to the browser, and its retry carries the nonce now remembered.
        if not has_body and dpop.is_nonce_challenge(resp.status, resp.headers):
            resp.close()
            headers = outgoing(token)
            resp, body = await _exchange(request, services, route, target, headers, None)
            dpop.UPSTREAM_NONCES.note(route.origin, resp.headers)
    if (
        resp.status == 401
        and token is not None
        and not fresh
        and not (key is not None and dpop.is_nonce_challenge(resp.status, resp.headers))
        and not has_body
        and request.method in _IDEMPOTENT
    ):
        try:
            new_token = await _renew_token(services, route, session, token)
        except BaseException:
            # The 401's body may still be streaming: without this the connection would stay
            # checked out of the route's pool for good (one slot per failed renewal).
            resp.close()
            raise
        if new_token is not None:
            resp.close()
            headers = outgoing(new_token)
            resp, body = await _exchange(request, services, route, target, headers, None)
    if body is not None:
        fields = answer_fields(resp, private=route.private, whole=True)
        return web.Response(status=resp.status, reason=resp.reason, headers=fields, body=body)
    return await _stream(request, services, table, route, resp, session)


async def _renew_token(
    services: Services, route: Route, session: Session | None, token: str
) -> str | None:
    """A new token after the upstream refused ``token``, or None to pass the 401 on."""
    if route.mode == "client":
        tokens = services.client_tokens
        return await tokens.token(route.client_scopes, reject=token) if tokens else None
    if session is None:
        return None
    plan = services.route_tokens.plan(route.upstream) if services.route_tokens else None
    if plan is not None and services.route_tokens is not None:
        return await services.route_tokens.renew(session, plan, token)
    session = await services.refresher.refresh(session, force=True)
    new = session.data.access_token
    return new if new != token else None


async def _stream(
    request: web.Request,
    services: Services,
    table: UpstreamTable,
    route: Route,
    resp: UpstreamResponse,
    session: Session | None,
) -> web.StreamResponse:
    """Copy the upstream's response to the browser chunk by chunk, as the chunks arrive."""
    out = web.StreamResponse(
        status=resp.status,
        reason=resp.reason,
        headers=downstream_headers(resp, private=route.private),
    )
    ended = False

    async def end() -> None:
        nonlocal ended
        ended = True
        resp.close()  # wakes the copy loop below

    watch = SessionWatch(services, session, table.session_check_interval, end) if session else None
    broken = False
    metrics.stream_opened("stream")
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
        metrics.stream_closed("stream")
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
