"""The direct path: a proxied request goes from the front door to :func:`~bff.proxy.forward.forward`
without the application's router and middleware chain (issue 11, point 4).

For every request, aiohttp's ``Application._handle`` walks the router's index, builds a match
info, and runs the middleware chain (request id and access line, metrics, JSON errors), each a
coroutine frame of its own: a fixed cost that was a sizeable share of a proxied GET's CPU time (see
the profile in docs/design.md, "Performance"). A request whose path lies under a configured
upstream prefix has only one possible handler, so :class:`DirectPath` picks the route itself (the
longest prefix, as the router does) and does what those middlewares do, inline and in the same
order, with the same helpers (:func:`bff.access.request_id`, :func:`bff.metrics.request_done`,
:func:`bff.middlewares.error_answer`): the request id, one access line, metrics counted once, and
the same JSON error bodies. Edge mode's auth endpoint (``/bff/authz``, asked once per API call by
the edge) takes the same path.

What stays as it was: the request carries the same match info (the route's resource, the app), so
``request.app``, the access log's and the metrics' route labels and the ``on_response_prepare``
hooks (request id, security headers, ``Cache-Control``) are unchanged; the front door's gate
(framing refusals, broken bodies, too-large bodies) runs first either way. When tracing is on,
the direct path is off (its server-span middleware needs the chain), and so is any route whose
prefix an app route could also match (an upstream at ``/healthz``): there, the router decides.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Final, TypeAlias

from aiohttp import web
from aiohttp.helpers import rfc822_formatted_time
from aiohttp.web_urldispatcher import AbstractRoute, UrlMappingMatchInfo

from bff import access, metrics
from bff.middlewares import SecurityHeaders, error_answer

__all__ = ["DIRECT", "DirectPath", "HandlerNow"]

log = logging.getLogger("bff.proxy")

#: A handler's synchronous form: the headers of its ``200`` with no body when it needs no I/O
#: to give that answer, else None (see :meth:`DirectPath.answer_now`). Values must be ASCII
#: without controls: the caller checks what it does not build itself.
HandlerNow: TypeAlias = Callable[[web.Request], Sequence[tuple[str, str]] | None]


def _under(path: str, prefix: str) -> bool:
    return path == prefix or path.startswith(prefix + "/")


class _Entry:
    """One proxied route as the router would have matched it: its match info and labels."""

    __slots__ = (
        "access_route",
        "handler",
        "handler_now",
        "head_200",
        "kind",
        "label",
        "match_info",
        "prefix",
        "prefix_slash",
    )

    def __init__(
        self,
        app: web.Application,
        prefix: str,
        route: AbstractRoute,
        handler_now: HandlerNow | None = None,
        fixed: Sequence[tuple[str, str]] = (),
    ) -> None:
        self.prefix = prefix
        self.prefix_slash = prefix + "/"
        self.handler = route.handler
        self.handler_now = handler_now
        # The fast lane's answer up to its per-request headers, built once.
        head = ["HTTP/1.1 200 OK", "Content-Length: 0", *(f"{n}: {v}" for n, v in fixed)]
        self.head_200 = "".join(f"{line}\r\n" for line in head).encode()
        # One frozen match info per resource, shared by its requests: bff reads only its route
        # and app (nothing reads the ``tail`` of a proxied path: forward uses the raw target).
        info = UrlMappingMatchInfo({}, route)
        info.add_app(app)
        info.freeze()
        self.match_info = info
        self.label, self.kind = metrics.describe(route.resource)
        self.access_route = access.route_name(route.resource)


class DirectPath:
    """Proxied routes matched and served without the router and the middleware chain."""

    def __init__(
        self,
        app: web.Application,
        routes: Iterable[tuple[str, AbstractRoute, AbstractRoute]],
        *,
        exact: Iterable[tuple[str, AbstractRoute, HandlerNow]] = (),
        reserved: Sequence[str],
        access_log: bool,
        security: SecurityHeaders | None = None,
    ) -> None:
        """``routes``: (prefix, route of the prefix itself, route of ``prefix/...``), longest
        prefix first; ``reserved``: the paths of the app's own routes registered before them;
        ``exact``: single paths that only one route takes (edge mode's auth endpoint), each
        with its handler's synchronous form (see :meth:`answer_now`); ``security``: the app's
        hook for the headers every answer gets, which the fast lane writes itself."""
        self._exact: dict[str, _Entry] = {
            path: _Entry(app, path, route, now, security.fixed(path) if security else ())
            for path, route, now in exact
        }
        #: The raw paths :meth:`answer_now` may answer, for the front door's quick test.
        self._now = {path: e for path, e in self._exact.items() if e.handler_now is not None}
        self.now_paths: frozenset[str] = frozenset(self._now)
        entries: list[tuple[_Entry, _Entry]] = []
        for prefix, itself, below in routes:
            if any(_under(path, prefix) or _under(prefix, path) for path in reserved):
                continue  # the router may answer some of these paths with an app route
            pair = (_Entry(app, prefix, itself), _Entry(app, prefix, below))
            entries.append(pair)
            self._exact[prefix] = pair[0]
        self._entries = tuple(entries)
        self._access_log = access_log

    def match(self, request: web.BaseRequest) -> _Entry | None:
        """The route the router would pick for ``request`` (longest prefix of its decoded path),
        or None when the app must route it."""
        path = request.rel_url.path_safe  # what aiohttp's router matches on
        entry = self._exact.get(path)
        if entry is not None:
            return entry
        for _, below in self._entries:
            if path.startswith(below.prefix_slash):
                return below
        return None

    async def handle(self, request: web.Request, entry: _Entry) -> web.StreamResponse:
        """What ``Application._handle`` and the middlewares do for a proxied route, in order:
        the ``Expect`` handler, the request id, metrics, JSON errors, the access line."""
        info = entry.match_info
        request._match_info = info
        if request.headers.get("Expect"):
            expected = await info.expect_handler(request)
            await request.writer.drain()
            if expected is not None:
                return expected
        rid = access.request_id(request)
        started = metrics.request_started()
        # As the two middlewares had them: 499 when the client went away; a BaseException that is
        # not an Exception counts 500 in metrics and 499 in the access line.
        status, counted, size = 499, 500, 0
        response: web.StreamResponse | None = None
        try:
            try:
                response = await entry.handler(request)
            except Exception as exc:  # the error middleware's answer (HTTPExceptions pass on)
                response = error_answer(request, exc, api=True)
            status = counted = response.status
            size = response.body_length if response.prepared else response.content_length or 0
            return response
        except web.HTTPException as exc:
            status = counted = exc.status
            if self._access_log:
                exc.headers["X-Request-ID"] = rid
            raise
        except asyncio.CancelledError:
            counted = 499
            raise
        except Exception:
            status = 500
            raise
        finally:
            metrics.request_done(request, entry.label, entry.kind, response, counted, started)
            if self._access_log and access.wanted():
                took = time.perf_counter() - started
                access.write(request, entry.access_route, rid, status, size, took)

    def exact(self, path: str) -> _Entry | None:
        """The entry of a raw request path that :meth:`answer_now` may answer, or None."""
        return self._now.get(path)

    def answer_now(
        self, request: web.Request, entry: _Entry, write: Callable[[bytes], None]
    ) -> bool:
        """:meth:`handle` for an entry with a synchronous handler, without awaiting anything.

        The handler gives the headers of a ``200`` with no body, or None when only the usual way
        can answer (it needs I/O, or the answer is a refusal): then nothing is done here and
        False returned. Else the answer is written through ``write`` as one piece, with the same
        headers aiohttp and the app's hooks give it (``Content-Length``, ``Date``, the request
        id, :meth:`SecurityHeaders.fixed`; no ``Server``), and counted and logged as
        :meth:`handle` counts and logs it. It raises only before anything is written: once the
        answer is out, the usual way must not give a second one.

        The front door calls it from ``data_received`` for a GET with no body, so an edge's auth
        call that the session cache can decide costs no task, no coroutine, no response object
        and no second turn of the event loop (issue 11, point 4)."""
        now = entry.handler_now
        if now is None:
            return False
        started = time.perf_counter()
        request._match_info = entry.match_info
        headers = now(request)
        if headers is None:
            return False
        rid = access.request_id(request)
        extra = "".join(f"{name}: {value}\r\n" for name, value in headers)
        tail = f"Date: {rfc822_formatted_time()}\r\nX-Request-ID: {rid}\r\n{extra}\r\n"
        write(entry.head_200 + tail.encode())
        # Answered: whatever happens now, the usual way must not answer a second time.
        try:
            metrics.request_started()
            metrics.request_done(
                request, entry.label, entry.kind, None, 200, started, websocket=False
            )
            if self._access_log and access.wanted():
                took = time.perf_counter() - started
                access.write(request, entry.access_route, rid, 200, 0, took)
        except Exception as exc:  # a bug in the bookkeeping: logged by type, never by message
            log.error(
                "fast_lane.bookkeeping_failed",
                extra={"event": "fast_lane.bookkeeping_failed", "error": type(exc).__name__},
            )
        return True


#: The app's :class:`DirectPath` (absent when tracing is on); the front door looks it up.
DIRECT: Final = web.AppKey("bff_direct_path", DirectPath)
