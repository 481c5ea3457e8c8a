"""Start the whole demo in one process: the mock OP (a thread), the echo API and bff (asyncio).

The app is on ``http://localhost:PORT`` and the OP on ``http://127.0.0.1:PORT2``: two different
*sites* as far as the browser is concerned, as in production, so the SameSite=Strict session
cookie and the callback's landing page are exercised for real.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

from bff.app import create_app
from bff.config import Settings, parse_settings
from bff.server import listen
from demo.api import create_api
from demo.op import MockProvider

__all__ = ["DEMO_USER", "DemoOptions", "DemoUrls", "run_demo"]

ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"

# One-click users on the mock OP's login page; any other name typed there works too.
DEMO_USER = "alice"
USERS: dict[str, dict[str, object]] = {
    "alice": {"name": "Alice Example", "email": "alice@example.com", "email_verified": True},
    "bob": {"name": "Bob Example", "email": "bob@example.com", "email_verified": True},
}


@dataclass(frozen=True)
class DemoOptions:
    port: int = 8080  # the app (bff)
    op_port: int = 9400  # the OpenID Provider
    api_port: int = 8081  # the demo API, reached only through bff at /api/demo
    store: str = "memory://"  # or a redis:// URL
    access_ttl: int = 15  # seconds: short, so that the silent refresh shows

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> DemoOptions:
        """DEMO_PORT, DEMO_OP_PORT, DEMO_API_PORT, DEMO_ACCESS_TTL, REDIS_URL."""
        env = dict(os.environ if env is None else env)
        default = cls()

        def port(name: str, fallback: int) -> int:
            raw = env.get(name, "")
            if not raw:
                return fallback
            if not raw.isdigit() or not 0 < int(raw) < 65536:
                raise ValueError(f"{name} must be a TCP port number, got {raw!r}")
            return int(raw)

        return cls(
            port=port("DEMO_PORT", default.port),
            op_port=port("DEMO_OP_PORT", default.op_port),
            api_port=port("DEMO_API_PORT", default.api_port),
            store=env.get("REDIS_URL") or default.store,
            access_ttl=port("DEMO_ACCESS_TTL", default.access_ttl),
        )


@dataclass(frozen=True)
class DemoUrls:
    app: str
    op: str
    api: str
    store: str


def demo_settings(options: DemoOptions, issuer: str) -> Settings:
    """bff's configuration for the demo, as the YAML an operator would write."""
    key = secrets.token_urlsafe(32)  # fresh per run: a restart logs everyone out, fine for a demo
    return parse_settings(
        f"""
public_url: http://localhost:{options.port}
listen: {{host: {HOST}, port: {options.port}}}
static: {ROOT / "static"}
oidc:
  issuer: {issuer}
  client_id: bff-demo                # the mock OP accepts any client id and secret
  client_secret: demo-secret
  scopes: [openid, profile, email]
  refresh_skew: 2s                   # refresh 2 s before the access token expires
  post_logout_redirect: /signed-out
session:
  store: "{options.store}"
  # Plain-HTTP dev: a Secure cookie is not kept on http://localhost by every browser (Safari),
  # so the demo uses a non-prefixed, non-Secure name. Production keeps the default __Host-bff.
  cookie: {{name: bff-session, same_site: strict, secure: false}}
keys: ["{key}"]
upstreams:
  - path: /api/demo
    url: http://{HOST}:{options.api_port}
    token: user
log: {{level: info, format: text}}
""",
        source="<demo>",
    )


async def _site(app: web.Application, port: int) -> web.AppRunner:
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    try:
        await web.TCPSite(runner, HOST, port).start()
    except BaseException:
        await runner.cleanup()
        raise
    return runner


@contextlib.asynccontextmanager
async def run_demo(options: DemoOptions) -> AsyncIterator[DemoUrls]:
    """Everything started and listening inside the block; everything stopped after it."""
    with MockProvider(options.op_port, users=USERS, access_ttl=options.access_ttl) as op:
        api = await _site(create_api(op.issuer), options.api_port)
        try:
            settings = demo_settings(options, op.issuer)
            bff = await listen(create_app(settings), settings, HOST, options.port)
            try:
                yield DemoUrls(
                    app=settings.public_url,
                    op=op.issuer,
                    api=f"http://{HOST}:{options.api_port}",
                    store=options.store,
                )
            finally:
                await bff.cleanup()
        finally:
            await api.cleanup()
