"""Cross-cutting request policy: errors as JSON, anti-forgery, security headers."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from aiohttp import web

from bff.errors import BffError, Forbidden, MethodNotAllowed, NotFound

__all__ = [
    "SecurityHeaders",
    "check_anti_forgery",
    "error_answer",
    "error_middleware",
    "json_error",
    "security_headers",
]

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def json_error(exc: BffError) -> web.Response:
    response = web.json_response(exc.body(), status=exc.status, headers=exc.headers())
    response.headers["Cache-Control"] = "no-store"
    return response


def error_middleware(
    *, api_prefixes: tuple[str, ...]
) -> Callable[..., Awaitable[web.StreamResponse]]:
    """Turn :class:`BffError` into OAuth-shaped JSON; anything else is a bug: log, generic 500."""

    def is_api(path: str) -> bool:
        return any(path == p or path.startswith(p + "/") for p in api_prefixes)

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except Exception as exc:
            return error_answer(request, exc, api=is_api(request.path))

    return middleware


def error_answer(request: web.Request, exc: Exception, *, api: bool) -> web.Response:
    """The JSON answer for what a handler raised (call it in the ``except`` block): a
    :class:`BffError` as itself, a router 404/405 under an ``api`` path as JSON, anything else
    (a bug) logged and a generic 500. Any other ``HTTPException`` is raised again."""
    if isinstance(exc, BffError):
        return json_error(exc)
    if isinstance(exc, web.HTTPException):
        if api and exc.status in (404, 405):
            return json_error(NotFound() if exc.status == 404 else MethodNotAllowed())
        raise exc
    # The message is generic on purpose: a traceback must never reach the browser.
    log.exception("request.failed", extra={"event": "request.failed", "path": request.path})
    return json_error(BffError("internal error"))


def check_anti_forgery(
    request: web.Request, public_origin: str, *, websocket: bool = False
) -> None:
    """The SPA's calls carry ``X-CSRF: 1``, which forces a CORS preflight no other site passes.

    Browsers also tell us when a request is cross-site (``Sec-Fetch-Site``) and where it comes
    from (``Origin``); either marking another site is refused. A WebSocket handshake cannot carry
    a custom header, so there a same-origin ``Origin`` is required instead.
    """
    origin = request.headers.get("Origin")
    if websocket:
        if origin != public_origin:
            raise Forbidden("a WebSocket must be opened from this origin")
        return
    if request.headers.get("X-CSRF") != "1":
        raise Forbidden("the X-CSRF: 1 header is required")
    if request.headers.get("Sec-Fetch-Site") == "cross-site":
        raise Forbidden("cross-site requests are refused")
    if origin is not None and origin != public_origin:
        raise Forbidden("requests from another origin are refused")


class SecurityHeaders:
    """An ``on_response_prepare`` hook, so streamed and error responses get the headers too.

    :meth:`fixed` says what it adds to an answer that is not HTML, for the front door's fast
    lane, which writes such an answer without the hooks (:meth:`bff.proxy.DirectPath.answer_now`).
    """

    __slots__ = ("_always", "_csp", "_no_store_prefixes")

    def __init__(self, *, csp: str, hsts: bool, no_store_prefixes: tuple[str, ...]) -> None:
        always = [
            ("X-Content-Type-Options", "nosniff"),
            ("Referrer-Policy", "no-referrer"),
            ("X-Frame-Options", "DENY"),
            ("Cross-Origin-Opener-Policy", "same-origin"),
        ]
        if hsts:
            always.append(("Strict-Transport-Security", "max-age=63072000; includeSubDomains"))
        self._always = tuple(always)
        self._csp = csp
        self._no_store_prefixes = no_store_prefixes

    def fixed(self, path: str) -> tuple[tuple[str, str], ...]:
        """The headers an answer at ``path`` that is not HTML gets, whatever else it holds."""
        if path.startswith(self._no_store_prefixes):
            return (*self._always, ("Cache-Control", "no-store"))
        return self._always

    async def __call__(self, request: web.Request, response: web.StreamResponse) -> None:
        headers = response.headers
        for name, value in self._always:
            headers.setdefault(name, value)
        if self._csp:
            # Parsing the Content-Type only when it can say text/html (every answer comes here).
            given = headers.get("Content-Type")
            if (
                given is not None
                and "html" in given.lower()
                and response.content_type == "text/html"
            ):
                headers.setdefault("Content-Security-Policy", self._csp)
        if request.path.startswith(self._no_store_prefixes):
            headers["Cache-Control"] = "no-store"
        headers.popall("Server", None)


def security_headers(
    *, csp: str, hsts: bool, no_store_prefixes: tuple[str, ...]
) -> SecurityHeaders:
    """The hook for ``app.on_response_prepare`` (see :class:`SecurityHeaders`)."""
    return SecurityHeaders(csp=csp, hsts=hsts, no_store_prefixes=no_store_prefixes)
