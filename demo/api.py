"""The demo upstream API: it echoes who the bearer token it received belongs to.

bff attaches ``Authorization: Bearer <access token>`` to every call it proxies. This API checks
that token the way a real resource server may for an opaque token: it asks the OpenID Provider's
userinfo endpoint, which refuses expired or revoked tokens. So an answer with claims proves that
bff sent a live token, and after the token's short lifetime, that bff refreshed it.

The answer names the token only by a short fingerprint (a hash prefix), never the token itself.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web

__all__ = ["ApiStats", "create_api"]


@dataclass
class ApiStats:
    """What the API has seen, for tests: requests, and the Authorization values it got."""

    requests: int = 0
    with_token: int = 0
    paths: list[str] = field(default_factory=list)


STATS = web.AppKey("demo_api_stats", ApiStats)


def _error(status: int, error: str, description: str) -> web.Response:
    return web.json_response(
        {"error": error, "error_description": description},
        status=status,
        headers={"WWW-Authenticate": f'Bearer error="{error}"'} if status == 401 else None,
    )


def create_api(issuer: str) -> web.Application:
    """An aiohttp app answering every path; ``issuer`` is the OP whose userinfo checks tokens."""
    app = web.Application()
    app[STATS] = ApiStats()
    http_key = web.AppKey("demo_api_http", aiohttp.ClientSession)
    userinfo_url: list[str] = []  # discovered once

    async def http_ctx(app: web.Application) -> Any:
        app[http_key] = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))
        yield
        await app[http_key].close()

    app.cleanup_ctx.append(http_ctx)

    async def userinfo(token: str) -> tuple[int, dict[str, Any]]:
        http = app[http_key]
        if not userinfo_url:
            async with http.get(f"{issuer}/.well-known/openid-configuration") as resp:
                userinfo_url.append((await resp.json())["userinfo_endpoint"])
        async with http.get(userinfo_url[0], headers={"Authorization": f"Bearer {token}"}) as resp:
            body = await resp.json(content_type=None) if resp.status == 200 else {}
            return resp.status, body

    async def echo(request: web.Request) -> web.Response:
        stats = request.app[STATS]
        stats.requests += 1
        stats.paths.append(request.path)
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token:
            return _error(401, "invalid_request", "no bearer token")
        stats.with_token += 1
        try:
            status, claims = await userinfo(token)
        except (aiohttp.ClientError, TimeoutError, KeyError, ValueError):
            return _error(502, "bad_gateway", "the OpenID Provider did not answer")
        if status != 200:
            return _error(401, "invalid_token", "the OpenID Provider refused the token")
        name = claims.get("name") or claims.get("email") or claims.get("sub")
        return web.json_response(
            {
                "message": f"Hello, {name}! This answer comes from the demo API.",
                "method": request.method,
                "path": request.path,
                "claims": claims,
                "token_fingerprint": hashlib.sha256(token.encode()).hexdigest()[:8],
                "received_at": time.strftime("%H:%M:%S"),
            },
            headers={"Cache-Control": "no-store"},
        )

    app.router.add_route("*", "/{tail:.*}", echo)
    return app
