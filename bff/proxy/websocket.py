"""The WebSocket proxy: one upstream handshake per browser socket, frames pumped both ways.

Frames pass as they come, in both directions; whichever side closes first closes the other with
its code. A ``user`` route's socket is closed with :data:`WS_SESSION_ENDED` once its session ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Final

import aiohttp
from aiohttp import WSMsgType, web
from yarl import URL

from bff import metrics, tracing
from bff.errors import UpstreamFailed, UpstreamTimeout
from bff.lifecycle import LIFECYCLE
from bff.proxy.headers import upstream_headers
from bff.proxy.routing import Route, UpstreamTable
from bff.proxy.session_watch import SessionWatch
from bff.services import Services
from bff.sessions import Session

__all__ = ["WS_SESSION_ENDED", "forward_websocket"]

log = logging.getLogger("bff.proxy")  # one logger name for the whole proxy package

#: WebSocket close code sent to the browser when its session ends (1008: policy violation).
WS_SESSION_ENDED: Final = 1008


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
    browser's, and pump frames until either side closes."""
    http = route.http
    if http is None:
        raise UpstreamFailed("the upstream pool is not open")
    offered = request.headers.get("Sec-WebSocket-Protocol", "")
    protocols = tuple(p.strip() for p in offered.split(",") if p.strip())
    headers = upstream_headers(
        request, route.ws_drop, route.set_headers, table.peers.forwarding(request), token
    )
    try:
        async with asyncio.timeout(route.timeout):
            upstream = await http.ws_connect(
                URL(route.ws_origin + target, encoded=True),
                headers=tracing.inject(headers),  # the server span's traceparent
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
