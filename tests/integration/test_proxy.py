"""The proxy end to end: a real redis-server, the real OP, bff in this process and a real
upstream server that records what reached it (issue 3, "what must be true", item 1)."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import hashlib
import json
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import WSMsgType, web
from multidict import CIMultiDict
from yarl import URL

from bff.app import create_app
from bff.config import Settings, parse_settings
from bff.proxy import SMALL_BODY
from bff.server import listen
from bff.services import SERVICES, Services
from bff.sessions import Session
from tests.support.procs import OidcProvider, RedisServer, browser_session, free_port, op_login

COOKIE = "bff-session"
KEY = "proxy-test-key-0123456789abcdef0123456789"
CSRF = {"X-CSRF": "1"}

# -------------------------------------------------------------------------------------------------
# The upstream: records every request (method, path, headers, body size) for the test to inspect.


@dataclass
class Seen:
    method: str
    path: str  # raw path and query as received
    headers: dict[str, list[str]]
    body_len: int = 0
    body_sha256: str = ""

    def header(self, name: str) -> str | None:
        values = self.headers.get(name.lower())
        return values[0] if values else None


@dataclass
class Upstream:
    port: int = field(default_factory=free_port)
    seen: list[Seen] = field(default_factory=list)
    rejected: set[str] = field(default_factory=set)  # bearer tokens answered with 401
    release: asyncio.Event = field(default_factory=asyncio.Event)  # lets held streams finish
    received: int = 0  # request body bytes received so far by /upload-progress
    runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def record(self, request: web.Request) -> Seen:
        headers: dict[str, list[str]] = {}
        for k, v in request.headers.items():
            headers.setdefault(k.lower(), []).append(v)
        seen = Seen(request.method, request.raw_path, headers)
        self.seen.append(seen)
        return seen

    async def echo(self, request: web.Request) -> web.StreamResponse:
        seen = self.record(request)
        digest = hashlib.sha256()
        async for chunk in request.content.iter_any():
            seen.body_len += len(chunk)
            digest.update(chunk)
        seen.body_sha256 = digest.hexdigest()
        auth = seen.header("authorization") or ""
        if auth.removeprefix("Bearer ") in self.rejected:
            return web.json_response({"error": "invalid_token"}, status=401)
        response = web.json_response(
            {"method": seen.method, "path": seen.path, "body_len": seen.body_len}
        )
        response.headers["Set-Cookie"] = "upstream=1; Path=/"
        response.headers["X-Upstream"] = "yes"
        if "cc" in request.query:  # caching as the test asks for it
            response.headers["Cache-Control"] = request.query["cc"]
            response.headers["Surrogate-Control"] = "max-age=600"
        return response

    async def slow(self, request: web.Request) -> web.Response:
        self.record(request)
        await asyncio.sleep(5)
        return web.Response(text="too late")

    async def hold(self, request: web.Request) -> web.StreamResponse:
        """Server-sent events: one event at once, the rest only after ``release``."""
        self.record(request)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b"data: first\n\n")
        try:
            await asyncio.wait_for(self.release.wait(), 10)
        except TimeoutError:
            return response
        with contextlib.suppress(ConnectionError):  # bff may have cut the stream
            await response.write(b"data: last\n\n")
            await response.write_eof()
        return response

    async def download(self, request: web.Request) -> web.StreamResponse:
        self.record(request)
        size = int(request.query["size"])
        response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        response.content_length = size
        await response.prepare(request)
        if request.method == "HEAD":
            return response
        block = bytes(range(256)) * 256  # 64 KiB
        sent = 0
        while sent < size:
            n = min(len(block), size - sent)
            await response.write(block[:n])
            sent += n
        await response.write_eof()
        return response

    async def reset(self, request: web.Request) -> web.StreamResponse:
        """Promises 1 MiB, sends 100 KiB, then drops the connection."""
        self.record(request)
        response = web.StreamResponse()
        response.content_length = 1024 * 1024
        await response.prepare(request)
        await response.write(b"r" * 100 * 1024)
        assert request.transport is not None
        request.transport.abort()
        return response

    async def redirect(self, request: web.Request) -> web.Response:
        self.record(request)
        return web.Response(status=302, headers={"Location": "/elsewhere"})

    async def upload_progress(self, request: web.Request) -> web.Response:
        self.record(request)
        async for chunk in request.content.iter_any():
            self.received += len(chunk)
        return web.json_response({"received": self.received})

    async def websocket(self, request: web.Request) -> web.WebSocketResponse:
        self.record(request)
        ws = web.WebSocketResponse(protocols=("chat",))
        await ws.prepare(request)
        async for msg in ws:
            if msg.type is WSMsgType.TEXT and msg.data == "bye":
                await ws.close(code=4000, message=b"upstream says bye")
            elif msg.type is WSMsgType.TEXT:
                await ws.send_str(msg.data)
            elif msg.type is WSMsgType.BINARY:
                await ws.send_bytes(msg.data)
        return ws

    async def start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/up/slow", self.slow)
        app.router.add_get("/up/hold", self.hold)
        app.router.add_get("/up/download", self.download)
        app.router.add_post("/up/upload-progress", self.upload_progress)
        app.router.add_get("/up/reset", self.reset)
        app.router.add_get("/up/redirect", self.redirect)
        app.router.add_get("/ws/{tail:.*}", self.websocket)
        app.router.add_route("*", "/{tail:.*}", self.echo)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()

    async def close(self) -> None:
        self.release.set()
        if self.runner is not None:
            await self.runner.cleanup()


# -------------------------------------------------------------------------------------------------
# bff in this process, on its own loopback port


@dataclass
class Bff:
    url: str
    settings: Settings
    app: web.Application
    upstream: Upstream
    op: OidcProvider

    @property
    def services(self) -> Services:
        return self.app[SERVICES]

    def session_secret(self, browser: aiohttp.ClientSession) -> Any:
        cookie = browser.cookie_jar.filter_cookies(URL(self.url)).get(COOKIE)
        assert cookie is not None, "not logged in"
        return self.services.keyring.unsign(cookie.value)

    async def session(self, browser: aiohttp.ClientSession) -> Session | None:
        return await self.services.sessions.load(self.session_secret(browser), fresh=True)

    async def login(self, browser: aiohttp.ClientSession, username: str = "") -> Session:
        """A whole login through bff and the OP, as a user no other test has (own sessions)."""
        username = username or f"user-{uuid.uuid4().hex[:12]}"
        async with browser.get(f"{self.url}/bff/login", allow_redirects=False) as resp:
            assert resp.status == 302, await resp.text()
            authorize = resp.headers["Location"]
        callback = await op_login(browser, authorize, username)
        async with browser.get(callback, allow_redirects=False) as resp:
            assert resp.status == 200, await resp.text()
        session = await self.session(browser)
        assert session is not None
        return session


def config(port: int, op: OidcProvider, client: dict[str, Any], redis: str, up: str, **kw: Any):
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    upstreams = [
        {"path": "/api", "url": f"{up}/up"},
        # api:admin is asked for but the OP does not know it, so never grants it.
        {"path": "/api/write", "url": f"{up}/up/write", "scopes": ["api:admin"]},
        {"path": "/api/read", "url": f"{up}/up/read", "scopes": ["api:read"]},
        {"path": "/api/get-only", "url": f"{up}/up/get-only", "methods": ["GET", "HEAD"]},
        {"path": "/api/no-delete", "url": f"{up}/up/no-delete", "methods": ["GET", "POST"]},
        {"path": "/api/service", "url": f"{up}/up/svc", "token": "client"},
        {"path": "/api/public", "url": f"{up}/up/public", "token": "none"},
        {"path": "/api/maybe", "url": f"{up}/up/maybe", "token": "user_or_none"},
        {"path": "/api/slow", "url": f"{up}/up/slow", "timeout": "1s"},
        {"path": "/api/dead", "url": dead, "connect_timeout": "2s"},
        {"path": "/api/ws", "url": f"ws://127.0.0.1:{up.rsplit(':', 1)[1]}/ws", "websocket": True},
        {"path": "/api/dead-ws", "url": dead, "websocket": True, "connect_timeout": "2s"},
        {
            "path": "/api/headers",
            "url": f"{up}/up/h",
            "set_headers": {"X-Api-Key": "k-123"},
            "remove_headers": ["X-Debug"],
        },
    ]
    text = json.dumps(
        {
            "public_url": f"http://127.0.0.1:{port}",
            "static": kw.pop("static"),
            "oidc": {
                "issuer": op.issuer,
                "client_id": client["client_id"],
                "client_secret": client["client_secret"],
                "scopes": ["openid", "profile", "api:read", "api:admin"],
                "refresh_skew": "1s",
            },
            "session": {
                "store": redis,
                "cookie": {"name": COOKIE, "secure": False},
            },
            "keys": [KEY],
            "upstreams": upstreams,
        }
    )
    return parse_settings(text)  # JSON is YAML


@pytest.fixture
async def bff(
    redis_server: RedisServer, oidc_op: OidcProvider, tmp_path: Path
) -> AsyncIterator[Bff]:
    upstream = Upstream()
    await upstream.start()
    port = free_port()
    client = await oidc_op.register_client(
        redirect_uris=[f"http://127.0.0.1:{port}/bff/callback"],
        grant_types=("authorization_code", "refresh_token", "client_credentials"),
        scope="openid profile api:read api:write",
    )
    (tmp_path / "static").mkdir()
    settings = config(
        port, oidc_op, client, redis_server.url, upstream.url, static=str(tmp_path / "static")
    )
    app = create_app(settings)
    # The front door as `bff run` serves: proxied routes take the direct path (bff.proxy.direct).
    runner = await listen(app, settings, "127.0.0.1", port)
    deadline = time.monotonic() + 10
    while not app[SERVICES].oidc.ready:
        assert time.monotonic() < deadline, "bff never loaded the OP's metadata"
        await asyncio.sleep(0.05)
    try:
        yield Bff(f"http://127.0.0.1:{port}", settings, app, upstream, oidc_op)
    finally:
        await runner.cleanup()
        await upstream.close()


@pytest.fixture
async def browser(bff: Bff) -> AsyncIterator[aiohttp.ClientSession]:
    async with browser_session(bff.url) as http:
        yield http


async def raw_request(
    url: str, target: str, headers: dict[str, str] | None = None, method: str = "GET"
) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 request with the target sent byte for byte (clients normalise ``..``)."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    lines = [f"{method} {target} HTTP/1.1", f"Host: {host}:{port}", "Connection: close"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
    await writer.drain()
    data = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode().split("\r\n")
    parsed = {}
    for line in header_lines:
        k, _, v = line.partition(":")
        parsed[k.strip().lower()] = v.strip()
    return int(status_line.split()[1]), parsed, body


def cookie_header(bff: Bff, browser: aiohttp.ClientSession) -> dict[str, str]:
    cookie = browser.cookie_jar.filter_cookies(URL(bff.url)).get(COOKIE)
    assert cookie is not None
    return {"Cookie": f"{COOKIE}={cookie.value}"}


# -------------------------------------------------------------------------------------------------
# Tokens and headers


async def test_the_upstream_sees_the_sessions_bearer_and_none_of_the_browsers_credentials(
    bff: Bff, browser: aiohttp.ClientSession
) -> None:
    session = await bff.login(browser)
    headers = {
        **CSRF,
        "Authorization": "Bearer made-up-by-the-browser",
        "Connection": "keep-alive, X-Hop",
        "X-Hop": "secret-hop",
        "X-Forwarded-For": "6.6.6.6",
        "X-Forwarded-Prefix": "/admin",
        "X-HTTP-Method-Override": "DELETE",
        "X-Original-URL": "/admin",
        "Accept": "application/json",
    }
    async with browser.get(
        URL(f"{bff.url}/api/orders/42?q=a%2Fb&x=1", encoded=True),
        headers=headers,
        cookies={"other": "c"},
    ) as resp:
        assert resp.status == 200, await resp.text()
        body = await resp.json()
        assert "Set-Cookie" not in resp.headers
        assert resp.headers["X-Upstream"] == "yes"
    assert body["path"] == "/up/orders/42?q=a%2Fb&x=1"
    seen = bff.upstream.seen[-1]
    assert seen.headers["authorization"] == [f"Bearer {session.data.access_token}"]
    assert "cookie" not in seen.headers
    assert "x-hop" not in seen.headers
    assert "x-csrf" not in seen.headers  # bff's own anti-forgery header stays with bff
    # Overrides an upstream framework would honour around `methods:` or the prefix are gone.
    for name in ("x-http-method-override", "x-original-url", "x-forwarded-prefix"):
        assert name not in seen.headers
    assert seen.header("accept") == "application/json"
    assert seen.headers["x-forwarded-for"] == ["127.0.0.1"]
    assert seen.header("x-forwarded-proto") == "http"
    assert seen.header("x-forwarded-host") == bff.url.removeprefix("http://")
    assert seen.header("host") == bff.upstream.url.removeprefix("http://")


async def test_route_headers_are_set_and_removed(bff: Bff, browser: aiohttp.ClientSession) -> None:
    await bff.login(browser)
    headers = {**CSRF, "X-Debug": "1", "X-Api-Key": "forged"}
    async with browser.get(f"{bff.url}/api/headers/x", headers=headers) as resp:
        assert resp.status == 200
    seen = bff.upstream.seen[-1]
    assert seen.headers["x-api-key"] == ["k-123"]
    assert "x-debug" not in seen.headers


async def test_a_post_body_reaches_the_upstream_intact(
    bff: Bff, browser: aiohttp.ClientSession
) -> None:
    await bff.login(browser)
    payload = os.urandom(300_000)
    async with browser.post(f"{bff.url}/api/items", data=payload, headers=CSRF) as resp:
        assert resp.status == 200
    seen = bff.upstream.seen[-1]
    assert (seen.method, seen.body_len) == ("POST", len(payload))
    assert seen.body_sha256 == hashlib.sha256(payload).hexdigest()


async def test_a_compressed_upload_is_passed_on_as_it_came(
    bff: Bff, browser: aiohttp.ClientSession
) -> None:
    await bff.login(browser)
    payload = os.urandom(1000) * 50
    body = gzip.compress(payload)
    headers = {**CSRF, "Content-Encoding": "gzip"}
    async with browser.post(f"{bff.url}/api/items", data=body, headers=headers) as resp:
        assert resp.status == 200
    seen = bff.upstream.seen[-1]
    # bff did not inflate it: the upstream got the gzip body with its Content-Encoding (and,
    # being aiohttp, inflated it itself to the original bytes).
    assert seen.header("content-encoding") == "gzip"
    assert seen.body_sha256 == hashlib.sha256(payload).hexdigest()


async def test_without_a_session_a_user_route_gives_401_json(bff: Bff) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{bff.url}/api/orders", headers=CSRF) as resp:
            assert resp.status == 401
            assert (await resp.json())["error"] == "login_required"
        forged = {**CSRF, "Cookie": f"{COOKIE}=not-a-signed-value"}
        async with http.get(f"{bff.url}/api/orders", headers=forged) as resp:
            assert resp.status == 401
    assert bff.upstream.seen == []


async def test_an_ended_session_gives_401(bff: Bff, browser: aiohttp.ClientSession) -> None:
    session = await bff.login(browser)
    await bff.services.sessions.end_matching(sub=session.data.sub)
    await asyncio.sleep(bff.settings.session.cache_ttl + 0.1)  # other instances' cache
    async with browser.get(f"{bff.url}/api/orders", headers=CSRF) as resp:
        assert resp.status == 401
        assert (await resp.json())["error"] == "session_expired"


async def test_a_route_needing_a_scope_the_token_lacks_gives_403(
    bff: Bff, browser: aiohttp.ClientSession
) -> None:
    session = await bff.login(browser)
    assert "api:read" in session.data.scopes and "api:admin" not in session.data.scopes
    async with browser.get(f"{bff.url}/api/read/x", headers=CSRF) as resp:
        assert resp.status == 200
    async with browser.get(f"{bff.url}/api/write/x", headers=CSRF) as resp:
        assert resp.status == 403
        assert (await resp.json())["error"] == "insufficient_scope"
    assert [s.path for s in bff.upstream.seen] == ["/up/read/x"]


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"X-CSRF": "0"},
        {"X-CSRF": "1", "Sec-Fetch-Site": "cross-site"},
        {"X-CSRF": "1", "Origin": "https://evil.example"},
    ],
    ids=["no-x-csrf", "wrong-x-csrf", "cross-site", "foreign-origin"],
)
async def test_a_forged_request_gives_403(
    bff: Bff, browser: aiohttp.ClientSession, headers: dict[str, str]
) -> None:
    await bff.login(browser)
    for path in ("/api/orders", "/api/public/x", "/api/service/x"):
        async with browser.post(f"{bff.url}{path}", headers=headers, data=b"x") as resp:
            assert resp.status == 403, path
            assert (await resp.json())["error"] == "csrf_failed"
    assert bff.upstream.seen == []


async def test_a_same_origin_request_passes_the_anti_forgery_check(
    bff: Bff, browser: aiohttp.ClientSession
) -> None:
    await bff.login(browser)
    headers = {**CSRF, "Origin": bff.url, "Sec-Fetch-Site": "same-origin"}
    async with browser.get(f"{bff.url}/api/orders", headers=headers) as resp:
        assert resp.status == 200


async def test_a_method_not_in_methods_gives_405_json(
    bff: Bff, browser: aiohttp.ClientSession
) -> None:
    await bff.login(browser)
    async with browser.get(f"{bff.url}/api/get-only/x", headers=CSRF) as resp:
        assert resp.status == 200
    async with browser.delete(f"{bff.url}/api/get-only/x", headers=CSRF) as resp:
        assert resp.status == 405
        assert (await resp.json())["error"] == "method_not_allowed"
    assert len(bff.upstream.seen) == 1


async def test_a_none_route_sends_no_token_and_needs_no_session(bff: Bff) -> None:
    async with aiohttp.ClientSession() as http:
        headers = {**CSRF, "Authorization": "Bearer browser"}
        async with http.get(f"{bff.url}/api/public/x", headers=headers) as resp:
            assert resp.status == 200
    assert "authorization" not in bff.upstream.seen[-1].headers


async def test_a_user_or_none_route_sends_the_token_only_with_a_session(
    bff: Bff, browser: aiohttp.ClientSession
) -> None:
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"{bff.url}/api/maybe/x", headers=CSRF) as r,
    ):
        assert r.status == 200
    assert "authorization" not in bff.upstream.seen[-1].headers
    session = await bff.login(browser)
    async with browser.get(f"{bff.url}/api/maybe/x", headers=CSRF) as resp:
        assert resp.status == 200
    assert bff.upstream.seen[-1].header("authorization") == f"Bearer {session.data.access_token}"


async def test_a_client_route_gets_one_client_credentials_token_for_concurrent_calls(
    bff: Bff,
) -> None:
    before = (await bff.op.stats())["token"]["client_credentials"]
    async with aiohttp.ClientSession() as http:

        async def call() -> int:
            async with http.get(f"{bff.url}/api/service/x", headers=CSRF) as resp:
                return resp.status

        statuses = await asyncio.gather(*(call() for _ in range(20)))
    assert statuses == [200] * 20
    stats = await bff.op.stats()
    assert stats["token"]["client_credentials"] - before == 1
    tokens = {s.header("authorization") for s in bff.upstream.seen}
    assert len(tokens) == 1
    token = next(iter(tokens))
    assert token is not None and token.startswith("Bearer ") and len(token) > 20


async def test_an_upstream_401_refreshes_once_and_retries_an_idempotent_call(
    bff: Bff, browser: aiohttp.ClientSession
) -> None:
    session = await bff.login(browser)
    bff.upstream.rejected.add(session.data.access_token)
    before = (await bff.op.stats())["token"]["refresh_token"]
    async with browser.get(f"{bff.url}/api/orders", headers=CSRF) as resp:
        assert resp.status == 200
    assert (await bff.op.stats())["token"]["refresh_token"] - before == 1
    first, second = bff.upstream.seen
    assert first.header("authorization") != second.header("authorization")
    refreshed = await bff.session(browser)
    assert refreshed is not None
    assert second.header("authorization") == f"Bearer {refreshed.data.access_token}"


async def test_an_upstream_401_to_a_call_with_a_body_is_passed_on(
    bff: Bff, browser: aiohttp.ClientSession
) -> None:
    session = await bff.login(browser)
    bff.upstream.rejected.add(session.data.access_token)
    before = (await bff.op.stats())["token"]["refresh_token"]
    async with browser.post(f"{bff.url}/api/orders", headers=CSRF, data=b"{}") as resp:
        assert resp.status == 401
    assert (await bff.op.stats())["token"]["refresh_token"] == before
    assert len(bff.upstream.seen) == 1


# -------------------------------------------------------------------------------------------------
# Paths


TRAVERSALS = [
    "/api/orders/../../bff/user",
    "/api/orders/..",
    "/api/orders/./x",
    "/api/orders/%2e%2e/admin",
    "/api/orders/%2E%2E/admin",
    "/api/orders/.%2e/admin",
    "/api/orders/..%2fadmin",
    "/api/orders/a%2Fb",
    "/api/orders/..%5cadmin",
    "/api/orders/a%5Cb",
    "/api/orders/..\\admin",
    "/api/orders/%252e%252e/admin",
    "/api/public/%2e%2e/%2e%2e/bff/user",
    "/api/orders/..;/admin",
    "/api/orders/%2e%2e;/admin",
    "/api/orders/%u002e%u002e/admin",
]


async def test_each_traversal_spelling_is_refused_with_400(
    bff: Bff, browser: aiohttp.ClientSession
) -> None:
    await bff.login(browser)
    headers = {**CSRF, **cookie_header(bff, browser)}
    for target in TRAVERSALS:
        status, _, body = await raw_request(bff.url, target, headers)
        assert status == 400, target
        assert json.loads(body)["error"] == "invalid_path", target
    assert bff.upstream.seen == []


async def test_the_prefix_is_replaced_by_the_upstream_path_and_the_query_kept(
    bff: Bff, browser: aiohttp.ClientSession
) -> None:
    await bff.login(browser)
    headers = {**CSRF, **cookie_header(bff, browser)}
    for target, expected in [
        ("/api/read/a/b?x=1&y=%2F", "/up/read/a/b?x=1&y=%2F"),
        ("/api/read", "/up/read"),
        ("/api//read//c", "/up/read/c"),
        ("/api/reader", "/up/reader"),
    ]:
        status, _, body = await raw_request(bff.url, target, headers)
        assert status == 200, (target, body)
        assert json.loads(body)["path"] == expected


# -------------------------------------------------------------------------------------------------
# Failures


async def test_a_dead_upstream_gives_502_json_without_its_address(
    bff: Bff, browser: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    await bff.login(browser)
    caplog.set_level(logging.WARNING, logger="bff")
    async with browser.get(f"{bff.url}/api/dead/x", headers=CSRF) as resp:
        assert resp.status == 502
        text = await resp.text()
    assert json.loads(text) == {
        "error": "upstream_error",
        "error_description": "the upstream service failed",
    }
    assert "127.0.0.1" not in text and "Traceback" not in text
    # The log line as it was with aiohttp's ClientSession: the event, the route, the error type.
    [failed] = [r for r in caplog.records if getattr(r, "event", None) == "proxy.upstream_failed"]
    assert (failed.route, failed.error) == ("/api/dead", "ClientConnectorError")  # type: ignore[attr-defined]
    assert str(bff.settings.upstreams[0].url) not in failed.getMessage()


async def test_a_slow_upstream_gives_504_json_after_the_routes_timeout(
    bff: Bff, browser: aiohttp.ClientSession
) -> None:
    await bff.login(browser)
    started = time.monotonic()
    async with browser.get(f"{bff.url}/api/slow", headers=CSRF) as resp:
        assert resp.status == 504
        text = await resp.text()
    assert 0.9 < time.monotonic() - started < 3
    assert json.loads(text)["error"] == "upstream_timeout"
    assert "127.0.0.1" not in text


async def test_an_upstream_reset_mid_body_truncates_the_response_visibly(
    bff: Bff, browser: aiohttp.ClientSession
) -> None:
    await bff.login(browser)
    async with browser.get(f"{bff.url}/api/reset", headers=CSRF) as resp:
        assert resp.status == 200
        assert resp.content_length == 1024 * 1024
        with pytest.raises(aiohttp.ClientPayloadError):
            await resp.read()
    # bff is still fine afterwards.
    async with browser.get(f"{bff.url}/api/orders", headers=CSRF) as resp:
        assert resp.status == 200


async def test_an_upstream_redirect_is_passed_on_not_followed(
    bff: Bff, browser: aiohttp.ClientSession
) -> None:
    await bff.login(browser)
    async with browser.get(f"{bff.url}/api/redirect", headers=CSRF, allow_redirects=False) as resp:
        assert resp.status == 302
        assert resp.headers["Location"] == "/elsewhere"
    assert len(bff.upstream.seen) == 1


async def test_a_head_request_keeps_the_upstreams_content_length(
    bff: Bff, browser: aiohttp.ClientSession
) -> None:
    await bff.login(browser)
    async with browser.head(f"{bff.url}/api/download?size=12345", headers=CSRF) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Length"] == "12345"
    assert bff.upstream.seen[-1].method == "HEAD"


# -------------------------------------------------------------------------------------------------
# Streaming


async def test_a_server_sent_event_arrives_before_the_upstream_closes_the_stream(
    bff: Bff, browser: aiohttp.ClientSession
) -> None:
    await bff.login(browser)
    async with browser.get(f"{bff.url}/api/hold", headers=CSRF) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"] == "text/event-stream"
        first = await asyncio.wait_for(resp.content.readuntil(b"\n\n"), 5)
        assert first == b"data: first\n\n"
        assert not bff.upstream.release.is_set()  # the upstream is still holding the stream
        bff.upstream.release.set()
        assert await resp.content.read() == b"data: last\n\n"


async def test_an_upload_streams_to_the_upstream_before_it_is_complete(
    bff: Bff, browser: aiohttp.ClientSession
) -> None:
    """Would fail if bff read the whole body before forwarding it."""
    await bff.login(browser)
    chunk = b"u" * 256 * 1024

    async def body() -> AsyncIterator[bytes]:
        yield chunk
        deadline = time.monotonic() + 5
        while bff.upstream.received < len(chunk):
            assert time.monotonic() < deadline, "the first chunk never reached the upstream"
            await asyncio.sleep(0.01)
        yield chunk

    async with browser.post(f"{bff.url}/api/upload-progress", data=body(), headers=CSRF) as resp:
        assert resp.status == 200
        assert (await resp.json())["received"] == 2 * len(chunk)


def reset_peak_rss() -> None:
    """Linux: writing 5 to clear_refs resets VmHWM, the peak resident set size."""
    Path("/proc/self/clear_refs").write_text("5")


def status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field}")


async def test_50_mb_each_way_stream_through_with_bounded_memory(
    bff: Bff, browser: aiohttp.ClientSession
) -> None:
    """bff, the upstream and the client all live in this process: a buffered body would show."""
    await bff.login(browser)
    size = 50 * 1024 * 1024
    block = os.urandom(64 * 1024)
    reset_peak_rss()
    baseline = status_kib("VmRSS")

    sent = hashlib.sha256()

    async def body() -> AsyncIterator[bytes]:
        for _ in range(size // len(block)):
            sent.update(block)
            yield block

    async with browser.post(f"{bff.url}/api/blob", data=body(), headers=CSRF) as resp:
        assert resp.status == 200
    assert bff.upstream.seen[-1].body_len == size
    assert bff.upstream.seen[-1].body_sha256 == sent.hexdigest()

    received = 0
    async with browser.get(f"{bff.url}/api/download?size={size}", headers=CSRF) as resp:
        assert resp.status == 200
        assert resp.content_length == size
        async for chunk in resp.content.iter_chunked(64 * 1024):
            received += len(chunk)
    assert received == size
    # Peak, not final: a buffered 50 MB body would be freed again by now.
    assert status_kib("VmHWM") - baseline < 25 * 1024, "memory grew with the body size"


# -------------------------------------------------------------------------------------------------
# WebSocket


async def test_a_websocket_echo_works_through_the_proxy(
    bff: Bff, browser: aiohttp.ClientSession
) -> None:
    session = await bff.login(browser)
    async with browser.ws_connect(
        f"{bff.url}/api/ws/chat?room=1", origin=bff.url, protocols=("chat",)
    ) as ws:
        assert ws.protocol == "chat"
        await ws.send_str("hello")
        assert (await ws.receive(timeout=5)).data == "hello"
        await ws.send_bytes(b"\x00\x01")
        assert (await ws.receive(timeout=5)).data == b"\x00\x01"
    seen = bff.upstream.seen[-1]
    assert seen.path == "/ws/chat?room=1"
    assert seen.header("authorization") == f"Bearer {session.data.access_token}"
    assert "cookie" not in seen.headers


async def test_a_websocket_without_a_session_is_refused(bff: Bff) -> None:
    async with aiohttp.ClientSession() as http:
        with pytest.raises(aiohttp.WSServerHandshakeError) as caught:
            await http.ws_connect(f"{bff.url}/api/ws/chat", origin=bff.url)
    assert caught.value.status == 401
    assert bff.upstream.seen == []


WS_KEY = "dGhlIHNhbXBsZSBub25jZQ=="


@pytest.mark.parametrize(
    ("method", "connection", "key", "version"),
    [
        ("GET", "Upgrade", "MARKws1", "13"),
        ("GET", "Upgrade", WS_KEY, "MARKws2"),
        ("GET", "MARKws3", WS_KEY, "13"),
        ("GET", "Upgrade", WS_KEY, "8"),
        ("GET", "Upgrade", WS_KEY + "!MARKws4", "13"),
        ("GET", "Upgrade", None, "13"),
        ("POST", "Upgrade", WS_KEY, "13"),
    ],
    ids=["bad-key", "bad-version", "no-connection-upgrade", "v8", "junk-key", "no-key", "post"],
)
async def test_a_bad_websocket_handshake_is_a_fixed_400_before_any_upstream_socket(
    bff: Bff,
    browser: aiohttp.ClientSession,
    method: str,
    connection: str,
    key: str | None,
    version: str,
) -> None:
    """RFC 6455 4.1. aiohttp's prepare() would answer a text page quoting the bad header (the
    review's MARKws markers), after the upstream socket, with the bearer, had been opened."""
    await bff.login(browser)
    lines = [f"{method} /api/ws/chat HTTP/1.1", f"Origin: {bff.url}", "Upgrade: websocket"]
    lines += [f"Connection: {connection}, close", f"Sec-WebSocket-Version: {version}"]
    lines += [f"Cookie: {cookie_header(bff, browser)['Cookie']}", "Content-Length: 0"]
    if key is not None:
        lines.append(f"Sec-WebSocket-Key: {key}")
    host, port = bff.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(
        ("\r\n".join([lines[0], f"Host: {host}:{port}", *lines[1:]]) + "\r\n\r\n").encode()
    )
    await writer.drain()
    data = await asyncio.wait_for(reader.read(), 10)  # bff closes: the request said close
    writer.close()
    assert data.startswith(b"HTTP/1.1 400 "), data[:200]
    assert b"MARKws" not in data
    assert b"content-type: application/json" in data.lower()
    # The front door refuses a websocket upgrade on a POST before any handler (bff.server).
    description = "malformed request" if method == "POST" else "not a valid WebSocket handshake"
    assert json.loads(data.partition(b"\r\n\r\n")[2]) == {
        "error": "invalid_request",
        "error_description": description,
    }
    assert bff.upstream.seen == []  # no upstream handshake at all


