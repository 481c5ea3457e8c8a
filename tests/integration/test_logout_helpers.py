"""Helpers of the logout and session-control integration tests (no tests here).

``running_bff`` serves a real ``create_app`` on a loopback port, against the real redis-server and
an OP (the real oidc-provider, or the hostile in-process one); ``bff_login`` walks a browser
through ``/bff/login`` -> OP -> ``/bff/callback``; ``peek_session`` opens the session a cookie
jar holds, the way only the cookie holder can, so a test can look for its tokens elsewhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from aiohttp import web
from aiohttp.test_utils import TestServer
from yarl import URL

from bff.app import create_app
from bff.config import Settings, parse_settings
from bff.keys import Keyring, SessionSecret, store_id
from bff.sessions import Session, SessionManager
from bff.store.redis import RedisStore
from tests.support.procs import OidcProvider, free_port, op_login

KEY = secrets.token_urlsafe(32)
COOKIE = "__Host-bff"
LANDING = "/signed-out"


def config_yaml(
    *,
    port: int,
    issuer: str,
    client_id: str,
    client_secret: str,
    redis_url: str,
    static: Path,
    session: Mapping[str, str] | None = None,
    upstreams: str = "",
) -> str:
    session_yaml = "".join(f"\n  {k}: {v}" for k, v in (session or {}).items())
    return f"""\
public_url: http://127.0.0.1:{port}
listen: {{host: 127.0.0.1, port: {port}}}
static: {static}
oidc:
  issuer: {json.dumps(issuer)}
  client_id: {json.dumps(client_id)}
  client_secret: {json.dumps(client_secret)}
  scopes: [openid, profile, email]
  post_logout_redirect: {LANDING}
session:
  store: {redis_url}{session_yaml}
keys: [{KEY}]
log: {{level: warning}}
{upstreams}"""


def static_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "static"
    folder.mkdir(exist_ok=True)
    (folder / "index.html").write_text("<!doctype html><title>app</title><p>the SPA</p>")
    return folder


@dataclass
class RunningBff:
    settings: Settings
    server: TestServer

    @property
    def url(self) -> str:
        return self.settings.public_url


@contextlib.asynccontextmanager
async def running_bff(settings: Settings) -> AsyncIterator[RunningBff]:
    port = urlsplit(settings.public_url).port
    server = TestServer(create_app(settings), host="127.0.0.1", port=port)
    await server.start_server()
    try:
        yield RunningBff(settings, server)
    finally:
        await server.close()


async def registered_bff_client(
    op: OidcProvider, ports: list[int], *, backchannel_port: int | None = None, **metadata: Any
) -> dict[str, Any]:
    """Register one confidential client for bff instances on ``ports`` (one redirect each)."""
    urls = [f"http://127.0.0.1:{p}" for p in ports]
    target = backchannel_port if backchannel_port is not None else ports[0]
    return await op.register_client(
        redirect_uris=[f"{u}/bff/callback" for u in urls],
        post_logout_redirect_uris=[f"{u}{LANDING}" for u in urls],
        backchannel_logout_uri=f"http://127.0.0.1:{target}/bff/backchannel-logout",
        **metadata,
    )


def bff_settings(
    op: OidcProvider,
    client: Mapping[str, Any],
    redis_url: str,
    tmp_path: Path,
    port: int,
    *,
    api: str | None = None,
    **session: str,
) -> Settings:
    """Settings for one instance; ``api`` (an upstream base URL) is served at ``/api``."""
    upstreams = ""
    if api is not None:
        upstreams = f"upstreams:\n  - {{path: /api, url: {api}, token: user, websocket: true}}\n"
    return parse_settings(
        config_yaml(
            port=port,
            issuer=op.issuer,
            client_id=client["client_id"],
            client_secret=client["client_secret"],
            redis_url=redis_url,
            static=static_dir(tmp_path),
            session=session,
            upstreams=upstreams,
        )
    )


@contextlib.asynccontextmanager
async def echo_api() -> AsyncIterator[str]:
    """An upstream API: ``GET /hello`` says whether a bearer token came; ``/ws`` echoes."""

    async def hello(request: web.Request) -> web.Response:
        bearer = request.headers.get("Authorization", "").startswith("Bearer ")
        return web.json_response({"bearer": bearer})

    async def echo(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for msg in ws:
            if msg.type == aiohttp.WSMsgType.TEXT:
                await ws.send_str(f"echo:{msg.data}")
        return ws

    app = web.Application()
    app.router.add_get("/hello", hello)
    app.router.add_get("/ws", echo)
    server = TestServer(app, host="127.0.0.1", port=free_port())
    await server.start_server()
    try:
        yield f"http://127.0.0.1:{server.port}"
    finally:
        await server.close()


def new_port() -> int:
    return free_port()


async def bff_login(
    browser: aiohttp.ClientSession,
    bff_url: str,
    username: str = "alice",
    *,
    at_op: Callable[[aiohttp.ClientSession, str, str], Awaitable[str]] = op_login,
) -> None:
    """A whole login through bff; the browser holds the session cookie afterwards."""
    async with browser.get(f"{bff_url}/bff/login", allow_redirects=False) as resp:
        assert resp.status == 302, await resp.text()
        authorize = resp.headers["Location"]
    callback = await at_op(browser, authorize, username)
    assert callback.startswith(f"{bff_url}/bff/callback?"), callback
    async with browser.get(callback, allow_redirects=False) as resp:
        assert resp.status == 200, await resp.text()
    assert session_cookie(browser, bff_url) is not None


async def follow_to_callback(browser: aiohttp.ClientSession, authorize: str, _user: str) -> str:
    """For an OP that answers the authorization request at once (the hostile OP)."""
    async with browser.get(authorize, allow_redirects=False) as resp:
        assert resp.status == 302, await resp.text()
        return resp.headers["Location"]


def session_cookie(browser: aiohttp.ClientSession, bff_url: str) -> str | None:
    morsel = browser.cookie_jar.filter_cookies(URL(bff_url)).get(COOKIE)
    return morsel.value if morsel is not None and morsel.value else None


async def get_user(
    bff_url: str, *, browser: aiohttp.ClientSession | None = None, cookie: str | None = None
) -> tuple[int, dict[str, Any]]:
    """GET /bff/user as the SPA would; ``cookie`` sends that raw value instead of a jar's."""
    headers = {"X-CSRF": "1"}
    if cookie is not None:
        headers["Cookie"] = f"{COOKIE}={cookie}"
    async with contextlib.AsyncExitStack() as stack:
        http = browser or await stack.enter_async_context(aiohttp.ClientSession())
        async with http.get(f"{bff_url}/bff/user", headers=headers) as resp:
            return resp.status, await resp.json()


