"""Issue 12 in a real browser: log in, call a resource route and an exchange route; each upstream
gets a token for its own audience, and the page never sees any of the tokens involved."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any, cast

import pytest
from aiohttp import web
from playwright.async_api import Browser

from bff.app import create_app
from bff.config import parse_settings
from bff.oidc import TOKEN_EXCHANGE_GRANT
from bff.services import SERVICES
from tests.e2e.conftest import STATIC, Bff, log_in
from tests.e2e.test_browser import Traffic, encodings, page_state
from tests.support.bff_procs import EchoUpstream
from tests.support.procs import OidcProvider, RedisServer, free_port

ORDERS = "https://orders.test/api"
REPORTS = "https://reports.test/api"


@pytest.fixture(scope="module")
def resource_op() -> Iterator[OidcProvider]:
    servers = {ORDERS: {"scope": "api:read"}, REPORTS: {"scope": "api:read"}}
    with OidcProvider(access_ttl=60, resource_servers=servers, token_exchange=True) as op:
        yield op


@pytest.fixture
def upstreams() -> Iterator[tuple[EchoUpstream, EchoUpstream]]:
    with EchoUpstream() as orders, EchoUpstream() as reports:
        yield orders, reports


@pytest.fixture
async def resource_bff(
    resource_op: OidcProvider,
    redis_server: RedisServer,
    upstreams: tuple[EchoUpstream, EchoUpstream],
) -> AsyncIterator[Bff]:
    port = free_port()
    public = f"http://localhost:{port}"
    client = await resource_op.register_client(
        redirect_uris=[f"{public}/bff/callback"],
        grant_types=["authorization_code", "refresh_token", TOKEN_EXCHANGE_GRANT],
    )
    settings = parse_settings(
        f"""
public_url: {public}
static: {STATIC}
oidc:
  issuer: {resource_op.issuer}
  client_id: {client["client_id"]}
  client_secret: {client["client_secret"]}
  scopes: [openid, profile, email, api:read]
session:
  store: {redis_server.url}
keys: ["{"e2e-key-" * 6}"]
upstreams:
  - path: /api/orders
    url: {upstreams[0].url}
    resource: {ORDERS}
  - path: /api/reports
    url: {upstreams[1].url}
    token: exchange
    audience: {REPORTS}
""",
        source="<e2e>",
    )
    app = create_app(settings)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        await app[SERVICES].oidc.metadata()
        yield Bff(public, settings, app[SERVICES], resource_op, cast(Any, None))
    finally:
        await runner.cleanup()


async def test_a_resource_route_and_an_exchange_route_from_the_page_never_show_it_a_token(
    resource_bff: Bff, browser: Browser, upstreams: tuple[EchoUpstream, EchoUpstream]
) -> None:
    context = await browser.new_context()
    page = await context.new_page()
    traffic = Traffic()
    traffic.attach(context)
    await log_in(page, resource_bff, "e2e-resource", settle=traffic.settle)
    answers = await page.evaluate(
        """async () => {
            const out = [];
            for (const path of ['/api/orders/mine', '/api/reports/mine']) {
                const r = await fetch(path, {headers: {'X-CSRF': '1'}});
                out.push([r.status, await r.json()]);
            }
            return out;
        }"""
    )
    assert [status for status, _ in answers] == [200, 200]
    await traffic.settle()
    state = await page_state(page)

    orders, reports = upstreams
    orders_token, reports_token = orders.seen()[-1].token, reports.seen()[-1].token
    assert orders_token and reports_token and orders_token != reports_token
    data = await resource_bff.session_data(context)
    assert data is not None and data.resource_tokens[ORDERS]["t"] == orders_token
    tokens = {orders_token, reports_token, data.access_token, data.refresh_token, data.id_token}
    seen = [*traffic.texts, state, str(answers)]
    for token in filter(None, tokens):
        for form in encodings(token):
            assert not [t for t in seen if form in t], "a token reached the browser"
    await context.close()