async def test_offered_subprotocols_the_upstream_refused_are_not_logged(
    bff: Bff, browser: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    """aiohttp warns with the browser's offered subprotocols when none is agreed on: request
    bytes in a log line. The upstream here speaks only "chat"."""
    await bff.login(browser)
    caplog.set_level(logging.DEBUG)
    async with browser.ws_connect(
        f"{bff.url}/api/ws/chat", origin=bff.url, protocols=("MARKproto",)
    ) as ws:
        assert ws.protocol is None
        await ws.send_str("hello")
        assert (await ws.receive(timeout=5)).data == "hello"
    assert bff.upstream.seen[-1].header("sec-websocket-protocol") == "MARKproto"  # it was sent
    assert not [r for r in caplog.records if "MARKproto" in r.getMessage()]


async def test_a_websocket_to_a_dead_upstream_gives_502(
    bff: Bff, browser: aiohttp.ClientSession
) -> None:
    await bff.login(browser)
    with pytest.raises(aiohttp.WSServerHandshakeError) as caught:
        await browser.ws_connect(f"{bff.url}/api/dead-ws/x", origin=bff.url)
    assert caught.value.status == 502


async def test_a_websocket_closed_by_the_upstream_closes_the_browsers(
    bff: Bff, browser: aiohttp.ClientSession
) -> None:
    await bff.login(browser)
    async with browser.ws_connect(f"{bff.url}/api/ws/chat", origin=bff.url) as ws:
        await ws.send_str("hi")
        assert (await ws.receive(timeout=5)).data == "hi"
        await ws.send_str("bye")  # the upstream closes with 4000
        msg = await ws.receive(timeout=5)
        assert msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSED, WSMsgType.CLOSING)
    assert ws.close_code == 4000