async def wait_for_status(
    expected: int, bff_url: str, *, within: float = 5.0, **kwargs: Any
) -> float:
    """Poll /bff/user until it answers ``expected``; returns how long that took."""
    start = time.monotonic()
    while True:
        status, _ = await get_user(bff_url, **kwargs)
        elapsed = time.monotonic() - start
        if status == expected:
            return elapsed
        assert elapsed < within, f"/bff/user still answers {status} after {within} s"
        await asyncio.sleep(0.1)


def secret_of(cookie: str) -> SessionSecret:
    value = Keyring([KEY]).unsign(cookie)
    assert value is not None
    return SessionSecret(value)


async def peek_session(redis_url: str, cookie: str) -> Session | None:
    """The session a cookie opens, read straight from the store (no bff instance involved)."""
    store = RedisStore.from_url(redis_url)
    try:
        manager = SessionManager(store, idle_timeout=3600, absolute_timeout=3600, cache_ttl=0)
        return await manager.load(secret_of(cookie), fresh=True)
    finally:
        await store.close()


async def store_traces(redis_url: str, cookie: str) -> list[str]:
    """Every Redis key that names, or whose set/index holds, the session of ``cookie``."""
    session_id = store_id(secret_of(cookie))
    store = RedisStore.from_url(redis_url)
    found: list[str] = []
    try:
        redis = store.client
        async for raw in redis.scan_iter(match="*", count=500):
            key = raw.decode() if isinstance(raw, bytes) else str(raw)
            if session_id in key:
                found.append(key)
                continue
            kind = await redis.type(key)
            kind = kind.decode() if isinstance(kind, bytes) else kind
            if kind == "zset":
                members = await redis.zrange(key, 0, -1)
                if any(session_id.encode() == m for m in members):
                    found.append(key)
            elif kind == "set" and await redis.sismember(key, session_id):
                found.append(key)
    finally:
        await store.close()
    return found


def url_recorder() -> tuple[aiohttp.TraceConfig, list[str]]:
    """A trace config that records every URL requested and every Location answered."""
    seen: list[str] = []

    async def on_start(_s: Any, _c: Any, params: aiohttp.TraceRequestStartParams) -> None:
        seen.append(str(params.url))

    async def on_end(_s: Any, _c: Any, params: aiohttp.TraceRequestEndParams) -> None:
        location = params.response.headers.get("Location")
        if location:
            seen.append(location)

    trace = aiohttp.TraceConfig()
    trace.on_request_start.append(on_start)
    trace.on_request_end.append(on_end)
    return trace, seen
