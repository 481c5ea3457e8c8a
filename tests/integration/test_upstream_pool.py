"""bff.proxy.upstream: the proxy's upstream client against a real aiohttp server on loopback.

The proxy's end-to-end tests (test_proxy.py) hold it to what the browser and upstream see; these
pin the pool's own rules: reuse, the retry of a closed pooled connection, the limit, framing of
body-less and streamed requests, and errors as aiohttp's client raises them.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web

from bff.proxy.upstream import UpstreamPool
from tests.support.procs import free_port


class Upstream:
    def __init__(self) -> None:
        self.port = free_port()
        self.peers: list[int] = []  # the client port of each request: one per connection used
        self.seen: list[tuple[str, dict[str, str], bytes]] = []
        self.gate: asyncio.Event | None = None
        self.runner: web.AppRunner | None = None

    async def handle(self, request: web.Request) -> web.StreamResponse:
        transport = request.transport
        assert transport is not None
        self.peers.append(transport.get_extra_info("peername")[1])
        body = await request.read()
        self.seen.append((request.method, dict(request.headers), body))
        if self.gate is not None:
            await self.gate.wait()
        if request.path == "/close":
            return web.Response(text="bye", headers={"Connection": "close"})
        return web.Response(text=f"{request.method} {request.path_qs}")

    async def start(self, keepalive: float = 75.0) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        self.runner = web.AppRunner(app, access_log=None, keepalive_timeout=keepalive)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        assert self.runner is not None
        await self.runner.cleanup()


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    server = Upstream()
    await server.start()
    yield server
    await server.stop()


async def _get(pool: UpstreamPool, target: str, method: str = "GET") -> tuple[int, bytes]:
    resp = await pool.request(method, target, [("X-Test", "1")], None)
    return resp.status, await resp.read()


async def test_a_connection_is_reused_once_its_answer_was_read(upstream: Upstream) -> None:
    pool = UpstreamPool(f"http://127.0.0.1:{upstream.port}", connect_timeout=5)
    try:
        for i in range(3):
            assert await _get(pool, f"/a?i={i}") == (200, f"GET /a?i={i}".encode())
        assert len(set(upstream.peers)) == 1
        assert upstream.seen[0][1]["Host"] == f"127.0.0.1:{upstream.port}"
        assert upstream.seen[0][1]["X-Test"] == "1"
    finally:
        await pool.close()


async def test_an_answer_that_says_close_is_not_reused(upstream: Upstream) -> None:
    pool = UpstreamPool(f"http://127.0.0.1:{upstream.port}", connect_timeout=5)
    try:
        assert await _get(pool, "/close") == (200, b"bye")
        assert await _get(pool, "/next") == (200, b"GET /next")
        assert len(set(upstream.peers)) == 2
    finally:
        await pool.close()


async def test_a_pooled_connection_the_upstream_closed_is_not_used() -> None:
    server = Upstream()
    await server.start(keepalive=0.1)  # the upstream drops idle connections at once
    pool = UpstreamPool(f"http://127.0.0.1:{server.port}", connect_timeout=5)
    try:
        assert await _get(pool, "/one") == (200, b"GET /one")
        await asyncio.sleep(0.5)
        assert await _get(pool, "/two") == (200, b"GET /two")
        assert len(set(server.peers)) == 2
    finally:
        await pool.close()
        await server.stop()


async def test_body_framing_as_aiohttp_sends_it(upstream: Upstream) -> None:
    pool = UpstreamPool(f"http://127.0.0.1:{upstream.port}", connect_timeout=5)

    async def body() -> AsyncIterator[bytes]:
        yield b"abc"
        yield b"def"

    try:
        assert (await _get(pool, "/empty", "POST"))[0] == 200
        resp = await pool.request("PUT", "/chunked", [], body())
        assert resp.status == 200
        await resp.read()
        resp = await pool.request("POST", "/sized", [("Content-Length", "6")], body())
        await resp.read()
        (_, empty, b0), (_, chunked, b1), (_, sized, b2) = upstream.seen
        assert empty["Content-Length"] == "0" and b0 == b""
        assert chunked["Transfer-Encoding"] == "chunked" and b1 == b"abcdef"
        assert sized["Content-Length"] == "6" and "Transfer-Encoding" not in sized
        assert b2 == b"abcdef"
    finally:
        await pool.close()


async def test_a_header_with_a_line_break_is_refused_before_anything_is_sent(
    upstream: Upstream,
) -> None:
    pool = UpstreamPool(f"http://127.0.0.1:{upstream.port}", connect_timeout=5)
    try:
        with pytest.raises(aiohttp.ClientError):
            await pool.request("GET", "/", [("X-Bad", "a\r\nX-Injected: 1")], None)
        assert upstream.seen == []
    finally:
        await pool.close()


async def test_no_more_connections_than_the_limit(upstream: Upstream) -> None:
    pool = UpstreamPool(f"http://127.0.0.1:{upstream.port}", connect_timeout=5, limit=1)
    upstream.gate = asyncio.Event()
    try:
        first = asyncio.create_task(_get(pool, "/first"))
        second = asyncio.create_task(_get(pool, "/second"))
        for _ in range(100):
            if upstream.seen:
                break
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.1)
        assert [s[0] for s in upstream.seen] == ["GET"]  # the second waits for the connection
        upstream.gate.set()
        assert await first == (200, b"GET /first")
        assert await second == (200, b"GET /second")
        assert len(set(upstream.peers)) == 1
    finally:
        await pool.close()


async def test_a_refused_connection_is_a_client_error() -> None:
    pool = UpstreamPool(f"http://127.0.0.1:{free_port()}", connect_timeout=5)
    with pytest.raises(aiohttp.ClientConnectorError):  # as aiohttp's client: the proxy logs it
        await pool.request("GET", "/", [], None)
    assert pool._open == 0  # nothing leaked towards the limit


async def test_connect_timeout_bounds_the_tls_handshake_too() -> None:
    """As aiohttp's ``sock_connect`` did: a server that accepts and then never answers the
    ClientHello is a ``ConnectionTimeoutError`` (the proxy's 504), not a wait for the route's
    whole timeout."""

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(TimeoutError, ConnectionError):
            while await asyncio.wait_for(reader.read(65536), 10):
                pass
        writer.close()

    port = free_port()
    server = await asyncio.start_server(silent, "127.0.0.1", port)
    pool = UpstreamPool(f"https://127.0.0.1:{port}", connect_timeout=0.3)
    try:
        with pytest.raises(aiohttp.ConnectionTimeoutError):
            await pool.request("GET", "/", [], None)
        assert pool._open == 0
    finally:
        await pool.close()
        server.close()
        await server.wait_closed()