@pytest.mark.parametrize("origin", ["https://evil.example", None])
async def test_a_websocket_from_a_foreign_origin_is_refused(
    bff: Bff, browser: aiohttp.ClientSession, origin: str | None
) -> None:
    await bff.login(browser)
    with pytest.raises(aiohttp.WSServerHandshakeError) as caught:
        await browser.ws_connect(f"{bff.url}/api/ws/chat", origin=origin)
    assert caught.value.status == 403
    assert bff.upstream.seen == []


async def test_a_websocket_is_closed_within_5_s_after_its_session_ends(
    bff: Bff, browser: aiohttp.ClientSession
) -> None:
    session = await bff.login(browser)
    async with browser.ws_connect(f"{bff.url}/api/ws/chat", origin=bff.url) as ws:
        await ws.send_str("ping")
        assert (await ws.receive(timeout=5)).data == "ping"
        ended_at = time.monotonic()
        assert await bff.services.sessions.end_matching(sub=session.data.sub) == 1
        msg = await ws.receive(timeout=5)
        assert msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSED, WSMsgType.CLOSING)
        assert time.monotonic() - ended_at < 5
        assert ws.close_code == 1008


async def test_an_event_stream_is_closed_after_its_session_ends(
    bff: Bff, browser: aiohttp.ClientSession
) -> None:
    session = await bff.login(browser)
    async with browser.get(f"{bff.url}/api/hold", headers=CSRF) as resp:
        assert await resp.content.readuntil(b"\n\n") == b"data: first\n\n"
        ended_at = time.monotonic()
        await bff.services.sessions.end_matching(sub=session.data.sub)
        with pytest.raises(aiohttp.ClientPayloadError):
            await asyncio.wait_for(resp.content.read(), 5)
        assert time.monotonic() - ended_at < 5


