"""``GET /bff/logout?sid=...``: end the session here and at the OP. (Issue 5 completes this.)"""

from __future__ import annotations

from aiohttp import web

from bff.errors import NotFound


async def handle(request: web.Request) -> web.Response:
    raise NotFound("logout is not implemented yet")
