"""Browser tests: headless Chromium (Debian's /usr/bin/chromium) driven by Playwright.

The app runs at ``http://localhost:PORT`` and the OP at ``http://127.0.0.1:PORT2``: two different
*sites* for the browser (scheme + registrable domain), as in production, so the SameSite=Strict
session cookie and the OP's cross-site redirect back to ``/bff/callback`` are exercised for real.
Chromium treats ``http://localhost`` as a secure context, so the default ``__Host-bff`` Secure
cookie is kept there over plain HTTP.

Fixtures: ``redis_server`` and ``oidc_op`` (the integration suite's real redis-server and npm
oidc-provider, access-token TTL 5 s), ``demo_api`` (the demo's echo API), ``bff`` (an in-process
bff with the Redis store and the demo API at ``/api/demo``), ``browser`` (a fresh Chromium).
"""

from __future__ import annotations

import shutil
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from aiohttp import web  # noqa: E402
from playwright.async_api import Browser, BrowserContext, Page, async_playwright, expect  # noqa: E402

from bff.app import create_app  # noqa: E402
from bff.config import Settings, parse_settings  # noqa: E402
from bff.keys import SessionSecret  # noqa: E402
from bff.services import SERVICES, Services  # noqa: E402
from bff.sessions import SessionData  # noqa: E402
from demo.api import STATS, ApiStats, create_api  # noqa: E402
from tests.integration import conftest as integration  # noqa: E402
from tests.support.procs import OidcProvider, RedisServer, free_port  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
STATIC = ROOT / "static"
SIGNED_OUT = "/signed-out"  # oidc.post_logout_redirect: a client-side route of the demo SPA
PASSWORD = "pw"  # the test OP takes any non-empty password

__all__ = ["OP_ACCESS_TTL", "Bff", "DemoApi", "log_in"]

# The integration suite's session-scoped real redis-server and OP (access-token TTL 5 s).
OP_ACCESS_TTL = integration.OP_ACCESS_TTL
redis_server = integration.redis_server
oidc_op = integration.oidc_op


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.path.is_relative_to(HERE):
            item.add_marker(pytest.mark.e2e)


@dataclass
class DemoApi:
    url: str
    stats: ApiStats


@dataclass
class Bff:
    url: str  # http://localhost:PORT
    settings: Settings
    services: Services
    op: OidcProvider
    api: DemoApi

    @property
    def cookie_name(self) -> str:
        return self.settings.session.cookie.name

    async def session_data(self, context: BrowserContext) -> SessionData | None:
        """The session record of ``context``'s cookie, decrypted with the cookie's secret."""
        cookie = next(
            (c for c in await context.cookies(self.url) if c["name"] == self.cookie_name), None
        )
        if cookie is None or not cookie["value"]:
            return None
        secret = self.services.keyring.unsign(cookie["value"])
        assert secret is not None, "the session cookie does not verify with bff's keys"
        session = await self.services.sessions.load(SessionSecret(secret), fresh=True)
        return session.data if session is not None else None


async def _serve(app: web.Application, port: int) -> web.AppRunner:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner


@pytest.fixture
async def demo_api(oidc_op: OidcProvider) -> AsyncIterator[DemoApi]:
    app = create_api(oidc_op.issuer)
    port = free_port()
    runner = await _serve(app, port)
    try:
        yield DemoApi(url=f"http://127.0.0.1:{port}", stats=app[STATS])
    finally:
        await runner.cleanup()


@pytest.fixture
async def bff(
    oidc_op: OidcProvider, redis_server: RedisServer, demo_api: DemoApi
) -> AsyncIterator[Bff]:
    port = free_port()
    public = f"http://localhost:{port}"
    client = await oidc_op.register_client(
        redirect_uris=[f"{public}/bff/callback"],
        post_logout_redirect_uris=[f"{public}{SIGNED_OUT}"],
        scope="openid profile email offline_access",
    )
    settings = parse_settings(
        f"""
public_url: {public}
static: {STATIC}
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
keys: ["{"e2e-key-" * 6}"]
upstreams:
  - path: /api/demo
    url: {demo_api.url}
    token: user
  - path: /api/checked
    url: {demo_api.url}
    token: user
    methods: [GET, POST]
""",
        source="<e2e>",
    )
    # The defaults under test: __Host- prefix, Secure, SameSite=Strict.
    assert settings.session.cookie.name == "__Host-bff"
    assert settings.session.cookie.secure and settings.session.cookie.same_site == "strict"
    app = create_app(settings)
    runner = await _serve(app, port)
    try:
        await app[SERVICES].oidc.metadata()  # discovery done before the browser arrives
        yield Bff(url=public, settings=settings, services=app[SERVICES], op=oidc_op, api=demo_api)
    finally:
        await runner.cleanup()


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    if shutil.which(CHROMIUM) is None or shutil.which("node") is None:
        pytest.skip(f"{CHROMIUM} or node not installed")
    async with async_playwright() as pw:
        chromium = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            await chromium.close()


async def log_in(
    page: Page,
    bff: Bff,
    username: str,
    settle: Callable[[], Awaitable[None]] | None = None,
) -> None:
    """What a person does: open the app, click "Log in", fill the OP's form, come back.

    ``settle`` runs once the app's first ``/bff/user`` answer is complete, before the browser
    leaves the page (a recorder reads response bodies then; Chromium drops them on navigation).
    """
    async with page.expect_response(lambda r: r.url.endswith("/bff/user")) as first:
        await page.goto(f"{bff.url}/")
    await (await first.value).finished()
    if settle is not None:
        await settle()
    await expect(page.locator("#login")).to_be_visible()
    await page.click("#login")
    await page.wait_for_url(f"{bff.op.issuer}/**")
    await page.fill("#login", username)
    await page.fill("#password", PASSWORD)
    await page.click("#sign-in")
    await expect(page.locator("#logged-in")).to_be_visible(timeout=15_000)


def as_text(value: Any) -> str:
    return value if isinstance(value, str) else repr(value)