# -------------------------------------------------------------------------------------------------
# Issue 9, point 4: header hygiene by meaning; no way around a route's `methods:`


OVERRIDE_HEADERS = [
    ("X-HTTP-Method-Override", "DELETE"),
    ("x_http_method_override", "DELETE"),
    ("X_HTTP_METHOD", "DELETE"),
    ("X-Method-Override", "DELETE"),
    ("x-original-method", "DELETE"),
    ("X_Original_URL", "/admin"),
    ("X-Rewrite-Url", "/admin"),
    ("X_Forwarded_For", "6.6.6.6"),
    ("X-FORWARDED-HOST", "evil.example"),
    ("x_forwarded_proto", "gopher"),
    ("Forwarded", "for=6.6.6.6"),
    ("X-Real-IP", "6.6.6.6"),
    ("X_Real_Ip", "6.6.6.6"),
    ("True-Client-IP", "6.6.6.6"),
    ("CF_Connecting_IP", "6.6.6.6"),
    ("Fastly-Client-IP", "6.6.6.6"),
    ("X-Client-IP", "6.6.6.6"),
]


async def test_overrides_and_client_addresses_in_any_spelling_never_reach_the_upstream(
    bff: Bff, browser: aiohttp.ClientSession
) -> None:
    await bff.login(browser)
    headers = CIMultiDict([*CSRF.items(), *OVERRIDE_HEADERS])
    async with browser.post(
        f"{bff.url}/api/no-delete/1?_method=DELETE&keep=1&%5FMETHOD=PUT",
        headers=headers,
        data=b"{}",
    ) as resp:
        assert resp.status == 200, await resp.text()
    seen = bff.upstream.seen[-1]
    assert (seen.method, seen.path) == ("POST", "/up/no-delete/1?keep=1")
    values = [v for vs in seen.headers.values() for v in vs]
    for planted in ("DELETE", "/admin", "6.6.6.6", "evil.example", "gopher"):
        assert not any(planted in v for v in values), (planted, seen.headers)
    assert seen.headers["x-forwarded-for"] == ["127.0.0.1"]
    assert seen.header("x-forwarded-proto") == "http"
    # DELETE itself is still refused, so nothing above was a way around it.
    async with browser.delete(f"{bff.url}/api/no-delete/1", headers=CSRF) as resp:
        assert resp.status == 405


