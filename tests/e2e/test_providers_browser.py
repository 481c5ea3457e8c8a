"""Issue 12, points 4-5 in real Chromium: a login at the second of two providers, through PAR.

Provider ``a`` (the default) is the suite's shared OP; provider ``b`` is a second oidc-provider
that offers pushed authorization requests, which bff then uses (``par: auto``). The person opens
``/bff/login?idp=b``, signs in at B's own page and lands in the app with a session at ``b``; the
only authorization URL the browser ever saw carries ``client_id`` and ``request_uri`` alone.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from urllib.parse import parse_qs, urlsplit

import pytest
from aiohttp import web
from playwright.async_api import Browser, Request, expect

from bff.app import create_app
from bff.config import parse_settings
from bff.services import SERVICES
from tests.e2e.conftest import PASSWORD, SIGNED_OUT, STATIC
from tests.support.procs import OidcProvider, RedisServer, free_port


@pytest.fixture(scope="module")
def op_b() -> Iterator[OidcProvider]:
    with OidcProvider(par="optional", cookie_prefix="e2eb") as op:
        yield op


@pytest.fixture
async def two_url(
    oidc_op: OidcProvider, op_b: OidcProvider, redis_server: RedisServer
) -> AsyncIterator[str]:
    port = free_port()
    public = f"http://localhost:{port}"
    clients = []
    for op, callback in ((oidc_op, "/bff/callback"), (op_b, "/bff/callback/b")):
        clients.append(
            await op.register_client(
                redirect_uris=[f"{public}{callback}"],
                post_logout_redirect_uris=[f"{public}{SIGNED_OUT}"],
                scope="openid profile email",
            )
        )
    a, b = clients
    settings = parse_settings(
        f"""
public_url: {public}
static: {STATIC}
oidc:
  - name: a
    issuer: {oidc_op.issuer}
    client_id: {a["client_id"]}
    client_secret: {a["client_secret"]}
    scopes: [openid, profile, email]
    post_logout_redirect: {SIGNED_OUT}
  - name: b
    issuer: {op_b.issuer}
    client_id: {b["client_id"]}
    client_secret: {b["client_secret"]}
    scopes: [openid, profile, email]
    post_logout_redirect: {SIGNED_OUT}
session:
  store: {redis_server.url}
  cache_ttl: 0s
keys: ["{"e2e-key-" * 6}"]
""",
        source="<e2e>",
    )
    app = create_app(settings)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        for client in app[SERVICES].providers.values():
            await client.metadata()  # discovery done before the browser arrives
        yield public
    finally:
        await runner.cleanup()


async def test_a_person_logs_in_at_the_second_provider_through_par(
    two_url: str, op_b: OidcProvider, browser: Browser
) -> None:
    await op_b.reset_stats()
    context = await browser.new_context()
    page = await context.new_page()
    requests: list[Request] = []

    def seen(request: Request) -> None:
        requests.append(request)

    context.on("request", seen)

    await page.goto(f"{two_url}/bff/login?idp=b&returnTo=/")
    await page.wait_for_url(f"{op_b.issuer}/**")
    await page.fill("#login", "e2e-second")
    await page.fill("#password", PASSWORD)
    await page.click("#sign-in")
    await expect(page.locator("#logged-in")).to_be_visible(timeout=15_000)
    await expect(page.locator("#claims")).to_contain_text('"sub": "e2e-second"')

    # The authorization request the browser made at B: client_id and request_uri, nothing else.
    authorize = [  # (/auth/<uid> is where the OP resumes after its own login form)
        r
        for r in requests
        if r.url.startswith(f"{op_b.issuer}/") and urlsplit(r.url).path == "/auth"
    ]
    assert len(authorize) == 1
    query = parse_qs(urlsplit(authorize[0].url).query)
    assert set(query) == {"client_id", "request_uri"}
    assert query["request_uri"][0].startswith("urn:ietf:params:oauth:request_uri:")
    assert (await op_b.stats())["par_requests"] == 1
    # It came back on B's own redirect URI, and the session says which provider it is at.
    assert any(urlsplit(r.url).path == "/bff/callback/b" for r in requests)
    me = await page.evaluate("fetch('/bff/user', {headers: {'X-CSRF': '1'}}).then(r => r.json())")
    assert me["idp"] == "b" and me["sub"] == "e2e-second"
    await context.close()
