"""The WebSocket proxy: one upstream handshake per browser socket, frames pumped both ways.

Frames pass as they come, in both directions; whichever side closes first closes the other with
its code. A ``user`` route's socket is closed with :data:`WS_SESSION_ENDED` once its session ends.

The browser's handshake is checked (:func:`check_handshake`) before its session is read and before
any upstream connection: a bad one is a fixed JSON 400. Left to ``prepare()``, aiohttp would answer
it with a text page quoting the offending header, and only after the upstream socket, bearer and
all, had been opened and closed again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from typing import Final

import aiohttp
from aiohttp import WSMsgType, web
from aiohttp.http import HttpVersion11
from yarl import URL

from bff import dpop, metrics, tracing
from bff.errors import BadRequest, UpstreamFailed, UpstreamTimeout
from bff.lifecycle import LIFECYCLE
from bff.proxy.headers import upstream_headers
from bff.proxy.routing import Route, UpstreamTable
from bff.proxy.session_watch import SessionWatch
from bff.services import Services
from bff.sessions import Session

__all__ = ["BAD_HANDSHAKE", "WS_SESSION_ENDED", "check_handshake", "forward_websocket"]

log = logging.getLogger("bff.proxy")  # one logger name for the whole proxy package

#: WebSocket close code sent to the browser when its session ends (1008: policy violation).
WS_SESSION_ENDED: Final = 1008
#: The fixed ``error_description`` of a refused handshake (``invalid_request``, 400).
BAD_HANDSHAKE: Final = "not a valid WebSocket handshake"
#: RFC 6455 4.1: the key is 16 random bytes, base64: 22 characters and ``==``.
_KEY: Final = re.compile(r"[A-Za-z0-9+/]{22}==")


class _NoOfferedProtocols(logging.Filter):
    """Drops aiohttp's warning that quotes the browser's offered subprotocols (request bytes)
    when the upstream agreed to none of them; a log line never holds request bytes."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (isinstance(record.msg, str) and record.msg.startswith("%s: Client protocols"))


logging.getLogger("aiohttp.websocket").addFilter(_NoOfferedProtocols())


def _offered(request: web.Request) -> tuple[str, ...]:
    offered = request.headers.get("Sec-WebSocket-Protocol", "")
    return tuple(p.strip() for p in offered.split(",") if p.strip())


def check_handshake(request: web.Request) -> None:
    """Raise a fixed 400 unless ``request`` is a WebSocket opening handshake that ``prepare()``
    will take (RFC 6455 4.1): GET, HTTP/1.1, ``Sec-WebSocket-Version: 13``, one well-formed key,
    and aiohttp's own checks (``Upgrade``, ``Connection``) via ``can_prepare``. aiohttp alone
    would also take versions 7 and 8 and any key that base64-decodes to 16 bytes after it
    skipped the characters outside the alphabet."""
    headers = request.headers
    keys = headers.getall("Sec-WebSocket-Key", ())
    if (
        request.method != "GET"
        or request.version != HttpVersion11
        or headers.getall("Sec-WebSocket-Version", ()) != ["13"]
        or len(keys) != 1
        or not _KEY.fullmatch(keys[0])
        # Offered protocols as the server's: aiohttp would log the client's when none overlap.
        or not web.WebSocketResponse(protocols=_offered(request)).can_prepare(request).ok
    ):
        raise BadRequest(BAD_HANDSHAKE)


async def forward_websocket(
    request: web.Request,
    services: Services,
    table: UpstreamTable,
    route: Route,
    target: str,
    session: Session | None,
    token: str | None,
) -> web.StreamResponse:
    """Open the upstream socket first (so its errors are still an HTTP status), then the
    browser's, and pump frames until either side closes. The caller ran :func:`check_handshake`
    (before reading the session), so ``prepare()`` cannot refuse the browser's handshake."""
    http = route.http
    if http is None:
        raise UpstreamFailed("the upstream pool is not open")
    protocols = _offered(request)
    url = URL(route.ws_origin + target, encoded=True)
    forwarded = table.peers.forwarding(request)
    key = dpop.session_key(session) if session is not None and token is not None else None

    def handshake_headers() -> list[tuple[str, str]]:
        if key is None or token is None:
            return upstream_headers(request, route.ws_drop, route.set_headers, forwarded, token)
        # The handshake is an HTTP GET to the http(s) form of the URL (RFC 9449 4.2: htu).
        auth = dpop.upstream_auth(key, "GET", route.origin + target, route.origin, token)
        return upstream_headers(
            request, route.ws_drop, (*route.set_headers, *auth), forwarded, None
        )

    try:
        async with asyncio.timeout(route.timeout):
            for attempt in (1, 2):
                try:
                    upstream = await http.ws_connect(
                        url,
                        headers=tracing.inject(handshake_headers()),  # with our traceparent
                        protocols=protocols,
                        compress=0,
                        autoping=True,
                        autoclose=True,
                    )
                    break
                except aiohttp.WSServerHandshakeError as exc:
                    # RFC 9449 9: a handshake has no body, so it is sent again with the nonce.
                    challenge = exc.headers
                    if (
                        key is None
                        or attempt == 2
                        or challenge is None
                        or not dpop.is_nonce_challenge(exc.status, challenge)
                    ):
                        raise
                    dpop.UPSTREAM_NONCES.note(route.origin, challenge)
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

    watch = SessionWatch(services, session, table.session_check_interval, end) if session else None
    metrics.stream_opened("websocket")
    lifecycle = request.app.get(LIFECYCLE)
    try:
        await browser.prepare(request)
        if lifecycle is not None:
            lifecycle.websockets.add(browser)  # closed with 1001 when the worker stops
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
        metrics.stream_closed("websocket")
        if lifecycle is not None:
            lifecycle.websockets.discard(browser)
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