async def test_a_websocket_handshake_gets_the_same_hygiene(
    bff: Bff, browser: aiohttp.ClientSession
) -> None:
    await bff.login(browser)
    async with browser.ws_connect(
        f"{bff.url}/api/ws/chat?_method=DELETE&room=1",
        origin=bff.url,
        headers=CIMultiDict(OVERRIDE_HEADERS),
    ) as ws:
        await ws.send_str("hello")
        assert (await ws.receive(timeout=5)).data == "hello"
    seen = bff.upstream.seen[-1]
    assert seen.path == "/ws/chat?room=1"
    values = [v for vs in seen.headers.values() for v in vs]
    for planted in ("DELETE", "/admin", "6.6.6.6", "evil.example", "gopher"):
        assert not any(planted in v for v in values), (planted, seen.headers)
    assert seen.headers["x-forwarded-for"] == ["127.0.0.1"]
    assert seen.headers["forwarded"] == [
        f'for=127.0.0.1;host="{bff.url.removeprefix("http://")}";proto=http'
    ]


def form_body(*fields: tuple[str, str]) -> aiohttp.FormData:
    form = aiohttp.FormData()
    for name, value in fields:
        form.add_field(name, value)
    return form


async def test_a_form_body_with_an_override_is_refused_and_never_reaches_the_upstream_whole(
    bff: Bff, browser: aiohttp.ClientSession
) -> None:
    await bff.login(browser)
    multipart = aiohttp.FormData()
    multipart.add_field("file", b"x" * 200_000, filename="a.bin")
    multipart.add_field("_method", "DELETE")
    bodies: list[Any] = [
        form_body(("a", "1"), ("_method", "DELETE")),
        form_body(("a", "1"), ("_METHOD", "DELETE")),
        multipart,
    ]
    json_body = {"data": {"id": 1}, "_method": "DELETE"}  # Laravel reads this one too
    for body in [*bodies, aiohttp.JsonPayload(json_body)]:
        async with browser.post(f"{bff.url}/api/no-delete/1", headers=CSRF, data=body) as resp:
            assert resp.status == 400
            assert await resp.json() == {
                "error": "method_override",
                "error_description": "a method override parameter is not accepted on this route",
            }
    # The upstream may have seen a start, never a whole body.
    assert all(s.body_sha256 == "" for s in bff.upstream.seen), bff.upstream.seen


