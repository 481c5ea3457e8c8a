"""The access log and the request id: one line per request a person can read (issue 10, point 5).

Each request gets a request id: the client's ``X-Request-ID`` when it is well-formed
(:data:`REQUEST_ID_SHAPE`), else a new random one. It goes upstream (``bff.proxy.headers``), back
in the response, and into the access line, which logger ``bff.access`` writes when the handler
returns (``log.access: true``, the default) with these fields:

``method``, ``route`` (the configured prefix of a proxied route or the endpoint's path, ``spa``
for the app's files, ``-`` when nothing matched; never the raw path or query, which can carry a
code or a token), ``status``, ``duration_ms``, ``upstream_status`` and ``upstream_ms`` (proxied
calls: until the upstream's response headers), ``bytes`` (response body), ``request_id``,
``session`` (a short one-way handle of the session, or ``-``) and ``client`` (after
``trusted_proxies``, :func:`bff.peers.client_address`).

Cheap on purpose: the route name is worked out once per route, the line is one dict built once,
and every value in it is either a number or text whose shape is fixed here, so it needs none of
the generic redaction (:class:`bff.log.RedactingFilter` skips records marked ``trusted``).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import re
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Final

from aiohttp import web
from aiohttp.web_urldispatcher import AbstractResource

from bff.keys import SessionSecret, store_id
from bff.peers import client_address

__all__ = [
    "REQUEST_ID",
    "REQUEST_ID_SHAPE",
    "SESSION_SECRET",
    "UPSTREAM",
    "access_middleware",
    "request_id",
    "request_id_header",
    "route_name",
    "session_handle",
    "wanted",
    "write",
]

log = logging.getLogger("bff.access")

#: What a client's ``X-Request-ID`` must look like to be kept (else bff makes its own).
REQUEST_ID_SHAPE: Final = re.compile(r"[A-Za-z0-9._-]{1,128}")
#: ... and not be a JWT (a client's own token would then be written into every line).
_JWT_LIKE: Final = re.compile(r"eyJ[\w-]*\.[\w-]*\.")
REQUEST_ID: Final = web.RequestKey("bff_request_id", str)
#: (status, seconds until its headers) of the upstream's last answer; set by the proxy.
UPSTREAM: Final = web.RequestKey("bff_upstream", tuple[int, float])
#: The verified session cookie's secret, set by ``CookiePolicy.session_secret``; only ever
#: turned into :func:`session_handle` here.
SESSION_SECRET: Final = web.RequestKey("bff_session_secret", str)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def session_handle(secret: SessionSecret) -> str:
    """12 hex digits of a hash of the session's store id: the same session gives the same handle
    in every line, and neither the cookie nor the store key can be had back from it."""
    return hashlib.sha256(store_id(secret).encode()).hexdigest()[:12]


def _route_name(resource: AbstractResource | None, names: dict[int, str]) -> str:
    if resource is None:
        return "-"
    key = id(resource)
    name = names.get(key)
    if name is None:
        canonical = resource.canonical
        base = canonical[: -len("/{tail}")] if canonical.endswith("/{tail}") else canonical
        name = base or "spa"  # the SPA's catch-all is "/{tail}"
        names[key] = name
    return name


def access_middleware(*, enabled: bool) -> Callable[..., Awaitable[web.StreamResponse]]:
    """Outermost middleware: sets the request id, and writes the access line when ``enabled``."""
    names: dict[int, str] = {}  # one entry per route: the app's routes are fixed at start-up

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        rid = request_id(request)
        if not enabled:
            return await handler(request)
        start = time.perf_counter()
        status, size = 499, 0  # a handler cancelled because the client went away
        try:
            response = await handler(request)
        except web.HTTPException as exc:
            status = exc.status
            exc.headers["X-Request-ID"] = rid
            raise
        except asyncio.CancelledError:
            raise  # 499: the client went away
        except Exception:
            status = 500
            raise
        else:
            status = response.status
            size = response.body_length if response.prepared else response.content_length or 0
            return response
        finally:
            if wanted():  # log level above info: no line, so no work for it
                route = _route_name(request.match_info.route.resource, names)
                write(request, route, rid, status, size, time.perf_counter() - start)

    return middleware


def request_id(request: web.Request) -> str:
    """The request's id (the client's when well-formed, else a new one), kept on the request."""
    given = request.headers.get("X-Request-ID")
    rid = (
        given
        if given is not None and REQUEST_ID_SHAPE.fullmatch(given) and not _JWT_LIKE.search(given)
        else None
    )
    request[REQUEST_ID] = rid = rid or _new_id()
    return rid


#: New request ids: 128 bits each from the OS's random source (as ``secrets.token_hex(16)``),
#: read for many ids at once: one ``getrandom`` per request was a measurable share of a proxied
#: call. Never shared with a forked child (it would hand out the parent's next ids).
_IDS_PER_READ: Final = 256
_ids: list[str] = []
os.register_at_fork(after_in_child=_ids.clear)


def _new_id() -> str:
    if not _ids:
        batch = secrets.token_hex(16 * _IDS_PER_READ)
        _ids.extend(batch[i : i + 32] for i in range(0, len(batch), 32))
    return _ids.pop()


def wanted() -> bool:
    """Whether an access line would be written now (``log.access`` aside): the logger's level."""
    return log.isEnabledFor(logging.INFO)


def route_name(resource: AbstractResource | None) -> str:
    """The access line's ``route`` for a resource (the direct path works it out once per route)."""
    return _route_name(resource, {})


def write(request: web.Request, route: str, rid: str, status: int, size: int, took: float) -> None:
    """Write one access line (the caller checked :func:`enabled`)."""
    upstream = request.get(UPSTREAM)
    secret = request.get(SESSION_SECRET)
    log.info(
        "access",
        extra={
            "event": "access",
            "trusted": True,
            "method": request.method,
            "route": route,
            "status": status,
            "duration_ms": round(took * 1000, 2),
            "upstream_status": upstream[0] if upstream is not None else None,
            "upstream_ms": round(upstream[1] * 1000, 2) if upstream is not None else None,
            "bytes": size,
            "request_id": rid,
            "session": session_handle(SessionSecret(secret)) if secret is not None else "-",
            "client": client_address(request),
        },
    )


async def request_id_header(request: web.Request, response: web.StreamResponse) -> None:
    """``on_response_prepare``: the request id goes back in every answer, streamed ones too."""
    rid = request.get(REQUEST_ID)
    if rid is not None:
        response.headers["X-Request-ID"] = rid
