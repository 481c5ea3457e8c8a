"""bff.proxy.upstream's name cache: an upstream's name is looked up once per DNS_TTL (as aiohttp's
``ttl_dns_cache=300`` did), once for concurrent connects, failures not kept; an address is never
looked up. The loop's ``getaddrinfo`` is counted (and, for failures, replaced); the connections
are real, to an aiohttp server on loopback."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from bff.proxy.upstream import DNS_TTL, UpstreamPool, _Resolver
from tests.support.procs import free_port


class Lookups:
    """Wraps the running loop's getaddrinfo: counts calls, optionally fails or waits."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.loop = asyncio.get_running_loop()
        self.real = self.loop.getaddrinfo
        self.calls: list[Any] = []
        self.fail = False
        self.gate: asyncio.Event | None = None
        monkeypatch.setattr(self.loop, "getaddrinfo", self.getaddrinfo)

    async def getaddrinfo(self, host: Any, port: Any, **kw: Any) -> Any:
        self.calls.append(host)
        if self.gate is not None:
            await self.gate.wait()
        if self.fail:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return await self.real(host, port, **kw)


@pytest.fixture
async def upstream_port() -> AsyncIterator[int]:
    async def handle(request: web.Request) -> web.Response:
        # Connection: close: every request needs a new connection, hence an address.
        return web.Response(text="ok", headers={"Connection": "close"})

    app = web.Application()
    app.router.add_get("/", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    yield port
    await runner.cleanup()


async def _get(pool: UpstreamPool) -> bytes:
    resp = await pool.request("GET", "/", [], None)
    return await resp.read()


async def test_a_name_is_looked_up_once_for_many_new_connections(
    monkeypatch: pytest.MonkeyPatch, upstream_port: int
) -> None:
    lookups = Lookups(monkeypatch)
    pool = UpstreamPool(f"http://localhost:{upstream_port}", connect_timeout=5)
    try:
        for _ in range(3):
            assert await _get(pool) == b"ok"
    finally:
        await pool.close()
    assert lookups.calls == ["localhost"]


async def test_an_address_is_never_looked_up(
    monkeypatch: pytest.MonkeyPatch, upstream_port: int
) -> None:
    lookups = Lookups(monkeypatch)
    pool = UpstreamPool(f"http://127.0.0.1:{upstream_port}", connect_timeout=5)
    try:
        assert await _get(pool) == b"ok"
    finally:
        await pool.close()
    assert lookups.calls == []


async def test_the_name_is_looked_up_again_after_the_ttl(monkeypatch: pytest.MonkeyPatch) -> None:
    lookups = Lookups(monkeypatch)
    now = [1000.0]
    resolver = _Resolver("localhost", 80)
    resolver.clock = lambda: now[0]
    first = await resolver.resolve()
    now[0] += DNS_TTL - 1
    assert await resolver.resolve() == first
    assert len(lookups.calls) == 1
    now[0] += 2
    await resolver.resolve()
    assert len(lookups.calls) == 2
    assert DNS_TTL == 300


async def test_concurrent_connects_share_one_look_up(monkeypatch: pytest.MonkeyPatch) -> None:
    lookups = Lookups(monkeypatch)
    lookups.gate = asyncio.Event()
    resolver = _Resolver("localhost", 80)
    waiting = [asyncio.create_task(resolver.resolve()) for _ in range(20)]
    await asyncio.sleep(0)
    waiting[0].cancel()  # a caller that gives up leaves the look-up to the others
    lookups.gate.set()
    results = await asyncio.gather(*waiting[1:])
    assert len(lookups.calls) == 1
    assert all(r == results[0] and r for r in results)


async def test_a_failed_look_up_is_a_connector_dns_error_and_is_not_kept(
    monkeypatch: pytest.MonkeyPatch, upstream_port: int
) -> None:
    lookups = Lookups(monkeypatch)
    lookups.fail = True
    pool = UpstreamPool(f"http://localhost:{upstream_port}", connect_timeout=5)
    try:
        with pytest.raises(aiohttp.ClientConnectorDNSError):  # as aiohttp's client raised it
            await _get(pool)
        assert pool._open == 0
        lookups.fail = False
        assert await _get(pool) == b"ok"  # asked again, not the failure remembered
    finally:
        await pool.close()
    assert lookups.calls == ["localhost", "localhost"]