async def test_form_bodies_without_an_override_pass_intact(
    bff: Bff, browser: aiohttp.ClientSession
) -> None:
    await bff.login(browser)
    payload = os.urandom(300_000)
    multipart = aiohttp.FormData()
    multipart.add_field("title", "_method=DELETE is a value")
    multipart.add_field("file", payload, filename="_method")
    json_body = aiohttp.JsonPayload({"paymentMethod": "card", "note": "_method"})
    for body in (form_body(("a", "1"), ("q", "_method")), multipart, json_body):
        async with browser.post(f"{bff.url}/api/no-delete/1", headers=CSRF, data=body) as resp:
            assert resp.status == 200, await resp.text()
        seen = bff.upstream.seen[-1]
        assert seen.body_len > 0 and seen.body_sha256 != ""
    # Without a `methods:` list an override gains nothing, and bodies are not scanned.
    async with browser.post(
        f"{bff.url}/api/x", headers=CSRF, data=form_body(("_method", "DELETE"))
    ) as resp:
        assert resp.status == 200
    assert bff.upstream.seen[-1].body_sha256 == hashlib.sha256(b"_method=DELETE").hexdigest()


# -------------------------------------------------------------------------------------------------
# Issue 9, point 6: a user's answer is never stored by a shared cache


async def test_answers_on_user_routes_are_private_and_others_keep_the_upstreams_caching(
    bff: Bff, browser: aiohttp.ClientSession
) -> None:
    async def cache_headers(http: aiohttp.ClientSession, path: str) -> tuple[str, str | None]:
        url = URL(f"{bff.url}{path}").with_query(cc="public, max-age=60, s-maxage=600")
        async with http.get(url, headers=CSRF) as resp:
            assert resp.status == 200, await resp.text()
            return resp.headers["Cache-Control"], resp.headers.get("Surrogate-Control")

    async with aiohttp.ClientSession() as anonymous:
        # user_or_none without a session: the same URL answers differently once logged in.
        assert await cache_headers(anonymous, "/api/maybe/x") == ("private, max-age=60", None)
        public = ("public, max-age=60, s-maxage=600", "max-age=600")
        assert await cache_headers(anonymous, "/api/public/x") == public
        assert await cache_headers(anonymous, "/api/service/x") == public
    await bff.login(browser)
    assert await cache_headers(browser, "/api/x") == ("private, max-age=60", None)
    assert await cache_headers(browser, "/api/maybe/x") == ("private, max-age=60", None)
    async with browser.get(f"{bff.url}/api/x", params={"cc": "no-store"}, headers=CSRF) as resp:
        assert resp.headers["Cache-Control"] == "no-store"
    # A streamed answer (bigger than SMALL_BODY) too.
    async with browser.get(
        f"{bff.url}/api/download", params={"size": str(SMALL_BODY * 2)}, headers=CSRF
    ) as resp:
        assert resp.status == 200
        assert resp.headers["Cache-Control"] == "private"
        await resp.read()


