"""The whole path in a real browser through nginx in edge mode (issue 11, point 2: "the Chromium
test covers one edge").

nginx runs the shipped ``deploy/edge/nginx.conf`` at ``http://localhost:PORT`` (the public
origin); bff (in this process, ``trusted_proxies: [127.0.0.1/32]``) sits behind it and only
answers nginx's ``/bff/authz`` for API calls, which nginx proxies to the demo API itself. The
person logs in, calls the API, outlives an access token, and logs out; no token may reach the
browser at any point, and the API sees the user's bearer every time.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from aiohttp import web
from playwright.async_api import Browser, expect

from bff.app import create_app
from bff.config import parse_settings
from bff.services import SERVICES
from tests.e2e.conftest import OP_ACCESS_TTL, SIGNED_OUT, STATIC, Bff, DemoApi, log_in
from tests.e2e.test_browser import Traffic, call_api, encodings, page_state
from tests.support.edge_procs import NginxEdge, edge_missing
from tests.support.procs import OidcProvider, RedisServer, free_port


@pytest.fixture
async def edge_bff(
    oidc_op: OidcProvider, redis_server: RedisServer, demo_api: DemoApi
) -> AsyncIterator[Bff]:
    """bff behind the shipped nginx config; ``Bff.url`` is nginx's (the public origin)."""
    missing = edge_missing("nginx")
    if missing is not None:
        pytest.skip(missing)
    edge = NginxEdge()
    public = f"http://localhost:{edge.port}"
    client = await oidc_op.register_client(
        redirect_uris=[f"{public}/bff/callback"],
        post_logout_redirect_uris=[f"{public}{SIGNED_OUT}"],
        scope="openid profile email offline_access",
    )
    settings = parse_settings(
        f"""
public_url: {public}
static: {STATIC}
trusted_proxies: [127.0.0.1/32]
oidc:
  issuer: {oidc_op.issuer}
  client_id: {client["client_id"]}
  client_secret: {client["client_secret"]}
  scopes: [openid, profile, email]
  refresh_skew: 1s
  post_logout_redirect: {SIGNED_OUT}
session:
  store: {redis_server.url}
  cache_ttl: 0s
keys: ["{"edge-key-" * 6}"]
upstreams:
  - path: /api
    url: {demo_api.url}
    token: user
""",
        source="<e2e-edge>",
    )
    app = create_app(settings)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        await app[SERVICES].oidc.metadata()
        edge.configure(port, int(demo_api.url.rsplit(":", 1)[1]))
        await asyncio.to_thread(edge.start)  # its readiness check goes through this loop's bff
        yield Bff(url=public, settings=settings, services=app[SERVICES], op=oidc_op, api=demo_api)
    finally:
        await asyncio.to_thread(edge.close)
        await runner.cleanup()


async def test_the_whole_flow_through_nginx_reaches_the_api_and_no_token_the_browser(
    edge_bff: Bff, browser: Browser
) -> None:
    bff = edge_bff
    context = await browser.new_context()
    page = await context.new_page()
    traffic = Traffic()
    traffic.attach(context)
    tokens: set[str] = set()
    states: list[str] = []

    async def collect() -> None:
        data = await bff.session_data(context)
        assert data is not None, "no live session for the browser's cookie"
        tokens.update(t for t in (data.access_token, data.refresh_token, data.id_token) if t)
        states.append(await page_state(page))

    await log_in(page, bff, "edge-e2e", settle=traffic.settle)
    await collect()
    calls = bff.api.stats.with_token
    await call_api(page, 1, 200)
    await expect(page.locator("#api-result")).to_contain_text('"sub": "edge-e2e"')
    first = await bff.session_data(context)
    await asyncio.sleep(OP_ACCESS_TTL + 1.5)  # the access token expires; bff refreshes it
    async with page.expect_response(lambda r: r.url.endswith("/bff/user")) as user:
        await call_api(page, 2, 200)
    await (await user.value).finished()
    await collect()
    refreshed = await bff.session_data(context)
    assert first is not None and refreshed is not None
    assert refreshed.access_token != first.access_token
    # The API validated a bearer at the OP on both calls: nginx attached bff's answer.
    assert bff.api.stats.with_token == calls + 2
    assert all("/api/" not in r.url or r.status == 200 for r in traffic.responses)

    await traffic.settle()
    await page.click("#logout")
    await page.click("#logout-yes")
    await page.wait_for_url(f"{bff.url}{SIGNED_OUT}*")
    assert await bff.session_data(context) is None
    await call_api(page, 1, 401)  # through nginx: bff's 401 after the logout
    states.append(await page_state(page))
    await traffic.settle()

    assert len(tokens) >= 4
    seen = traffic.texts + states
    for token in tokens:
        for form in encodings(token):
            leaks = [text[:200] for text in seen if form in text]
            assert not leaks, f"a token reached the browser: {leaks}"
    await context.close()
