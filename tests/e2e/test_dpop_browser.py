"""DPoP (RFC 9449) in a real Chromium: a person logs in with the demo SPA and calls the API through
bff; the upstream (``tests/support/dpop_upstream.py``) takes the call only with a valid proof of
the key the OP bound the token to, and no token, proof or key ever reaches the browser."""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator, Iterator

import pytest
from playwright.async_api import Browser, Response, expect

from bff.app import create_app
from bff.config import parse_settings
from bff.services import SERVICES
from tests.e2e.conftest import STATIC, Bff, DemoApi, _serve, log_in
from tests.support.dpop_upstream import DpopUpstream
from tests.support.procs import OidcProvider, RedisServer, free_port


@pytest.fixture(scope="module")
def dpop_op() -> Iterator[OidcProvider]:
    if shutil.which("node") is None:
        pytest.skip("node not found on PATH")
    with OidcProvider(access_ttl=60, dpop=True, dpop_nonce=True) as op:
        yield op


@pytest.fixture
async def upstream(dpop_op: OidcProvider) -> AsyncIterator[DpopUpstream]:
    rs = await dpop_op.register_client(grant_types=("client_credentials",), scope="api:read")
    api = DpopUpstream(
        introspection=f"{dpop_op.issuer}/token/introspection",
        client=(rs["client_id"], rs["client_secret"]),
        require_nonce=True,  # the upstream's nonce dance, in the browser's flow too
    )
    await api.start()
    try:
        yield api
    finally:
        await api.close()


@pytest.fixture
async def dpop_bff(
    dpop_op: OidcProvider, redis_server: RedisServer, upstream: DpopUpstream
) -> AsyncIterator[Bff]:
    port = free_port()
    public = f"http://localhost:{port}"
    client = await dpop_op.register_client(
        redirect_uris=[f"{public}/bff/callback"],
        scope="openid profile email",
        dpop_bound_access_tokens=True,
    )
    settings = parse_settings(
        f"""
public_url: {public}
static: {STATIC}
oidc:
  issuer: {dpop_op.issuer}
  client_id: {client["client_id"]}
  client_secret: {client["client_secret"]}
  scopes: [openid, profile, email]
  dpop: true
session:
  store: {redis_server.url}
keys: ["{"e2e-dpop-" * 5}"]
upstreams:
  - path: /api/demo
    url: {upstream.url}/demo
""",
        source="<e2e-dpop>",
    )
    app = create_app(settings)
    runner = await _serve(app, port)
    try:
        await app[SERVICES].oidc.metadata()
        yield Bff(
            url=public,
            settings=settings,
            services=app[SERVICES],
            op=dpop_op,
            api=DemoApi(url=upstream.url, stats=None),  # type: ignore[arg-type]
        )
    finally:
        await runner.cleanup()


async def test_a_person_logs_in_and_calls_a_dpop_api_through_bff(
    browser: Browser, dpop_bff: Bff, upstream: DpopUpstream
) -> None:
    context = await browser.new_context()
    page = await context.new_page()
    seen: list[Response] = []
    page.on("response", lambda response: seen.append(response))
    await log_in(page, dpop_bff, "dpop-person")
    data = await dpop_bff.session_data(context)
    assert data is not None and data.dpop_jwk is not None
    await page.click("#call-api")
    await expect(page.locator("#api-status")).to_contain_text("Call #1: 200")
    await page.click("#call-api")
    await expect(page.locator("#api-status")).to_contain_text("Call #2: 200")
    # The upstream refused the first proof for want of its nonce; bff did the dance, then every
    # call was accepted, each with a new proof of the session's key.
    calls = upstream.calls
    assert [c.verdict for c in calls] == ["use_dpop_nonce", "ok", "ok"]
    assert calls[1].token == data.access_token and len({c.proof for c in calls}) == 3
    # Nothing of it reached the browser.
    secrets = [data.access_token, data.dpop_jwk["d"], *(c.proof or "" for c in calls)]
    for response in seen:
        headers = " ".join(f"{k}: {v}" for k, v in (await response.all_headers()).items())
        body = ""
        if response.request.resource_type in ("fetch", "xhr", "document"):
            try:
                body = await response.text()
            except Exception:  # a redirect or a page left at once has no body to read
                body = ""
        for secret in secrets:
            assert secret not in headers and secret not in body, response.url
    assert "DPoP" not in (await page.evaluate("document.cookie"))
    await context.close()