# -------------------------------------------------------------------------------------------------
# Issue 9, point 6: two cookies of one name are no cookie


async def raw_lines(url: str, lines: list[str]) -> tuple[int, bytes]:
    """One request: its request line and header lines as given (several Cookie lines too)."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    head = [lines[0], f"Host: {host}:{port}", "Connection: close", *lines[1:]]
    writer.write(("\r\n".join(head) + "\r\n\r\n").encode())
    await writer.drain()
    data = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    return int(data.split(b" ", 2)[1]), data.partition(b"\r\n\r\n")[2]


async def test_two_session_cookies_make_an_anonymous_request(
    bff: Bff, browser: aiohttp.ClientSession
) -> None:
    await bff.login(browser)
    good = cookie_header(bff, browser)["Cookie"]
    planted = f"{COOKIE}=planted-by-a-sibling"
    start = "GET /bff/user HTTP/1.1"
    assert (await raw_lines(bff.url, [start, "X-CSRF: 1", f"Cookie: {good}"]))[0] == 200
    for cookies in (
        [f"Cookie: {good}; {planted}"],
        [f"Cookie: {planted}; {good}"],
        [f"Cookie: {good}; {good}"],
        [f"Cookie: {good}", f"Cookie: {planted}"],
        [f"Cookie: {planted}", f"Cookie: {good}"],
    ):
        for target in ("/bff/user", "/api/x", "/api/maybe/x"):
            status, body = await raw_lines(
                bff.url, [f"GET {target} HTTP/1.1", "X-CSRF: 1", *cookies]
            )
            expected = 200 if target == "/api/maybe/x" else 401
            assert status == expected, (target, cookies, body)
    # On the user_or_none route the two-cookie calls went out anonymous.
    maybe = [s for s in bff.upstream.seen if s.path.startswith("/up/maybe")]
    assert len(maybe) == 5 and all("authorization" not in s.headers for s in maybe)
    # Quotes do not hide a cookie (the review's header strings): browsers split on ";" with no
    # quoted strings, so a planted valid session next to the victim's is still two sessions.
    async with browser_session(bff.url) as attacker:
        await bff.login(attacker)
        planted = cookie_header(bff, attacker)["Cookie"]
    assert (await raw_lines(bff.url, [start, "X-CSRF: 1", f"Cookie: {planted}"]))[0] == 200
    for line in (
        f'Cookie: {planted}; a="x\\"; {good}; y="',
        f'Cookie: {planted}; a="x; {good}"',
        f'Cookie: a="x\\"; {good}; y="; {planted}',
    ):
        status, body = await raw_lines(bff.url, [start, "X-CSRF: 1", line])
        assert status == 401, (line, body)
