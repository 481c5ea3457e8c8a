"""``POST /bff/backchannel-logout``: OpenID Connect Back-Channel Logout 1.0. (Issue 5.)"""

from __future__ import annotations

from aiohttp import web

from bff.errors import NotFound


async def handle(request: web.Request) -> web.Response:
    raise NotFound("back-channel logout is not implemented yet")
